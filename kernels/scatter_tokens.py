"""scatter_tokens: put the kept tokens back at their positions and fill the masked ones, in one pass.

Contract
    scatter_tokens(y, ids_keep, length, fill="noise", noise_std=0.01, generator=None, impl="auto") -> out

    y         [R, K, D]          fp32 / bf16 / fp16: the encoder outputs of the kept tokens
    ids_keep  [R, K]             int32 / int64: kept positions of each row, in [0, length), no duplicates
    length    int >= K           the full sequence length N
    out       [R, length, D]     dtype of y

        out[r, ids_keep[r, j]] = y[r, j]
        out[r, n] = fill value for every position n not in ids_keep[r]:
            fill="noise"   fresh N(0, noise_std^2) draws, new ones on every call (data2vec 2.0's decoder
                           input: the masked tokens are noise vectors, not a learned mask embedding)
            fill="zero"    0
            fill=tensor    a vector [D] (e.g. a learned mask token), broadcast to every filled position

    The value is computed in fp32 and rounded once to y's dtype.

Gradients
    dy[r, j]  = dout[r, ids_keep[r, j]]                      (the gather at ids_keep)
    dfill     = sum of dout over every filled (r, n)         (only for fill=tensor requiring grad),
                reduced as fp32 partial sums per (row, chunk of positions) that the launcher sums:
                deterministic, no atomics.

Random numbers
    fill="noise" draws one 32-bit seed per call from ``generator`` (or torch's default generator of
    y's device) as a device tensor, so no host sync is needed. The Triton kernel then generates the
    noise in-kernel with Philox and Box-Muller (``tl.randn4x``'s stream up to rounding, see ``_randn4x``:
    key = (seed, row), one counter per position and group of four channels), so the fill is one pass
    over the output. The PyTorch reference draws ``torch.randn`` from the same generator instead. The
    two streams are different: Triton and torch outputs agree exactly at the kept positions and only
    in distribution at the filled ones. Each implementation is reproducible: the
    same generator state gives the same output, and the generator advances, so each call is fresh.

References
    data2vec 2.0: Baevski et al., "Efficient Self-supervised Learning with Contextualized Target
    Representations for Vision, Speech and Language", ICML 2023. Reference code: fairseq
    ``examples/data2vec/models/data2vec2.py`` (``Data2VecMultiModel.forward``: decoder input built
    from the kept encoder outputs and ``mask_noise_std`` noise, un-shuffled with ``ids_restore``).

Limits
    - Duplicate positions within one ids_keep row are undefined behaviour (which duplicate lands in
      the output is unspecified; dy is still the plain gather).
    - ids_keep is checked for shape, dtype, device and range [0, length); the range check is one host
      sync, skipped with ``check_ids=False`` by callers whose ids are valid by construction (e.g.
      made by ``d2v2.models.layers.masking.mask_to_ids``): an out-of-range id then faults the kernel.
    - D up to 65536; length * D < 2**31 on the Triton path (the in-kernel noise counter is 32-bit).
    - The Triton noise stream depends on the seed, the row, the position and next_power_of_2(D), not on
      the tile shape; it is not the stream torch.randn would give, and the interpreter's float maths
      may differ from a GPU's in the last bits.
    - The Triton path makes non-contiguous inputs contiguous (one copy) before launch.
"""

from __future__ import annotations

import math

import torch

from ._utils import (
    INDEX_DTYPES,
    check_index_range,
    check_shape,
    check_tensor,
    ensure_contiguous,
    inverse_ids,
    resolve_impl,
    row_tile_settings,
    tl,
    triton,
)

FILL_MODES = ("noise", "zero")

# A tile holds TILE_ELEMENTS values: a few token rows of one full D-row each (see gather_tokens).
TILE_ELEMENTS = 4096
# Positions per program in the fill-gradient pass: few enough partial rows to sum (R * ceil(N / 128)
# rows of D fp32), enough programs to fill an H100 (ViT-B: 256 rows x 2 chunks).
FILL_GRAD_CHUNK = 128


