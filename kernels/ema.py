"""In-place exponential moving average over a list of tensors: the data2vec 2.0 teacher update.

Contract
    ``ema_(teacher, student, decay, impl="auto") -> None``

    - ``teacher``, ``student``: sequences of equal length; ``teacher[i].shape == student[i].shape``; all
      tensors on one device; dtypes fp32, bf16 or fp16 in any mix (the two tensors of a pair may differ).
    - For every pair, in place: ``t <- decay * t + (1 - decay) * s``, computed in fp32 and rounded once
      to ``t``'s dtype. ``(1 - decay)`` is formed before rounding to fp32 (in float64 for a Python float,
      in the tensor's dtype for a tensor), as the reference's ``add_(param, alpha=1 - decay)`` does.
    - ``decay``: a Python float in [0, 1], or a 0-dim fp32/fp64 tensor on the tensors' device that the
      kernel reads itself, so a decay schedule kept on the device costs no host sync.
    - ``decay == 1.0`` given as a float is a no-op: the reference takes no EMA step once tau reaches 1
      (teacher frozen).
    - Not differentiable: an optimizer-style update. The teacher must not be tracked by autograd while
      it is written: each teacher tensor must have ``requires_grad=False``, or the call must run under
      ``torch.no_grad()``. The student is only read (detached).
    - Returns None.

Design (Triton path)
    A multi-tensor apply, as NVIDIA apex's ``multi_tensor_apply``: pairs are grouped by
    (teacher dtype, student dtype, alignment) and each group is one launch (one launch in practice:
    a model's parameters share a dtype and are allocator-aligned). A device table holds every pair's
    teacher and student addresses (int64) and sizes; a second table maps each program to its
    (pair, first element) chunk of ``_CHUNK`` elements. The kernel casts the addresses to typed
    pointers. Tables depend only on (addresses, sizes, dtypes), so they are cached under that key:
    a training loop that updates the same parameters every step builds and uploads them once.
    Pairs whose addresses are 16-byte aligned and whose sizes are multiples of 8 elements (every
    parameter of the d2v2 models) go to launches that tell the compiler so, which lets it emit
    128-bit loads and stores; the rest go to a launch without those hints. Triton's interpreter
    also treats int64 -> pointer casts as raw addresses, so the same kernel runs under
    TRITON_INTERPRET=1 (tested).

Precision
    The reference keeps an fp32 master copy of the teacher (fairseq ``EMAModule`` with
    ``ema_fp32=True``). We keep no master copy: the arithmetic is fp32, but the result is rounded to
    the teacher's stored dtype at every step. With an fp32 teacher (the d2v2 default; autocast runs
    its matmuls in bf16) this is the reference's update. With a bf16/fp16 teacher, updates smaller
    than half an ulp of ``t`` (``(1 - decay) * |s - t|`` at decay 0.9999 and above) are lost to
    rounding: keep teachers in fp32.

References
    data2vec 2.0 (Baevski et al., 2022, arXiv:2212.07525), section 2 "Teacher";
    fairseq ``fairseq/modules/ema_module.py: EMAModule._step_internal``;
    NVIDIA apex ``csrc/multi_tensor_apply.cuh`` (the multi-tensor apply pattern).

Limits
    - Teacher tensors must be contiguous (ValueError otherwise: the kernel writes through their
      addresses); a non-contiguous student tensor is copied to a contiguous one first.
    - A decay given as a tensor is not range-checked (checking would need a host sync).
    - Teacher tensors must not overlap one another (the same tensor listed twice would be updated
      by two programs at once, where the reference applies both updates in turn).
    - Dense tensors only (no sparse, no complex).
    - Not yet timed on a GPU (target: 85% of copy bandwidth over the ~86M parameters of ViT-B).
      Compiled offline for sm_90: the aligned launches use 128-bit loads and stores, the others
      scalar ones. ``_CHUNK``, ``_BLOCK`` and ``_NUM_WARPS`` are first guesses to tune there.
"""

from __future__ import annotations

import collections
import numbers
from typing import Sequence

import torch

from ._utils import FLOAT_DTYPES, HAS_TRITON, check_tensor, resolve_impl, tl, triton


def ema_ref(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], decay: float | torch.Tensor) -> None:
    """PyTorch reference: ``t <- decay * t + (1 - decay) * s`` in fp32 for every pair, in place."""
    if isinstance(decay, torch.Tensor):
        teacher_weight = decay.to(torch.float32)
        student_weight = (1 - decay).to(torch.float32)
    else:
        if decay == 1.0:
            return
        teacher_weight, student_weight = float(decay), 1.0 - float(decay)
    with torch.no_grad():
        for t, s in zip(teacher, student):
            t.copy_(t.float() * teacher_weight + s.detach().float() * student_weight)


