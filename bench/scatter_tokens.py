"""``scatter_tokens`` bench cases: the kept tokens back to full length, masked positions filled with noise.

Bytes moved (R = B*M rows, es = element size; the noise is made in registers)
    fwd  y: R*K*D*es + ids + out: R*N*D*es
    bwd  ids + the kept rows of dout: R*K*D*es + dy: R*K*D*es
    full fwd + bwd
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from d2v2.kernels.scatter_tokens import scatter_tokens, scatter_tokens_ref

from . import harness
from .harness import BASE_PROVIDERS, MEMORY_TARGETS, TRAIN_MODES, Case, Workload
from .shapes import ShapeSpec


def setup_scatter_tokens(spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    harness.check_provider("scatter_tokens", provider, BASE_PROVIDERS)
    op = harness.op_provider(scatter_tokens, scatter_tokens_ref, provider, device)
    gen = harness.generator(device)
    y = harness.randn((spec.rows, spec.kept, spec.dim), device, dtype, gen, requires_grad=True)
    ids = harness.ids_keep(spec.rows, spec.length, spec.kept, device, gen)
    fwd = harness.nbytes(y, ids) + spec.rows * spec.length * spec.dim * y.element_size()
    bwd = harness.nbytes(ids) + 2 * harness.nbytes(y)
    return Workload(
        fn=lambda: op(y, ids, spec.length, fill="noise", noise_std=0.01),
        grad_inputs=(y,),
        bytes={"fwd": fwd, "bwd": bwd, "full": fwd + bwd},
    )


def bench_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> list[Case]:
    return [
        Case(
            "scatter_tokens", s.name, dims=f"R={s.rows} K={s.kept} N={s.length} D={s.dim} fill=noise",
            dtype=dtype, modes=TRAIN_MODES, providers=BASE_PROVIDERS, bound="memory", targets=MEMORY_TARGETS,
            setup=functools.partial(setup_scatter_tokens, s, dtype=dtype),
        )  # fmt: skip
        for s in shapes.values()
    ]
