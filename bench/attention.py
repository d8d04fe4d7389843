"""``attention`` bench cases: ``d2v2.kernels.attention`` against SDPA, FlexAttention and xformers.

Shapes (the student's attention over the kept tokens, per GPU), from each ``shapes.ShapeSpec``:
rows = batch * clones, L = kept (+ the CLS token for images), the preset's heads of D / heads,
ALiBi on the ORIGINAL positions of the kept tokens for audio (slopes: ``d2v2.models.alibi_slopes``,
the encoder's own). At the base recipes: images 256 rows x L 40, speech 24 x 500 of 999 frames
(ALiBi), text 32 x 266 of 512 tokens; 12 heads of 64.

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
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2v2.kernels.attention import attention, attention_ref
from d2v2.models import alibi_slopes

from . import harness
from .harness import MODES, Case, Unavailable, Workload
from .shapes import ShapeSpec

PLAIN_PROVIDERS = ("triton", "torch", "compile", "sdpa", "flex", "xformers")
ALIBI_PROVIDERS = ("triton", "torch", "compile", "sdpa-bias", "flex", "xformers")
ALIBI_TARGETS = (("full", "speedup_vs_sdpa-bias", 2.0), ("full", "speedup_vs_flex", 1.0))
PLAIN_TARGETS = (("full", "speedup_vs_sdpa", 0.9),)


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


def attention_flops(shape: AttentionShape) -> dict[str, float]:
    """FLOPs per mode: fwd 4 * rows * H * L^2 * Dh, bwd 2.5x, full 3.5x."""
    fwd = 4.0 * shape.rows * shape.heads * shape.length**2 * shape.head_dim
    return {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd}


def shape_from_spec(spec: ShapeSpec) -> AttentionShape:
    """The student attention of a shape spec: kept tokens (+ CLS), the preset's heads, ALiBi for audio."""
    return AttentionShape(
        spec.name, spec.rows, spec.heads, spec.kept + spec.extra_tokens, spec.dim // spec.heads,
        spec.length if spec.alibi else None,
    )  # fmt: skip


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
        slopes = alibi_slopes(shape.heads).to(device).requires_grad_()
    return qkv, q, k, v, positions, slopes


def _materialised_alibi(positions, slopes, dtype):
    """The reference's [rows, H, L, L] bias, in the compute dtype, rebuilt from the slopes."""
    dist = (positions[:, :, None] - positions[:, None, :]).abs().to(torch.float32)  # [rows, L, L]
    return lambda: (-slopes[None, :, None, None] * dist[:, None]).to(dtype)


def setup_attention(shape: AttentionShape, provider: str, device: torch.device, dtype: torch.dtype) -> Workload:
    """Inputs and the forward callable of ``provider`` at ``shape``; Unavailable when it cannot run here."""
    allowed = ALIBI_PROVIDERS if shape.alibi else PLAIN_PROVIDERS
    if provider not in allowed:
        raise ValueError(f"provider must be one of {allowed} for attention at {shape.name}, got {provider!r}")
    qkv, q, k, v, positions, slopes = _inputs(shape, device, dtype)
    leaves = (qkv,) + ((slopes,) if slopes is not None else ())
    alibi = dict(positions=positions, alibi_slopes=slopes) if shape.alibi else {}

    if provider == "triton":
        harness.require_triton(device)
        fn = functools.partial(attention, q, k, v, impl="triton", **alibi)
    elif provider == "torch":
        fn = functools.partial(attention_ref, q, k, v, **alibi)
    elif provider == "compile":
        torch._dynamo.reset()
        fn = functools.partial(harness.compiled(attention_ref), q, k, v, **alibi)
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
    return Workload(fn=fn, grad_inputs=leaves, flops=attention_flops(shape))


def _flex_forward(q, k, v, positions, slopes, device):
    if device.type != "cuda":
        raise Unavailable("flex_attention is benchmarked on CUDA only (its CPU path is a different kernel)")
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        raise Unavailable(f"torch.nn.attention.flex_attention is not importable: {e}") from e
    torch._dynamo.reset()
    compiled = harness.compiled(flex_attention)
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


def bench_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> list[Case]:
    """Attention at each spec's student shape: compute-bound, with the ALiBi or plain providers and targets."""
    cases = []
    for spec in shapes.values():
        shape = shape_from_spec(spec)
        cases.append(Case(
            "attention", shape.name, dims=shape.dims, dtype=dtype, modes=MODES,
            providers=ALIBI_PROVIDERS if shape.alibi else PLAIN_PROVIDERS, bound="compute",
            setup=functools.partial(setup_attention, shape, dtype=dtype),
            targets=ALIBI_TARGETS if shape.alibi else PLAIN_TARGETS,
        ))  # fmt: skip
    return cases
