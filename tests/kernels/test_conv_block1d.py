"""conv_block1d: the reference against plain math, the Triton kernels (interpreted) against the
reference, forward and every gradient, and each argument check."""

import math

import pytest
import torch

from d2v2.kernels.conv_block1d import conv_block1d, conv_block1d_ref
from tests.helpers import assert_close, lowp_tolerance


def plain_block1d(x, weight, bias, groups, residual):
    """Independent math: explicit zero padding, one einsum per tap per group, LayerNorm and erf GELU
    written out."""
    rows, length, channels = x.shape
    c_out, c_in_per_group, taps = weight.shape
    pad = taps // 2
    zeros = x.new_zeros(rows, pad, channels)
    padded = torch.cat([zeros, x, zeros], dim=1).view(rows, length + 2 * pad, groups, c_in_per_group)
    w = weight.view(groups, c_out // groups, c_in_per_group, taps)
    y = sum(torch.einsum("rngc,goc->rngo", padded[:, t : t + length], w[..., t]) for t in range(taps))
    y = y.reshape(rows, length, c_out)
    if bias is not None:
        y = y + bias
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    z = (y - mean) / torch.sqrt(var + 1e-5)
    out = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    return out + x if residual and channels == c_out else out


def make_inputs(rows, length, channels, c_out, groups, taps, with_bias, dtype=torch.float32):
    x = torch.randn(rows, length, channels)
    weight = torch.randn(c_out, channels // groups, taps) / math.sqrt(channels // groups * taps)
    bias = torch.randn(c_out) if with_bias else None
    dout = torch.randn(rows, length, c_out)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), dout.to(dtype)


def forward_backward(fn, x, weight, bias, dout, *args, **kwargs):
    """(out, dx, dweight, dbias) of fn at fresh leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = fn(*leaves, *args, **kwargs)
    out.backward(dout)
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


GRAD_NAMES = ("out", "dx", "dweight", "dbias")

# (rows, length, C, C_out, groups, taps, residual, bias)
CASES = {
    # residual block, odd length, two samples inside one position tile
    "k3-g2-residual": (2, 9, 32, 32, 2, 3, True, True),
    # audio-style first block: C_out != C so no residual even though residual=True; 12 out-channels
    # per group (< 16, padded tile)
    "k7-32to24-skips-residual": (2, 9, 32, 24, 2, 7, True, True),
    # text-style: groups 1, no residual, no bias, a sequence shorter than the kernel
    "k9-g1-short-no-bias": (2, 5, 32, 32, 1, 9, False, False),
    # 16 groups of 3 channels: C not a power of two, channel tiles mostly padding
    "k5-g16-tiny-groups": (2, 7, 48, 48, 16, 5, True, True),
    # 600 positions: many position tiles and two position splits of the weight gradient
    "k3-many-positions": (3, 200, 16, 16, 1, 3, True, True),
}


@pytest.mark.parametrize("case", ["k3-g2-residual", "k7-32to24-skips-residual", "k9-g1-short-no-bias"])
def test_reference_matches_plain_math(case):
    *shape, residual, with_bias = CASES[case]
    groups = shape[4]
    x, weight, bias, dout = (t.double() if t is not None else None for t in make_inputs(*shape, with_bias))
    ref = forward_backward(conv_block1d_ref, x, weight, bias, dout, groups, residual)
    plain = forward_backward(plain_block1d, x, weight, bias, dout, groups, residual)
    for name, a, e in zip(GRAD_NAMES, ref, plain):
        if e is not None:
            assert_close(a, e, atol=1e-10, rtol=1e-10, name=name)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_fp32(case):
    *shape, residual, with_bias = CASES[case]
    groups = shape[4]
    x, weight, bias, dout = make_inputs(*shape, with_bias)
    got = forward_backward(conv_block1d, x, weight, bias, dout, groups, residual, impl="triton")
    want = forward_backward(conv_block1d_ref, x, weight, bias, dout, groups, residual)
    for name, a, e in zip(GRAD_NAMES, got, want):
        assert (a is None) == (e is None), name
        if e is not None:
            assert_close(a, e, atol=1e-4, rtol=1e-4, name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_against_fp32(dtype):
    """Judged like flash-attn: the error against the fp32 reference may be at most about twice
    PyTorch's own error in the same precision."""
    x, weight, bias, dout = make_inputs(2, 33, 32, 32, 2, 7, True, dtype)
    got = forward_backward(conv_block1d, x, weight, bias, dout, 2, True, impl="triton")
    lowp = forward_backward(conv_block1d_ref, x, weight, bias, dout, 2, True)
    want = forward_backward(conv_block1d_ref, *(t.float() for t in (x, weight, bias, dout)), 2, True)
    atol, _ = lowp_tolerance(dtype)
    for name, a, p, e in zip(GRAD_NAMES, got, lowp, want):
        assert a.dtype == dtype, name
        ours, torchs = (a.float() - e).abs().max().item(), (p.float() - e).abs().max().item()
        assert ours <= 2 * torchs + atol, f"{name}: error {ours:.3e} vs PyTorch {dtype} {torchs:.3e}"


def test_fp32_parameters_with_bf16_input():
    """As under autocast: the parameters are cast to x's dtype; their grads keep their own dtype."""
    x, weight, bias, dout = make_inputs(2, 9, 32, 32, 2, 3, True)
    got = forward_backward(conv_block1d, x.bfloat16(), weight, bias, dout.bfloat16(), 2, impl="triton")
    want = forward_backward(conv_block1d_ref, x.bfloat16(), weight, bias, dout.bfloat16(), 2)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    atol, rtol = lowp_tolerance(torch.bfloat16)
    for name, a, e in zip(GRAD_NAMES, got, want):
        assert_close(a, e, atol=4 * atol, rtol=rtol, name=name)


def test_frozen_weight_and_strided_input():
    """x a non-contiguous view; weight frozen and no bias: only x gets a gradient."""
    x = torch.randn(9, 2, 32).transpose(0, 1).requires_grad_()  # [2, 9, 32], strided
    weight = torch.randn(32, 16, 3) / 7
    out = conv_block1d(x, weight, None, 2, impl="triton")
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    x_ref = x.detach().clone().requires_grad_()
    out_ref = conv_block1d_ref(x_ref, weight, None, 2)
    (dx_ref,) = torch.autograd.grad(out_ref, x_ref, torch.ones_like(out_ref))
    assert_close(out, out_ref, atol=1e-5, rtol=1e-5, name="out")
    assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5, name="dx")


