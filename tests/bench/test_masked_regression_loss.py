"""bench/masked_regression_loss.py: the bytes-moved formula."""

from __future__ import annotations

import dataclasses

import torch

from d2v2.bench import masked_regression_loss
from d2v2.bench.shapes import QUICK_SHAPES
from tests.bench.helpers import CPU


def test_bytes_with_nothing_kept():
    # Every (row, position) is masked: every target row is read once for its M clones.
    spec = dataclasses.replace(QUICK_SHAPES["vit-b"], kept=0)
    b, n, d, r = spec.batch, spec.length, spec.dim, spec.rows
    work = masked_regression_loss.setup_masked_regression_loss(spec, "torch", CPU, torch.bfloat16)
    assert work.bytes["fwd"] == r * n + r * n * d * 2 + b * n * d * 4
    assert work.bytes["bwd"] == work.bytes["fwd"] + r * n * d * 2
    assert work.fn().dim() == 0
