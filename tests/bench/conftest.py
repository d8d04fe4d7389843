"""The bench tests run on one OpenMP thread each."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # Tiny ops on a shared, loaded CPU: with several OpenMP threads a busy peer core turns a 0.1 ms
    # convolution into 100 ms of spin-waiting. One thread keeps these tests fast and steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
