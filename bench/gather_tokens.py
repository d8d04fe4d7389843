"""``gather_tokens`` bench cases: the kept tokens of every clone (+ the fixed positions for images).

Bytes moved (the minimum DRAM traffic: each distinct input element read once, each output element
written once; R = B*M rows, es = element size, "distinct" counted from the actual ids)
    fwd  ids + distinct (sample, kept position) rows of x * D*es(x)
         + distinct kept positions of pos * D*es(pos) + y: R*K*D*es(x)
    bwd  ids + dy: R*K*D*es(x) + dx: B*N*D*es(x) (rows no clone kept are written as zeros)
    full fwd + bwd
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from d2v2.kernels.gather_tokens import gather_tokens, gather_tokens_ref

from . import harness
from .harness import BASE_PROVIDERS, MEMORY_TARGETS, TRAIN_MODES, Case, Workload
from .shapes import ShapeSpec


def distinct_rows(ids: torch.Tensor, clones: int, length: int) -> int:
    """Number of distinct (sample, position) pairs among ``ids`` [R, K] (rows r of sample r // clones)."""
    sample = torch.arange(ids.shape[0], device=ids.device)[:, None] // clones
    return int(torch.unique(sample * length + ids).numel())


def setup_gather_tokens(spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    harness.check_provider("gather_tokens", provider, BASE_PROVIDERS)
    op = harness.op_provider(gather_tokens, gather_tokens_ref, provider, device)
    gen = harness.generator(device)
    x = harness.randn((spec.batch, spec.length, spec.dim), device, dtype, gen, requires_grad=True)
    # the fixed sin-cos buffer, fp32 as the model keeps it
    pos = harness.randn((spec.length, spec.dim), device, torch.float32, gen) if spec.has_pos else None
    ids = harness.ids_keep(spec.rows, spec.length, spec.kept, device, gen)
    es, out_rows = x.element_size(), spec.rows * spec.kept
    fwd = harness.nbytes(ids) + distinct_rows(ids, spec.clones, spec.length) * spec.dim * es
    fwd += out_rows * spec.dim * es
    if pos is not None:
        fwd += int(torch.unique(ids).numel()) * spec.dim * pos.element_size()
    bwd = harness.nbytes(ids) + out_rows * spec.dim * es + harness.nbytes(x)
    return Workload(
        fn=lambda: op(x, ids, pos, spec.clones),
        grad_inputs=(x,),
        bytes={"fwd": fwd, "bwd": bwd, "full": fwd + bwd},
    )


def bench_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> list[Case]:
    return [
        Case(
            "gather_tokens", s.name, dims=f"B={s.batch} M={s.clones} N={s.length} K={s.kept} D={s.dim}"
            + (" +pos" if s.has_pos else ""), dtype=dtype, modes=TRAIN_MODES, providers=BASE_PROVIDERS,
            bound="memory", targets=MEMORY_TARGETS, setup=functools.partial(setup_gather_tokens, s, dtype=dtype),
        )  # fmt: skip
        for s in shapes.values()
    ]
