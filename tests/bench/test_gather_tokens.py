"""bench/gather_tokens.py: the bytes-moved formula and the provider check."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from d2v2.bench import gather_tokens
from d2v2.bench.shapes import QUICK_SHAPES
from tests.bench.helpers import CPU


def test_bytes_with_every_position_kept():
    spec = dataclasses.replace(QUICK_SHAPES["vit-b"], kept=QUICK_SHAPES["vit-b"].length)  # fp32 features and pos
    b, n, d, r = spec.batch, spec.length, spec.dim, spec.rows
    work = gather_tokens.setup_gather_tokens(spec, "torch", CPU, torch.float32)
    ids = r * n * 8  # every x row and every pos row is read, the output has R*N rows
    assert work.bytes["fwd"] == ids + b * n * d * 4 + n * d * 4 + r * n * d * 4
    assert work.bytes["bwd"] == ids + r * n * d * 4 + b * n * d * 4
    assert work.bytes["full"] == work.bytes["fwd"] + work.bytes["bwd"]
    assert work.fn().shape == (r, n, d)


def test_rejects_providers_that_do_not_apply():
    for provider in ("nope", "apex"):  # apex has no gather
        with pytest.raises(ValueError, match="provider must be one of"):
            gather_tokens.setup_gather_tokens(QUICK_SHAPES["vit-b"], provider, CPU, torch.float32)
