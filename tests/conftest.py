"""Suite-wide fixtures: the test device, interpreted Triton on CPU, and every RNG seeded before each test.

``D2V2_TEST_DEVICE`` picks the mode (``tests.helpers.TEST_DEVICE``):

- ``cpu`` (default): the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors;
  every test runs except those marked ``cuda``.
- ``cuda``: the compiled kernels on CUDA tensors (TRITON_INTERPRET must be unset). What runs: the kernel
  tests (``tests/kernels``, less the CPU-specific ones in ``CPU_ONLY``), the models' kernel-path tests
  (``CUDA_MODEL_TESTS``) and the tests marked ``cuda`` (reference shapes, fp16, the engine's bf16 steps);
  every other test is skipped, saying why. Inside the kernel and model tests torch's default device is
  the GPU, so their own ``torch.randn(...)`` make CUDA tensors with no edit to the tests. Without a visible GPU
  every test is skipped: the mode collects and skips cleanly on a CPU machine.
"""

import os
import random
import sys
from pathlib import Path

# d2v2 is imported as installed, never from the repository root: there, the top-level folders kernels/,
# models/, engine/ and bench/ would shadow installed distributions of the same names (transformers imports
# Hugging Face's `kernels`). .pytest.ini's importlib mode adds nothing to sys.path; `python -m pytest`
# has put the working directory first, so it goes, and so for every Python the tests start (PYTHONSAFEPATH,
# Python 3.11+: `python -m` and `python -c` then leave the working directory off sys.path).
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or os.curdir).resolve() != REPO_ROOT]
os.environ["PYTHONSAFEPATH"] = "1"

from tests.helpers import TEST_DEVICE  # noqa: E402

# Triton reads this when a kernel is decorated, so it must be set before d2v2.kernels is imported.
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Kernel tests that check CPU-specific behaviour (argument errors naming "cpu", impl="auto" on CPU,
# the interpreter switch) or that build a CPU torch.Generator for the op: skipped in CUDA mode.
CPU_ONLY = (
    "test_ref_", "test_reference_matches", "test_auto_on_cpu", "bad_argument", "test_rejects_bad_arguments",
    "test_bad_impl_raises", "test_explicit_triton_without_gpu", "test_noise_is_fresh_per_call_and_reproducible",
    "test_scatter_tokens.py::test_many_tiles_per_row",
)  # fmt: skip
# Model tests that compare the kernel path with the PyTorch path: they run in CUDA mode too.
CUDA_MODEL_TESTS = ("tests/models/test_data2vec2.py::test_triton_path_matches_torch_path_on_a_micro_model",)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs only with D2V2_TEST_DEVICE=cuda (compiled kernels on a GPU)")
    if TEST_DEVICE == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise pytest.UsageError("D2V2_TEST_DEVICE=cuda tests the compiled kernels: unset TRITON_INTERPRET")


def _runs_on_cuda(item) -> bool:
    if item.get_closest_marker("cuda"):
        return True
    nodeid = item.nodeid.split("[")[0]
    if nodeid.startswith("tests/kernels/"):
        return not any(pattern in nodeid for pattern in CPU_ONLY)
    return nodeid in CUDA_MODEL_TESTS


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE == "cpu":
        skip = pytest.mark.skip(reason="CUDA mode only (D2V2_TEST_DEVICE=cuda)")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip)
        return
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="D2V2_TEST_DEVICE=cuda but no CUDA device is visible")
        for item in items:
            item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="CPU-mode test (D2V2_TEST_DEVICE=cpu)")
    for item in items:
        if not _runs_on_cuda(item):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def default_device(request):
    """The test device as torch's default device for the kernel and model tests' own tensor factories.
    (Engine tests name their devices: the data pipeline must keep making CPU tensors to pin.)"""
    if TEST_DEVICE == "cuda" and not request.node.nodeid.startswith("tests/engine/"):
        with torch.device("cuda"):
            yield torch.device("cuda")
    else:
        yield torch.device("cpu")


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)  # every CUDA device's generator too
    yield
