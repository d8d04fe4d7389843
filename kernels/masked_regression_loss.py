"""Regression loss over masked positions against targets shared by clones: the data2vec 2.0 loss.

Contract
    ``masked_regression_loss(pred, target, mask, clones=1, scale=None, beta=0.0, impl="auto") -> loss``

    - ``pred`` [R, N, D], ``target`` [R // clones, N, D], fp32/bf16/fp16 each (they may differ: a bf16
      decoder output against fp32 targets is the usual case); ``mask`` bool [R, N], True = masked;
      all on one device. Row r of ``pred`` is regressed onto row ``r // clones`` of ``target``: the
      targets of the ``clones`` masked views of a sample are never repeated in memory.
    - ``loss`` = 0-dim fp32 tensor::

          sum over masked (r, n) of  scale * sum_d l(pred[r, n, d] - target[r // clones, n, d])
          ------------------------------------------------------------------------------------
                                   number of masked (r, n)

      with ``l(x) = x**2`` when ``beta == 0`` (squared error, not half of it) and otherwise torch's
      smooth-L1 ``l(x) = 0.5 * x**2 / beta if |x| < beta else |x| - 0.5 * beta``. ``scale`` defaults
      to ``1 / sqrt(D)``. All arithmetic in fp32.
    - No masked position at all: the loss is 0 (not NaN) and every gradient is zero.
    - Gradients: ``d loss / d pred[r, n, d] = g * scale / count * l'(pred - target)`` at masked
      positions, 0 elsewhere (in ``pred``'s dtype); ``d loss / d target[b] = -sum over the clones r of
      sample b of d loss / d pred[r]`` (in ``target``'s dtype), computed only when ``target`` requires
      grad (data2vec's targets come from the teacher under no_grad and do not).

Kernels
    Forward: one program per (row, block of BLOCK_N positions) loops over D in BLOCK_D slices; loads
    of unmasked positions are switched off by the load mask, so they cost no memory traffic. Each
    program writes its (already scaled) partial sum into an fp32 buffer that the launcher sums, so
    the result is deterministic. The division by the masked count stays on the device (no host sync).
    Backward: the same tiling writes the whole gradient of ``pred`` (zeros at unmasked positions).
    When ``target`` needs a gradient, each program takes all ``clones`` rows of one sample instead,
    so it can sum their gradients in registers and write the target's gradient once: deterministic,
    no atomics.

References
    data2vec 2.0 (Baevski et al., 2022, arXiv:2212.07525), section 2 "Objective";
    fairseq ``examples/data2vec/models/data2vec2.py: Data2VecMultiModel.d2v_loss`` (squared error or
    smooth-L1, summed over D, times ``loss_scale`` or 1/sqrt(D)) and the averaging over masked tokens
    done by ``ModelCriterion`` and the fairseq trainer (sample_size = number of masked tokens).

Limits
    - D >= 1; ``scale`` and ``beta`` are Python numbers (``beta >= 0``), fixed per call.
    - The masked count is exact (int64); the loss sum is an fp32 sum of per-program partials.
    - Not yet timed on a GPU. Compiled offline for sm_90, every variant keeps 128-bit loads of
      ``pred`` and ``target`` when D is a multiple of 8. BLOCK_D / BLOCK_N / warps come from
      ``_block_settings`` and are first guesses to tune on an H100 at the reference shapes.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ._utils import check_shape, check_tensor, ensure_contiguous, resolve_impl, tl, triton


def masked_regression_loss_ref(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    clones: int = 1,
    scale: float | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """PyTorch reference (selects the masked positions, so it syncs with the host once)."""
    scale = pred.shape[-1] ** -0.5 if scale is None else scale
    rows, positions = mask.nonzero(as_tuple=True)
    masked_pred = pred[rows, positions].float()  # [M, D]
    masked_target = target[torch.div(rows, clones, rounding_mode="floor"), positions].float()  # [M, D]
    if beta == 0:
        per_element = (masked_pred - masked_target).square()
    else:
        per_element = F.smooth_l1_loss(masked_pred, masked_target, reduction="none", beta=beta)
    return per_element.sum() * scale / mask.sum().clamp(min=1)


@triton.jit
def _masked_regression_loss_fwd_kernel(
    partial_ptr,  # [R, cdiv(N, BLOCK_N)] fp32: scale * loss sum of each program
    pred_ptr,  # [R, N, D], unit stride along D
    stride_pr,
    stride_pn,
    target_ptr,  # [R // clones, N, D], unit stride along D
    stride_tr,
    stride_tn,
    mask_ptr,  # [R, N] uint8 (the bool mask's bytes)
    stride_mr,
    stride_mn,
    N,
    D,
    clones,
    scale,
    beta,
    SMOOTH_L1: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block_n = tl.program_id(1)
    positions = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    is_masked = tl.load(mask_ptr + row * stride_mr + positions * stride_mn, mask=positions < N, other=0) != 0
    pred_rows = pred_ptr + row * stride_pr + positions[:, None] * stride_pn  # [BLOCK_N, 1]
    target_rows = target_ptr + (row // clones) * stride_tr + positions[:, None] * stride_tn

    total = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        cols = d_start + tl.arange(0, BLOCK_D)
        if EVEN_D:
            load_mask = is_masked[:, None]
        else:
            load_mask = is_masked[:, None] & (cols[None, :] < D)
        # Unmasked positions load 0 for both, so their loss is 0 under either l.
        p = tl.load(pred_rows + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
        t = tl.load(target_rows + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
        diff = p - t
        if SMOOTH_L1:
            abs_diff = tl.abs(diff)
            total += tl.where(abs_diff < beta, 0.5 * diff * diff / beta, abs_diff - 0.5 * beta)
        else:
            total += diff * diff
    tl.store(partial_ptr + row * tl.num_programs(1) + block_n, tl.sum(tl.sum(total, axis=1), axis=0) * scale)


@triton.jit
def _masked_regression_loss_bwd_kernel(
    grad_pred_ptr,  # [R, N, D], unit stride along D
    stride_gpr,
    stride_gpn,
    grad_target_ptr,  # [R // clones, N, D], unit stride along D; written when HAS_GRAD_TARGET
    stride_gtr,
    stride_gtn,
    pred_ptr,  # [R, N, D]
    stride_pr,
    stride_pn,
    target_ptr,  # [R // clones, N, D]
    stride_tr,
    stride_tn,
    mask_ptr,  # [R, N] uint8
    stride_mr,
    stride_mn,
    coef_ptr,  # [] fp32: grad_loss * scale / max(masked count, 1)
    N,
    D,
    clones,
    beta,
    ROWS_PER_PROGRAM: tl.constexpr,  # 1, or clones when HAS_GRAD_TARGET (one sample per program)
    SMOOTH_L1: tl.constexpr,
    HAS_GRAD_TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    first_row = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM
    target_row = first_row // clones
    positions = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_row = positions < N
    coef = tl.load(coef_ptr)
    target_rows = target_ptr + target_row * stride_tr + positions[:, None] * stride_tn  # [BLOCK_N, 1]

    for d_start in range(0, D, BLOCK_D):
        cols = d_start + tl.arange(0, BLOCK_D)
        if EVEN_D:
            in_bounds = in_row[:, None]  # [BLOCK_N, 1], broadcast along D
        else:
            in_bounds = in_row[:, None] & (cols[None, :] < D)
        if HAS_GRAD_TARGET:
            # Read once, shared by the clones; their gradients are summed here in fp32.
            t_shared = tl.load(target_rows + cols[None, :], mask=in_bounds, other=0.0).to(tl.float32)
            grad_target = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for clone in range(ROWS_PER_PROGRAM):
            row = first_row + clone
            is_masked = tl.load(mask_ptr + row * stride_mr + positions * stride_mn, mask=in_row, other=0) != 0
            load_mask = in_bounds & is_masked[:, None]
            pred_block = pred_ptr + row * stride_pr + positions[:, None] * stride_pn + cols[None, :]
            p = tl.load(pred_block, mask=load_mask, other=0.0)
            if HAS_GRAD_TARGET:
                t = t_shared
            else:
                t = tl.load(target_rows + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
            diff = p.to(tl.float32) - t
            if SMOOTH_L1:
                sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
                slope = tl.where(tl.abs(diff) < beta, diff / beta, sign)
            else:
                slope = 2.0 * diff
            grad = tl.where(load_mask, coef * slope, 0.0)
            tl.store(
                grad_pred_ptr + row * stride_gpr + positions[:, None] * stride_gpn + cols[None, :],
                grad.to(grad_pred_ptr.dtype.element_ty),
                mask=in_bounds,
            )
            if HAS_GRAD_TARGET:
                grad_target -= grad
        if HAS_GRAD_TARGET:
            tl.store(
                grad_target_ptr + target_row * stride_gtr + positions[:, None] * stride_gtn + cols[None, :],
                grad_target.to(grad_target_ptr.dtype.element_ty),
                mask=in_bounds,
            )


# Tile of about 2K elements per program: 128-wide D slices (768 and 1024 split evenly) by 16 positions.
_MAX_BLOCK_D = 128
_TILE_ELEMENTS = 2048
_NUM_WARPS = 4


def _block_settings(n: int, d: int) -> tuple[int, int, bool]:
    block_d = min(triton.next_power_of_2(d), _MAX_BLOCK_D)
    block_n = min(_TILE_ELEMENTS // block_d, triton.next_power_of_2(n))
    return block_n, block_d, d % block_d == 0


def _masked_regression_loss_fwd(pred, target, mask, clones, scale, beta):
    """Loss (0-dim fp32) and the masked count (0-dim int64), both left on the device."""
    rows, length, dim = pred.shape
    block_n, block_d, even_d = _block_settings(length, dim)
    partial = torch.zeros(rows, triton.cdiv(length, block_n), dtype=torch.float32, device=pred.device)
    mask_bytes = mask.view(torch.uint8)
    if partial.numel() > 0:
        _masked_regression_loss_fwd_kernel[partial.shape](
            partial,
            pred,
            pred.stride(0),
            pred.stride(1),
            target,
            target.stride(0),
            target.stride(1),
            mask_bytes,
            mask_bytes.stride(0),
            mask_bytes.stride(1),
            length,
            dim,
            clones,
            scale,
            beta,
            SMOOTH_L1=beta > 0,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            EVEN_D=even_d,
            num_warps=_NUM_WARPS,
        )
    count = mask.sum()
    return partial.sum() / count.clamp(min=1), count


def _masked_regression_loss_bwd(grad_loss, pred, target, mask, count, clones, scale, beta, need_grad_target):
    """Gradients of pred (always) and of target (when need_grad_target, else None)."""
    rows, length, dim = pred.shape
    block_n, block_d, even_d = _block_settings(length, dim)
    grad_pred = torch.empty_like(pred)
    grad_target = torch.empty_like(target) if need_grad_target else None
    rows_per_program = clones if need_grad_target else 1
    coef = (grad_loss.float() * scale / count.clamp(min=1)).reshape(())
    mask_bytes = mask.view(torch.uint8)
    grid = (rows // rows_per_program, triton.cdiv(length, block_n))
    if grid[0] * grid[1] > 0:
        grad_target_arg = grad_target if need_grad_target else grad_pred  # unused when not needed
        _masked_regression_loss_bwd_kernel[grid](
            grad_pred,
            grad_pred.stride(0),
            grad_pred.stride(1),
            grad_target_arg,
            grad_target_arg.stride(0),
            grad_target_arg.stride(1),
            pred,
            pred.stride(0),
            pred.stride(1),
            target,
            target.stride(0),
            target.stride(1),
            mask_bytes,
            mask_bytes.stride(0),
            mask_bytes.stride(1),
            coef,
            length,
            dim,
            clones,
            beta,
            ROWS_PER_PROGRAM=rows_per_program,
            SMOOTH_L1=beta > 0,
            HAS_GRAD_TARGET=need_grad_target,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            EVEN_D=even_d,
            num_warps=_NUM_WARPS,
        )
    return grad_pred, grad_target


class MaskedRegressionLossFunction(torch.autograd.Function):
    @staticmethod
    @ensure_contiguous
    def forward(ctx, pred, target, mask, clones, scale, beta):
        loss, count = _masked_regression_loss_fwd(pred, target, mask, clones, scale, beta)
        ctx.save_for_backward(pred, target, mask, count)
        ctx.clones, ctx.scale, ctx.beta = clones, scale, beta
        return loss

    @staticmethod
    @ensure_contiguous
    def backward(ctx, grad_loss):
        pred, target, mask, count = ctx.saved_tensors
        grad_pred, grad_target = _masked_regression_loss_bwd(
            grad_loss, pred, target, mask, count, ctx.clones, ctx.scale, ctx.beta, ctx.needs_input_grad[1]
        )
        return grad_pred, grad_target, None, None, None, None


def _check_number(name: str, value: object, *, minimum: float | None = None) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite Python number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def masked_regression_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    clones: int = 1,
    scale: float | None = None,
    beta: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Mean over masked positions of ``scale * sum_d l(pred - target)``; a 0-dim fp32 tensor.

    Args:
        pred: [R, N, D] predictions (fp32/bf16/fp16).
        target: [R // clones, N, D] targets; row r of pred is compared with row r // clones.
        mask: bool [R, N], True where the loss is taken.
        clones: masked views per sample (R must be a multiple of it).
        scale: factor on each position's sum over D; None means 1 / sqrt(D).
        beta: 0 for squared error, > 0 for smooth-L1 with this beta.
        impl: "auto" | "triton" | "torch" (see ``d2v2.kernels``).
    """
    check_tensor("pred", pred, ndim=3)
    check_tensor("target", target, ndim=3, device=pred.device)
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,), device=pred.device)
    if not isinstance(clones, int) or isinstance(clones, bool) or clones < 1:
        raise ValueError(f"clones must be an int >= 1, got {clones!r}")
    rows, length, dim = pred.shape
    if rows % clones != 0:
        raise ValueError(f"pred's first dimension ({rows}) must be a multiple of clones ({clones})")
    if dim < 1:
        raise ValueError(f"pred must have a feature dimension D >= 1, got shape {list(pred.shape)}")
    check_shape("target", target, [rows // clones, length, dim])
    check_shape("mask", mask, [rows, length])
    scale = dim**-0.5 if scale is None else _check_number("scale", scale)
    beta = _check_number("beta", beta, minimum=0.0)

    if resolve_impl(impl, pred, target, mask) == "torch":
        return masked_regression_loss_ref(pred, target, mask, clones, scale, beta)
    return MaskedRegressionLossFunction.apply(pred, target, mask, clones, scale, beta)
