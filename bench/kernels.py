"""``d2v2 bench kernels``: every op of ``d2v2.kernels`` against its providers at the reference shapes.

What is measured
    For each case (one op at one named shape spec and dtype), each provider and each mode:
    median and 20/80-percentile time (``harness.measure``: do_bench on CUDA, a plain timer on CPU),
    peak allocated memory (CUDA), achieved GB/s from the op's bytes-moved formula and its fraction
    of the copy bandwidth measured once per run, TFLOP/s (compute-bound ops) and its fraction of a
    measured matmul ceiling, and the speedups over the "torch" and "compile" providers (and over any
    provider a case's targets name). Output: ``results.json`` (meta + one row per op, shape, dtype,
    provider and mode, measured or skipped with the reason), ``results.md`` (table, targets, sizes,
    skips) and ``results.png`` (speedup over torch eager per mode) in ``bench-out/kernels-<device>-<date>/``.

Providers (a named list; each case says which apply)
    triton   the public op with impl="triton" (on CPU only under TRITON_INTERPRET=1, else skipped)
    torch    the op's own ``<op>_ref`` in eager PyTorch: the test oracle is the baseline, never a copy
    compile  ``torch.compile(<op>_ref)``
    apex     only where apex has a real equivalent, only on CUDA and only when importable:
             ema_: ``amp_C.multi_tensor_axpby`` through ``multi_tensor_applier`` (a fused multi-tensor
             t <- (1 - decay) * s + decay * t); layer_targets with a final LayerNorm (images):
             ``layer_targets_ref(..., final=None)`` then ``apex.normalization.FusedLayerNorm``.

Modes
    fwd   one forward call (inputs that get gradients in training require grad, so the forward
          saves what its backward needs, as in a training step)
    bwd   ``out.backward(grad, retain_graph=True)`` on one prebuilt forward graph
    full  forward then backward
    ema_ and layer_targets run without autograd in training (teacher side), so they have "fwd" only.
    The public ops' index-range check (one host sync per call) is switched off while timing: the
    "torch" and "compile" providers call ``<op>_ref``, which never checks.

Shapes (``REFERENCE_SHAPES``; ``--quick`` uses ``QUICK_SHAPES``, the same structure scaled down)
    vit-b       B=16 images, M=16 clones, N=196 patches (14 x 14), K=39 kept, D=768; targets: top 10
                layers, instance norm -> average -> LayerNorm; decoder conv2d 768, k3, groups 16;
                EMA over every ViT-B parameter (teacher fp32; student fp32, and bf16 as a mixed case)
    audio-base  B=3 clips of 20 s (1 M samples per GPU), M=8, N=999 frames, K=500 kept, D=768;
                targets: top 8 layers, IN -> AVG; decoder conv1d 384, k7, groups 16 (the residual
                384 -> 384 layers)
    text-base   B=4 blocks, M=8, N=512 tokens, K=266 kept, D=768; targets: top 12 layers, IN -> AVG;
                loss scale 1; decoder conv1d 768, k9, groups 1, no residual

Bytes moved (the minimum DRAM traffic of the op: each distinct input element read once, each
output element written once; an implementation's own scratch buffers are not counted, so a
provider that spills to memory shows up as a lower fraction of the ceiling). R = B*M rows,
es(t) = element size of t, "distinct" counts are taken from the actual indices and mask.
    gather_tokens   fwd  ids + distinct (sample, kept position) rows of x * D*es(x)
                         + distinct kept positions of pos * D*es(pos) + y: R*K*D*es(x)
                    bwd  ids + dy: R*K*D*es(x) + dx: B*N*D*es(x) (rows no clone kept are written as zeros)
    scatter_tokens  fwd  y: R*K*D*es + ids + out: R*N*D*es (the noise is made in registers)
                    bwd  ids + the kept rows of dout: R*K*D*es + dy: R*K*D*es
    layer_targets   fwd  k*B*N*D*es(layers) + target: B*N*D*4 (fp32)
    ema_            fwd  sum over pairs of read t + read s + write t
    masked_regression_loss
                    fwd  mask: R*N + masked rows of pred * D*es(pred)
                         + distinct masked (sample, position) rows of target * D*es(target)
                    bwd  the same reads + dpred: R*N*D*es(pred) (unmasked rows are written as zeros)
    conv_block1d/2d fwd  x + weight + bias + out: R*N*C_out*es(x)
                    bwd  dout + x + weight + dx + dweight + dbias
                    FLOPs fwd 2*R*N*C_out*(C/groups)*k^d (the convolution; norm and GELU are
                    negligible), bwd twice that (dx and dweight)
    full = fwd + bwd in every formula.

Targets (the issue's, for H100; checked on CUDA and listed in results.md)
    memory-bound ops: >= 85 % of the measured copy bandwidth, >= 1.5x torch, >= 1.2x compile;
    conv blocks: fwd+bwd ("full") >= 1.3x torch.

Plugging in more cases (how bench/attention.py contributes)
    A module listed in ``CONTRIBUTORS`` defines

        bench_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> list[Case]

    It receives the run's shape specs (reference or quick) and activation dtype and returns
    ``Case`` objects: ``op``, ``shape`` (a spec name), ``dims`` (a readable size string), ``dtype``,
    ``modes``, ``providers`` (its own names are fine, e.g. "sdpa", "xformers"), ``bound``
    ("memory" or "compute": which ceiling the report compares against), ``targets`` (tuples of
    (mode or None for all, metric, minimum), e.g. ("full", "speedup_vs_sdpa", 0.9): a speedup over
    any named provider is computed for the report), and
    ``setup(provider, device) -> Workload``. ``setup`` raises ValueError for a provider the case does
    not know and ``Unavailable(reason)`` for one that cannot run here (the report records the
    reason). ``Workload.fn`` runs one forward on prebuilt inputs and returns the output tensor;
    ``Workload.grad_inputs`` are the leaves whose .grad is reset between repetitions;
    ``Workload.bytes`` / ``Workload.flops`` map each mode to its formula's count (leave a mode out
    where the formula does not apply). A contributor that is missing is skipped silently; one that
    fails to import is skipped with its error in the report.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch


from . import harness

MODES = ("fwd", "bwd", "full")
TRAIN_MODES = MODES
NO_GRAD_MODES = ("fwd",)
PROVIDERS = ("triton", "torch", "compile", "apex")
BASE_PROVIDERS = ("triton", "torch", "compile")
CONTRIBUTORS = ("d2v2.bench.attention",)

# (mode or None for every mode, metric, minimum): the targets for our Triton kernels on H100.
MEMORY_TARGETS = ((None, "frac_copy_bw", 0.85), (None, "speedup_vs_torch", 1.5), (None, "speedup_vs_compile", 1.2))
CONV_TARGETS = (("full", "speedup_vs_torch", 1.3),)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EMA_DECAY = 0.9998  # images base tau_0: the value the teacher update runs at for most of training


class Unavailable(RuntimeError):
    """A provider that applies to a case but cannot run here (not installed, no GPU...)."""


@dataclass(frozen=True)
class ShapeSpec:
    """One modality's per-GPU sizes from the data2vec 2.0 base recipes (reference section 2 table)."""

    name: str
    batch: int  # B samples per GPU
    clones: int  # M masked views of each sample
    length: int  # N tokens per sample: patches, frames or BPE tokens
    kept: int  # K unmasked tokens per clone
    dim: int  # D, the model width
    target_layers: int  # top-k teacher layers averaged into the target
    dec_dim: int  # decoder channels
    dec_kernel: int
    dec_groups: int
    dec_residual: bool
    grid: tuple[int, int] | None = None  # (H, W) patch grid for images; None for sequences
    has_pos: bool = False  # gather adds a fixed position table (images); audio and text add positions earlier
    target_final: str | None = None  # final target norm: "layer" for images
    loss_scale: float | None = None  # None = 1/sqrt(D)
    depth: int = 12  # transformer blocks (for the EMA parameter list)
    patch: int = 16  # patch size (for the EMA parameter list)

    @property
    def rows(self) -> int:
        return self.batch * self.clones