# Each program updates one chunk of _CHUNK elements of one pair, in _CHUNK // _BLOCK unrolled steps.
_CHUNK = 8192
_BLOCK = 2048
_NUM_WARPS = 8
# Alignment the hinted launches promise: 16-byte addresses (one 128-bit vector) and sizes in whole
# vectors of the narrowest dtype (8 bf16/fp16 elements).
_ALIGN_BYTES = 16
_ALIGN_ELEMENTS = 8


@triton.jit
def _ema_fwd_kernel(
    pairs_ptr,  # [3, P] int64: teacher address, student address, number of elements of each pair
    stride_pairs_field,  # = P
    chunks_ptr,  # [2, C] int64: pair index and first element of each program's chunk
    stride_chunks_field,  # = C
    decay_ptr,  # [] fp32/fp64, read when DECAY_IN_TENSOR
    decay,  # fp32 scalar, used otherwise
    one_minus_decay,  # fp32 scalar, used otherwise
    TEACHER_DTYPE: tl.constexpr,
    STUDENT_DTYPE: tl.constexpr,
    DECAY_IN_TENSOR: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    pair = tl.load(chunks_ptr + pid)
    start = tl.multiple_of(tl.load(chunks_ptr + stride_chunks_field + pid), CHUNK)
    teacher_ptr = tl.load(pairs_ptr + pair).to(tl.pointer_type(TEACHER_DTYPE))
    student_ptr = tl.load(pairs_ptr + stride_pairs_field + pair).to(tl.pointer_type(STUDENT_DTYPE))
    numel = tl.load(pairs_ptr + 2 * stride_pairs_field + pair)
    if ALIGNED:  # _ALIGN_BYTES and _ALIGN_ELEMENTS, checked by the launcher: allows 128-bit accesses
        teacher_ptr = tl.multiple_of(teacher_ptr, 16)
        student_ptr = tl.multiple_of(student_ptr, 16)
        numel = tl.multiple_of(numel, 8)

    if DECAY_IN_TENSOR:
        decay_value = tl.load(decay_ptr)
        teacher_weight = decay_value.to(tl.float32)
        student_weight = (1.0 - decay_value).to(tl.float32)  # in the tensor's dtype, then rounded
    else:
        teacher_weight = decay
        student_weight = one_minus_decay

    for step in tl.static_range(CHUNK // BLOCK):
        offsets = start + step * BLOCK + tl.arange(0, BLOCK)
        in_pair = offsets < numel
        t = tl.load(teacher_ptr + offsets, mask=in_pair).to(tl.float32)
        s = tl.load(student_ptr + offsets, mask=in_pair).to(tl.float32)
        tl.store(teacher_ptr + offsets, (t * teacher_weight + s * student_weight).to(TEACHER_DTYPE), mask=in_pair)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} if HAS_TRITON else {}

# (device, ((teacher address, student address, numel), ...)) -> (pairs table, chunks table) on device.
_TABLE_CACHE: collections.OrderedDict = collections.OrderedDict()
_TABLE_CACHE_SIZE = 16


def _is_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % _ALIGN_BYTES == 0 and t.numel() % _ALIGN_ELEMENTS == 0


def _launch_tables(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
    """Device tables [3, P] (addresses, sizes) and [2, C] (pair, chunk start) for one launch, cached."""
    key = (device, tuple((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in pairs))
    tables = _TABLE_CACHE.get(key)
    if tables is not None:
        _TABLE_CACHE.move_to_end(key)
        return tables
    pair_table = torch.tensor([list(entry) for entry in key[1]], dtype=torch.int64).T  # [3, P]
    chunks_per_pair = (pair_table[2] + _CHUNK - 1) // _CHUNK
    pair_of_chunk = torch.repeat_interleave(torch.arange(len(pairs)), chunks_per_pair)
    first_chunk_of_pair = torch.cumsum(chunks_per_pair, 0) - chunks_per_pair
    chunk_start = (torch.arange(pair_of_chunk.numel()) - first_chunk_of_pair[pair_of_chunk]) * _CHUNK
    chunk_table = torch.stack([pair_of_chunk, chunk_start])  # [2, C]
    # One upload for both tables.
    packed = torch.cat([pair_table.reshape(-1), chunk_table.reshape(-1)]).to(device)
    num_pairs, num_chunks = pair_table.shape[1], chunk_table.shape[1]
    tables = (packed[: 3 * num_pairs].view(3, num_pairs), packed[3 * num_pairs :].view(2, num_chunks))
    _TABLE_CACHE[key] = tables
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return tables


def _ema_fwd(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], decay: float | torch.Tensor) -> None:
    """Launch one multi-tensor kernel per (teacher dtype, student dtype, aligned) group."""
    if not isinstance(decay, torch.Tensor) and decay == 1.0:
        return
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = collections.defaultdict(list)
    for t, s in zip(teacher, student):
        if t.numel() == 0:
            continue
        s = s.detach().contiguous()
        groups[(t.dtype, s.dtype, _is_aligned(t) and _is_aligned(s))].append((t, s))

    decay_in_tensor = isinstance(decay, torch.Tensor)
    for (teacher_dtype, student_dtype, aligned), pairs in groups.items():
        device = pairs[0][0].device
        pair_table, chunk_table = _launch_tables(pairs, device)
        _ema_fwd_kernel[(chunk_table.shape[1],)](
            pair_table,
            pair_table.stride(0),
            chunk_table,
            chunk_table.stride(0),
            decay if decay_in_tensor else pair_table,  # the pointer is unused for a float decay
            0.0 if decay_in_tensor else float(decay),
            0.0 if decay_in_tensor else 1.0 - float(decay),
            TEACHER_DTYPE=_TL_DTYPES[teacher_dtype],
            STUDENT_DTYPE=_TL_DTYPES[student_dtype],
            DECAY_IN_TENSOR=decay_in_tensor,
            ALIGNED=aligned,
            CHUNK=_CHUNK,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
        )
    # The kernel wrote through raw addresses; tell autograd the teachers changed in place.
    torch.autograd.graph.increment_version([t for pairs in groups.values() for t, _ in pairs])


def _check_decay(decay: object, device: torch.device) -> None:
    if isinstance(decay, torch.Tensor):
        check_tensor("decay", decay, ndim=0, dtypes=(torch.float32, torch.float64), device=device)
    elif isinstance(decay, numbers.Real) and not isinstance(decay, bool):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
    else:
        raise ValueError(f"decay must be a float or a 0-dim tensor, got {type(decay).__name__}")


def ema_(
    teacher: Sequence[torch.Tensor],
    student: Sequence[torch.Tensor],
    decay: float | torch.Tensor,
    impl: str = "auto",
) -> None:
    """In place, for every pair: ``teacher[i] <- decay * teacher[i] + (1 - decay) * student[i]`` (fp32 math).

    Args:
        teacher: tensors updated in place; contiguous, fp32/bf16/fp16, not tracked by autograd
            (``requires_grad=False``, or call under ``torch.no_grad()``).
        student: tensors of the same shapes, on the same device, any float dtype; only read.
        decay: Python float in [0, 1] (1.0 is a no-op), or a 0-dim fp32/fp64 tensor on the device.
        impl: "auto" | "triton" | "torch" (see ``d2v2.kernels``).
    """
    if isinstance(teacher, torch.Tensor) or isinstance(student, torch.Tensor):
        raise ValueError("teacher and student must be sequences of tensors, not single tensors")
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"teacher and student must have the same length, got {len(teacher)} and {len(student)}")
    if not teacher:
        return
    device = check_tensor("teacher[0]", teacher[0]).device
    grad_enabled = torch.is_grad_enabled()
    for i, (t, s) in enumerate(zip(teacher, student)):
        check_tensor(f"teacher[{i}]", t, dtypes=FLOAT_DTYPES, device=device)
        check_tensor(f"student[{i}]", s, dtypes=FLOAT_DTYPES, device=device)
        if t.shape != s.shape:
            raise ValueError(
                f"teacher[{i}] and student[{i}] must have the same shape, got {list(t.shape)} and {list(s.shape)}"
            )
        if not t.is_contiguous():
            raise ValueError(f"teacher[{i}] must be contiguous (it is updated in place), got strides {t.stride()}")
        if grad_enabled and t.requires_grad:
            raise ValueError(
                f"teacher[{i}] requires grad; set requires_grad=False on the teacher or call ema_ under torch.no_grad()"
            )
    _check_decay(decay, device)

    if resolve_impl(impl, *teacher, *student) == "torch":
        ema_ref(teacher, student, decay)
    else:
        _ema_fwd(teacher, student, decay)
