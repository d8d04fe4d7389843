"""Shared helpers for the ops in ``d2v2.kernels``: Triton import guard, implementation choice,
argument checks and launch settings. Private: nothing here is part of the public API.
"""

from __future__ import annotations

import functools
import os
import types
from typing import Iterable, Sequence

import torch

try:  # Triton wheels exist for Linux x86-64 only; everything else runs the PyTorch references.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton does not install

    def _no_triton_decorator(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    # Stand-ins so kernel definitions still parse; they are never launched (resolve_impl refuses).
    triton = types.SimpleNamespace(
        jit=_no_triton_decorator,
        autotune=lambda *a, **k: _no_triton_decorator,
        heuristics=lambda *a, **k: _no_triton_decorator,
        Config=lambda *a, **k: None,
        cdiv=lambda a, b: (a + b - 1) // b,
        next_power_of_2=lambda n: 1 << max(0, int(n) - 1).bit_length(),
    )
    tl = types.SimpleNamespace(constexpr=None)
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)

# Row-wise ops load one whole row (or a D-wide slice) per program; past this a row no longer
# fits comfortably in registers and the op must be tiled differently.
MAX_FUSED_SIZE = 65536


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set by ``_aot.trace_launches()``: launches are then recorded, not run, so CPU tensors may take the
# Triton path (with the host code's GPU branches, unlike the interpreter). ``_smem_limit`` and ``_arch``
# stand in for the device's shared memory and compute capability while it asks the autotuners what
# they keep on each architecture.
_tracing = False
_smem_limit: int | None = None
_arch: int | None = None


def tracing_launches() -> bool:
    """True inside ``trace_launches()``, where the ops record their Triton launches instead of running them."""
    return _tracing


def resolve_impl(impl: str, *tensors: torch.Tensor | None) -> str:
    """Turn ``impl`` ("auto" | "triton" | "torch") into "triton" or "torch" for these tensors.

    "auto" picks Triton for CUDA tensors when Triton is importable and the PyTorch reference
    otherwise; ``D2V2_KERNELS=torch|triton`` overrides "auto". "triton" on CPU tensors runs the
    kernels in Triton's interpreter when TRITON_INTERPRET=1 (how CI tests them); an explicit
    "triton" that cannot run raises ValueError saying why.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        forced = os.environ.get("D2V2_KERNELS", "").strip().lower()
        if forced and forced not in ("torch", "triton"):
            raise ValueError(f"D2V2_KERNELS must be 'torch' or 'triton', got {forced!r}")
        impl = forced or "auto"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "auto":
        return "triton" if HAS_TRITON and on_cuda else "torch"
    runnable = HAS_TRITON and (on_cuda or triton_interpret() or _tracing)
    if impl == "triton" and not runnable:
        if not HAS_TRITON:
            raise ValueError("impl='triton' needs the triton package; install it or use impl='torch'")
        raise ValueError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to interpret the kernels on "
            "CPU); move the inputs to a GPU or use impl='torch'"
        )
    return impl


def device_smem_limit() -> int | None:
    """Shared memory one block of the current CUDA device may opt in to; None when nothing runs on a GPU
    (the interpreter, ``trace_launches``, no CUDA), where no config is filtered by it."""
    if _smem_limit is not None:
        return _smem_limit
    if triton_interpret() or _tracing or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


def device_arch() -> int | None:
    """Compute capability of the current CUDA device as 10 * major + minor (80: A100, 90: H100), which
    the autotuners' pruning reads to drop configs that spill registers there; None when nothing runs on
    a GPU (the interpreter, ``trace_launches``, no CUDA), where no config is dropped by it."""
    if _arch is not None:
        return _arch
    if triton_interpret() or _tracing or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
    return 10 * major + minor


# Shared memory the compiler allocates beyond the tiles the kernels' estimates count, per architecture
# (compute capabilities from, bytes): on sm_100 Triton 3.9 adds barriers and conversion scratch, up to 2,064 B
# over the estimates of the conv, conv weight-gradient and attention dK/dV configs (``d2v2 bench compile``);
# on sm_80 and sm_90 every estimate bounds the compiled size, and their choices stay as they are. On sm_100
# the margin also drops the fp32 attention backward's two largest tiles (estimates within 2 KiB of the limit,
# compiled at 131 KB), which fp32 can spare: it keeps the smaller ones.
_COMPILER_SMEM_MARGINS = ((100, 4096),)


def smem_margin(arch: int | None) -> int:
    """Bytes added to a config's shared-memory estimate on compute capability ``arch`` (None: none)."""
    if arch is None:
        return 0
    return max((margin for since, margin in _COMPILER_SMEM_MARGINS if arch >= since), default=0)


def fit_shared_memory(configs: list, smem_estimate, named_args: dict, kwargs: dict) -> list:
    """The autotune ``configs`` whose shared memory (``smem_estimate(config, args)``, an upper bound in
    bytes, plus the architecture's ``smem_margin``) fits the current device, so that every config left
    launches; the smallest one if none fits.

    The bounds are checked against the compiler's figures for every config at the recipes' shapes
    by ``d2v2 bench compile`` and its test (a bound below the compiled size fails them)."""
    limit = device_smem_limit()
    if limit is None:
        return configs
    args, margin = {**named_args, **kwargs}, smem_margin(device_arch())
    fitting = [c for c in configs if smem_estimate(c, args) + margin <= limit]
    return fitting or [min(configs, key=lambda c: smem_estimate(c, args))]


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise ValueError naming ``name`` unless ``t`` is a tensor of the expected rank, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Raise ValueError unless ``t.shape`` matches ``expected`` (None matches any size)."""
    shape = tuple(t.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(shape)}")


def check_index_range(name: str, idx: torch.Tensor, upper: int) -> None:
    """Raise ValueError unless every entry of the integer tensor ``idx`` lies in [0, upper).

    Costs one device-to-host sync: the ops that take indices skip it with ``check_ids=False``.
    """
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} values must lie in [0, {upper}), got range [{lo}, {hi}]")


@functools.lru_cache(maxsize=None)
def block_settings(n: int) -> tuple[int, int]:
    """Block size (next power of two of ``n``) and warp count for a row-wise op over ``n`` elements."""
    block = triton.next_power_of_2(max(int(n), 1))
    if block > MAX_FUSED_SIZE:
        raise ValueError(
            f"a row of {n} elements exceeds the fused row-wise limit of {MAX_FUSED_SIZE}; "
            "split the feature dimension"
        )
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def row_tile_settings(rows: int, dim: int, tile_elements: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) for a tile of a few token rows of one full D-row each,
    holding at most ``tile_elements`` values (the token-movement ops' tiling)."""
    block_d, _ = block_settings(dim)
    block_rows = max(1, min(triton.next_power_of_2(max(rows, 1)), tile_elements // block_d))
    _, num_warps = block_settings(block_rows * block_d)
    return block_rows, block_d, num_warps


def inverse_ids(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """[R, length] int32 map from position to kept slot: inv[r, ids_keep[r, j]] = j, -1 elsewhere."""
    rows, kept = ids_keep.shape
    inv = torch.full((rows, length), -1, dtype=torch.int32, device=ids_keep.device)
    slots = torch.arange(kept, dtype=torch.int32, device=ids_keep.device).expand(rows, kept)
    return inv.scatter_(1, ids_keep.long(), slots)


def ensure_contiguous(fn):
    """Make every tensor argument of an autograd Function's forward/backward contiguous, once."""

    @functools.wraps(fn)
    def wrapper(ctx, *args, **kwargs):
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        return fn(ctx, *args, **kwargs)

    return wrapper
