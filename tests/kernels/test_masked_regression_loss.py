"""masked_regression_loss: interpreted Triton kernels against the reference, the reference against plain math."""

import pytest
import torch

from d2v2.kernels.masked_regression_loss import masked_regression_loss, masked_regression_loss_ref
from tests.helpers import assert_close, lowp_tolerance


def _inputs(rows, length, dim, clones, *, pred_dtype=torch.float32, target_grad=False, mask_ratio=0.6):
    pred = torch.randn(rows, length, dim).to(pred_dtype).requires_grad_()
    target = torch.randn(rows // clones, length, dim).requires_grad_(target_grad)
    mask = torch.rand(rows, length) < mask_ratio
    mask[0, 0] = True  # at least one masked position
    return pred, target, mask


def _plain_loss(pred, target, mask, clones, scale, beta):
    """Dense, independent formulation: repeat the targets, weight every position by its mask."""
    diff = pred.double() - target.double().repeat_interleave(clones, dim=0)
    if beta == 0:
        per_element = diff**2
    else:
        per_element = torch.where(diff.abs() < beta, 0.5 * diff**2 / beta, diff.abs() - 0.5 * beta)
    per_position = per_element.sum(-1) * scale
    return (per_position * mask).sum() / mask.sum()


def _grads(loss, pred, target):
    inputs = [pred, target] if target.requires_grad else [pred]
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize(
    "clones, beta",
    [(1, 0.0), (3, 0.0), (2, 0.75)],
    ids=["clones1-square", "clones3-square", "clones2-smoothl1"],
)
def test_ref_matches_plain_math(clones, beta):
    pred, target, mask = _inputs(6, 7, 10, clones, target_grad=True)
    scale = 10**-0.5
    loss = masked_regression_loss_ref(pred, target, mask, clones, beta=beta)
    plain = _plain_loss(pred, target, mask, clones, scale, beta)
    assert_close(loss, plain.float(), atol=1e-5, rtol=1e-5, name="loss")
    for name, got, want in zip(["grad pred", "grad target"], _grads(loss, pred, target), _grads(plain, pred, target)):
        assert_close(got, want.float(), atol=1e-6, rtol=1e-5, name=name)


# (rows, length, dim, clones): the awkward cases the kernels must tile correctly.
SHAPES = {
    "D24-odd-N-clones1": (4, 7, 24, 1),  # D not a power of two, odd length
    "D128-even-clones3": (6, 5, 128, 3),  # D a whole number of 128-wide slices (EVEN_D)
    "D200-N33-clones2": (4, 33, 200, 2),  # ragged last D slice, several position blocks
    "N1-D1": (2, 1, 1, 2),  # one position, one feature
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("beta", [0.0, 0.75], ids=["square", "smoothl1"])
@pytest.mark.parametrize("target_grad", [False, True], ids=["target-nograd", "target-grad"])
def test_triton_matches_ref_fp32(shape, beta, target_grad):
    rows, length, dim, clones = shape
    pred, target, mask = _inputs(rows, length, dim, clones, target_grad=target_grad)
    loss = masked_regression_loss(pred, target, mask, clones, beta=beta, impl="triton")
    expected = masked_regression_loss_ref(pred, target, mask, clones, beta=beta)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, expected, atol=1e-5, rtol=1e-5, name="loss")
    grads, expected_grads = _grads(loss, pred, target), _grads(expected, pred, target)
    for name, got, want in zip(["grad pred", "grad target"], grads, expected_grads):
        assert_close(got, want, atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("pred_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("beta", [0.0, 0.75], ids=["square", "smoothl1"])
def test_triton_lowp_pred_against_fp32_ref(pred_dtype, beta):
    # The usual case: a bf16 decoder output against fp32 targets, judged against the fp32 reference.
    pred, target, mask = _inputs(4, 9, 48, 2, pred_dtype=pred_dtype, target_grad=True)
    pred32 = pred.detach().float().requires_grad_()
    loss = masked_regression_loss(pred, target, mask, 2, beta=beta, impl="triton")
    expected = masked_regression_loss_ref(pred32, target, mask, 2, beta=beta)
    atol, rtol = lowp_tolerance(pred_dtype)
    assert_close(loss, expected, atol=1e-5, rtol=1e-5, name="loss")  # the inputs are the same values
    grad_pred, grad_target = _grads(loss, pred, target)
    want_pred, want_target = _grads(expected, pred32, target)
    assert grad_pred.dtype == pred_dtype and grad_target.dtype == torch.float32
    assert_close(grad_pred, want_pred, atol=atol * want_pred.abs().max().item(), rtol=rtol, name="grad pred")
    assert_close(grad_target, want_target, atol=atol * want_target.abs().max().item(), rtol=rtol, name="grad target")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_explicit_scale(impl):
    pred, target, mask = _inputs(2, 6, 12, 1)
    loss = masked_regression_loss(pred, target, mask, scale=1.0, impl=impl)
    plain = _plain_loss(pred, target, mask, 1, 1.0, 0.0)
    assert_close(loss, plain.float(), atol=1e-5, rtol=1e-5, name="loss")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_masked_position_gives_zero_loss_and_zero_grads(impl):
    pred, target, _ = _inputs(4, 5, 8, 2, target_grad=True)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    loss = masked_regression_loss(pred, target, mask, 2, impl=impl)
    assert loss.item() == 0.0
    for grad in _grads(loss, pred, target):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_unmasked_positions_are_never_read():
    # NaNs at unmasked positions must not leak into the loss or the gradients.
    pred, target, mask = _inputs(4, 6, 16, 2)
    with torch.no_grad():
        pred[~mask] = float("nan")
    loss = masked_regression_loss(pred, target, mask, 2, impl="triton")
    (grad_pred,) = _grads(loss, pred, target)
    assert torch.isfinite(loss) and torch.isfinite(grad_pred).all()
    assert torch.equal(grad_pred[~mask], torch.zeros_like(grad_pred[~mask]))


def test_noncontiguous_inputs():
    pred, target, mask = _inputs(4, 6, 10, 2)
    pred_t = pred.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # strided view
    loss = masked_regression_loss(pred_t, target, mask, 2, impl="triton")
    expected = masked_regression_loss_ref(pred, target, mask, 2)
    assert_close(loss, expected, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(_grads(loss, pred_t, target)[0], _grads(expected, pred, target)[0], atol=1e-6, rtol=1e-5)


def _good():
    return torch.randn(4, 5, 6), torch.randn(2, 5, 6), torch.ones(4, 5, dtype=torch.bool)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p, t, m: dict(pred=p[0]), "pred must be 3-D"),
        (lambda p, t, m: dict(pred=p.double()), "pred must have dtype"),
        (lambda p, t, m: dict(target=t[:1]), r"target must have shape \[2, 5, 6\], got \[1, 5, 6\]"),
        (lambda p, t, m: dict(target=t.to("meta")), "target must be on cpu"),
        (lambda p, t, m: dict(mask=m[:, :4]), r"mask must have shape \[4, 5\], got \[4, 4\]"),
        (lambda p, t, m: dict(mask=m.float()), "mask must have dtype"),
        (lambda p, t, m: dict(clones=3), r"multiple of clones \(3\)"),
        (lambda p, t, m: dict(clones=0), "clones must be an int >= 1"),
        (lambda p, t, m: dict(clones=2.0), "clones must be an int >= 1"),
        (lambda p, t, m: dict(pred=p[..., :0], target=t[..., :0]), "D >= 1"),
        (lambda p, t, m: dict(beta=-1.0), "beta must be >= 0"),
        (lambda p, t, m: dict(scale=float("nan")), "scale must be a finite Python number"),
        (lambda p, t, m: dict(scale=torch.tensor(1.0)), "scale must be a finite Python number"),
        (lambda p, t, m: dict(impl="cuda"), "impl must be one of"),
    ],
    ids=[
        "pred-2d", "pred-fp64", "target-shape", "target-device", "mask-shape", "mask-float", "rows-vs-clones",
        "clones-zero", "clones-float", "d-zero", "beta-negative", "scale-nan", "scale-tensor", "impl",
    ],
)
def test_bad_arguments_raise(change, match):
    pred, target, mask = _good()
    kwargs = dict(pred=pred, target=target, mask=mask, clones=2, impl="triton")
    kwargs.update(change(pred, target, mask))
    with pytest.raises(ValueError, match=match):
        masked_regression_loss(**kwargs)
