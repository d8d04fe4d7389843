"""CUDA mode only: every op's compiled kernel against its reference, forward and backward, in fp32,
bf16 and fp16, at the bench's toy shapes and at the reference shapes (ViT-B B=16 K=16, audio base
999 frames, text 512 tokens), where launch grids, autotuned configs and shared memory are the real ones.

The inputs come from the bench's own case setups (``d2v2.bench.kernels.collect_cases``: the benchmark
and this test cannot drift apart): the "triton" and "torch" providers of a case build identical inputs from one seed, so the
reference runs on exactly the values the kernel sees, in fp32 arithmetic inside.
"""

from __future__ import annotations

import pytest
import torch

from d2v2.bench import harness, kernels as bench, shapes
from d2v2.kernels import ema_
from d2v2.kernels.ema import ema_ref
from tests.helpers import TEST_DEVICE, assert_close, lowp_tolerance

pytestmark = pytest.mark.cuda

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPE_SETS = {"quick": shapes.QUICK_SHAPES, "reference": shapes.REFERENCE_SHAPES}
# The reference side is the same dtype as the kernel (both read the same rounded inputs); fp32 gets
# looser bounds than the unit tests because sums over thousands of terms (dx over clones, dweight,
# dslopes) are formed in different orders.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: lowp_tolerance(torch.bfloat16), torch.float16: (1e-2, 1e-2)}


def _cases():
    params = []
    for set_name, specs in SHAPE_SETS.items():
        for dtype in DTYPES:
            for case in bench.collect_cases(specs, dtype):
                if case.op == "ema_":  # in place, returns nothing: test_ema_at_vit_scale below
                    continue
                dtype_name = str(dtype).removeprefix("torch.")
                params.append(pytest.param(case, id=f"{set_name}-{case.op}-{case.shape}-{dtype_name}"))
    return params


def check_case(case: harness.Case, device: torch.device) -> None:
    """The case's "triton" provider against its "torch" provider: output, then every input gradient."""
    ours, ref = case.setup("triton", device), case.setup("torch", device)
    out, out_ref = ours.fn(), ref.fn()
    atol, rtol = TOLERANCE[case.dtype]
    if case.op == "scatter_tokens":  # the noise fill comes from two RNG streams by design
        check_scatter(out, out_ref, kept=ours.grad_inputs[0].shape[1])
    else:
        scale = max(1.0, out_ref.detach().float().abs().max().item())
        assert_close(out, out_ref, atol=atol * scale, rtol=rtol, name=f"{case.op} out")
    if "bwd" not in case.modes or not out.requires_grad:
        return
    grad = torch.randn_like(out_ref) if out_ref.dim() else None
    grads = torch.autograd.grad(out, ours.grad_inputs, grad)
    grads_ref = torch.autograd.grad(out_ref, ref.grad_inputs, grad)
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        scale = max(1.0, want.detach().float().abs().max().item())
        assert_close(got, want, atol=atol * scale, rtol=rtol, name=f"{case.op} grad of input {i}")


def check_scatter(out: torch.Tensor, out_ref: torch.Tensor, kept: int) -> None:
    """Kept rows copied bit for bit to the same positions (K per row); the rest noise of std ~0.01."""
    same = (out.detach().float() - out_ref.detach().float()).abs().amax(-1) == 0  # [R, N]
    assert (same.sum(1) == kept).all(), f"rows placed alike per clone: {same.sum(1).tolist()}, expected {kept}"
    spread = out.detach().float()[~same].std().item()
    assert 0.008 < spread < 0.012, f"noise std {spread:.4f}, expected about 0.01"


@pytest.mark.parametrize("case", _cases())
def test_kernel_matches_reference(case):
    check_case(case, torch.device(TEST_DEVICE))


# The image teachers of ViT-B and ViT-H (from the presets): the launch over ~0.6 G parameters is a known risk.
@pytest.mark.parametrize("size", ("base", "huge"))
@pytest.mark.parametrize("student_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_ema_at_vit_scale(student_dtype, size):
    # Every parameter of the ViT in one call (the real multi-tensor launch), fp32 teacher.
    params = shapes.ema_parameter_shapes("image", size)
    teacher = [torch.randn(s) * 0.02 for s in params]
    student = [(torch.randn(s) * 0.02).to(student_dtype) for s in params]
    expected = [t.clone() for t in teacher]
    ema_(teacher, student, 0.9998, impl="triton")
    ema_ref(expected, student, 0.9998)
    for i, (got, want) in enumerate(zip(teacher, expected)):
        if not torch.allclose(got, want, atol=1e-7, rtol=1e-6):  # on the device; the report copies to the host
            assert_close(got, want, atol=1e-7, rtol=1e-6, name=f"teacher[{i}] {tuple(got.shape)}")
