"""Assertion helpers and the test device, shared by the test suite."""

from __future__ import annotations

import os

import torch

TEST_DEVICE = os.environ.get("D2V2_TEST_DEVICE", "cpu")
"""The suite's mode (see tests/conftest.py): "cpu" (interpreted kernels) or "cuda" (compiled kernels)."""
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"D2V2_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "tensor"):
    """torch.allclose with a report of the worst and first mismatching indices on failure."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()
        err = (a - e).abs()
        worst = torch.nonzero(err == err[bad].max())[0].tolist()
        first = [tuple(i) for i in idx[:5].tolist()]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs error {err[bad].max().item():.3e} at {worst}; first at {first}: "
            f"{[(a[i].item(), e[i].item()) for i in first]}"
        )


def lowp_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing an op's output in ``dtype`` against its fp32 reference."""
    return {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}[dtype]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``d2v2 <argv>``: it must exit 2 with one line on stderr and no traceback; returns that line."""
    from d2v2.engine.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err