def test_no_rows():
    x = torch.randn(0, 9, 32, requires_grad=True)
    weight = torch.randn(32, 16, 3, requires_grad=True)
    out = conv_block1d(x, weight, None, 2, impl="triton")
    assert out.shape == (0, 9, 32)
    out.sum().backward()
    assert weight.grad is not None and not weight.grad.any()


def test_auto_on_cpu_runs_the_reference():
    x, weight, bias, _ = make_inputs(2, 9, 32, 24, 2, 7, True)
    assert torch.equal(conv_block1d(x, weight, bias, 2), conv_block1d_ref(x, weight, bias, 2))


X = torch.randn(2, 9, 32)
W = torch.randn(32, 16, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": X[0]}, "x must be 3-D"),
        ({"x": X.long()}, "x must have dtype"),
        ({"weight": W.unsqueeze(2)}, "weight must be 3-D"),
        ({"weight": W.double()}, "weight must have dtype"),
        ({"weight": W.to("meta")}, "weight must be on cpu"),
        ({"weight": torch.randn(32, 8, 3)}, r"weight must have shape \[C_out, C/groups = 16"),
        ({"weight": torch.randn(32, 16, 4)}, "kernel size must be odd"),
        ({"groups": 3, "weight": torch.randn(33, 10, 3)}, r"x channels \(32\) must be divisible by groups \(3\)"),
        ({"groups": 4, "weight": torch.randn(30, 8, 3)}, r"weight output channels \(30\)"),
        ({"groups": 0}, "groups must be a positive int"),
        ({"groups": 2.0}, "groups must be a positive int"),
        ({"bias": torch.randn(31)}, r"bias must have shape \[32\]"),
        ({"bias": torch.randn(1, 32)}, "bias must be 1-D"),
        ({"residual": 1}, "residual must be a bool"),
        ({"impl": "cuda"}, "impl must be one of"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    args = {"x": X, "weight": W, "bias": None, "groups": 2, "residual": True, "impl": "auto"} | kwargs
    with pytest.raises(ValueError, match=match):
        conv_block1d(**args)
