"""bench/layer_targets.py: the bytes-moved formula, the norms from the preset, apex only with a final LayerNorm."""

from __future__ import annotations

import pytest
import torch

from d2v2.bench import layer_targets
from d2v2.bench.shapes import QUICK_SHAPES
from tests.bench.helpers import CPU


def test_bytes_and_norms():
    spec = QUICK_SHAPES["vit-b"]
    b, n, d = spec.batch, spec.length, spec.dim
    work = layer_targets.setup_layer_targets(spec, "torch", CPU, torch.bfloat16)
    assert work.bytes == {"fwd": spec.target_layers * b * n * d * 2 + b * n * d * 4}
    assert work.fn().dtype == torch.float32
    [case] = layer_targets.bench_cases({"vit-b": spec}, torch.float32)
    assert case.dims.endswith("instance->avg->layer") and "apex" in case.providers


def test_no_apex_without_a_final_layer_norm():
    with pytest.raises(ValueError, match="provider must be one of"):
        layer_targets.setup_layer_targets(QUICK_SHAPES["audio-base"], "apex", CPU, torch.float32)
