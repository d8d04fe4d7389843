"""The pytest-benchmark target (``bench/perf``): never part of the test suite.

It lives outside ``tests/`` so that ``pytest tests`` (CI) never collects it, and every benchmark here
is skipped unless pytest-benchmark is asked to run benchmarks only, so that a bare ``pytest`` from the
repository root does not spend minutes timing. How to run it and compare against the committed
baseline: see ``bench/perf/README.md``.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="a benchmark: run with `pytest bench/perf --benchmark-only`")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded_single_thread():
    """Every benchmark from the same seed on one thread (set OMP_NUM_THREADS=1 too, before Python
    starts): the figures are per core, and a shared machine's other load touches them less."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
