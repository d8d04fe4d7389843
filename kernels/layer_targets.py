"""data2vec 2.0 regression targets from the teacher's top-k layers: per-layer norm, average, final norm.

Contract
    layer_targets(layers, per_layer="instance", final="layer", eps=1e-5, impl="auto") -> [B, N, D] fp32

    layers   k tensors [B, N, D] (a list or tuple) or one tensor [k, B, N, D]; fp32, bf16 or fp16, all of
             one shape, dtype and device. They are the FFN outputs of the teacher's top-k blocks.
    per_layer, final  "instance" | "layer" | None, parameter-free normalisations (no affine):
             "instance": over N for each (b, d), like F.instance_norm on the [B, D, N] transpose;
             "layer":    over D for each (b, n), like F.layer_norm without weight and bias;
             both use the biased variance and ``eps`` inside the square root.

    target = final_norm( (1/k) * sum_i per_layer_norm(float32(layers[i])) )

    The released recipes use IN -> AVG -> LN (images), IN -> AVG (audio, text base) and LN -> AVG -> IN
    (text large); every one of the 3 x 3 combinations is supported. An instance norm over N = 1 gives
    zeros (the centred value is exactly 0), as the reference computes it.

Memory traffic (the Triton path)
    Every layer is read exactly once and the fp32 output written once: one kernel keeps a tile of
    [N, block of D] columns (instance norm) or [block of N, D] rows (layer norm) in registers, so the
    statistics and the normalised accumulation come from the same load; the layers are visited in a
    loop inside the kernel, addressed from layer 0's pointer by element offsets (see Limits), so a
    list of k tensors is never stacked. The two mixed orders, IN -> AVG -> LN and LN -> AVG -> IN,
    need both whole columns and whole rows: when one [N, D] tile fits (_TILE elements, small models)
    that is still a single pass; otherwise (every reference shape) the average is written
    first and the final norm runs as a second, in-place pass over the fp32 output, so the total is
    k reads of the layers + one fp32 write + one fp32 read and write.

Gradients
    The op is differentiable in every layer, but targets are normally built under no_grad, so the
    backward is not a kernel: it runs the reference below under autograd (recomputing the forward
    in fp32, then differentiating it). Gradients come back in each layer's dtype.

References
    Baevski et al., "Efficient Self-supervised Learning with Contextualized Target Representations for
    Vision, Speech and Language" (data2vec 2.0), 2022; fairseq examples/data2vec/models/data2vec2.py
    (``make_targets``: instance_norm_target_layer, layer_norm_target_layer, layer_norm_targets,
    instance_norm_targets).

Limits
    - The axis a norm reduces over lives in one tile: N (instance) and D (layer) up to 65536, else
      ValueError; past a few thousand the tile leaves few registers for the other axis and slows.
    - The layers share one set of strides (any strides; non-matching layers are made contiguous) and
      are addressed as offsets from layer 0's data pointer. That is fine on a GPU's flat address
      space and under TRITON_INTERPRET=1 (CPU addresses), but it assumes all layers share a device.
    - B <= 65535 (the batch is the grid's third axis).
    - The backward is PyTorch (see Gradients), not a kernel.
    - The tile size (_TILE) was chosen by register budget, not yet tuned by timing on an H100: x, the
      prefetched next layer and the fp32 accumulator for 8192 elements over 32 warps compile for
      sm_80 and sm_90 (triton 3.9) to 28-64 registers without spills and 16-byte vector loads; a
      table of offsets that are not multiples of 16 elements (never the case for separate CUDA
      allocations) falls back to scalar loads.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._utils import MAX_FUSED_SIZE, block_settings, check_tensor, resolve_impl, tl, triton

NORMS = ("instance", "layer", None)
_NORM_DIM = {"instance": 1, "layer": 2}  # the axis of [B, N, D] each norm reduces over


def _normalize_ref(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(biased var + eps) along ``dim``; written out so that N = 1 gives zeros."""
    mean = x.mean(dim, keepdim=True)
    var = x.var(dim, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def layer_targets_ref(
    layers: Sequence[torch.Tensor] | torch.Tensor,
    per_layer: str | None = "instance",
    final: str | None = "layer",
    eps: float = 1e-5,
) -> torch.Tensor:
    """PyTorch reference: the impl="torch" path and the test oracle; differentiable through autograd."""
    acc = None
    for layer in layers:
        y = layer.float()
        if per_layer is not None:
            y = _normalize_ref(y, _NORM_DIM[per_layer], eps)
        acc = y if acc is None else acc + y
    target = acc / len(layers)
    if final is not None:
        target = _normalize_ref(target, _NORM_DIM[final], eps)
    return target


@triton.jit
def _normalize_tile(x, valid, AXIS: tl.constexpr, N, D, eps):
    """Normalise the fp32 tile ``x`` along AXIS (0: over N, 1: over D, -1: leave it); the tile must
    span that axis whole and hold 0 at its invalid (padding) entries, as the result does."""
    if AXIS >= 0:
        count = N if AXIS == 0 else D
        mean = tl.sum(x, axis=AXIS) / count
        x = tl.where(valid, x - tl.expand_dims(mean, AXIS), 0.0)
        var = tl.sum(x * x, axis=AXIS) / count
        x = x * tl.expand_dims(tl.rsqrt(var + eps), AXIS)
    return x


@triton.jit
def _layer_offset(layer_offsets_ptr, stride_xl, i, USE_OFFSET_TABLE: tl.constexpr, OFFSET_UNIT: tl.constexpr):
    """Element offset of layer ``i`` from layer 0: from the table, or ``i`` times a uniform layer stride."""
    if USE_OFFSET_TABLE:
        # Multiplying by the constexpr unit shows the compiler the offset's alignment (vector loads).
        offset = tl.load(layer_offsets_ptr + i) * OFFSET_UNIT
    else:
        offset = stride_xl * tl.cast(i, tl.int64)
    return offset


@triton.jit
def _layer_targets_fwd_kernel(
    out_ptr,  # [B, N, D] fp32
    stride_ob,
    stride_on,
    stride_od,
    x_ptr,  # layer 0 [B, N, D]; layer i starts _layer_offset(i) elements further, with the same strides
    stride_xb,
    stride_xn,
    stride_xd,
    layer_offsets_ptr,  # [k] int64 offsets of the layers from x_ptr in OFFSET_UNIT elements (if USE_OFFSET_TABLE)
    stride_xl,  # elements from one layer to the next (used if not USE_OFFSET_TABLE)
    N,
    D,
    num_layers,
    eps,
    PER_LAYER_AXIS: tl.constexpr,  # -1: no per-layer norm; 0: instance norm (over N); 1: layer norm (over D)
    FINAL_AXIS: tl.constexpr,  # the same codes for the norm after the average
    USE_OFFSET_TABLE: tl.constexpr,
    OFFSET_UNIT: tl.constexpr,  # 16 when every layer offset is a multiple of 16 elements, else 1
    BLOCK_N: tl.constexpr,  # covers all of N whenever a norm reduces over axis 0
    BLOCK_D: tl.constexpr,  # covers all of D whenever a norm reduces over axis 1
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    valid = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    x_tile = x_ptr + pid_b * stride_xb + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd

    # Each layer is loaded once; layer i's load is issued before layer i-1's reductions so that it is
    # in flight while they run.
    x = tl.load(x_tile, mask=valid, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(1, num_layers):
        offset = _layer_offset(layer_offsets_ptr, stride_xl, i, USE_OFFSET_TABLE, OFFSET_UNIT)
        x_next = tl.load(x_tile + offset, mask=valid, other=0.0)
        acc += _normalize_tile(x.to(tl.float32), valid, PER_LAYER_AXIS, N, D, eps)
        x = x_next
    acc += _normalize_tile(x.to(tl.float32), valid, PER_LAYER_AXIS, N, D, eps)

    target = _normalize_tile(acc / num_layers, valid, FINAL_AXIS, N, D, eps)
    out_tile = out_ptr + pid_b * stride_ob + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(out_tile, target, mask=valid)


# Tile axis each norm reduces over: 0 is N (instance norm), 1 is D (layer norm); -1 is no norm.
_AXIS = {None: -1, "instance": 0, "layer": 1}
# Elements per program tile (x, the prefetched next layer and the accumulator stay in registers).
# A norm's axis is always whole; the other axis is filled up to this; both norms' axes share one
# tile (a single pass for IN -> AVG -> LN and LN -> AVG -> IN) only if [N, D] fits in it.
_TILE = 8192


def _tile_shape(n: int, d: int, span_n: bool, span_d: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for a tile spanning all of N and/or all of D as requested."""
    full_n, full_d = triton.next_power_of_2(n), triton.next_power_of_2(d)
    if span_n and span_d:
        block_n, block_d = full_n, full_d
    elif span_n:
        block_n, block_d = full_n, min(full_d, max(1, _TILE // full_n))
    else:
        block_d = full_d if span_d else min(full_d, _TILE)
        block_n = min(full_n, max(1, _TILE // block_d))
    elements = block_n * block_d
    # A full tile gets 32 warps, 8 elements a thread: at 16 warps ptxas held x, the prefetched layer
    # and the fp32 accumulator in 64 registers and spilled 4 / 4 B in bf16 on sm_80 for the [256, 32]
    # instance-norm tile (image recipes, N = 196); at 32 warps every recipe's tile compiles to 28-64
    # registers on sm_80 and sm_90 without spills, at an occupancy as high or higher (``d2v2 bench compile``).
    num_warps = 32 if elements >= _TILE else block_settings(elements)[1]
    return block_n, block_d, num_warps


def _layer_addressing(layers: Sequence[torch.Tensor], device: torch.device):
    """(offset table or None, uniform layer stride, table unit) addressing each layer from layers[0].

    Evenly spaced layers (views of one [k, B, N, D] tensor) need only a stride; a list of separate
    tensors gets a small int64 table of offsets (one tiny host-to-device copy) instead of a stacked copy.
    """
    itemsize = layers[0].element_size()
    deltas = [t.data_ptr() - layers[0].data_ptr() for t in layers]
    # Storage is aligned to its element size, so this holds for tensors of one dtype.
    assert all(delta % itemsize == 0 for delta in deltas), "layers of one dtype must be element-aligned"
    offsets = [delta // itemsize for delta in deltas]
    stride = offsets[1] if len(offsets) > 1 else 0
    if all(offset == i * stride for i, offset in enumerate(offsets)):
        return None, stride, 1
    unit = 16 if all(offset % 16 == 0 for offset in offsets) else 1
    return torch.tensor([offset // unit for offset in offsets], dtype=torch.int64, device=device), 0, unit


def _launch_fwd(out, layers, table, stride_xl, unit, per_layer, final, eps):
    """One launch over (N-block, D-block, b) tiles: reads each of ``layers`` once, writes ``out`` once."""
    B, N, D = out.shape
    axes = {_AXIS[per_layer], _AXIS[final]}
    block_n, block_d, num_warps = _tile_shape(N, D, span_n=0 in axes, span_d=1 in axes)
    x = layers[0]
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d), B)
    _layer_targets_fwd_kernel[grid](
        out, *out.stride(),
        x, *x.stride(),
        x if table is None else table, stride_xl,
        N, D, len(layers), eps,
        PER_LAYER_AXIS=_AXIS[per_layer],
        FINAL_AXIS=_AXIS[final],
        USE_OFFSET_TABLE=table is not None,
        OFFSET_UNIT=unit,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip


def _layer_targets_fwd(layers: Sequence[torch.Tensor], per_layer, final, eps: float) -> torch.Tensor:
    x = layers[0]
    B, N, D = x.shape
    out = torch.empty((B, N, D), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    if any(t.stride() != x.stride() for t in layers):  # one set of strides serves every layer
        layers = [t.contiguous() for t in layers]
    table, stride_xl, unit = _layer_addressing(layers, x.device)

    mixed = {_AXIS[per_layer], _AXIS[final]} == {0, 1}
    if not mixed or triton.next_power_of_2(N) * triton.next_power_of_2(D) <= _TILE:
        _launch_fwd(out, layers, table, stride_xl, unit, per_layer, final, eps)
    else:  # average first, then the final norm in place over the fp32 output (a tile cannot span both)
        _launch_fwd(out, layers, table, stride_xl, unit, per_layer, None, eps)
        _launch_fwd(out, [out], None, 0, 1, final, None, eps)
    return out


class LayerTargetsFunction(torch.autograd.Function):
    """Triton forward; the backward differentiates the reference (targets are built under no_grad)."""

    @staticmethod
    def forward(ctx, per_layer, final, eps, *layers):
        ctx.save_for_backward(*layers)
        ctx.norms = (per_layer, final, eps)
        return _layer_targets_fwd(layers, per_layer, final, eps)

    @staticmethod
    def backward(ctx, grad_out):
        needs_grad = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            layers = [t.detach().requires_grad_(needs) for t, needs in zip(ctx.saved_tensors, needs_grad)]
            target = layer_targets_ref(layers, *ctx.norms)
            wanted = [t for t in layers if t.requires_grad]
            grads = iter(torch.autograd.grad(target, wanted, grad_out))
        return (None, None, None, *(next(grads) if needs else None for needs in needs_grad))


def _check_norm(name: str, norm: object) -> None:
    if not (norm is None or (isinstance(norm, str) and norm in NORMS)):
        raise ValueError(f"{name} must be one of {NORMS}, got {norm!r}")


def _check_layers(layers: object) -> tuple[torch.Tensor, ...]:
    """The layers as a tuple of [B, N, D] tensors of one shape, dtype and device (views of a stack)."""
    if isinstance(layers, torch.Tensor):
        check_tensor("layers", layers, ndim=4)
        if layers.shape[0] == 0:
            raise ValueError(f"layers must hold at least one layer, got shape {list(layers.shape)}")
        return layers.unbind(0)
    if not isinstance(layers, (list, tuple)):
        raise ValueError(
            f"layers must be a list or tuple of [B, N, D] tensors or one [k, B, N, D] tensor, "
            f"got {type(layers).__name__}"
        )
    if len(layers) == 0:
        raise ValueError("layers must hold at least one layer, got an empty sequence")
    first = check_tensor("layers[0]", layers[0], ndim=3)
    for i, layer in enumerate(layers[1:], start=1):
        check_tensor(f"layers[{i}]", layer, ndim=3, dtypes=(first.dtype,), device=first.device)
        if layer.shape != first.shape:
            raise ValueError(f"layers[{i}] must have shape {list(first.shape)} like layers[0], got {list(layer.shape)}")
    return tuple(layers)


def layer_targets(
    layers: Sequence[torch.Tensor] | torch.Tensor,
    per_layer: str | None = "instance",
    final: str | None = "layer",
    eps: float = 1e-5,
    impl: str = "auto",
) -> torch.Tensor:
    """data2vec 2.0 targets: normalise each of the k layers, average them, normalise the average.

    Args:
        layers: k tensors [B, N, D] (list or tuple) or one [k, B, N, D] tensor; fp32, bf16 or fp16.
        per_layer: "instance" (over N), "layer" (over D) or None, applied to each layer.
        final: "instance", "layer" or None, applied to the average.
        eps: added to the variance inside the square root of every norm; > 0.
        impl: "auto" | "triton" | "torch".

    Returns:
        [B, N, D] fp32 targets. Differentiable in the layers (see the module docstring).
    """
    layers = _check_layers(layers)
    _check_norm("per_layer", per_layer)
    _check_norm("final", final)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    _, N, D = layers[0].shape
    if N < 1 or D < 1:
        raise ValueError(f"layers must have N >= 1 and D >= 1 to normalise over, got shape {list(layers[0].shape)}")
    for norm, axis, size in (("instance", "N", N), ("layer", "D", D)):
        if norm in (per_layer, final) and size > MAX_FUSED_SIZE:
            raise ValueError(
                f"layers: a {norm} norm reduces over {axis} in one tile, so {axis} must be <= "
                f"{MAX_FUSED_SIZE}, got {axis} = {size}"
            )
    if resolve_impl(impl, *layers) == "torch":
        return layer_targets_ref(layers, per_layer, final, eps)
    return LayerTargetsFunction.apply(per_layer, final, float(eps), *layers)
