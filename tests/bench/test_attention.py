"""bench/attention.py: the student's attention shapes from the specs and the encoder's own ALiBi slopes."""

from __future__ import annotations

import pytest
import torch

from d2v2.bench import attention
from d2v2.bench.shapes import QUICK_SHAPES, REFERENCE_SHAPES
from d2v2.models import alibi_slopes
from tests.bench.helpers import CPU


def test_reference_attention_shapes():
    shapes = {n: attention.shape_from_spec(s) for n, s in REFERENCE_SHAPES.items()}
    assert (shapes["vit-b"].rows, shapes["vit-b"].length, shapes["vit-b"].alibi) == (256, 40, False)  # + CLS
    assert (shapes["audio-base"].rows, shapes["audio-base"].length, shapes["audio-base"].alibi_length) == (24, 500, 999)
    assert (shapes["text-base"].rows, shapes["text-base"].length) == (32, 266)
    assert all((s.heads, s.head_dim) == (12, 64) for s in shapes.values())
    assert attention.attention_flops(shapes["text-base"])["full"] == 3.5 * 4 * 32 * 12 * 266**2 * 64


def test_alibi_workload_uses_the_encoders_slopes():
    shape = attention.shape_from_spec(QUICK_SHAPES["audio-base"])
    work = attention.setup_attention(shape, "torch", CPU, torch.float32)
    qkv, slopes = work.grad_inputs
    assert torch.equal(slopes.detach(), alibi_slopes(shape.heads))
    assert work.fn().shape == (shape.rows, shape.heads, shape.length, shape.head_dim)
    with pytest.raises(ValueError, match="provider must be one of"):
        attention.setup_attention(shape, "sdpa", CPU, torch.float32)  # plain SDPA has no ALiBi
