"""Shared machinery of ``conv_block1d`` and ``conv_block2d``: argument checks, the PyTorch epilogue
of the references, and the Triton kernels, launchers and autograd Function. Private.

Both ops are one computation. A 1-D block over N positions with a kernel of k taps is the 2-D block
on a (1, N) grid with a (1, k) kernel, so everything below works on a grid (H, W) and a kernel
(KH, KW), and ``conv_block1d`` passes H = KH = 1.

For x [R, H*W, C] (channels-last), weight [C_out, C/G, KH, KW], bias [C_out] or None, G groups:

    y[r, p, o]   = b[o] + sum_{t, c} x[r, p + shift(t), g(o)*C/G + c] * w[o, c, t]   ("same" padding)
    yhat[r, p]   = (y[r, p] - mean_o y[r, p]) * rstd[r, p],  rstd = 1 / sqrt(var_o y[r, p] + 1e-5)
    out[r, p, o] = gelu(yhat[r, p, o]) + x[r, p, o]        (the residual only when it applies)

Forward, two launches:
  1. ``_conv_block_conv_kernel``: an implicit GEMM. One program computes BLOCK_M positions x
     BLOCK_O output channels of one group, with tl.dot steps over (tap, BLOCK_C in-channels of the
     group), loading x straight from the channels-last rows (zeros outside the grid = "same"
     padding). Writes y (pre-norm, input dtype). LayerNorm needs all C_out channels of a position,
     which one program of a grouped conv does not own, hence the second launch.
  2. ``_conv_block_norm_fwd_kernel``: LayerNorm + GELU + residual, BLOCK_R whole rows of C_out per
     program; writes out and the per-position LayerNorm statistics (mean, rstd; fp32).
Saved for backward: x, the weight in x's dtype, y (input dtype, as PyTorch's own conv -> layer_norm
chain saves it) and mean/rstd (fp32, 8 bytes per position); yhat is recomputed from them.

Backward, three launches and one sum:
  1. ``_conv_block_norm_bwd_kernel``: per row, dyhat = dout * gelu'(yhat) and the LayerNorm input
     gradient dy = rstd * (dyhat - mean(dyhat) - yhat * mean(dyhat * yhat)); writes dy (input dtype).
  2. dx = the transposed conv of dy plus dout (residual): the same conv kernel, run with the weight
     transposed per group and flipped in space (a transposed "same" conv with odd kernel and stride 1
     is a conv with the flipped kernel), and dout added in its epilogue.
  3. ``_conv_block_wgrad_kernel``: dw[g] = X_shifted^T @ dy[g] over all R*H*W positions, split into
     SPLIT chunks of positions; each program writes an fp32 partial sum (its slice of dw and, for the
     first reduction tile, of db) and the launcher sums the partials: deterministic, no atomics.

The tensor-core product runs in the input dtype (weight and bias are cast to x's dtype, as autocast
does) with fp32 accumulation; fp32 inputs use TF32 when torch.backends.cudnn.allow_tf32 is set (the
default, the same choice PyTorch makes for its own convolutions), exact fp32 otherwise.

Tiles: tl.dot needs every tile side >= 16, so channel tiles are powers of two >= 16, masked where a
group has fewer channels or is not a multiple of the tile (24 -> 32, 2 -> 16). The conv and weight-
gradient kernels autotune BLOCK_M, warps and the in-channel tile (padded full width, or an exact
narrower one: 48 channels as one masked 64 tile or three 16 tiles), keyed by the channel counts and
kernel size only, so a new sequence length does not retune. The candidates are untuned guesses: no
H100 measurement backs them yet.

Interpreter (TRITON_INTERPRET=1, triton 3.9): its tl.dot multiplies bf16 operands as raw uint16, so
interpreted bf16 tiles are upcast to fp32 first (DOT_IN_FP32; the same exact products the GPU's bf16
MMA accumulates in fp32), and its fp32 -> bf16 casts truncate instead of rounding to nearest, so
interpreted bf16 outputs can be off by one ulp where the GPU is off by half.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._utils import (
    block_settings,
    check_tensor,
    device_arch,
    ensure_contiguous,
    fit_shared_memory,
    tl,
    triton,
    triton_interpret,
)

LAYER_NORM_EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# Argument checks and the epilogue shared by both PyTorch references
# ----------------------------------------------------------------------------------------------


def check_conv_block_args(
    x: object, weight: object, bias: object, groups: object, residual: object, spatial_dims: int
) -> None:
    """Raise ValueError naming the bad argument unless the conv-block arguments are consistent.

    ``spatial_dims`` is 1 for conv_block1d (weight [C_out, C/groups, k]) and 2 for conv_block2d
    (weight [C_out, C/groups, kh, kw]).
    """
    check_tensor("x", x, ndim=3)
    check_tensor("weight", weight, ndim=2 + spatial_dims, device=x.device)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if not isinstance(residual, bool):
        raise ValueError(f"residual must be a bool, got {residual!r}")
    channels = x.shape[2]
    c_out, c_in_per_group = weight.shape[0], weight.shape[1]
    if channels % groups != 0:
        raise ValueError(f"x channels ({channels}) must be divisible by groups ({groups})")
    if c_out % groups != 0:
        raise ValueError(f"weight output channels ({c_out}) must be divisible by groups ({groups})")
    if c_in_per_group != channels // groups:
        raise ValueError(
            f"weight must have shape [C_out, C/groups = {channels // groups}, ...] for x with "
            f"C={channels} and groups={groups}, got {list(weight.shape)}"
        )
    kernel = tuple(weight.shape[2:])
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"weight kernel size must be odd (\"same\" padding k//2), got {list(kernel)}")
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(f"bias must have shape [{c_out}] (C_out), got {list(bias.shape)}")


def check_grid(grid: object, length: int) -> tuple[int, int]:
    """Return grid as (H, W), raising ValueError unless it is two positive ints with H*W == length."""
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 2
        or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)
    ):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    height, width = grid
    if height * width != length:
        raise ValueError(f"grid {height}x{width} = {height * width} positions must equal x.shape[1] = {length}")
    return height, width


def norm_gelu_residual_ref(y: torch.Tensor, x: torch.Tensor, residual: bool) -> torch.Tensor:
    """The block's epilogue in PyTorch: y [R, N, C_out] -> gelu(layer_norm(y)) (+ x)."""
    out = F.gelu(F.layer_norm(y, (y.shape[-1],), eps=LAYER_NORM_EPS))
    if residual and x.shape[-1] == y.shape[-1]:
        out = out + x
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


