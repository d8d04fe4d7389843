"""Attention benchmark cases: ``d2v2.kernels.attention`` against SDPA, FlexAttention and xformers.

Two entry points over the same setup code:

    attention_cases(shapes=ATTENTION_SHAPES, dtype=torch.bfloat16) -> list[AttentionCase]
        Standalone: each AttentionCase names a shape and its providers, carries the FLOP count per
        mode, and ``case.setup(provider, device)`` returns an AttentionWorkload whose
        ``callable("fwd" | "bwd" | "full")`` is the thing to time (``grad_inputs`` are the leaves whose
        .grad to reset between repetitions).

    bench_cases(shapes, dtype) -> list[d2v2.bench.kernels.Case]
        The plug-in contract of ``d2v2 bench kernels`` (see bench/kernels.py): the same cases at that
        run's shape specs (reference or quick), op "attention", compute-bound.

Shapes (the student's attention over the kept tokens, per GPU, base models: 12 heads of 64)
    images  B*M = 16*16 = 256 rows, L = 40 (39 kept patches + CLS), plain attention
    speech  32 rows, L = 500 kept of 999 frames, ALiBi on the ORIGINAL frame positions
    text    32 rows (4 blocks x 8 clones), L = 266 kept of 512 tokens, plain attention
    ``bench_cases`` derives the same from the kernels bench's ShapeSpec: rows = batch * clones,
    L = kept (+ 1 CLS with a patch grid), heads = dim / 64, ALiBi for the "audio" specs.

Providers (q, k, v are strided views of one [rows, L, 3, H, Dh] qkv tensor, as the models make them)
    triton     ``attention(..., impl="triton")``: ALiBi computed in the kernel from positions
    torch      ``attention_ref``: the op's own reference (fp32 SDPA with an fp32 bias)
    compile    ``torch.compile(attention_ref)``
    sdpa       plain ``F.scaled_dot_product_attention`` restricted to the flash / efficient backends
               (plain shapes only: the "within 10 % of SDPA flash" target)
    sdpa-bias  SDPA with a materialised [rows, H, L, L] bias in the input dtype, rebuilt from the
               slopes every call (the slopes get their gradient through it), as the reference
               implementation gathers its ALiBi bias (ALiBi shapes only)
    flex       ``torch.compile(flex_attention)`` with an ALiBi ``score_mod`` reading the positions
               and slopes (plain ``flex_attention`` for plain shapes); CUDA only
    xformers   ``xformers.ops.memory_efficient_attention`` (with the materialised bias for ALiBi),
               when importable

FLOPs (the FlashAttention convention, non-causal): fwd 4 * rows * H * L^2 * Dh (two matmuls),
bwd 2.5 x fwd (five matmuls, one of them recomputing the scores), full 3.5 x fwd.

Targets (H100, bf16, "full" = fwd + bwd): ALiBi shapes >= 2x sdpa-bias and >= 1x flex; plain shapes
>= 0.9x sdpa. Expressed as ``speedup_vs_<provider>`` metrics on the triton rows.

Dropout is 0 in every case (FlexAttention has none); the audio and text recipes train with 0.1,
which adds the kernel's in-register Philox draws on top of these numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from d2v2 import kernels as _kernels
from d2v2.kernels.attention import attention, attention_ref

from .kernels import Case, Unavailable, Workload

MODES = ("fwd", "bwd", "full")
PLAIN_PROVIDERS = ("triton", "torch", "compile", "sdpa", "flex", "xformers")
ALIBI_PROVIDERS = ("triton", "torch", "compile", "sdpa-bias", "flex", "xformers")
ALIBI_TARGETS = (("full", "speedup_vs_sdpa-bias", 2.0), ("full", "speedup_vs_flex", 1.0))
PLAIN_TARGETS = (("full", "speedup_vs_sdpa", 0.9),)
HEAD_DIM = 64  # every base / large recipe: 768 / 12 and 1024 / 16


@dataclass(frozen=True)
class AttentionShape:
    """One attention call of the student: rows = samples x clones, each attending over its kept tokens."""

    name: str
    rows: int
    heads: int
    length: int  # kept tokens per row (L)
    head_dim: int
    alibi_length: int | None = None  # ALiBi: positions are L sorted picks of 0..alibi_length-1; None = no ALiBi

    @property
    def alibi(self) -> bool:
        return self.alibi_length is not None

    @property
    def dims(self) -> str:
        where = f" ALiBi on kept positions of {self.alibi_length}" if self.alibi else ""
        return f"rows={self.rows} H={self.heads} L={self.length} Dh={self.head_dim}{where}"


ATTENTION_SHAPES = {
    s.name: s
    for s in (
        AttentionShape("images", rows=256, heads=12, length=40, head_dim=HEAD_DIM),
        AttentionShape("speech", rows=32, heads=12, length=500, head_dim=HEAD_DIM, alibi_length=999),
        AttentionShape("text", rows=32, heads=12, length=266, head_dim=HEAD_DIM),
    )
}


def attention_flops(shape: AttentionShape) -> dict[str, float]:
    """FLOPs per mode: fwd 4 * rows * H * L^2 * Dh, bwd 2.5x, full 3.5x."""
    fwd = 4.0 * shape.rows * shape.heads * shape.length**2 * shape.head_dim
    return {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd}


@dataclass
class AttentionWorkload:
    """Prebuilt inputs behind one (shape, provider): ``forward()`` runs one forward and returns the output."""

    forward: Callable[[], torch.Tensor]
    grad_inputs: tuple[torch.Tensor, ...]
    flops: Mapping[str, float] = field(default_factory=dict)

    def callable(self, mode: str) -> Callable[[], Any]:
        """The function to time for ``mode``: "fwd" a forward, "bwd" a backward through one prebuilt
        forward graph (retained), "full" a forward then its backward."""
        if mode == "fwd":
            return self.forward
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        out = self.forward()
        grad = torch.randn_like(out)
        if mode == "bwd":
            return lambda: out.backward(grad, retain_graph=True)
        return lambda: self.forward().backward(grad)


@dataclass(frozen=True)
class AttentionCase:
    shape: AttentionShape
    dtype: torch.dtype
    providers: tuple[str, ...]
    flops: Mapping[str, float]
    targets: tuple[tuple[str | None, str, float], ...]

    def setup(self, provider: str, device: torch.device) -> AttentionWorkload:
        return setup_attention(self.shape, provider, device, self.dtype)


def alibi_base_slopes(heads: int) -> torch.Tensor:
    """The standard geometric ALiBi slopes (Press et al.), with the interleaving for a head count that is
    not a power of two (the reference's ``get_alibi``)."""

    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        slopes = power_of_2(heads)
    else:
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def _inputs(shape: AttentionShape, device: torch.device, dtype: torch.dtype):
    """q, k, v (views of one qkv leaf), positions and slopes (a leaf requiring grad) or None."""
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(shape.rows, shape.length, 3, shape.heads, shape.head_dim, device=device, generator=gen)
    qkv = qkv.to(dtype).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [rows, H, L, Dh]
    positions = slopes = None
    if shape.alibi:
        noise = torch.rand(shape.rows, shape.alibi_length, device=device, generator=gen)
        positions = noise.argsort(dim=1)[:, : shape.length].sort(dim=1).values  # [rows, L] kept frames
        slopes = alibi_base_slopes(shape.heads).to(device).requires_grad_()
    return qkv, q, k, v, positions, slopes


def _materialised_alibi(positions, slopes, dtype):
    """The reference's [rows, H, L, L] bias, in the compute dtype, rebuilt from the slopes."""
    dist = (positions[:, :, None] - positions[:, None, :]).abs().to(torch.float32)  # [rows, L, L]
    return lambda: (-slopes[None, :, None, None] * dist[:, None]).to(dtype)


def setup_attention(
    shape: AttentionShape, provider: str, device: torch.device, dtype: torch.dtype
) -> AttentionWorkload:
    """Inputs and the forward callable of ``provider`` at ``shape``; Unavailable when it cannot run here."""
    allowed = ALIBI_PROVIDERS if shape.alibi else PLAIN_PROVIDERS
    if provider not in allowed:
        raise ValueError(f"provider must be one of {allowed} for attention at {shape.name}, got {provider!r}")
    qkv, q, k, v, positions, slopes = _inputs(shape, device, dtype)
    leaves = (qkv,) + ((slopes,) if slopes is not None else ())
    alibi = dict(positions=positions, alibi_slopes=slopes) if shape.alibi else {}

    if provider == "triton":
        if not _kernels.HAS_TRITON:
            raise Unavailable("triton is not installed")
        if device.type != "cuda" and not _kernels.triton_interpret():
            raise Unavailable("Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to interpret them on CPU")
        fn = functools.partial(attention, q, k, v, impl="triton", **alibi)
    elif provider == "torch":
        fn = functools.partial(attention_ref, q, k, v, **alibi)
    elif provider == "compile":
        torch._dynamo.reset()
        fn = functools.partial(torch.compile(attention_ref), q, k, v, **alibi)
    elif provider == "sdpa":
        if device.type != "cuda":
            raise Unavailable("the flash / efficient SDPA backends need CUDA")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)

    elif provider == "sdpa-bias":
        bias = _materialised_alibi(positions, slopes, dtype)

        def fn():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias())

    elif provider == "flex":
        fn = _flex_forward(q, k, v, positions, slopes, device)
    elif provider == "xformers":
        fn = _xformers_forward(q, k, v, positions, slopes, dtype)
    return AttentionWorkload(forward=fn, grad_inputs=leaves, flops=attention_flops(shape))


