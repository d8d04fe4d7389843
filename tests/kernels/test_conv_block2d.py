"""conv_block2d: the reference against plain math, the Triton kernels (interpreted) against the
reference, forward and every gradient, determinism, and each argument check."""

import math

import pytest
import torch

from d2v2.kernels.conv_block2d import conv_block2d, conv_block2d_ref
from tests.helpers import assert_close, lowp_tolerance


def plain_block2d(x, weight, bias, groups, grid, residual):
    """Independent math on the (H, W) grid: explicit zero padding, one einsum per tap per group,
    LayerNorm and erf GELU written out."""
    rows, _, channels = x.shape
    height, width = grid
    c_out, c_in_per_group, kh, kw = weight.shape
    image = x.view(rows, height, width, channels)
    padded = x.new_zeros(rows, height + kh - 1, width + kw - 1, channels)
    padded[:, kh // 2 : kh // 2 + height, kw // 2 : kw // 2 + width] = image
    padded = padded.view(*padded.shape[:3], groups, c_in_per_group)
    w = weight.view(groups, c_out // groups, c_in_per_group, kh, kw)
    y = sum(
        torch.einsum("rhwgc,goc->rhwgo", padded[:, i : i + height, j : j + width], w[..., i, j])
        for i in range(kh)
        for j in range(kw)
    )
    y = y.reshape(rows, height * width, c_out)
    if bias is not None:
        y = y + bias
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    z = (y - mean) / torch.sqrt(var + 1e-5)
    out = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    return out + x if residual and channels == c_out else out


def make_inputs(rows, grid, channels, c_out, groups, kernel, with_bias, dtype=torch.float32):
    fan_in = channels // groups * kernel[0] * kernel[1]
    x = torch.randn(rows, grid[0] * grid[1], channels)
    weight = torch.randn(c_out, channels // groups, *kernel) / math.sqrt(fan_in)
    bias = torch.randn(c_out) if with_bias else None
    dout = torch.randn(rows, grid[0] * grid[1], c_out)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), dout.to(dtype)


def forward_backward(fn, x, weight, bias, dout, *args, **kwargs):
    """(out, dx, dweight, dbias) of fn at fresh leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = fn(*leaves, *args, **kwargs)
    out.backward(dout)
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


GRAD_NAMES = ("out", "dx", "dweight", "dbias")

# (rows, grid, C, C_out, groups, kernel, residual, bias)
CASES = {
    # residual block on a grid with H != W
    "k3-g2-3x5-residual": (2, (3, 5), 32, 32, 2, (3, 3), True, True),
    # a kernel wider than the grid's short side; C_out != C, so no residual; no bias
    "k5-g1-32to16-no-bias": (2, (3, 5), 32, 16, 1, (5, 5), True, False),
    # 16 groups of 2 channels (padded channel tiles) with a rectangular odd kernel
    "k1x3-g16-tiny-groups": (2, (4, 3), 32, 32, 16, (1, 3), True, True),
}


@pytest.mark.parametrize("case", ["k3-g2-3x5-residual", "k5-g1-32to16-no-bias"])
def test_reference_matches_plain_math(case):
    *shape, residual, with_bias = CASES[case]
    grid, groups = shape[1], shape[4]
    x, weight, bias, dout = (t.double() if t is not None else None for t in make_inputs(*shape, with_bias))
    ref = forward_backward(conv_block2d_ref, x, weight, bias, dout, groups, grid, residual)
    plain = forward_backward(plain_block2d, x, weight, bias, dout, groups, grid, residual)
    for name, a, e in zip(GRAD_NAMES, ref, plain):
        if e is not None:
            assert_close(a, e, atol=1e-10, rtol=1e-10, name=name)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_fp32(case):
    *shape, residual, with_bias = CASES[case]
    grid, groups = shape[1], shape[4]
    x, weight, bias, dout = make_inputs(*shape, with_bias)
    got = forward_backward(conv_block2d, x, weight, bias, dout, groups, grid, residual, impl="triton")
    want = forward_backward(conv_block2d_ref, x, weight, bias, dout, groups, grid, residual)
    for name, a, e in zip(GRAD_NAMES, got, want):
        assert (a is None) == (e is None), name
        if e is not None:
            assert_close(a, e, atol=1e-4, rtol=1e-4, name=name)


def test_triton_bf16_against_fp32():
    """Judged like flash-attn: the error against the fp32 reference may be at most about twice
    PyTorch's own bf16 error."""
    dtype = torch.bfloat16
    x, weight, bias, dout = make_inputs(2, (5, 5), 32, 32, 2, (3, 3), True, dtype)
    got = forward_backward(conv_block2d, x, weight, bias, dout, 2, (5, 5), impl="triton")
    lowp = forward_backward(conv_block2d_ref, x, weight, bias, dout, 2, (5, 5))
    want = forward_backward(conv_block2d_ref, *(t.float() for t in (x, weight, bias, dout)), 2, (5, 5))
    atol, _ = lowp_tolerance(dtype)
    for name, a, p, e in zip(GRAD_NAMES, got, lowp, want):
        assert a.dtype == dtype, name
        ours, torchs = (a.float() - e).abs().max().item(), (p.float() - e).abs().max().item()
        assert ours <= 2 * torchs + atol, f"{name}: error {ours:.3e} vs PyTorch bf16 {torchs:.3e}"


def test_many_positions_deterministic():
    """An images-base-like 14x14 grid, 588 positions: many position tiles and two position splits
    of the weight gradient, whose fp32 partial sums the launcher reduces (no atomics), so two runs
    agree bit for bit."""
    x, weight, bias, dout = make_inputs(3, (14, 14), 16, 16, 1, (3, 3), True)
    first = forward_backward(conv_block2d, x, weight, bias, dout, 1, (14, 14), impl="triton")
    second = forward_backward(conv_block2d, x, weight, bias, dout, 1, (14, 14), impl="triton")
    want = forward_backward(conv_block2d_ref, x, weight, bias, dout, 1, (14, 14))
    for name, a, b, e in zip(GRAD_NAMES, first, second, want):
        assert torch.equal(a, b), name
        assert_close(a, e, atol=1e-4, rtol=1e-4, name=name)


def test_auto_on_cpu_runs_the_reference():
    x, weight, bias, _ = make_inputs(2, (3, 5), 32, 16, 1, (5, 5), True)
    assert torch.equal(conv_block2d(x, weight, bias, 1, (3, 5)), conv_block2d_ref(x, weight, bias, 1, (3, 5)))


X = torch.randn(2, 15, 32)
W = torch.randn(32, 16, 3, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": X.view(2, 3, 5, 32)}, "x must be 3-D"),
        ({"x": X.half().to(torch.int16)}, "x must have dtype"),
        ({"weight": W[..., 0]}, "weight must be 4-D"),
        ({"weight": W.to("meta")}, "weight must be on cpu"),
        ({"weight": torch.randn(32, 32, 3, 3)}, r"weight must have shape \[C_out, C/groups = 16"),
        ({"weight": torch.randn(32, 16, 3, 2)}, "kernel size must be odd"),
        ({"groups": 5, "weight": torch.randn(30, 6, 3, 3)}, r"x channels \(32\) must be divisible by groups \(5\)"),
        ({"groups": 4, "weight": torch.randn(30, 8, 3, 3)}, r"weight output channels \(30\)"),
        ({"bias": torch.randn(16)}, r"bias must have shape \[32\]"),
        ({"bias": torch.randn(32).to(torch.int32)}, "bias must have dtype"),
        ({"grid": (5, 5)}, r"grid 5x5 = 25 positions must equal x.shape\[1\] = 15"),
        ({"grid": (15,)}, "grid must be a pair of positive ints"),
        ({"grid": (-3, -5)}, "grid must be a pair of positive ints"),
        ({"grid": (3.0, 5)}, "grid must be a pair of positive ints"),
        ({"residual": None}, "residual must be a bool"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    args = {"x": X, "weight": W, "bias": None, "groups": 2, "grid": (3, 5), "residual": True} | kwargs
    with pytest.raises(ValueError, match=match):
        conv_block2d(**args)
