"""bench/ema.py: the teacher's tensor list from the preset, the bytes formula, fp32 and mixed students."""

from __future__ import annotations

import math

import torch

from d2v2.bench import ema
from d2v2.bench.shapes import QUICK_SHAPES, ema_parameter_shapes
from tests.bench.helpers import CPU


def test_bytes_and_cases():
    spec = QUICK_SHAPES["vit-b"]  # the image-tiny teacher
    numel = sum(math.prod(s) for s in ema_parameter_shapes("image", spec.size))
    assert ema.setup_ema(spec, "torch", CPU, torch.float32).bytes == {"fwd": numel * 12}
    assert ema.setup_ema(spec, "torch", CPU, torch.bfloat16).bytes == {"fwd": numel * (8 + 2)}
    cases = ema.bench_cases(QUICK_SHAPES, torch.float32)  # image specs only
    assert [(c.shape, c.dtype) for c in cases] == [("vit-b", torch.float32), ("vit-b", torch.bfloat16)]
