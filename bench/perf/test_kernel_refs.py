"""The CPU path of every kernel: each op's PyTorch reference (``<op>_ref``, the "torch" provider of the
kernel bench) at the bench's quick shapes, forward + backward where training differentiates it.

The inputs are the kernel bench's own case setups (``d2v2.bench.kernels.collect_cases``), so this target,
``d2v2 bench kernels`` and the CUDA reference-shape tests time and check the same workloads.
"""

from __future__ import annotations

import pytest
import torch

from d2v2.bench import harness, kernels, shapes

CPU = torch.device("cpu")
CASES = {
    f"{c.op}-{c.shape}-{harness.dtype_name(c.dtype)}": c
    for c in kernels.collect_cases(shapes.QUICK_SHAPES, torch.float32)
    if "torch" in c.providers
}


@pytest.mark.parametrize("name", CASES)
def test_reference(benchmark, name):
    case = CASES[name]
    mode = "full" if "full" in case.modes else "fwd"  # the training path: forward and backward
    work = case.setup("torch", CPU)
    fn = harness.mode_fn(work, mode)

    def step():
        for t in work.grad_inputs:
            t.grad = None
        fn()

    benchmark.extra_info.update(op=case.op, shape=case.shape, dims=case.dims, mode=mode)
    benchmark(step)