_VIT_B = ShapeSpec(
    "vit-b", batch=16, clones=16, length=196, kept=39, dim=768, target_layers=10,
    dec_dim=768, dec_kernel=3, dec_groups=16, dec_residual=True,
    grid=(14, 14), has_pos=True, target_final="layer",
)  # fmt: skip
_AUDIO_BASE = ShapeSpec(
    "audio-base", batch=3, clones=8, length=999, kept=500, dim=768, target_layers=8,
    dec_dim=384, dec_kernel=7, dec_groups=16, dec_residual=True,
)  # fmt: skip
_TEXT_BASE = ShapeSpec(
    "text-base", batch=4, clones=8, length=512, kept=266, dim=768, target_layers=12,
    dec_dim=768, dec_kernel=9, dec_groups=1, dec_residual=False, loss_scale=1.0,
)  # fmt: skip
REFERENCE_SHAPES = {s.name: s for s in (_VIT_B, _AUDIO_BASE, _TEXT_BASE)}
# The same structure at toy sizes: odd lengths, D not a power of two, groups > 1 kept where the
# reference has them, so --quick exercises the same code paths in seconds on a CPU.
_TOY = dict(batch=2, clones=2, dim=48, target_layers=2, depth=2, patch=4)
QUICK_SHAPES = {
    s.name: s
    for s in (
        replace(_VIT_B, **_TOY, length=16, grid=(4, 4), kept=5, dec_dim=48, dec_groups=4),
        replace(_AUDIO_BASE, **_TOY, length=25, kept=12, dec_dim=24, dec_groups=4),
        replace(_TEXT_BASE, **_TOY, length=24, kept=13, dec_dim=48),
    )
}


@dataclass
class Workload:
    """Prebuilt inputs behind one callable: what the harness times for one (case, provider)."""

    fn: Callable[[], torch.Tensor | None]  # one forward call; returns the output for bwd/full
    grad_inputs: tuple[torch.Tensor, ...] = ()  # leaves whose .grad is reset between repetitions
    bytes: Mapping[str, int] = field(default_factory=dict)  # mode -> bytes moved (formula)
    flops: Mapping[str, float] = field(default_factory=dict)  # mode -> floating-point operations