def _flex_forward(q, k, v, positions, slopes, device):
    if device.type != "cuda":
        raise Unavailable("flex_attention is benchmarked on CUDA only (its CPU path is a different kernel)")
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        raise Unavailable(f"torch.nn.attention.flex_attention is not importable: {e}") from e
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention)
    if positions is None:
        return lambda: compiled(q, k, v)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (positions[b, q_idx] - positions[b, kv_idx]).abs()

    return lambda: compiled(q, k, v, score_mod=alibi)


def _xformers_forward(q, k, v, positions, slopes, dtype):
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise Unavailable(f"xformers is not importable: {e}") from e
    bias = _materialised_alibi(positions, slopes, dtype) if positions is not None else None

    def fn():
        # xformers takes [rows, L, H, Dh]: the qkv views transposed back, no copy.
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=None if bias is None else bias()
        )
        return out.transpose(1, 2)

    return fn


def attention_cases(
    shapes: Mapping[str, AttentionShape] = ATTENTION_SHAPES, dtype: torch.dtype = torch.bfloat16
) -> list[AttentionCase]:
    """One AttentionCase per shape, with its providers, FLOP counts and targets."""
    return [
        AttentionCase(
            shape=s,
            dtype=dtype,
            providers=ALIBI_PROVIDERS if s.alibi else PLAIN_PROVIDERS,
            flops=attention_flops(s),
            targets=ALIBI_TARGETS if s.alibi else PLAIN_TARGETS,
        )
        for s in shapes.values()
    ]