def _in_channel_tiles(c_in_per_group: int, widest: int) -> tuple[int, ...]:
    """Candidate in-channel tile widths (tl.dot needs >= 16): the group's channels in one padded
    power-of-two tile (up to ``widest``), plus, when that tile pads, the widest power of two in 16..64
    that divides them (48 channels: 64 padded, or 3 x 16 exact). The autotuner picks between them."""
    full = min(widest, max(16, triton.next_power_of_2(c_in_per_group)))
    exact = [b for b in (64, 32, 16) if b < full and c_in_per_group % b == 0]
    return (full, exact[0]) if c_in_per_group % full and exact else (full,)


def _out_channel_tile(c_out_per_group: int) -> int:
    return min(128, max(16, triton.next_power_of_2(c_out_per_group)))


def _conv_configs() -> list:
    """Autotune candidates of the conv-like kernels, pruned per call by ``_prune_in_channel_tiles``.

    Untuned guesses pending H100 measurements: 64/128-position tiles, 4 or 8 warps, 3 stages; plus,
    per in-channel width, one small-footprint config that always fits shared memory. In fp32 the
    widest tiles need more than the chip has (text decoder wgrad, 768 channels: 128 positions x (128
    in + 128 out) channels x 4 B x 3 stages = 384 KiB > 227 KiB on H100/H200); the autotuner prunes a
    config whose shared memory does not fit the device (``fit_shared_memory``, before launch), and the
    32-position, 2-stage one (64 KiB) is what remains.
    """
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_C": block_c}, num_warps=warps, num_stages=3)
        for block_m in (64, 128)
        for block_c in (16, 32, 64, 128)
        for warps in (4, 8)
    ] + [triton.Config({"BLOCK_M": 32, "BLOCK_C": block_c}, num_warps=4, num_stages=2) for block_c in (16, 32, 64, 128)]