@dataclass(frozen=True)
class Case:
    """One op at one shape spec and dtype; see the module docstring for the plug-in contract."""

    op: str
    shape: str
    dims: str
    dtype: torch.dtype
    modes: tuple[str, ...]
    providers: tuple[str, ...]
    bound: str  # "memory" | "compute"
    setup: Callable[[str, torch.device], Workload]
    targets: tuple[tuple[str | None, str, float], ...] = ()


# ----------------------------------------------------------------------------------------------
# Providers


def _kernel_module(name: str):
    try:
        return importlib.import_module(f"d2v2.kernels.{name}")
    except ImportError as e:
        raise Unavailable(f"d2v2.kernels.{name} is not importable: {e}") from e


def op_provider(module_name: str, op: str, provider: str, device: torch.device) -> Callable[..., Any]:
    """The callable behind a generic provider: the op (triton), its ``<op>_ref`` (torch) or the compiled ref."""
    _check_provider(op, provider, BASE_PROVIDERS)
    module = _kernel_module(module_name)
    reference = getattr(module, f"{op.rstrip('_')}_ref")  # ema_ -> ema_ref
    if provider == "triton":
        from d2v2.kernels import HAS_TRITON, triton_interpret

        if not HAS_TRITON:
            raise Unavailable("triton is not installed")
        if device.type != "cuda" and not triton_interpret():
            raise Unavailable("Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to interpret them on CPU")
        # The bench's ids are valid by construction: no per-call range check (a host sync) in the timing.
        unchecked = {"check_ids": False} if op in ("gather_tokens", "scatter_tokens") else {}
        return functools.partial(getattr(module, op), impl="triton", **unchecked)
    if provider == "torch":
        return reference
    torch._dynamo.reset()  # a fresh cache per case: recompiles never hit the cache-size limit
    return torch.compile(reference)


def _check_provider(op: str, provider: str, allowed: Sequence[str]) -> None:
    if provider not in allowed:
        raise ValueError(f"provider must be one of {tuple(allowed)} for {op}, got {provider!r}")


def _require_cuda_for_apex(device: torch.device) -> None:
    # apex's fused modules quietly fall back to PyTorch on CPU tensors: that would not be apex's number.
    if device.type != "cuda":
        raise Unavailable("apex runs on CUDA only")


# ----------------------------------------------------------------------------------------------
# Inputs


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, device, dtype, gen, requires_grad=False, std=1.0) -> torch.Tensor:
    t = (torch.randn(shape, device=device, generator=gen) * std).to(dtype)
    return t.requires_grad_(requires_grad)


