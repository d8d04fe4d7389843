"""``conv_block1d`` / ``conv_block2d`` bench cases: one decoder block (grouped conv -> LayerNorm -> GELU
(+ residual)) at the recipe's decoder width, kernel and groups: 2-D over the patch grid for images,
1-D over the sequence for audio and text.

Bytes moved and FLOPs (R = B*M rows, es = element size of x; parameters stay fp32)
    fwd  x + weight + bias + out: R*N*C_out*es(x)
    bwd  dout + x + weight + dx + dweight + dbias
    FLOPs fwd 2*R*N*C_out*(C/groups)*k^d (the convolution; norm and GELU are negligible), bwd twice
    that (dx and dweight); full = fwd + bwd.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from d2v2.kernels.conv_block1d import conv_block1d, conv_block1d_ref
from d2v2.kernels.conv_block2d import conv_block2d, conv_block2d_ref

from . import harness
from .harness import BASE_PROVIDERS, CONV_TARGETS, TRAIN_MODES, Case, Workload
from .shapes import ShapeSpec


def _conv_workload(op, x, weight, bias, extra_args, taps: int, groups: int) -> Workload:
    rows, length, channels = x.shape
    out_channels = weight.shape[0]
    out_bytes = rows * length * out_channels * x.element_size()
    fwd = harness.nbytes(x, weight, bias) + out_bytes
    bwd = out_bytes + 2 * harness.nbytes(x, weight, bias)
    flops = 2.0 * rows * length * out_channels * (channels // groups) * taps
    return Workload(
        fn=lambda: op(x, weight, bias, groups, *extra_args),
        grad_inputs=(x, weight, bias),
        bytes={"fwd": fwd, "bwd": bwd, "full": fwd + bwd},
        flops={"fwd": flops, "bwd": 2 * flops, "full": 3 * flops},
    )


def _parameters(spec: ShapeSpec, taps: tuple[int, ...], device, gen):
    # Parameters stay fp32 as in mixed-precision training; the op casts them to x's dtype.
    c, g = spec.dec_dim, spec.dec_groups
    fan_in = c // g * spec.dec_kernel ** len(taps)
    weight = harness.randn((c, c // g, *taps), device, torch.float32, gen, requires_grad=True, std=fan_in**-0.5)
    bias = harness.randn((c,), device, torch.float32, gen, requires_grad=True, std=0.02)
    return weight, bias


def setup_conv_block1d(spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    harness.check_provider("conv_block1d", provider, BASE_PROVIDERS)
    op = harness.op_provider(conv_block1d, conv_block1d_ref, provider, device)
    gen = harness.generator(device)
    x = harness.randn((spec.rows, spec.length, spec.dec_dim), device, dtype, gen, requires_grad=True)
    weight, bias = _parameters(spec, (spec.dec_kernel,), device, gen)
    return _conv_workload(op, x, weight, bias, (spec.dec_residual,), taps=spec.dec_kernel, groups=spec.dec_groups)


def setup_conv_block2d(spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    harness.check_provider("conv_block2d", provider, BASE_PROVIDERS)
    if spec.grid is None:
        raise ValueError(f"conv_block2d needs a shape spec with a grid; {spec.name!r} has none")
    op = harness.op_provider(conv_block2d, conv_block2d_ref, provider, device)
    gen = harness.generator(device)
    k = spec.dec_kernel
    x = harness.randn((spec.rows, spec.length, spec.dec_dim), device, dtype, gen, requires_grad=True)
    weight, bias = _parameters(spec, (k, k), device, gen)
    return _conv_workload(op, x, weight, bias, (spec.grid, spec.dec_residual), taps=k * k, groups=spec.dec_groups)


def bench_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> list[Case]:
    """conv_block2d for the specs with a patch grid, conv_block1d for the sequences."""
    cases = []
    for s in shapes.values():
        where = f"grid={s.grid[0]}x{s.grid[1]}" if s.grid else f"N={s.length}"
        res = "residual" if s.dec_residual else "no residual"
        cases.append(Case(
            "conv_block2d" if s.grid else "conv_block1d", s.name,
            dims=f"R={s.rows} {where} C={s.dec_dim} k={s.dec_kernel} g={s.dec_groups} {res}",
            dtype=dtype, modes=TRAIN_MODES, providers=BASE_PROVIDERS, bound="compute", targets=CONV_TARGETS,
            setup=functools.partial(setup_conv_block2d if s.grid else setup_conv_block1d, s, dtype=dtype),
        ))  # fmt: skip
    return cases
