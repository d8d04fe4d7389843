"""``ema_`` bench cases: one teacher update over every tensor the ViT teacher averages.

The tensor list is the image preset's own teacher (``shapes.ema_parameter_shapes``: the model built on
the ``meta`` device), at the image preset's starting decay. The teacher is fp32; the
student fp32, and bf16 as the mixed case. Providers: triton, torch, compile, and apex's
``amp_C.multi_tensor_axpby`` through ``multi_tensor_applier`` (a fused multi-tensor
t <- (1 - decay) * s + decay * t; CUDA only). Forward only (no autograd in the update).

Bytes moved: sum over pairs of read t + read s + write t.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

from d2v2.kernels.ema import ema_, ema_ref
from d2v2.models import data2vec2_config

from . import harness
from .harness import MEMORY_TARGETS, NO_GRAD_MODES, PROVIDERS, Case, Unavailable, Workload
from .shapes import ShapeSpec, ema_parameter_shapes


def ema_decay(spec: ShapeSpec) -> float:
    """The image preset's starting decay tau_0 (the value is immaterial to the time; the preset's keeps it real)."""
    return data2vec2_config("image", spec.size).ema_decay


def setup_ema(
    spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype, teacher_dtype: torch.dtype = torch.float32
) -> Workload:
    """EMA over every parameter of the image teacher of ``spec``'s size; ``dtype`` is the student's."""
    harness.check_provider("ema_", provider, PROVIDERS)
    gen = harness.generator(device)
    shapes = ema_parameter_shapes("image", spec.size)
    teacher = [harness.randn(s, device, teacher_dtype, gen, std=0.02) for s in shapes]
    student = [harness.randn(s, device, dtype, gen, std=0.02) for s in shapes]
    decay = ema_decay(spec)
    if provider == "apex":
        harness.require_cuda_for_apex(device)
        try:
            import amp_C
            from apex.multi_tensor_apply import multi_tensor_applier
        except ImportError as e:
            raise Unavailable(f"apex's amp_C extension is not importable: {e}") from e
        noop_flag = torch.zeros(1, dtype=torch.int32, device=device)

        def fn():
            # out = a * x + b * y with x = student, y = out = teacher; arg_to_check=-1 checks both for inf/nan.
            multi_tensor_applier(amp_C.multi_tensor_axpby, noop_flag, [student, teacher, teacher], 1.0 - decay, decay, -1)

    else:
        op = harness.op_provider(ema_, ema_ref, provider, device)

        def fn():
            with torch.no_grad():
                op(teacher, student, decay)

    return Workload(fn=fn, bytes={"fwd": 2 * harness.nbytes(*teacher) + harness.nbytes(*student)})


def bench_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> list[Case]:
    """The image specs only (one ViT per run is enough): student fp32 and the mixed bf16 student."""
    cases = []
    for s in (s for s in shapes.values() if s.modality == "image"):
        params = ema_parameter_shapes("image", s.size)
        numel = sum(math.prod(p) for p in params)
        for student in (torch.float32, torch.bfloat16):
            cases.append(Case(
                "ema_", s.name,
                dims=f"{len(params)} tensors, {numel / 1e6:.2f}M params, teacher fp32, "
                f"student {harness.dtype_name(student)}",
                dtype=student, modes=NO_GRAD_MODES, providers=PROVIDERS, bound="memory",
                targets=MEMORY_TARGETS, setup=functools.partial(setup_ema, s, dtype=student),
            ))  # fmt: skip
    return cases
