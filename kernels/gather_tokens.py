"""gather_tokens: clone each sample, add positions and keep the unmasked tokens, in one pass.

Contract
    gather_tokens(x, ids_keep, pos=None, clones=1, impl="auto") -> y

    x         [B, N, D]          fp32 / bf16 / fp16: per-sample token features (the local encoder's output)
    ids_keep  [B*clones, K]      int32 / int64: row r holds the kept positions of clone r % clones of
                                 sample r // clones (data2vec 2.0 sorts them ascending; not required)
    pos       [N, D] or None     fp32 / bf16 / fp16: positional embedding added to every kept token
    y         [B*clones, K, D]   dtype of x

        y[r, j] = x[r // clones, ids_keep[r, j]] + pos[ids_keep[r, j]]

    Arithmetic is fp32; y is rounded once to x's dtype. The [B*clones, N, D] repeated tensor that the
    reference implementation builds (``repeat_interleave`` then ``gather``) is never materialised: each
    output row reads its sample's row directly.

Gradients
    dx[b, n]  = sum over clones c of b and kept slots j with ids_keep[b*clones + c, j] == n of dy[b*clones + c, j]
                (zero where no clone kept n)
    dpos[n]   = sum over b of dx[b, n]   (every row that kept position n), only when pos requires grad

    The backward kernel runs one program per (sample, block of positions) over an inverse map
    inv[r, n] = j (or -1) built from ids_keep, loops over the sample's clones and sums in fp32
    registers: each dx element is written exactly once, no atomics, bit-for-bit deterministic.
    dpos reduces the fp32 dx over samples with torch.sum (deterministic).

References
    data2vec 2.0: Baevski et al., "Efficient Self-supervised Learning with Contextualized Target
    Representations for Vision, Speech and Language", ICML 2023. Reference code: fairseq
    ``examples/data2vec/models/modalities/base.py`` (``ModalitySpecificEncoder.forward``: clone
    ``repeat_interleave``, ``add_positions``, ``gather_unmasked``).

Limits
    - Duplicate positions within one ids_keep row are undefined behaviour: the forward is still the
      plain gather, but the backward credits only one of the duplicates.
    - ids_keep is checked for shape, dtype, device and range [0, N); the range check is one host
      sync, skipped with ``check_ids=False`` by callers whose ids are valid by construction (e.g.
      made by ``d2v2.models.layers.masking.mask_to_ids``): an out-of-range id then faults the kernel.
    - D up to 65536 (one D-row per tile; see ``_utils.block_settings``).
    - clones is a compile-time constant (one compilation per value; the backward unrolls over it),
      which suits its fixed per-recipe values (8-16).
    - The Triton path makes non-contiguous inputs contiguous (one copy) before launch.
"""

from __future__ import annotations

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

# A tile holds TILE_ELEMENTS values: a few token rows of one full D-row each. Enough bytes in flight
# per program for a memory-bound copy on an H100 without spilling registers (ViT-B: 4 rows x 1024).
TILE_ELEMENTS = 4096


def gather_tokens_ref(
    x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None, clones: int = 1
) -> torch.Tensor:
    """PyTorch reference (the impl="torch" path and the test oracle); differentiable through autograd."""
    rows = ids_keep.shape[0]
    sample = torch.arange(rows, device=x.device) // clones  # [R]: the sample each clone row reads
    ids = ids_keep.long()
    y = x[sample[:, None], ids].float()  # [R, K, D]
    if pos is not None:
        y = y + pos[ids].float()
    return y.to(x.dtype)