def _smem_estimate(config, args) -> int:
    """Upper bound of a conv-like config's shared memory: num_stages deep of the [BLOCK_M, BLOCK_C]
    input tile and the [BLOCK_C or BLOCK_M, BLOCK_O] second operand (the weight, or dy for wgrad)."""
    m, c, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_C"], config.num_stages
    size = args["x_ptr"].element_size()
    return stages * (m * c + max(m, c) * args["BLOCK_O"]) * size


# Conv configs that spill in bf16 / fp16 on some architectures (``d2v2 bench compile``, Triton 3.9), dropped
# there: (compute capabilities [from, to), {(BLOCK_M, BLOCK_C, num_warps)}). sm_100: the 128 x 64 tile at
# 4 warps spills 8 / 8 B at 96 registers (the audio positional conv's input gradient, 48 channels per
# group, k = 19); at 8 warps that launch takes 55 registers without spills. sm_80: the 128 x 16 tile at
# 4 warps spills 4 / 4 B (the audio-large decoder's conv: 48 channels per group, k = 7).
_CONV_SPILLS_16_BIT = (((80, 90), {(128, 16, 4)}), ((100, 110), {(128, 64, 4)}))


def _prune_in_channel_tiles(widest: int, eight_warps_in_16_bit: bool = False, spills_16_bit=()):
    """The configs of the group's in-channel tile widths that fit the device's shared memory. With
    ``eight_warps_in_16_bit`` (the wgrad), bf16 / fp16 keep only 8-warp configs: at 4 warps the
    [BLOCK_C, BLOCK_O] fp32 accumulator and both staged operands spill (ptxas, sm_80 and sm_90, in
    64 x 64, 64 x 128, 128 x 16, 128 x 128 and 32 x 64 tiles; ``d2v2 bench compile``). In bf16 / fp16
    the (BLOCK_M, BLOCK_C, num_warps) that ``spills_16_bit`` lists for the device's architecture
    (``device_arch``) are dropped too."""

    def prune(configs, named_args, **kwargs):
        c_in_per_group = kwargs.get("C_IN_PER_GROUP", named_args.get("C_IN_PER_GROUP"))
        widths = _in_channel_tiles(c_in_per_group, widest)
        tiles = [c for c in configs if c.kwargs["BLOCK_C"] in widths]
        if eight_warps_in_16_bit and named_args["x_ptr"].element_size() == 2:
            tiles = [c for c in tiles if c.num_warps == 8] or tiles
        arch = device_arch()
        if arch is not None and named_args["x_ptr"].element_size() == 2:
            dropped = set().union(*(blocks for (lo, hi), blocks in spills_16_bit if lo <= arch < hi))
            tiles = [c for c in tiles if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_C"], c.num_warps) not in dropped] or tiles
        # then what does not fit the device's shared memory (fp32 wgrad at 128 x 128, see _conv_configs)
        return fit_shared_memory(tiles, _smem_estimate, named_args, kwargs)

    return {"early_config_prune": prune}


def _launch(kernel, grid, widest: int, c_in_per_group: int):
    """``kernel[grid]`` on a GPU; under TRITON_INTERPRET=1 the bare kernel with one fixed config.

    The interpreter must never benchmark: triton before 3.7 times even a single surviving config,
    which needs a GPU driver.
    """
    if not triton_interpret():
        return kernel[grid]
    fixed = {"BLOCK_M": 32, "BLOCK_C": _in_channel_tiles(c_in_per_group, widest)[0], "num_warps": 4, "num_stages": 1}
    return lambda *args, **kwargs: kernel.fn[grid](*args, **kwargs, **fixed)


# The widest in-channel tile each autotuned kernel may use.
_CONV_WIDEST, _WGRAD_WIDEST = 64, 128


@triton.autotune(
    configs=_conv_configs(),
    key=["C_IN_PER_GROUP", "C_OUT_PER_GROUP", "KH", "KW"],
    prune_configs_by=_prune_in_channel_tiles(widest=_CONV_WIDEST, spills_16_bit=_CONV_SPILLS_16_BIT),
)
@triton.jit
def _conv_block_conv_kernel(
    out_ptr, stride_om, stride_oc,  # [M, GROUPS * C_OUT_PER_GROUP] conv output (input dtype)
    x_ptr, stride_xm, stride_xc,  # [M, GROUPS * C_IN_PER_GROUP] channels-last input, M = R*H*W
    w_ptr, stride_wg, stride_wk, stride_wo,  # [GROUPS, KH*KW*C_IN_PER_GROUP, C_OUT_PER_GROUP] packed
    bias_ptr,  # [GROUPS * C_OUT_PER_GROUP], read when HAS_BIAS
    add_ptr, stride_am, stride_ac,  # [M, GROUPS * C_OUT_PER_GROUP], added when HAS_ADD
    M, H, W, GROUPS,
    C_IN_PER_GROUP: tl.constexpr,
    C_OUT_PER_GROUP: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ADD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """"Same" grouped conv as an implicit GEMM: BLOCK_M positions x BLOCK_O channels of one group.

    The reduction runs over (tap, BLOCK_C in-channels of the group) steps in one loop, so the
    compiler can pipeline it across taps: every tap reads the same channels-last rows shifted by
    dh*W + dw positions, with positions whose source falls outside the (H, W) grid masked to zero
    ("same" zero padding).
    """
    # Output-channel tiles of one group are neighbours in launch order, then the groups of one
    # position tile, so concurrently running programs read the same rows of x.
    NUM_C_TILES = (C_IN_PER_GROUP + BLOCK_C - 1) // BLOCK_C
    NUM_O_TILES = (C_OUT_PER_GROUP + BLOCK_O - 1) // BLOCK_O
    pid = tl.program_id(0)
    pid_o = pid % NUM_O_TILES
    group = (pid // NUM_O_TILES) % GROUPS
    pid_m = pid // (NUM_O_TILES * GROUPS)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] flat positions r*H*W + h*W + w
    m_mask = offs_m < M
    pos = offs_m % (H * W)
    h = pos // W
    w = pos % W
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # [BLOCK_O] channel within the group
    o_mask = offs_o < C_OUT_PER_GROUP

    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm + group * C_IN_PER_GROUP * stride_xc  # [BLOCK_M]
    w_group = w_ptr + group * stride_wg + offs_o * stride_wo  # [BLOCK_O]

    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for step in range(KH * KW * NUM_C_TILES):
        tap = step // NUM_C_TILES
        c = (step % NUM_C_TILES) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] in-channel within the group
        c_mask = c < C_IN_PER_GROUP
        dh = tap // KW - KH // 2
        dw = tap % KW - KW // 2
        src_ok = m_mask & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
        x_tap = x_rows + (dh * W + dw) * stride_xm
        a = tl.load(x_tap[:, None] + c[None, :] * stride_xc, mask=src_ok[:, None] & c_mask[None, :], other=0.0)
        b = tl.load(
            w_group[None, :] + (tap * C_IN_PER_GROUP + c)[:, None] * stride_wk,
            mask=c_mask[:, None] & o_mask[None, :],
            other=0.0,
        )
        if DOT_IN_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_O]

    channels = group * C_OUT_PER_GROUP + offs_o  # [BLOCK_O] absolute output channel
    mask = m_mask[:, None] & o_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channels, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_ADD:
        add = tl.load(add_ptr + offs_m.to(tl.int64)[:, None] * stride_am + channels[None, :] * stride_ac, mask=mask)
        acc += add.to(tl.float32)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + channels[None, :] * stride_oc
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_erf(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _conv_block_norm_fwd_kernel(
    out_ptr, stride_om,  # [M, C_OUT] block output (input dtype)
    mean_ptr, rstd_ptr,  # [M] LayerNorm statistics (fp32), saved for backward
    y_ptr, stride_ym,  # [M, C_OUT] conv output, pre-norm
    x_ptr, stride_xm,  # [M, C_OUT] block input, read when RESIDUAL
    M, C_OUT, eps,
    RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out = gelu(layer_norm(y)) (+ x) for BLOCK_R whole rows; channels are unit-stride."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < C_OUT)[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    y = tl.load(y_ptr + rows64 * stride_ym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(y, axis=1) / C_OUT
    centred = tl.where(mask, y - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / C_OUT + eps)
    out = _gelu_erf(centred * rstd[:, None])
    if RESIDUAL:
        out += tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64 * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _conv_block_norm_bwd_kernel(
    dy_ptr, stride_dym,  # [M, C_OUT] gradient of the conv output (input dtype)
    dout_ptr, stride_dom,  # [M, C_OUT] gradient of the block output
    y_ptr, stride_ym,  # [M, C_OUT] saved conv output, pre-norm
    mean_ptr, rstd_ptr,  # [M] saved LayerNorm statistics (fp32)
    M, C_OUT,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dy = rstd * (g - mean(g) - yhat * mean(g * yhat)) with g = dout * gelu'(yhat), per row.

    gelu'(z) = Phi(z) + z * phi(z) for the erf GELU; the bracket is LayerNorm's input gradient
    without affine parameters.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < C_OUT)[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    y = tl.load(y_ptr + rows64 * stride_ym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + rows64 * stride_dom + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)

    yhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
    cdf = 0.5 * (1.0 + tl.math.erf(yhat * 0.7071067811865476))
    pdf = tl.exp(-0.5 * yhat * yhat) * 0.3989422804014327  # 1 / sqrt(2 pi)
    g = dout * (cdf + yhat * pdf)  # zero outside the mask since dout is
    mean_g = tl.sum(g, axis=1) / C_OUT
    mean_g_yhat = tl.sum(g * yhat, axis=1) / C_OUT
    dy = (g - mean_g[:, None] - yhat * mean_g_yhat[:, None]) * rstd[:, None]
    tl.store(dy_ptr + rows64 * stride_dym + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mask)


# Wider in-channel tiles than the conv (up to 128): dy is re-read once per (tap, in-channel tile).
@triton.autotune(
    configs=_conv_configs(),
    key=["C_IN_PER_GROUP", "C_OUT_PER_GROUP", "KH", "KW"],
    prune_configs_by=_prune_in_channel_tiles(widest=_WGRAD_WIDEST, eight_warps_in_16_bit=True),
)
@triton.jit
def _conv_block_wgrad_kernel(
    dw_ptr, stride_dws, stride_dwg, stride_dwk, stride_dwo,  # [SPLIT, GROUPS, KH*KW*C_IN_PER_GROUP, C_OUT_PER_GROUP]
    db_ptr, stride_dbs,  # [SPLIT, GROUPS * C_OUT_PER_GROUP] fp32, written when HAS_BIAS
    x_ptr, stride_xm, stride_xc,  # [M, GROUPS * C_IN_PER_GROUP] block input
    dy_ptr, stride_dym, stride_dyc,  # [M, GROUPS * C_OUT_PER_GROUP] gradient of the conv output
    M, H, W, POSITIONS_PER_SPLIT,
    C_IN_PER_GROUP: tl.constexpr,
    C_OUT_PER_GROUP: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Partial weight (and bias) gradient of one tap x BLOCK_C in-channels x BLOCK_O out-channels
    of one group, summed over one split of the positions: dw[t, c, o] += x[p + shift(t), c]^T dy[p, o].

    Program axes: 0 = (tap, in-channel tile, out-channel tile), 1 = group, 2 = split.
    """
    NUM_C_TILES = (C_IN_PER_GROUP + BLOCK_C - 1) // BLOCK_C
    NUM_O_TILES = (C_OUT_PER_GROUP + BLOCK_O - 1) // BLOCK_O
    pid = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    pid_o = pid % NUM_O_TILES
    pid_c = (pid // NUM_O_TILES) % NUM_C_TILES
    tap = pid // (NUM_O_TILES * NUM_C_TILES)
    dh = tap // KW - KH // 2
    dw = tap % KW - KW // 2

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] in-channel within the group
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # [BLOCK_O] out-channel within the group
    c_mask = offs_c < C_IN_PER_GROUP
    o_mask = offs_o < C_OUT_PER_GROUP
    x_cols = x_ptr + (group * C_IN_PER_GROUP + offs_c) * stride_xc  # [BLOCK_C]
    dy_cols = dy_ptr + (group * C_OUT_PER_GROUP + offs_o) * stride_dyc  # [BLOCK_O]
    # The bias gradient is the column sum of dy: the tiles of tap 0, first in-channel tile add it up.
    sums_bias = pid < NUM_O_TILES

    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    start = split * POSITIONS_PER_SPLIT
    end = tl.minimum(start + POSITIONS_PER_SPLIT, M)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] flat positions
        m_mask = offs_m < end
        pos = offs_m % (H * W)
        h = pos // W
        w = pos % W
        src_ok = m_mask & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
        src = (offs_m + dh * W + dw).to(tl.int64) * stride_xm  # [BLOCK_M]
        x_t = tl.load(x_cols[:, None] + src[None, :], mask=c_mask[:, None] & src_ok[None, :], other=0.0)
        dy = tl.load(
            dy_cols[None, :] + offs_m.to(tl.int64)[:, None] * stride_dym,
            mask=m_mask[:, None] & o_mask[None, :],
            other=0.0,
        )
        if DOT_IN_FP32:
            x_t, dy = x_t.to(tl.float32), dy.to(tl.float32)
        acc = tl.dot(x_t, dy, acc, input_precision=INPUT_PRECISION)  # [BLOCK_C, BLOCK_O]
        if HAS_BIAS:  # constexpr, then a runtime test: kept apart for the JIT
            if sums_bias:
                db_acc += tl.sum(dy.to(tl.float32), axis=0)

    k_rows = tap * C_IN_PER_GROUP + offs_c  # [BLOCK_C] row of the packed weight
    dw_tile = dw_ptr + split * stride_dws + group * stride_dwg
    tl.store(
        dw_tile + k_rows[:, None] * stride_dwk + offs_o[None, :] * stride_dwo,
        acc,
        mask=c_mask[:, None] & o_mask[None, :],
    )
    if HAS_BIAS:
        if sums_bias:
            tl.store(db_ptr + split * stride_dbs + group * C_OUT_PER_GROUP + offs_o, db_acc, mask=o_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


# The shared-memory bound the device filter uses, read by ``trace_launches`` for the compile bench.
_conv_block_conv_kernel.smem_estimate = _smem_estimate
_conv_block_wgrad_kernel.smem_estimate = _smem_estimate


def _pack_weight(weight: torch.Tensor, groups: int, transpose: bool) -> torch.Tensor:
    """[C_out, C/G, KH, KW] -> the conv kernel's [G, KH*KW*c_in, c_out] layout (rows = tap, channel).

    transpose=True packs the weight of the input-gradient conv: in and out channels of each group
    swapped and the kernel flipped in space (dx = conv(dy, flipped w^T) for odd "same" kernels).
    """
    c_out, c_in_per_group, kh, kw = weight.shape
    w = weight.view(groups, c_out // groups, c_in_per_group, kh, kw)  # [G, o, c, kh, kw]
    if transpose:
        w = w.flip(3, 4).permute(0, 3, 4, 1, 2)  # [G, kh, kw, o, c]
    else:
        w = w.permute(0, 3, 4, 2, 1)  # [G, kh, kw, c, o]
    return w.reshape(groups, kh * kw * w.shape[3], w.shape[4]).contiguous()


def _dot_settings(dtype: torch.dtype) -> dict:
    """INPUT_PRECISION and DOT_IN_FP32 for tiles of ``dtype``.

    TF32 for fp32 exactly when PyTorch's own convolutions would use it (ignored for bf16/fp16).
    Triton's interpreter multiplies bf16 dot operands as their raw uint16 storage (triton 3.9,
    ``interpreter.py: create_dot``), so interpreted bf16 tiles are upcast first: the same products,
    each exact in fp32, as the GPU's bf16 MMA with fp32 accumulation.
    """
    return {
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32",
        "DOT_IN_FP32": dtype == torch.bfloat16 and triton_interpret(),
    }


def _conv(x2d: torch.Tensor, packed: torch.Tensor, bias, add, grid_hw, kernel_hw, out_channels: int):
    """Grouped "same" conv of flat channels-last rows x2d [M, C] with a packed weight -> [M, out_channels]."""
    m, channels = x2d.shape
    groups = packed.shape[0]
    (height, width), (kh, kw) = grid_hw, kernel_hw
    c_out_per_group = out_channels // groups
    block_o = _out_channel_tile(c_out_per_group)
    out = torch.empty((m, out_channels), device=x2d.device, dtype=x2d.dtype)
    num_o_tiles = triton.cdiv(c_out_per_group, block_o)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * groups * num_o_tiles,)

    _launch(_conv_block_conv_kernel, grid, _CONV_WIDEST, channels // groups)(
        out, out.stride(0), out.stride(1),
        x2d, x2d.stride(0), x2d.stride(1),
        packed, packed.stride(0), packed.stride(1), packed.stride(2),
        bias if bias is not None else x2d,
        add if add is not None else x2d, *(add.stride() if add is not None else (0, 0)),
        m, height, width, groups,
        C_IN_PER_GROUP=channels // groups, C_OUT_PER_GROUP=c_out_per_group, KH=kh, KW=kw,
        HAS_BIAS=bias is not None, HAS_ADD=add is not None,
        BLOCK_O=block_o, **_dot_settings(x2d.dtype),
    )  # fmt: skip
    return out


def _row_settings(c_out: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for the LayerNorm row kernels: whole rows, ~4K elements a program."""
    block_c, num_warps = block_settings(c_out)
    return max(1, min(16, 4096 // block_c)), block_c, num_warps


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the partial sums are exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def _conv_block_fwd(x, weight, bias, groups, grid_hw, residual):
    """Forward of the block on contiguous x [R, H*W, C]; returns (out, y, mean, rstd, weight in x's dtype)."""
    rows, length, channels = x.shape
    c_out, _, kh, kw = weight.shape
    m = rows * length
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    x2d = x.view(m, channels)
    y = _conv(x2d, _pack_weight(weight, groups, transpose=False), bias, None, grid_hw, (kh, kw), c_out)

    out = torch.empty_like(y)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_r, block_c, num_warps = _row_settings(c_out)
    _conv_block_norm_fwd_kernel[(triton.cdiv(m, block_r),)](
        out, out.stride(0), mean, rstd, y, y.stride(0), x2d, x2d.stride(0),
        m, c_out, LAYER_NORM_EPS,
        RESIDUAL=residual and channels == c_out, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return out.view(rows, length, c_out), y, mean, rstd, weight


def _conv_block_bwd(dout, x, weight, y, mean, rstd, groups, grid_hw, residual, need_dx, need_dw, need_db):
    """Backward of the block; weight is the saved one (x's dtype). Returns (dx, dw fp32, db fp32)."""
    rows, length, channels = x.shape
    c_out, c_in_per_group, kh, kw = weight.shape
    m = rows * length
    dout2d = dout.view(m, c_out)
    dy = torch.empty_like(y)
    block_r, block_c, num_warps = _row_settings(c_out)
    _conv_block_norm_bwd_kernel[(triton.cdiv(m, block_r),)](
        dy, dy.stride(0), dout2d, dout2d.stride(0), y, y.stride(0), mean, rstd,
        m, c_out, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip

    dx = dw = db = None
    if need_dx:
        packed_t = _pack_weight(weight, groups, transpose=True)
        add = dout2d if residual and channels == c_out else None
        dx = _conv(dy, packed_t, None, add, grid_hw, (kh, kw), channels).view(rows, length, channels)

    if need_dw or need_db:
        c_out_per_group = c_out // groups
        block_o = _out_channel_tile(c_out_per_group)
        num_o_tiles = triton.cdiv(c_out_per_group, block_o)
        widest_tiles = kh * kw * triton.cdiv(c_in_per_group, _in_channel_tiles(c_in_per_group, 128)[0]) * num_o_tiles
        # Enough position splits for ~8 programs per SM, each still running several BLOCK_M steps;
        # splits are multiples of 128 positions, so of every autotuned BLOCK_M.
        splits = max(1, min(triton.cdiv(8 * _num_sms(x.device), widest_tiles * groups), triton.cdiv(m, 512)))
        per_split = triton.cdiv(triton.cdiv(m, splits), 128) * 128
        splits = triton.cdiv(m, per_split)
        dw_parts = torch.empty((splits, groups, kh * kw * c_in_per_group, c_out_per_group),
                               device=x.device, dtype=torch.float32)  # fmt: skip
        db_parts = torch.empty((splits, c_out), device=x.device, dtype=torch.float32) if need_db else dw_parts
        x2d = x.view(m, channels)

        def grid(meta):
            return (kh * kw * triton.cdiv(c_in_per_group, meta["BLOCK_C"]) * num_o_tiles, groups, splits)

        _launch(_conv_block_wgrad_kernel, grid, _WGRAD_WIDEST, c_in_per_group)(
            dw_parts, *dw_parts.stride(), db_parts, db_parts.stride(0),
            x2d, x2d.stride(0), x2d.stride(1), dy, dy.stride(0), dy.stride(1),
            m, grid_hw[0], grid_hw[1], per_split,
            C_IN_PER_GROUP=c_in_per_group, C_OUT_PER_GROUP=c_out_per_group, KH=kh, KW=kw,
            HAS_BIAS=need_db, BLOCK_O=block_o, **_dot_settings(x.dtype),
        )  # fmt: skip
        packed = dw_parts.sum(0).view(groups, kh, kw, c_in_per_group, c_out_per_group)
        dw = packed.permute(0, 4, 3, 1, 2).reshape(c_out, c_in_per_group, kh, kw)
        db = db_parts.sum(0) if need_db else None
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class ConvBlockFunction(torch.autograd.Function):
    """Conv -> LayerNorm -> GELU (+ x) on x [R, H*W, C] with weight [C_out, C/G, KH, KW] on grid (H, W)."""

    @staticmethod
    @ensure_contiguous
    def forward(ctx, x, weight, bias, groups, grid_hw, residual):
        if x.numel() == 0:  # no positions: nothing to launch
            ctx.empty = True
            ctx.save_for_backward(x, weight, bias)
            return x.new_zeros(x.shape[0], x.shape[1], weight.shape[0])
        ctx.empty = False
        out, y, mean, rstd, weight_cast = _conv_block_fwd(x, weight, bias, groups, grid_hw, residual)
        ctx.save_for_backward(x, weight_cast, y, mean, rstd)
        ctx.groups, ctx.grid_hw, ctx.residual = groups, grid_hw, residual
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @ensure_contiguous
    def backward(ctx, dout):
        if ctx.empty:
            x, weight, bias = ctx.saved_tensors
            dbias = None if bias is None else torch.zeros_like(bias)
            return torch.zeros_like(x), torch.zeros_like(weight), dbias, None, None, None
        x, weight, y, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = _conv_block_bwd(
            dout, x, weight, y, mean, rstd, ctx.groups, ctx.grid_hw, ctx.residual, need_dx, need_dw, need_db
        )
        dw = None if dw is None or not need_dw else dw.to(ctx.weight_dtype)
        db = None if db is None else db.to(ctx.bias_dtype)
        return dx, dw, db, None, None, None
