"""The suite's CUDA mode (tests/conftest.py) collects and skips cleanly on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_mode_without_a_gpu_skips_every_test():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"D2V2_TEST_DEVICE": "cuda"}
    files = ["tests/kernels/test_ema.py", "tests/kernels/test_reference_shapes.py", "tests/engine/test_cuda.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *files],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = run.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary and "error" not in summary
    assert "D2V2_TEST_DEVICE=cuda but no CUDA device is visible" in run.stdout


def test_cuda_mode_refuses_the_interpreter():
    env = dict(os.environ, D2V2_TEST_DEVICE="cuda", TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "tests/kernels/test_ema.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0 and "unset TRITON_INTERPRET" in run.stdout + run.stderr
