"""bench/harness.py: percentiles, speedups, the timer's gradient reset, provider checks, case selection."""

from __future__ import annotations

import pytest
import torch

from d2v2.bench import harness
from d2v2.kernels.gather_tokens import gather_tokens, gather_tokens_ref
from tests.bench.helpers import CPU


def test_percentiles_match_torch_quantile():
    samples = torch.rand(101, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.quantile(samples, torch.tensor(harness.QUANTILES, dtype=torch.float64))
    assert harness.percentiles(samples.tolist(), harness.QUANTILES) == pytest.approx(expected.tolist())
    with pytest.raises(ValueError, match="quantiles"):
        harness.percentiles(samples.tolist(), [1.5])
    with pytest.raises(ValueError, match="empty"):
        harness.percentiles([], harness.QUANTILES)


def test_speedups_within_groups():
    rows = [
        {"op": "a", "provider": "torch", "median_ms": 4.0},
        {"op": "a", "provider": "triton", "median_ms": 1.0},
        {"op": "b", "provider": "triton", "median_ms": 1.0},  # no baseline in its group
    ]
    harness.speedups(rows, group_keys=("op",), label_key="provider", baseline="torch")
    assert [r["speedup_vs_torch"] for r in rows] == [1.0, 4.0, None]


def test_timer_resets_gradients_outside_the_timed_call():
    x = torch.ones(3, requires_grad=True)
    calls = []

    def step():
        assert x.grad is None
        (x * 3).sum().backward()
        calls.append(1)

    timing = harness.measure(step, CPU, warmup_ms=0.1, rep_ms=0.1, grad_to_none=(x,))
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms and len(calls) >= 3 + 2


def test_provider_and_name_checks():
    with pytest.raises(ValueError, match="provider must be one of"):
        harness.op_provider(gather_tokens, gather_tokens_ref, "sdpa", CPU)
    assert harness.op_provider(gather_tokens, gather_tokens_ref, "torch", CPU).__name__ == "gather_tokens_ref"
    with pytest.raises(ValueError, match="dtype must be one of"):
        harness.dtype_from_name("int8")
    assert harness.dtype_name(torch.bfloat16) == "bf16" and harness.dtype_name(torch.float64) == "float64"


def test_ids_keep_are_sorted_distinct_positions():
    ids = harness.ids_keep(5, 17, 6, CPU, harness.generator(CPU))
    assert ids.shape == (5, 6) and (ids.diff(dim=1) > 0).all() and ids.max() < 17


def test_compiled_backward_can_be_timed_repeatedly():
    # "bwd" repeats backward(retain_graph=True) on one forward graph; the compile provider's graph of
    # masked_regression_loss used to refuse the second call (AOTAutograd's donated buffers).
    from d2v2.bench import masked_regression_loss
    from d2v2.bench.shapes import QUICK_SHAPES

    case = masked_regression_loss.bench_cases({"vit-b": QUICK_SHAPES["vit-b"]}, torch.float32)[0]
    backward = harness.mode_fn(case.setup("compile", torch.device("cpu")), "bwd")
    for _ in range(3):
        backward()