def _ids_keep(spec: ShapeSpec, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """[R, K] int64: K distinct positions of N per row, sorted, as the masking code produces them."""
    noise = torch.rand(spec.rows, spec.length, device=device, generator=gen)
    return noise.argsort(dim=1)[:, : spec.kept].sort(dim=1).values


def _distinct_rows(ids: torch.Tensor, clones: int, length: int) -> int:
    """Number of distinct (sample, position) pairs among ``ids`` [R, K] (rows r of sample r // clones)."""
    sample = torch.arange(ids.shape[0], device=ids.device)[:, None] // clones
    return int(torch.unique(sample * length + ids).numel())


def vit_parameter_shapes(dim: int, depth: int, patch: int, in_chans: int = 3, mlp_ratio: int = 4) -> list[tuple]:
    """Every trainable tensor of a ViT encoder (the image teacher: the model minus its decoder)."""
    hidden = dim * mlp_ratio
    shapes: list[tuple] = [(dim, in_chans, patch, patch), (dim,), (1, 1, dim)]  # patch embed, CLS token
    shapes += [(dim,), (dim,)]  # the encoder's input LayerNorm
    block = [
        (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),  # attention qkv and proj
        (dim,), (dim,),  # norm1
        (hidden, dim), (hidden,), (dim, hidden), (dim,),  # mlp fc1, fc2
        (dim,), (dim,),  # norm2
    ]  # fmt: skip
    return shapes + block * depth


# ----------------------------------------------------------------------------------------------
# Setup functions: one per op, (shape spec, provider, device, dtype) -> Workload


def setup_gather_tokens(spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    _check_provider("gather_tokens", provider, BASE_PROVIDERS)
    op = op_provider("gather_tokens", "gather_tokens", provider, device)
    gen = _generator(device)
    x = _randn((spec.batch, spec.length, spec.dim), device, dtype, gen, requires_grad=True)
    pos = _randn((spec.length, spec.dim), device, torch.float32, gen) if spec.has_pos else None  # fixed sin-cos buffer
    ids = _ids_keep(spec, device, gen)
    es, out_rows = x.element_size(), spec.rows * spec.kept
    fwd = _nbytes(ids) + _distinct_rows(ids, spec.clones, spec.length) * spec.dim * es + out_rows * spec.dim * es
    if pos is not None:
        fwd += int(torch.unique(ids).numel()) * spec.dim * pos.element_size()
    bwd = _nbytes(ids) + out_rows * spec.dim * es + _nbytes(x)
    return Workload(
        fn=lambda: op(x, ids, pos, spec.clones),
        grad_inputs=(x,),
        bytes={"fwd": fwd, "bwd": bwd, "full": fwd + bwd},
    )


def setup_scatter_tokens(spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    _check_provider("scatter_tokens", provider, BASE_PROVIDERS)
    op = op_provider("scatter_tokens", "scatter_tokens", provider, device)
    gen = _generator(device)
    y = _randn((spec.rows, spec.kept, spec.dim), device, dtype, gen, requires_grad=True)
    ids = _ids_keep(spec, device, gen)
    es = y.element_size()
    fwd = _nbytes(y, ids) + spec.rows * spec.length * spec.dim * es
    bwd = _nbytes(ids) + 2 * _nbytes(y)
    return Workload(
        fn=lambda: op(y, ids, spec.length, fill="noise", noise_std=0.01),
        grad_inputs=(y,),
        bytes={"fwd": fwd, "bwd": bwd, "full": fwd + bwd},
    )


def setup_layer_targets(spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    providers = BASE_PROVIDERS + (("apex",) if spec.target_final == "layer" else ())
    _check_provider("layer_targets", provider, providers)
    gen = _generator(device)
    layers = [_randn((spec.batch, spec.length, spec.dim), device, dtype, gen) for _ in range(spec.target_layers)]
    if provider == "apex":
        _require_cuda_for_apex(device)
        try:
            from apex.normalization import FusedLayerNorm
        except ImportError as e:
            raise Unavailable(f"apex.normalization is not importable: {e}") from e
        reference = _kernel_module("layer_targets").layer_targets_ref
        final_norm = FusedLayerNorm(spec.dim, eps=1e-5, elementwise_affine=False).to(device)

        def run():
            return final_norm(reference(layers, per_layer="instance", final=None, eps=1e-5))

    else:
        op = op_provider("layer_targets", "layer_targets", provider, device)

        def run():
            return op(layers, per_layer="instance", final=spec.target_final, eps=1e-5)

    def fn():
        with torch.no_grad():  # the teacher side: targets never need gradients
            return run()

    nbytes = _nbytes(*layers) + spec.batch * spec.length * spec.dim * 4
    return Workload(fn=fn, bytes={"fwd": nbytes})


def setup_ema(
    spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype, teacher_dtype: torch.dtype = torch.float32
) -> Workload:
    """EMA over every ViT parameter of ``spec``; ``dtype`` is the student's, the teacher stays fp32."""
    _check_provider("ema_", provider, PROVIDERS)
    gen = _generator(device)
    shapes = vit_parameter_shapes(spec.dim, spec.depth, spec.patch)
    teacher = [_randn(s, device, teacher_dtype, gen, std=0.02) for s in shapes]
    student = [_randn(s, device, dtype, gen, std=0.02) for s in shapes]
    if provider == "apex":
        _require_cuda_for_apex(device)
        try:
            import amp_C
            from apex.multi_tensor_apply import multi_tensor_applier
        except ImportError as e:
            raise Unavailable(f"apex's amp_C extension is not importable: {e}") from e
        noop_flag = torch.zeros(1, dtype=torch.int32, device=device)

        def fn():
            # out = a * x + b * y with x = student, y = out = teacher; arg_to_check=-1 checks both for inf/nan.
            multi_tensor_applier(
                amp_C.multi_tensor_axpby, noop_flag, [student, teacher, teacher], 1.0 - EMA_DECAY, EMA_DECAY, -1
            )

    else:
        op = op_provider("ema", "ema_", provider, device)

        def fn():
            with torch.no_grad():
                op(teacher, student, EMA_DECAY)

    return Workload(fn=fn, bytes={"fwd": 2 * _nbytes(*teacher) + _nbytes(*student)})


def _masked_rows(mask: torch.Tensor, clones: int) -> tuple[int, int]:
    """(masked (row, position) pairs, distinct masked (sample, position) pairs) of ``mask`` [R, N]."""
    rows, positions = mask.nonzero(as_tuple=True)
    distinct = torch.unique((rows // clones) * mask.shape[1] + positions).numel()
    return int(rows.numel()), int(distinct)


def setup_masked_regression_loss(
    spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype
) -> Workload:
    _check_provider("masked_regression_loss", provider, BASE_PROVIDERS)
    op = op_provider("masked_regression_loss", "masked_regression_loss", provider, device)
    gen = _generator(device)
    pred = _randn((spec.rows, spec.length, spec.dim), device, dtype, gen, requires_grad=True)
    target = _randn((spec.batch, spec.length, spec.dim), device, torch.float32, gen)  # layer_targets is fp32
    mask = torch.ones(spec.rows, spec.length, dtype=torch.bool, device=device)
    mask.scatter_(1, _ids_keep(spec, device, gen), False)  # True = masked: every row masks N - K positions
    masked, distinct = _masked_rows(mask, spec.clones)
    reads = _nbytes(mask) + masked * spec.dim * pred.element_size() + distinct * spec.dim * target.element_size()
    bwd = reads + _nbytes(pred)
    return Workload(
        fn=lambda: op(pred, target, mask, spec.clones, spec.loss_scale, 0.0),
        grad_inputs=(pred,),
        bytes={"fwd": reads, "bwd": bwd, "full": reads + bwd},
    )


def _conv_workload(op, x, weight, bias, extra_args, taps: int, groups: int) -> Workload:
    rows, length, channels = x.shape
    out_channels = weight.shape[0]
    out_bytes = rows * length * out_channels * x.element_size()
    fwd = _nbytes(x, weight, bias) + out_bytes
    bwd = out_bytes + 2 * _nbytes(x, weight, bias)
    flops = 2.0 * rows * length * out_channels * (channels // groups) * taps
    return Workload(
        fn=lambda: op(x, weight, bias, groups, *extra_args),
        grad_inputs=(x, weight, bias),
        bytes={"fwd": fwd, "bwd": bwd, "full": fwd + bwd},
        flops={"fwd": flops, "bwd": 2 * flops, "full": 3 * flops},
    )


def setup_conv_block1d(spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    _check_provider("conv_block1d", provider, BASE_PROVIDERS)
    op = op_provider("conv_block1d", "conv_block1d", provider, device)
    gen = _generator(device)
    c, k, g = spec.dec_dim, spec.dec_kernel, spec.dec_groups
    x = _randn((spec.rows, spec.length, c), device, dtype, gen, requires_grad=True)
    # Parameters stay fp32 as in mixed-precision training; the op casts them to x's dtype.
    weight = _randn((c, c // g, k), device, torch.float32, gen, requires_grad=True, std=(c // g * k) ** -0.5)
    bias = _randn((c,), device, torch.float32, gen, requires_grad=True, std=0.02)
    return _conv_workload(op, x, weight, bias, (spec.dec_residual,), taps=k, groups=g)


def setup_conv_block2d(spec: ShapeSpec, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    _check_provider("conv_block2d", provider, BASE_PROVIDERS)
    if spec.grid is None:
        raise ValueError(f"conv_block2d needs a shape spec with a grid; {spec.name!r} has none")
    op = op_provider("conv_block2d", "conv_block2d", provider, device)
    gen = _generator(device)
    c, k, g = spec.dec_dim, spec.dec_kernel, spec.dec_groups
    x = _randn((spec.rows, spec.length, c), device, dtype, gen, requires_grad=True)
    weight = _randn((c, c // g, k, k), device, torch.float32, gen, requires_grad=True, std=(c // g * k * k) ** -0.5)
    bias = _randn((c,), device, torch.float32, gen, requires_grad=True, std=0.02)
    return _conv_workload(op, x, weight, bias, (spec.grid, spec.dec_residual), taps=k * k, groups=g)


# ----------------------------------------------------------------------------------------------
# Cases


def builtin_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> list[Case]:
    """Every op of d2v2.kernels except attention (which bench/attention.py contributes)."""
    cases = []
    for s in shapes.values():
        pos = " +pos" if s.has_pos else ""
        common = dict(shape=s.name, dtype=dtype)
        cases.append(Case(
            "gather_tokens", dims=f"B={s.batch} M={s.clones} N={s.length} K={s.kept} D={s.dim}{pos}",
            modes=TRAIN_MODES, providers=BASE_PROVIDERS, bound="memory", targets=MEMORY_TARGETS,
            setup=functools.partial(setup_gather_tokens, s, dtype=dtype), **common,
        ))  # fmt: skip
        cases.append(Case(
            "scatter_tokens", dims=f"R={s.rows} K={s.kept} N={s.length} D={s.dim} fill=noise",
            modes=TRAIN_MODES, providers=BASE_PROVIDERS, bound="memory", targets=MEMORY_TARGETS,
            setup=functools.partial(setup_scatter_tokens, s, dtype=dtype), **common,
        ))  # fmt: skip
        norms = f"instance->avg->{s.target_final}" if s.target_final else "instance->avg"
        cases.append(Case(
            "layer_targets", dims=f"k={s.target_layers} x [{s.batch},{s.length},{s.dim}] {norms}",
            modes=NO_GRAD_MODES, providers=BASE_PROVIDERS + (("apex",) if s.target_final == "layer" else ()),
            bound="memory", targets=MEMORY_TARGETS,
            setup=functools.partial(setup_layer_targets, s, dtype=dtype), **common,
        ))  # fmt: skip
        cases.append(Case(
            "masked_regression_loss",
            dims=f"R={s.rows} N={s.length} D={s.dim} M={s.clones} masked={s.length - s.kept}/row",
            modes=TRAIN_MODES, providers=BASE_PROVIDERS, bound="memory", targets=MEMORY_TARGETS,
            setup=functools.partial(setup_masked_regression_loss, s, dtype=dtype), **common,
        ))  # fmt: skip
        conv = "conv_block2d" if s.grid else "conv_block1d"
        where = f"grid={s.grid[0]}x{s.grid[1]}" if s.grid else f"N={s.length}"
        res = "residual" if s.dec_residual else "no residual"
        cases.append(Case(
            conv, dims=f"R={s.rows} {where} C={s.dec_dim} k={s.dec_kernel} g={s.dec_groups} {res}",
            modes=TRAIN_MODES, providers=BASE_PROVIDERS, bound="compute", targets=CONV_TARGETS,
            setup=functools.partial(setup_conv_block2d if s.grid else setup_conv_block1d, s, dtype=dtype),
            **common,
        ))  # fmt: skip
        if s.grid is not None:  # EMA over the ViT's parameters: student fp32, and the mixed bf16 student
            params = vit_parameter_shapes(s.dim, s.depth, s.patch)
            numel = sum(math.prod(p) for p in params)
            for student in (torch.float32, torch.bfloat16):
                cases.append(Case(
                    "ema_", s.name,
                    dims=f"{len(params)} tensors, {numel / 1e6:.2f}M params, teacher fp32, "
                    f"student {_dtype_name(student)}",
                    dtype=student, modes=NO_GRAD_MODES, providers=PROVIDERS, bound="memory",
                    targets=MEMORY_TARGETS, setup=functools.partial(setup_ema, s, dtype=student),
                ))  # fmt: skip
    return cases


def contributed_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> tuple[list[Case], list[str]]:
    """Cases from the modules in CONTRIBUTORS, and a note for each one that failed to load."""
    cases, notes = [], []
    for module_name in CONTRIBUTORS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            # A contributor not written (yet) has nothing to say; one that fails to import is reported.
            if not (isinstance(e, ModuleNotFoundError) and e.name == module_name):
                notes.append(f"{module_name} skipped: {e}")
            continue
        cases.extend(module.bench_cases(shapes, dtype))
    return cases, notes


_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype) or str(dtype).replace("torch.", "")


def select_cases(
    cases: Sequence[Case],
    *,
    ops: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
) -> tuple[list[Case], tuple[str, ...], tuple[str, ...]]:
    """Filter ``cases``; raise ValueError for a name that no case knows. Returns (cases, providers, modes)."""

    def check(arg: str, wanted: Sequence[str] | None, known: Sequence[str]) -> None:
        unknown = [w for w in wanted or () if w not in known]
        if unknown:
            raise ValueError(f"{arg}: unknown {', '.join(map(repr, unknown))}; expected some of {', '.join(known)}")

    known_ops = list(dict.fromkeys(c.op for c in cases))
    known_shapes = list(dict.fromkeys(c.shape for c in cases))
    known_providers = list(dict.fromkeys(PROVIDERS + tuple(p for c in cases for p in c.providers)))
    check("ops", ops, known_ops)
    check("shapes", shapes, known_shapes)
    check("providers", providers, known_providers)
    check("modes", modes, MODES)
    chosen = [c for c in cases if (not ops or c.op in ops) and (not shapes or c.shape in shapes)]
    return chosen, tuple(providers or known_providers), tuple(modes or MODES)


# ----------------------------------------------------------------------------------------------
# Running


def _mode_fn(work: Workload, mode: str) -> Callable[[], Any]:
    if mode == "fwd":
        return work.fn
    out = work.fn()
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise ValueError(f"mode {mode!r} needs a forward that returns a tensor requiring grad")
    grad = None if out.dim() == 0 else torch.randn_like(out)
    if mode == "bwd":
        return lambda: out.backward(grad, retain_graph=True)
    return lambda: work.fn().backward(grad)


def _row(case: Case, provider: str, mode: str, stamp: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "op": case.op, "shape": case.shape, "dims": case.dims, "dtype": _dtype_name(case.dtype),
        "provider": provider, "mode": mode, "bound": case.bound, "status": "ok", "note": "",
        "median_ms": None, "p20_ms": None, "p80_ms": None, "peak_mem_mb": None,
        "bytes": None, "gbps": None, "frac_copy_bw": None, "flops": None, "tflops": None, "frac_matmul": None,
        "device": stamp["device"], "torch": stamp["torch"], "triton": stamp["triton"], "date": stamp["date"],
    }  # fmt: skip


def run_case(
    case: Case,
    provider: str,
    modes: Sequence[str],
    device: torch.device,
    ceilings: Mapping[str, float | None],
    stamp: Mapping[str, Any],
    *,
    warmup_ms: float,
    rep_ms: float,
) -> list[dict[str, Any]]:
    """Rows for one (case, provider): measured, or marked skipped / error with the reason."""
    modes = [m for m in modes if m in case.modes]
    rows = [_row(case, provider, m, stamp) for m in modes]
    try:
        work = case.setup(provider, device)
        for row in rows:
            fn = _mode_fn(work, row["mode"])
            timing = harness.measure(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=work.grad_inputs)
            row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)
            row["peak_mem_mb"] = harness.peak_memory_mb(fn, device)
            _add_rates(row, work.bytes.get(row["mode"]), work.flops.get(row["mode"]), ceilings)
            del fn
    except Unavailable as e:
        for row in rows:
            if row["median_ms"] is None:
                row.update(status="skipped", note=str(e))
    except Exception as e:  # noqa: BLE001 - one failing provider must not lose the rest of the run
        message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        for row in rows:
            if row["median_ms"] is None:
                row.update(status="error", note=message)
    return rows


def _add_rates(row: dict[str, Any], nbytes: int | None, flops: float | None, ceilings: Mapping[str, float | None]):
    seconds = row["median_ms"] * 1e-3
    if nbytes is not None:
        row["bytes"] = int(nbytes)
        row["gbps"] = nbytes / seconds / 1e9
        if ceilings.get("copy_gbps"):
            row["frac_copy_bw"] = row["gbps"] / ceilings["copy_gbps"]
    if flops is not None:
        row["flops"] = float(flops)
        row["tflops"] = flops / seconds / 1e12
        if ceilings.get("matmul_tflops"):
            row["frac_matmul"] = row["tflops"] / ceilings["matmul_tflops"]


def _baselines(cases: Sequence[Case]) -> list[str]:
    """torch and compile, plus every provider a case's targets compare against (e.g. "sdpa")."""
    named = (m.removeprefix("speedup_vs_") for c in cases for _, m, _ in c.targets if m.startswith("speedup_vs_"))
    return list(dict.fromkeys(("torch", "compile", *named)))


def apply_targets(rows: list[dict[str, Any]], cases: Sequence[Case], device: torch.device) -> None:
    """Mark each triton row on CUDA with the targets that apply and whether it meets all of them."""
    by_key = {(c.op, c.shape, _dtype_name(c.dtype)): c for c in cases}
    for row in rows:
        row["targets"], row["meets_targets"] = None, None
        case = by_key.get((row["op"], row["shape"], row["dtype"]))
        if device.type != "cuda" or row["provider"] != "triton" or row["status"] != "ok" or case is None:
            continue
        wanted = {metric: minimum for mode, metric, minimum in case.targets if mode in (None, row["mode"])}
        if not wanted:
            continue
        row["targets"] = wanted
        values = [row.get(metric) for metric in wanted]
        if all(v is not None for v in values):
            row["meets_targets"] = all(v >= wanted[m] for m, v in zip(wanted, values))


def run(
    *,
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    ops: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    out_dir: Path | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    argv: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run the selected cases and write results.json, results.md and results.png into ``out_dir``."""
    specs = QUICK_SHAPES if quick else REFERENCE_SHAPES
    contributed, notes = contributed_cases(specs, dtype)
    all_cases = builtin_cases(specs, dtype) + contributed
    cases, providers, modes = select_cases(all_cases, ops=ops, shapes=shapes, providers=providers, modes=modes)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    stamp = harness.environment_stamp(device)
    ceilings = {"copy_gbps": harness.copy_bandwidth_gbps(device), "matmul_tflops": None}
    if any(c.bound == "compute" for c in cases):
        ceilings["matmul_tflops"] = harness.matmul_tflops(device, dtype)
    log(f"copy bandwidth ceiling {ceilings['copy_gbps']:.1f} GB/s" + (
        f", {_dtype_name(dtype)} matmul ceiling {ceilings['matmul_tflops']:.2f} TFLOP/s"
        if ceilings["matmul_tflops"] else ""
    ))  # fmt: skip
    rows: list[dict[str, Any]] = []
    for case in cases:
        for provider in (p for p in providers if p in case.providers):
            for row in run_case(case, provider, modes, device, ceilings, stamp, warmup_ms=warmup_ms, rep_ms=rep_ms):
                rows.append(row)
                log(_progress_line(row))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for baseline in _baselines(cases):
        harness.speedups(rows, group_keys=("op", "shape", "dtype", "mode"), label_key="provider", baseline=baseline)
    apply_targets(rows, cases, device)
    meta = {
        **stamp,
        "benchmark": "kernels",
        "shapes": "quick" if quick else "reference",
        "dtype": _dtype_name(dtype),
        "copy_gbps": ceilings["copy_gbps"],
        "matmul_tflops": ceilings["matmul_tflops"],
        "timer": "triton.testing.do_bench" if device.type == "cuda" else "time.perf_counter",
        "command": " ".join(argv) if argv is not None else None,
        "notes": notes or None,
    }
    out_dir = Path(out_dir) if out_dir is not None else harness.default_out_dir("kernels", device)
    return rows, write_report(out_dir, meta, rows, notes)


def _progress_line(row: Mapping[str, Any]) -> str:
    head = f"{row['op']:<23} {row['shape']:<11} {row['dtype']:<5} {row['provider']:<9} {row['mode']:<4}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['note']}"
    rate = f"{row['gbps']:9.4g} GB/s" if row["gbps"] is not None else ""
    return f"{head} {row['median_ms']:10.4f} ms {rate}"


# ----------------------------------------------------------------------------------------------
# Report

_COLUMNS = (
    ("op", "op", ""), ("shape", "shape", ""), ("dtype", "dtype", ""), ("mode", "mode", ""),
    ("provider", "provider", ""), ("median ms", "median_ms", ".4f"), ("p20-p80 ms", "spread", ""),
    ("GB/s", "gbps", ".4g"), ("% copy BW", "pct_copy_bw", ".1f"), ("TFLOP/s", "tflops", ".4g"),
    ("% matmul", "pct_matmul", ".1f"), ("x torch", "speedup_vs_torch", ".2f"),
    ("x compile", "speedup_vs_compile", ".2f"), ("x others", "other_speedups", ""),
    ("peak MiB", "peak_mem_mb", ".1f"), ("status", "status", ""),
)  # fmt: skip
_SHOWN_SPEEDUPS = ("speedup_vs_torch", "speedup_vs_compile")


def _display(row: Mapping[str, Any]) -> dict[str, Any]:
    shown = dict(row)
    if row["median_ms"] is not None:
        shown["spread"] = f"{row['p20_ms']:.4f}-{row['p80_ms']:.4f}"
    for frac, pct in (("frac_copy_bw", "pct_copy_bw"), ("frac_matmul", "pct_matmul")):
        shown[pct] = None if row.get(frac) is None else 100 * row[frac]
    others = [
        f"{key.removeprefix('speedup_vs_')} {value:.2f}"
        for key, value in row.items()
        if key.startswith("speedup_vs_") and key not in _SHOWN_SPEEDUPS and value is not None
    ]
    shown["other_speedups"] = ", ".join(others) or None
    return shown


def _targets_section(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    lines = ["## Targets (H100): Triton rows", ""]
    judged = [r for r in rows if r.get("targets")]
    if meta["device_type"] != "cuda":
        return "\n".join(lines + ["Not judged: the targets are for a CUDA GPU and this run was on CPU."])
    if not judged:
        return "\n".join(lines + ["No Triton rows with targets in this run."])
    for r in judged:
        parts = []
        for metric, minimum in r["targets"].items():
            value = r.get(metric)
            shown = "–" if value is None else f"{value:.2f}"
            parts.append(f"{metric} {shown} (>= {minimum})")
        verdict = {True: "met", False: "MISSED", None: "incomplete"}[r["meets_targets"]]
        lines.append(f"- {verdict}: {r['op']} {r['shape']} {r['dtype']} {r['mode']}: " + ", ".join(parts))
    return "\n".join(lines)


def _notes_section(rows: Sequence[Mapping[str, Any]], notes: Sequence[str]) -> str:
    shapes: dict[tuple, list[str]] = {}  # one line per (status, op, provider, reason), listing its shapes
    for r in rows:
        if r["status"] != "ok":
            listed = shapes.setdefault((r["status"], r["op"], r["provider"], r["note"]), [])
            if r["shape"] not in listed:
                listed.append(r["shape"])
    lines = [
        f"- {status}: {op} {provider} ({', '.join(where)}): {note}"
        for (status, op, provider, note), where in shapes.items()
    ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(["## Skipped and failed", ""] + (lines or ["Nothing skipped."]))


def _dims_section(rows: Sequence[Mapping[str, Any]]) -> str:
    sizes = dict.fromkeys((r["op"], r["shape"], r["dtype"], r["dims"]) for r in rows)
    return "## Sizes\n\n" + harness.markdown_table(
        [dict(zip(("op", "shape", "dtype", "dims"), s)) for s in sizes],
        [("op", "op", ""), ("shape", "shape", ""), ("dtype", "dtype", ""), ("sizes", "dims", "")],
    )


def write_report(
    out_dir: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()
) -> dict[str, Path]:
    """results.json (meta + every row), results.md (tables, targets, skips) and results.png (speedups)."""
    paths = {"json": harness.write_json(out_dir / "results.json", meta, rows)}
    header = {k: meta[k] for k in ("device", "torch", "triton", "cuda", "date", "shapes", "dtype", "timer")}
    header["copy bandwidth ceiling"] = f"{meta['copy_gbps']:.1f} GB/s"
    if meta.get("matmul_tflops"):
        header["matmul ceiling"] = f"{meta['matmul_tflops']:.2f} TFLOP/s ({meta['dtype']})"
    measured = [_display(r) for r in rows if r["status"] == "ok"]  # the rest are listed under "Skipped"
    table = "## Results\n\n" + harness.markdown_table(measured, _COLUMNS)
    sections = [table, _targets_section(rows, meta), _dims_section(rows), _notes_section(rows, notes)]
    paths["md"] = harness.write_markdown(out_dir / "results.md", "d2v2 kernel benchmark", header, sections)
    # Speedups over torch eager (the dashed line at 1 is torch itself); plain times when no torch row ran.
    by_speedup = any(r.get("speedup_vs_torch") is not None and r["provider"] != "torch" for r in rows)
    paths["png"] = harness.write_bar_plot(
        out_dir / "results.png",
        [r for r in rows if r["provider"] != "torch"] if by_speedup else rows,
        panel_key="mode",
        group=lambda r: f"{r['op']} {r['shape']} {r['dtype']}",
        series_key="provider",
        value_key="speedup_vs_torch" if by_speedup else "median_ms",
        ylabel="speedup over torch eager" if by_speedup else "median ms",
        title=f"d2v2 kernels on {meta['device']} ({meta['date'][:10]})",
        reference_line=1.0 if by_speedup else None,
        log_scale=True,
    )
    return paths


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


__all__ = [
    "Case", "MODES", "PROVIDERS", "QUICK_SHAPES", "REFERENCE_SHAPES", "ShapeSpec", "Unavailable", "Workload",
    "builtin_cases", "op_provider", "run", "select_cases", "vit_parameter_shapes",
]  # fmt: skip
