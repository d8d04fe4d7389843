"""bench/conv_block.py: bytes and FLOP formulas; 2-D needs a patch grid."""

from __future__ import annotations

import pytest
import torch

from d2v2.bench import conv_block
from d2v2.bench.shapes import QUICK_SHAPES
from tests.bench.helpers import CPU


def test_bytes_and_flops_2d():
    spec = QUICK_SHAPES["vit-b"]
    r, n, c, g, taps = spec.rows, spec.length, spec.dec_dim, spec.dec_groups, spec.dec_kernel**2
    work = conv_block.setup_conv_block2d(spec, "torch", CPU, torch.float32)
    assert work.flops["fwd"] == 2 * r * n * c * (c // g) * taps
    assert work.flops["full"] == 3 * work.flops["fwd"]
    weights = (c * (c // g) * taps + c) * 4
    assert work.bytes["fwd"] == 2 * r * n * c * 4 + weights


def test_cases_pick_the_dimension_and_2d_needs_a_grid():
    cases = conv_block.bench_cases(QUICK_SHAPES, torch.float32)
    assert [c.op for c in cases] == ["conv_block2d", "conv_block1d", "conv_block1d"]
    with pytest.raises(ValueError, match="grid"):
        conv_block.setup_conv_block2d(QUICK_SHAPES["audio-base"], "torch", CPU, torch.float32)
