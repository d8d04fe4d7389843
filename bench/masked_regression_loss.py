"""``masked_regression_loss`` bench cases: the decoder's prediction against the per-sample targets at
the masked positions of every clone.

Bytes moved (R = B*M rows, es = element size, "distinct" counted from the actual mask)
    fwd  mask: R*N + masked rows of pred * D*es(pred)
         + distinct masked (sample, position) rows of target * D*es(target)
    bwd  the same reads + dpred: R*N*D*es(pred) (unmasked rows are written as zeros)
    full fwd + bwd
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from d2v2.kernels.masked_regression_loss import masked_regression_loss, masked_regression_loss_ref

from . import harness
from .harness import BASE_PROVIDERS, MEMORY_TARGETS, TRAIN_MODES, Case, Workload
from .shapes import ShapeSpec


def masked_rows(mask: torch.Tensor, clones: int) -> tuple[int, int]:
    """(masked (row, position) pairs, distinct masked (sample, position) pairs) of ``mask`` [R, N]."""
    rows, positions = mask.nonzero(as_tuple=True)
    distinct = torch.unique((rows // clones) * mask.shape[1] + positions).numel()
    return int(rows.numel()), int(distinct)


def setup_masked_regression_loss(
    spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype
) -> Workload:
    harness.check_provider("masked_regression_loss", provider, BASE_PROVIDERS)
    op = harness.op_provider(masked_regression_loss, masked_regression_loss_ref, provider, device)
    gen = harness.generator(device)
    pred = harness.randn((spec.rows, spec.length, spec.dim), device, dtype, gen, requires_grad=True)
    target = harness.randn((spec.batch, spec.length, spec.dim), device, torch.float32, gen)  # layer_targets is fp32
    mask = torch.ones(spec.rows, spec.length, dtype=torch.bool, device=device)
    # True = masked: every row masks N - K positions
    mask.scatter_(1, harness.ids_keep(spec.rows, spec.length, spec.kept, device, gen), False)
    masked, distinct = masked_rows(mask, spec.clones)
    reads = harness.nbytes(mask) + masked * spec.dim * pred.element_size() + distinct * spec.dim * target.element_size()
    bwd = reads + harness.nbytes(pred)
    return Workload(
        fn=lambda: op(pred, target, mask, spec.clones, spec.loss_scale, 0.0),
        grad_inputs=(pred,),
        bytes={"fwd": reads, "bwd": bwd, "full": reads + bwd},
    )


def bench_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> list[Case]:
    return [
        Case(
            "masked_regression_loss", s.name,
            dims=f"R={s.rows} N={s.length} D={s.dim} M={s.clones} masked={s.length - s.kept}/row",
            dtype=dtype, modes=TRAIN_MODES, providers=BASE_PROVIDERS, bound="memory", targets=MEMORY_TARGETS,
            setup=functools.partial(setup_masked_regression_loss, s, dtype=dtype),
        )  # fmt: skip
        for s in shapes.values()
    ]