@triton.jit
def _gather_tokens_fwd_kernel(
    y_ptr,  # [R, K, D] out
    stride_yr,
    stride_yk,
    x_ptr,  # [B, N, D]
    stride_xb,
    stride_xn,
    ids_ptr,  # [R, K] int32 / int64
    stride_idsr,
    pos_ptr,  # [N, D] (unused unless HAS_POS)
    stride_posn,
    K,
    D,
    CLONES: tl.constexpr,
    HAS_POS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_d < D)[None, :]

    sample = row // CLONES
    ids = tl.load(ids_ptr + row * stride_idsr + offs_k, mask=mask_k, other=0).to(tl.int64)
    vals = tl.load(
        x_ptr + sample * stride_xb + ids[:, None] * stride_xn + offs_d[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    if HAS_POS:
        vals += tl.load(pos_ptr + ids[:, None] * stride_posn + offs_d[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(
        y_ptr + row * stride_yr + offs_k[:, None] * stride_yk + offs_d[None, :],
        vals.to(y_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _gather_tokens_bwd_kernel(
    dx_ptr,  # [B, N, D] out (x's dtype, or fp32 when it also feeds dpos)
    stride_dxb,
    stride_dxn,
    dy_ptr,  # [R, K, D]
    stride_dyr,
    stride_dyk,
    inv_ptr,  # [R, N] int32: slot j with ids_keep[r, j] == n, or -1
    stride_invr,
    N,
    D,
    CLONES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    sample = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D

    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Clones in a fixed order, summed in registers: the result does not depend on scheduling.
    # Unrolled, so the clones' loads are all in flight at once rather than one round trip each.
    for clone in tl.static_range(CLONES):
        row = sample * CLONES + clone
        slot = tl.load(inv_ptr + row * stride_invr + offs_n, mask=mask_n, other=-1)
        kept = slot >= 0
        # Masked lanes issue no memory traffic: only the kept tokens of dy are read.
        acc += tl.load(
            dy_ptr + row * stride_dyr + slot.to(tl.int64)[:, None] * stride_dyk + offs_d[None, :],
            mask=kept[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
    tl.store(
        dx_ptr + sample * stride_dxb + offs_n[:, None] * stride_dxn + offs_d[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=mask_n[:, None] & mask_d[None, :],
    )


def _tile_settings(rows: int, dim: int) -> tuple[int, int, int]:
    return row_tile_settings(rows, dim, TILE_ELEMENTS)  # read at call time: tests shrink the tile


def _gather_tokens_fwd(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None, clones: int) -> torch.Tensor:
    batch, _, dim = x.shape
    rows, kept = ids_keep.shape
    assert rows == batch * clones and x.stride(-1) == 1 and (pos is None or pos.stride(-1) == 1)
    y = torch.empty((rows, kept, dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_k, block_d, num_warps = _tile_settings(kept, dim)
    pos_arg = pos if pos is not None else x  # never read when HAS_POS is False
    _gather_tokens_fwd_kernel[(rows, triton.cdiv(kept, block_k))](
        y,
        y.stride(0),
        y.stride(1),
        x,
        x.stride(0),
        x.stride(1),
        ids_keep,
        ids_keep.stride(0),
        pos_arg,
        pos_arg.stride(0),
        kept,
        dim,
        CLONES=clones,
        HAS_POS=pos is not None,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y


def _gather_tokens_bwd(
    dy: torch.Tensor, ids_keep: torch.Tensor, batch: int, length: int, clones: int, dx_dtype: torch.dtype
) -> torch.Tensor:
    """dx [B, N, D] in ``dx_dtype``: the clone-summed scatter of dy, every element written once."""
    dim = dy.shape[2]
    dx = torch.empty((batch, length, dim), dtype=dx_dtype, device=dy.device)
    if dx.numel() == 0:
        return dx
    inv = inverse_ids(ids_keep, length)
    block_n, block_d, num_warps = _tile_settings(length, dim)
    _gather_tokens_bwd_kernel[(batch, triton.cdiv(length, block_n))](
        dx,
        dx.stride(0),
        dx.stride(1),
        dy,
        dy.stride(0),
        dy.stride(1),
        inv,
        inv.stride(0),
        length,
        dim,
        CLONES=clones,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return dx


class GatherTokensFunction(torch.autograd.Function):
    @staticmethod
    @ensure_contiguous
    def forward(ctx, x, ids_keep, pos, clones):
        ctx.save_for_backward(ids_keep)
        ctx.clones = clones
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.pos_dtype = pos.dtype if pos is not None else None
        return _gather_tokens_fwd(x, ids_keep, pos, clones)

    @staticmethod
    @ensure_contiguous
    def backward(ctx, dy):
        (ids_keep,) = ctx.saved_tensors
        needs_x, _, needs_pos, _ = ctx.needs_input_grad
        batch, length, _ = ctx.x_shape
        # dpos sums dx over samples, so dx stays fp32 until that reduction is done.
        dx_dtype = torch.float32 if needs_pos else ctx.x_dtype
        dx = _gather_tokens_bwd(dy, ids_keep, batch, length, ctx.clones, dx_dtype)
        dpos = dx.sum(0).to(ctx.pos_dtype) if needs_pos else None
        return (dx.to(ctx.x_dtype) if needs_x else None), None, dpos, None


def gather_tokens(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    pos: torch.Tensor | None = None,
    clones: int = 1,
    impl: str = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """Clone, add positions and keep tokens: y[r, j] = x[r // clones, ids_keep[r, j]] + pos[ids_keep[r, j]].

    Args:
        x: [B, N, D] features, fp32 / bf16 / fp16.
        ids_keep: [B*clones, K] int32 / int64 kept positions in [0, N), no duplicates within a row.
        pos: optional [N, D] positional embedding (any float dtype; may require grad).
        clones: number of masked copies of each sample (rows b*clones .. b*clones + clones-1 read sample b).
        impl: "auto" | "triton" | "torch" (see ``d2v2.kernels``).
        check_ids: check that ids_keep lies in [0, N) (one host sync); False when the caller knows it does.

    Returns:
        [B*clones, K, D] in x's dtype. Gradients flow to x (summed over clones) and to pos.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    if isinstance(clones, bool) or not isinstance(clones, int) or clones < 1:
        raise ValueError(f"clones must be an int >= 1, got {clones!r}")
    batch, length, dim = x.shape
    check_shape("ids_keep", ids_keep, (batch * clones, None))
    if pos is not None:
        check_tensor("pos", pos, ndim=2, device=x.device)
        check_shape("pos", pos, (length, dim))
    if check_ids:
        check_index_range("ids_keep", ids_keep, length)

    if resolve_impl(impl, x, ids_keep, pos) == "torch":
        return gather_tokens_ref(x, ids_keep, pos, clones)
    return GatherTokensFunction.apply(x, ids_keep, pos, clones)