def scatter_tokens_ref(
    y: torch.Tensor,
    ids_keep: torch.Tensor,
    length: int,
    fill: str | torch.Tensor = "noise",
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PyTorch reference (the impl="torch" path and the test oracle); differentiable through autograd."""
    rows, kept, dim = y.shape
    if isinstance(fill, torch.Tensor):
        base = fill.float().expand(rows, length, dim)
    elif fill == "noise":
        base = torch.randn((rows, length, dim), generator=generator, device=y.device) * noise_std
    else:
        base = torch.zeros((rows, length, dim), device=y.device)
    index = ids_keep.long()[:, :, None].expand(rows, kept, dim)
    return base.scatter(1, index, y.float()).to(y.dtype)


@triton.jit
def _sincos_2pi(u):
    """(sin(2 pi u), cos(2 pi u)) in fp32 for u in [0, 1), within 4e-7 of the exact values.

    The angle is reduced exactly to the nearest quarter turn (u - q / 4 in [-1/8, 1/8]), where the
    degree-7 and degree-8 Taylor polynomials of sin and cos suffice, and the quadrant q rotates the pair.
    tl.sin / tl.cos (libdevice's sinf / cosf) carry a Payne-Hanek reduction for arguments past 1e5 that
    is never taken here but compiled in, with a local array: with it the bf16 noise fill spilled
    8 / 8 B at 64 registers on sm_80 (D = 768, 8 warps) and 4 / 4 B on sm_90 (D = 1280, 8 warps).
    Without it the kernel compiles to 40 registers there and spills nowhere (``d2v2 bench compile``)."""
    q = tl.floor(u * 4.0 + 0.5)  # nearest quarter turn, 0 .. 4
    x = (u - q * 0.25) * 6.283185307179586  # in [-pi / 4, pi / 4]
    x2 = x * x
    s = x * (1.0 + x2 * (-1.0 / 6.0 + x2 * (1.0 / 120.0 + x2 * (-1.0 / 5040.0))))
    c = 1.0 + x2 * (-0.5 + x2 * (1.0 / 24.0 + x2 * (-1.0 / 720.0 + x2 * (1.0 / 40320.0))))
    quadrant = q.to(tl.int32) & 3  # sin(x + q pi / 2), cos(x + q pi / 2)
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    return sin, cos


@triton.jit
def _randn4x(key, counter):
    """Four N(0, 1) draws per counter: ``tl.randn4x``'s Philox uniforms and Box-Muller pairs, with the
    angle's sine and cosine from ``_sincos_2pi`` instead of tl.sin / tl.cos (see there why)."""
    u1, u2, u3, u4 = tl.rand4x(key, counter)
    r1 = tl.sqrt(-2.0 * tl.log(tl.maximum(u1, 1.0e-7)))
    r3 = tl.sqrt(-2.0 * tl.log(tl.maximum(u3, 1.0e-7)))
    s2, c2 = _sincos_2pi(u2)
    s4, c4 = _sincos_2pi(u4)
    return r1 * c2, r1 * s2, r3 * c4, r3 * s4


@triton.jit
def _scatter_tokens_fwd_kernel(
    out_ptr,  # [R, N, D] out
    stride_outr,
    stride_outn,
    y_ptr,  # [R, K, D]
    stride_yr,
    stride_yk,
    inv_ptr,  # [R, N] int32: slot j with ids_keep[r, j] == n, or -1
    stride_invr,
    fill_ptr,  # [D] fill vector (read only when FILL == "vector")
    seed_ptr,  # [1] int64 seed in [0, 2**32) (read only when FILL == "noise")
    N,
    D,
    noise_std,
    FILL: tl.constexpr,  # "noise" | "zero" | "vector"
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D

    slot = tl.load(inv_ptr + row * stride_invr + offs_n, mask=mask_n, other=-1)
    kept = (slot >= 0)[:, None]
    vals = tl.load(
        y_ptr + row * stride_yr + slot.to(tl.int64)[:, None] * stride_yk + offs_d[None, :],
        mask=kept & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    if FILL == "noise":
        # Philox key: low word the call's seed, high word the row, so rows and calls never share a stream.
        key = tl.load(seed_ptr) + (row << 32)
        # One Philox call yields four normals; spread them over four adjacent channels so the
        # generator costs a quarter of a call per element (Philox, not memory, would bound the op).
        counter = offs_n[:, None] * (BLOCK_D // 4) + tl.arange(0, BLOCK_D // 4)[None, :]  # [BLOCK_N, BLOCK_D/4]
        n0, n1, n2, n3 = _randn4x(key, counter)
        noise = tl.reshape(tl.join(tl.join(n0, n1), tl.join(n2, n3)), (BLOCK_N, BLOCK_D))  # d = 4q + 2i + j
        vals = tl.where(kept, vals, noise * noise_std)
    elif FILL == "vector":
        fill = tl.load(fill_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        vals = tl.where(kept, vals, fill[None, :])
    tl.store(
        out_ptr + row * stride_outr + offs_n[:, None] * stride_outn + offs_d[None, :],
        vals.to(out_ptr.dtype.element_ty),
        mask=mask_n[:, None] & mask_d[None, :],
    )


@triton.jit
def _scatter_tokens_bwd_kernel(
    dy_ptr,  # [R, K, D] out
    stride_dyr,
    stride_dyk,
    dout_ptr,  # [R, N, D]
    stride_doutr,
    stride_doutn,
    ids_ptr,  # [R, K] int32 / int64
    stride_idsr,
    K,
    D,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # dy is a gather over slots, so every dy element is written exactly once.
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_d < D)[None, :]

    ids = tl.load(ids_ptr + row * stride_idsr + offs_k, mask=mask_k, other=0).to(tl.int64)
    grad = tl.load(
        dout_ptr + row * stride_doutr + ids[:, None] * stride_doutn + offs_d[None, :], mask=mask, other=0.0
    )
    tl.store(
        dy_ptr + row * stride_dyr + offs_k[:, None] * stride_dyk + offs_d[None, :],
        grad.to(dy_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _scatter_tokens_fill_bwd_kernel(
    partial_ptr,  # [R, CHUNKS, D] fp32 out: dout summed over the filled positions of one chunk
    stride_partialr,
    stride_partialc,
    dout_ptr,  # [R, N, D]
    stride_doutr,
    stride_doutn,
    inv_ptr,  # [R, N] int32: slot or -1
    stride_invr,
    N,
    D,
    CHUNK: tl.constexpr,  # positions per program, a multiple of BLOCK_N
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK_N):
        offs_n = chunk * CHUNK + start + tl.arange(0, BLOCK_N)
        slot = tl.load(inv_ptr + row * stride_invr + offs_n, mask=offs_n < N, other=0)
        filled = (offs_n < N) & (slot < 0)
        # Kept positions are masked out of the load: only the filled part of dout is read here.
        acc += tl.load(
            dout_ptr + row * stride_doutr + offs_n[:, None] * stride_doutn + offs_d[None, :],
            mask=filled[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
    tl.store(partial_ptr + row * stride_partialr + chunk * stride_partialc + offs_d, tl.sum(acc, axis=0), mask=mask_d)


def _tile_settings(rows: int, dim: int) -> tuple[int, int, int]:
    return row_tile_settings(rows, dim, TILE_ELEMENTS)  # read at call time: tests shrink the tile


def _scatter_tokens_fwd(
    y: torch.Tensor,
    inv: torch.Tensor,
    fill: str | torch.Tensor,
    noise_std: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    rows, _, dim = y.shape
    length = inv.shape[1]
    assert y.stride(-1) == 1 and inv.is_contiguous()
    out = torch.empty((rows, length, dim), dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    if length * dim >= 2**31:
        raise ValueError(f"length * D must be < 2**31 on the Triton path, got {length} * {dim}")
    mode = "vector" if isinstance(fill, torch.Tensor) else fill
    fill_arg = fill if mode == "vector" else y  # never read unless FILL == "vector"
    seed = y  # never read unless FILL == "noise"
    if mode == "noise":
        seed = torch.randint(0, 2**32, (1,), dtype=torch.int64, device=y.device, generator=generator)
    block_n, block_d, num_warps = _tile_settings(length, dim)
    block_d = max(block_d, 4)  # the noise fill spreads each Philox call over four channels
    _scatter_tokens_fwd_kernel[(rows, triton.cdiv(length, block_n))](
        out,
        out.stride(0),
        out.stride(1),
        y,
        y.stride(0),
        y.stride(1),
        inv,
        inv.stride(0),
        fill_arg,
        seed,
        length,
        dim,
        float(noise_std),
        FILL=mode,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out


def _scatter_tokens_bwd(dout: torch.Tensor, ids_keep: torch.Tensor, dy_dtype: torch.dtype) -> torch.Tensor:
    rows, _, dim = dout.shape
    kept = ids_keep.shape[1]
    dy = torch.empty((rows, kept, dim), dtype=dy_dtype, device=dout.device)
    if dy.numel() == 0:
        return dy
    block_k, block_d, num_warps = _tile_settings(kept, dim)
    _scatter_tokens_bwd_kernel[(rows, triton.cdiv(kept, block_k))](
        dy,
        dy.stride(0),
        dy.stride(1),
        dout,
        dout.stride(0),
        dout.stride(1),
        ids_keep,
        ids_keep.stride(0),
        kept,
        dim,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return dy


def _scatter_tokens_fill_bwd(dout: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """dfill [D] fp32: dout summed over every filled position, via per-(row, chunk) partial sums."""
    rows, length, dim = dout.shape
    block_n, block_d, num_warps = _tile_settings(min(length, FILL_GRAD_CHUNK), dim)
    chunk = block_n * math.ceil(FILL_GRAD_CHUNK / block_n)
    chunks = triton.cdiv(length, chunk)
    partial = torch.empty((rows, chunks, dim), dtype=torch.float32, device=dout.device)
    if partial.numel() == 0:
        return torch.zeros(dim, dtype=torch.float32, device=dout.device)
    _scatter_tokens_fill_bwd_kernel[(rows, chunks)](
        partial,
        partial.stride(0),
        partial.stride(1),
        dout,
        dout.stride(0),
        dout.stride(1),
        inv,
        inv.stride(0),
        length,
        dim,
        CHUNK=chunk,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return partial.sum((0, 1))


class ScatterTokensFunction(torch.autograd.Function):
    @staticmethod
    @ensure_contiguous
    def forward(ctx, y, ids_keep, length, fill, noise_std, generator):
        inv = inverse_ids(ids_keep, length)
        ctx.save_for_backward(ids_keep, inv)
        ctx.y_dtype = y.dtype
        ctx.fill_dtype = fill.dtype if isinstance(fill, torch.Tensor) else None
        return _scatter_tokens_fwd(y, inv, fill, noise_std, generator)

    @staticmethod
    @ensure_contiguous
    def backward(ctx, dout):
        ids_keep, inv = ctx.saved_tensors
        needs_y, _, _, needs_fill, _, _ = ctx.needs_input_grad
        dy = _scatter_tokens_bwd(dout, ids_keep, ctx.y_dtype) if needs_y else None
        dfill = _scatter_tokens_fill_bwd(dout, inv).to(ctx.fill_dtype) if needs_fill else None
        return dy, None, None, dfill, None, None


def scatter_tokens(
    y: torch.Tensor,
    ids_keep: torch.Tensor,
    length: int,
    fill: str | torch.Tensor = "noise",
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
    impl: str = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """Place y's rows at ids_keep in a [R, length, D] sequence and fill every other position.

    Args:
        y: [R, K, D] kept-token features, fp32 / bf16 / fp16.
        ids_keep: [R, K] int32 / int64 kept positions in [0, length), no duplicates within a row.
        length: full sequence length (>= K).
        fill: "noise" (fresh N(0, noise_std^2) per call), "zero", or a [D] float tensor (may require grad).
        noise_std: standard deviation of the noise fill (>= 0).
        generator: torch.Generator on y's device for the noise; None uses torch's default one.
        impl: "auto" | "triton" | "torch" (see ``d2v2.kernels``). Triton's and torch's noise streams
            differ; each is reproducible from the generator state.
        check_ids: check that ids_keep lies in [0, length) (one host sync); False when the caller knows it does.

    Returns:
        [R, length, D] in y's dtype. Gradients flow to y (the gather at ids_keep) and to a fill tensor.
    """
    check_tensor("y", y, ndim=3)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=y.device)
    rows, kept, dim = y.shape
    check_shape("ids_keep", ids_keep, (rows, kept))
    if isinstance(length, bool) or not isinstance(length, int) or length < kept:
        raise ValueError(f"length must be an int >= K = {kept}, got {length!r}")
    if isinstance(fill, torch.Tensor):
        check_tensor("fill", fill, ndim=1, device=y.device)
        check_shape("fill", fill, (dim,))
    elif not isinstance(fill, str) or fill not in FILL_MODES:
        raise ValueError(f"fill must be one of {FILL_MODES} or a [D] tensor, got {fill!r}")
    if (
        isinstance(noise_std, bool)
        or not isinstance(noise_std, (int, float))
        or not math.isfinite(noise_std)
        or noise_std < 0
    ):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != y.device.type:
            raise ValueError(f"generator must be on {y.device} like y, got {generator.device}")
    if check_ids:
        check_index_range("ids_keep", ids_keep, length)

    if resolve_impl(impl, y, ids_keep, fill if isinstance(fill, torch.Tensor) else None) == "torch":
        return scatter_tokens_ref(y, ids_keep, length, fill, noise_std, generator)
    return ScatterTokensFunction.apply(y, ids_keep, length, fill, noise_std, generator)