def shape_from_spec(spec) -> AttentionShape:
    """The student attention of a ``d2v2.bench.kernels.ShapeSpec``: kept tokens (+ CLS on a patch grid),
    dim / 64 heads of 64, ALiBi over the full sequence for the audio specs."""
    heads = max(1, spec.dim // HEAD_DIM)
    length = spec.kept + (1 if spec.grid is not None else 0)
    alibi_length = spec.length if spec.name.startswith("audio") else None
    return AttentionShape(spec.name, spec.rows, heads, length, spec.dim // heads, alibi_length)


def bench_cases(shapes: Mapping[str, Any], dtype: torch.dtype) -> list[Case]:
    """The ``d2v2 bench kernels`` plug-in: attention at that run's shape specs."""
    cases = []
    for case in attention_cases({name: shape_from_spec(spec) for name, spec in shapes.items()}, dtype):

        def setup(provider, device, case=case):
            work = case.setup(provider, device)
            return Workload(fn=work.forward, grad_inputs=work.grad_inputs, flops=dict(work.flops))

        cases.append(
            Case(
                "attention", case.shape.name, dims=case.shape.dims, dtype=dtype, modes=MODES,
                providers=case.providers, bound="compute", setup=setup, targets=case.targets,
            )
        )  # fmt: skip
    return cases
