"""bench/scatter_tokens.py: the bytes-moved formula."""

from __future__ import annotations

import torch

from d2v2.bench import scatter_tokens
from d2v2.bench.shapes import QUICK_SHAPES
from tests.bench.helpers import CPU


def test_bytes():
    spec = QUICK_SHAPES["vit-b"]
    r, k, n, d = spec.rows, spec.kept, spec.length, spec.dim
    work = scatter_tokens.setup_scatter_tokens(spec, "torch", CPU, torch.bfloat16)
    assert work.bytes["fwd"] == r * k * d * 2 + r * k * 8 + r * n * d * 2
    assert work.bytes["bwd"] == r * k * 8 + 2 * r * k * d * 2
    assert work.fn().shape == (r, n, d)
