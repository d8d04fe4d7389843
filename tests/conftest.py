"""Suite-wide fixtures: interpreted Triton on CPU, and every RNG seeded before each test."""

import os
import random

# Triton reads this when a kernel is decorated, so it must be set before d2v2.kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
