"""``layer_targets`` bench cases: the teacher's top-k layers -> per-layer norm -> average (-> final norm).

Providers: triton, torch, compile, and apex where the recipe has a final LayerNorm (images):
``layer_targets_ref(..., final=None)`` then ``apex.normalization.FusedLayerNorm`` (CUDA only).
Forward only: the teacher side never needs gradients.

Bytes moved: k*B*N*D*es(layers) + target: B*N*D*4 (fp32).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from d2v2.kernels.layer_targets import layer_targets, layer_targets_ref

from . import harness
from .harness import BASE_PROVIDERS, MEMORY_TARGETS, NO_GRAD_MODES, Case, Unavailable, Workload
from .shapes import ShapeSpec

EPS = 1e-5


def providers(spec: ShapeSpec) -> tuple[str, ...]:
    return BASE_PROVIDERS + (("apex",) if spec.target_final == "layer" else ())


def setup_layer_targets(spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    harness.check_provider("layer_targets", provider, providers(spec))
    gen = harness.generator(device)
    layers = [harness.randn((spec.batch, spec.length, spec.dim), device, dtype, gen) for _ in range(spec.target_layers)]
    if provider == "apex":
        harness.require_cuda_for_apex(device)
        try:
            from apex.normalization import FusedLayerNorm
        except ImportError as e:
            raise Unavailable(f"apex.normalization is not importable: {e}") from e
        final_norm = FusedLayerNorm(spec.dim, eps=EPS, elementwise_affine=False).to(device)

        def run():
            return final_norm(layer_targets_ref(layers, per_layer=spec.target_per_layer, final=None, eps=EPS))

    else:
        op = harness.op_provider(layer_targets, layer_targets_ref, provider, device)

        def run():
            return op(layers, per_layer=spec.target_per_layer, final=spec.target_final, eps=EPS)

    def fn():
        with torch.no_grad():  # the teacher side: targets never need gradients
            return run()

    return Workload(fn=fn, bytes={"fwd": harness.nbytes(*layers) + spec.batch * spec.length * spec.dim * 4})


def bench_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> list[Case]:
    cases = []
    for s in shapes.values():
        norms = "->".join(n for n in (s.target_per_layer, "avg", s.target_final) if n)
        cases.append(Case(
            "layer_targets", s.name, dims=f"k={s.target_layers} x [{s.batch},{s.length},{s.dim}] {norms}",
            dtype=dtype, modes=NO_GRAD_MODES, providers=providers(s), bound="memory", targets=MEMORY_TARGETS,
            setup=functools.partial(setup_layer_targets, s, dtype=dtype),
        ))  # fmt: skip
    return cases
