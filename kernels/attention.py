"""attention: memory-efficient softmax attention over the kept tokens, with ALiBi on original positions.

Contract
    attention(q, k, v, positions=None, alibi_slopes=None, key_padding_mask=None, dropout_p=0.0,
              scale=None, impl="auto", *, seed=None) -> out

    q, k, v           [B, H, L, Dh]  fp32 / bf16 / fp16, one dtype; any strides (views of a fused qkv
                                     projection are read in place, never copied)
    positions         [B, L] or None int32 / int64: the ORIGINAL position of each kept token (ALiBi
                                     distances are measured between these, not between slots of the
                                     compacted sequence); None with alibi_slopes means 0..L-1
    alibi_slopes      [H] or None    fp32 / bf16 / fp16, may require grad (learned per-head scale)
    key_padding_mask  [B, L] or None bool, True = padding (that key gets no attention)
    dropout_p         float in [0, 1): dropout on the attention probabilities (pass 0 in eval mode)
    scale             float or None: the logit scale, default 1 / sqrt(Dh)
    seed              int in [0, 2**31) or None: the dropout seed; None draws one from torch's default
                                     (CPU) generator, so torch.manual_seed makes a run reproducible
    out               [B, H, L, Dh]  dtype of q, contiguous

        s[b,h,i,j]  = scale * q[b,h,i] . k[b,h,j] - alibi_slopes[h] * |positions[b,i] - positions[b,j]|
                      (-inf where key_padding_mask[b, j])
        p[b,h,i,:]  = softmax_j(s[b,h,i,:]),  then dropout: p * z / (1 - dropout_p), z ~ Bernoulli(1 - dropout_p)
        out[b,h,i]  = sum_j p[b,h,i,j] v[b,h,j]

    A query whose every key is padding (all of key_padding_mask[b] True) has out = 0 and zero gradients,
    instead of the NaN that a softmax over an empty set gives.

    The Triton path never stores the L x L scores, probabilities or bias: each program keeps a
    [BLOCK_M, Dh] query tile in SRAM and streams key/value tiles through an online softmax in fp32
    (FlashAttention), adding the ALiBi bias computed from the two position vectors on the fly. The
    forward saves only out and the per-row log-sum-exp (base 2, fp32); peak memory is linear in L.

Gradients (the backward recomputes p tile by tile from the saved log-sum-exp)
    delta_i   = sum_d dout[i, d] * out[i, d]          (equals sum_j p_ij dp_ij, dropout included)
    dp_ij     = (dout_i . v_j) * z_ij / (1 - dropout_p)
    ds_ij     = p_ij * (dp_ij - delta_i)               the gradient of the loss wrt s_ij
    dq_i      = scale * sum_j ds_ij k_j
    dk_j      = scale * sum_i ds_ij q_i
    dv_j      = sum_i p_ij z_ij / (1 - dropout_p) dout_i
    dslope_h  = - sum_{b,i,j} ds[b,h,i,j] |positions[b,i] - positions[b,j]|

    Three launches: a pre-pass for delta, one kernel for dk/dv (one program per key block, looping
    over query blocks) and one for dq (one program per query block, looping over key blocks); every
    output element is written by exactly one program, no atomics. The slope gradient is reduced per
    dk/dv program into an fp32 partial buffer [B, key slots, H] that the launcher sums: deterministic.

Dropout
    The Triton kernels draw the mask with Philox (``tl.rand``) keyed by (seed, batch*H + head) and
    counted by i * L + j, so the backward regenerates exactly the forward's mask from (seed, offsets)
    and nothing of size L x L is stored. The PyTorch path (impl="torch") draws its mask with a
    ``torch.Generator`` seeded from the same seed. The two masks differ from each other; each is
    reproducible from its seed (for the same shapes).

References
    FlashAttention: Dao et al., NeurIPS 2022; FlashAttention-2: Dao, 2023 (online softmax, the
    dk/dv and dq backward split). Triton's fused-attention tutorial (python/tutorials/06-fused-attention.py).
    ALiBi: Press et al., "Train Short, Test Long", ICLR 2022. data2vec 2.0: Baevski et al., ICML 2023;
    reference code fairseq ``examples/data2vec/models/modalities/modules.py: AltAttention`` (the
    attention) and ``base.py: get_alibi_bias, masked_alibi`` (ALiBi gathered to the kept positions).

Limits
    - Triton path: head dims up to 256; a head dim that is not a power of two (80, 96) is padded to
      the next power of two in registers with masked loads (wasted FLOPs, no extra memory).
    - Self-attention only: q, k and v share one length L (k/v of another length is not supported).
    - Positions are converted to fp32 in the kernel: distances are exact below 2**24.
    - Triton dropout counts i * L + j in int32: L up to 46340 when dropout_p > 0.
    - fp32 inputs use IEEE fp32 dot products (no TF32) on the GPU; bf16 / fp16 use the tensor cores
      with fp32 accumulation, and the probabilities are rounded to the input dtype before p v.
    - In bf16 / fp16 the backward's delta = rowsum(dout * out) uses the rounded out (as FlashAttention
      does); the slope gradient weighs every ds by a distance, so it carries that rounding (about
      0.5 % relative in bf16), more than the q, k, v gradients.
    - Offsets inside one (batch, head) plane are int32: a view whose plane spans 2**31 elements or
      more is copied to a contiguous tensor first.
    - Verified under TRITON_INTERPRET=1 (CPU) against the reference with Triton 3.6 and 3.9, and
      every config compiled ahead of time for sm_80, sm_90 and sm_100 (``d2v2 bench compile``).
      bf16/fp16 at Dh 64 and 80 (image-huge, BLOCK_D 128): the configs that spill on an
      architecture are pruned there for the flag mixes where they spill (``_FWD_SPILLS``,
      ``_BWD_DKDV_SPILLS``, ``_BWD_DQ_SPILLS``: on sm_80 the backward's 64-row steps, on sm_90 the
      dk/dv 64-query steps with dropout and the forward's 64 x 64 with ALiBi, padding and dropout, on
      sm_100 some ALiBi mixes; at Dh 80 more of the backward's), so no config the autotuner keeps
      spills. Configs are also filtered by the device's shared memory (``_smem_estimate``). Where
      every config of a pass spills for a mix no model uses (Dh 80 with ALiBi and dropout on sm_90),
      one stays. fp32 inputs (no autocast) spill heavily in most configs: the fp32 path is correct
      but slow; train with bf16 autocast. Not yet run or timed on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_shape,
    check_tensor,
    device_arch,
    fit_shared_memory,
    resolve_impl,
    tl,
    triton,
    triton_interpret,
)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Dropout counter i * L + j is int32 (see Limits): floor(sqrt(2**31 - 1)).
MAX_DROPOUT_LENGTH = 46340
# The reference path materialises one [B, H, chunk, L] block of scores at a time, at most this many
# elements (64 MB in fp32); longer inputs are chunked over queries and recomputed in the backward.
REF_CHUNK_ELEMENTS = 1 << 24


def _alibi_padding_bias(
    positions: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    rows: slice,
    length: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive fp32 bias for the query rows ``rows``: [B, H, rows, L] with ALiBi, [B, 1, 1, L] with
    padding alone, None with neither. Differentiable wrt alibi_slopes."""
    bias = None
    if alibi_slopes is not None:
        if positions is None:
            positions = torch.arange(length, device=device)[None]  # [1, L]
        pos = positions.to(torch.float32)
        dist = (pos[:, rows, None] - pos[:, None, :]).abs()  # [B, rows, L]
        bias = -alibi_slopes.float()[None, :, None, None] * dist[:, None]  # [B, H, rows, L]
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, device=device, dtype=torch.float32)
        pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]  # [B, 1, 1, L]
        bias = pad if bias is None else bias + pad
    return bias


def _attention_ref_rows(q_rows, k, v, positions, alibi_slopes, key_padding_mask, dropout_p, scale, seed, start):
    """fp32 attention for the query rows [start, start + q_rows.shape[2]); keys are all L."""
    rows = slice(start, start + q_rows.shape[2])
    bias = _alibi_padding_bias(positions, alibi_slopes, key_padding_mask, rows, k.shape[2], q_rows.device)
    if dropout_p == 0.0:
        return F.scaled_dot_product_attention(q_rows, k, v, attn_mask=bias, scale=scale)
    scores = torch.matmul(q_rows, k.transpose(-1, -2)) * scale  # [B, H, rows, L]
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    # One generator per chunk, keyed by its first row, so a checkpointed recompute redraws the same mask.
    generator = torch.Generator(device=q_rows.device).manual_seed(seed + (start << 32))
    keep = torch.rand(probs.shape, generator=generator, device=probs.device) >= dropout_p
    probs = probs * keep / (1.0 - dropout_p)
    return torch.matmul(probs, v)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """PyTorch reference (the impl="torch" path and the test oracle); differentiable through autograd,
    alibi_slopes included.

    Computes in fp32 (an ALiBi bias of a few hundred loses whole units in bf16) through
    ``F.scaled_dot_product_attention`` with an fp32 bias. Up to REF_CHUNK_ELEMENTS score elements it
    is one call; beyond, it runs over query chunks under activation checkpointing, so neither the
    forward nor the backward holds more than one chunk's [B, H, chunk, L] scores. With dropout the
    probabilities are formed explicitly and masked with a ``torch.Generator`` seeded from ``seed``
    (None: drawn from torch's default generator).
    """
    batch, heads, length, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**31, ()).item())
    empty_rows = None
    if key_padding_mask is not None:
        # Keys all padding: attend to every key (a finite softmax) and zero the rows afterwards.
        # Done unconditionally: testing for such rows first would cost a device-to-host sync.
        empty_rows = key_padding_mask.all(dim=-1)  # [B]
        key_padding_mask = key_padding_mask & ~empty_rows[:, None]

    qf, kf, vf = q.float(), k.float(), v.float()
    args = (kf, vf, positions, alibi_slopes, key_padding_mask, float(dropout_p), scale, seed)
    chunk = max(1, REF_CHUNK_ELEMENTS // max(1, batch * heads * length))
    if chunk >= length:
        out = _attention_ref_rows(qf, *args, 0)
    else:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, alibi_slopes)
        )
        pieces = []
        for start in range(0, length, chunk):
            q_rows = qf[:, :, start : start + chunk]
            if needs_grad:
                pieces.append(checkpoint(_attention_ref_rows, q_rows, *args, start, use_reentrant=False))
            else:
                pieces.append(_attention_ref_rows(q_rows, *args, start))
        out = torch.cat(pieces, dim=2)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows[:, None, None, None], 0.0)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------------
# Triton kernels. Scores live in base 2: s2 = s * log2(e), so exp2 replaces exp and the saved
# log-sum-exp is base 2 as well. The batch and head indices are widened to int64 before they multiply
# a stride; offsets inside one (batch, head) plane stay int32 (``_int32_addressable`` makes sure they
# fit) and are recomputed from the loop index every iteration: hoisted loop-invariant [BLOCK, BLOCK_D]
# offset tiles would pin ~64 registers per program and made the 64 x 64 configs spill on sm90.
# ---------------------------------------------------------------------------------------------------


def _configs(shapes):
    """Autotune configs (BLOCK_M, BLOCK_N, num_warps, num_stages); one small config when interpreting,
    where the autotuner would otherwise run every config on the CPU."""
    if triton_interpret():
        # 16 x 16 tiles: the smallest tl.dot shape, so L = 33 in the tests spans three blocks.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes
    ]


# Forward: one program per (query block, batch*head). 128 x 64 with 8 warps is the FlashAttention-2
# shape for long L; the 64- and 32-row shapes are there for the short kept sequences (L = 40 images,
# 266 text), where 128-row blocks would leave most rows empty. The pruner drops blocks longer than L.
_FWD_SHAPES = ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2))
_FWD_CONFIGS = _configs(_FWD_SHAPES)
# dk/dv: BLOCK_N keys per program (outer), BLOCK_M queries per step (inner); dq the other way round.
# The tutorial's 32 x 128 / 128 x 32 shapes, plus smaller ones for short L. 128 x 128 is left out:
# its fp32 score, probability and dp tiles on top of the accumulators do not fit in registers.
# Register use checked by compiling for sm90 (Triton 3.6 and 3.9): see the module docstring's Limits.
_BWD_DKDV_SHAPES = ((32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2))
_BWD_DQ_SHAPES = ((128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2))
_BWD_DKDV_CONFIGS = _configs(_BWD_DKDV_SHAPES)
_BWD_DQ_CONFIGS = _configs(_BWD_DQ_SHAPES)
# The slope partial buffer has one slot per _MIN_BWD_BLOCK_N keys, whatever BLOCK_N the autotuner picks.
_MIN_BWD_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _BWD_DKDV_CONFIGS)
_AUTOTUNE_KEY = ["L_BUCKET", "HEAD_DIM", "HAS_ALIBI", "HAS_PADDING", "HAS_DROPOUT"]


# Configs that spill registers in bf16 / fp16 at head dim 64, found by compiling every launch of the base
# recipes ahead of time, each ALiBi / padding / dropout mix (``d2v2 bench compile``, Triton 3.9), and
# dropped by the autotuners on the architectures where they spill. Each entry: (compute capabilities
# [from, to), the launch flags that must all match, the (BLOCK_M, BLOCK_N) dropped); the comment above
# it gives what ptxas reported. An architecture outside every range (or no GPU) drops nothing.
_FWD_SPILLS = (
    # sm_90: 64 x 64 with ALiBi, padding and dropout: 8 / 8 B (stores / loads) at 255 registers.
    ((90, 100), {"HAS_ALIBI": True, "HAS_PADDING": True, "HAS_DROPOUT": True}, {(64, 64)}),
    # sm_100: with ALiBi and padding 64 x 64 spills 24 / 24 B (16 / 16 with dropout), 128 x 64 16 / 16 B.
    ((100, 110), {"HAS_ALIBI": True, "HAS_PADDING": True}, {(64, 64), (128, 64)}),
    # sm_100: 64 x 64 with ALiBi and dropout: 12 / 12 B.
    ((100, 110), {"HAS_ALIBI": True, "HAS_DROPOUT": True}, {(64, 64)}),
    # Dh 80 (image-huge; BLOCK_D 128), sm_90, ALiBi and padding: 64 x 64 56 / 60 B, 32 x 32 4 / 4 B.
    ((90, 100), {"BLOCK_D": 128, "HAS_ALIBI": True, "HAS_PADDING": True}, {(64, 64), (32, 32)}),
)
# dk/dv: the configs stepping over 64 queries (the score, probability and dp tiles on top of two
# [BLOCK_N, Dh] fp32 accumulators; with dropout, the in-register Philox draws as well).
_BWD_DKDV_SPILLS = (
    # sm_80: at the 255-register ceiling in every mix; with ALiBi 100 / 88 B (216 / 196 B with padding),
    # 64 x 128 with padding 8 / 4 B.
    ((80, 90), {}, {(64, 64), (64, 128)}),
    # sm_90: with dropout 40 / 44 B, with ALiBi and dropout 52 / 56 B.
    ((90, 100), {"HAS_DROPOUT": True}, {(64, 64), (64, 128)}),
    # sm_100: with ALiBi and dropout 36 / 36 B (64 x 64) and 36 / 40 B (64 x 128).
    ((100, 110), {"HAS_ALIBI": True, "HAS_DROPOUT": True}, {(64, 64), (64, 128)}),
    # Dh 80 (image-huge; BLOCK_D 128): on sm_80 32 x 128 spills in every mix (60 / 60 B without any
    # flag, 5868 / 5540 B with dropout), 32 x 64 only with dropout, padding or ALiBi (16 / 8 B to
    # 240 / 188 B), which image-huge does not use: 32 x 64 stays, the least spilling. On sm_90 64 x 64
    # and 64 x 128 spill in every mix (28 / 28 B and 36 / 36 B without any flag), 32 x 64 with dropout
    # or ALiBi (16-20 B); 32 x 128 stays (16 B with ALiBi and dropout, a mix no model has at Dh 80).
    ((80, 90), {"BLOCK_D": 128}, {(32, 128)}),
    ((90, 100), {"BLOCK_D": 128}, {(64, 64), (64, 128)}),
    ((90, 100), {"BLOCK_D": 128, "HAS_DROPOUT": True}, {(32, 64)}),
    ((90, 100), {"BLOCK_D": 128, "HAS_ALIBI": True}, {(32, 64)}),
)
_BWD_DQ_SPILLS = (
    # sm_80: the 64-key steps at 255 registers: 64 x 64 spills 8 / 4 B, 128 x 64 with padding 16 / 8 B.
    ((80, 90), {}, {(64, 64), (128, 64)}),
    # sm_100: 128 x 32 with ALiBi and padding, without dropout: 4 / 4 B at 80 registers.
    ((100, 110), {"HAS_ALIBI": True, "HAS_PADDING": True, "HAS_DROPOUT": False}, {(128, 32)}),
    # Dh 80 (BLOCK_D 128), sm_90, ALiBi, padding and dropout: 64 x 64 4 / 4 B.
    ((90, 100), {"BLOCK_D": 128, "HAS_ALIBI": True, "HAS_PADDING": True, "HAS_DROPOUT": True}, {(64, 64)}),
)


def _flag_matches(arg, value) -> bool:
    """A spill table's flag: a bool matches the launch's truthiness, an int (``BLOCK_D``) its value."""
    return bool(arg) == value if isinstance(value, bool) else arg == value


def _prune_configs(spills, smem_estimate=None):
    """``early_config_prune`` of one kernel: drop the configs ``spills`` lists for the device's
    architecture (``device_arch``) and the launch's flags, then the configs whose blocks are larger
    than the (bucketed) length (keep the smallest otherwise), then those whose shared memory exceeds
    the device's (``fit_shared_memory``). No list comes out empty."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        arch = device_arch()
        if arch is not None:
            dropped = set()
            for (lo, hi), flags, blocks in spills:
                if lo <= arch < hi and all(_flag_matches(args[name], value) for name, value in flags.items()):
                    dropped |= blocks
            configs = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) not in dropped] or configs
        bucket = args["L_BUCKET"]
        fitting = [c for c in configs if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= bucket]
        smallest = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        return fit_shared_memory(fitting or [smallest], smem_estimate or _smem_estimate, named_args, kwargs)

    return {"early_config_prune": prune}


def _smem_estimate_bwd(config, args) -> int:
    """The backward passes' bound: ``_smem_estimate``, plus a second fp32 [BLOCK_M, BLOCK_N] scratch at
    BLOCK_D 128, where the dk/dv pass converts both p and dp (131,648 B compiled for 64 x 64 in bf16 at
    Dh 80 on sm_100, 115,712 B without it)."""
    wide = args["BLOCK_D"] > 64
    return _smem_estimate(config, args) + (config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] * 4 if wide else 0)


def _smem_estimate(config, args) -> int:
    """Upper bound of a config's shared memory: the pipelined tiles of the inner loop (num_stages deep,
    two operands), the program's resident tiles (two, counted as staged too), the fp32 row statistics
    and one fp32 [BLOCK_M, BLOCK_N] layout-conversion scratch. Matches sm90's compiled figure
    for the forward's 64 x 64 (57344 B in bf16 at Dh 64) up to the scratch term."""
    m, n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    block_d, size = args["BLOCK_D"], args["q_ptr"].element_size()
    widest = max(m, n)
    return (stages * 2 * widest + 2 * widest) * block_d * size + stages * 2 * widest * 4 + m * n * 4


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST_DOT (set only under TRITON_INTERPRET=1 for bf16) works around
    the interpreter's tl.dot, which multiplies bf16 operands as their raw uint16 bits: the operands
    are widened to fp32 first, which is exact, so the result matches a tensor-core bf16 dot."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def _scores_2(
    q,  # [BLOCK_M, BLOCK_D] query tile (or the key tile, for the transposed scores of the dk/dv pass)
    kt,  # [BLOCK_D, BLOCK_N] transposed key tile (or the transposed query tile)
    pos_a,  # [BLOCK_M] fp32 positions of the rows
    pos_b,  # [BLOCK_N] fp32 positions of the columns
    qk_scale,  # scale * log2(e)
    slope_2,  # alibi slope * log2(e)
    HAS_ALIBI: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Base-2 scores of one tile: scale * q k^T - slope * |pos_a - pos_b|, all in fp32."""
    s = _dot(q, kt, INPUT_PRECISION, UPCAST_DOT) * qk_scale
    if HAS_ALIBI:
        s -= slope_2 * tl.abs(pos_a[:, None] - pos_b[None, :])
    return s


@triton.jit
def _attention_fwd_inner(
    acc,  # [BLOCK_M, BLOCK_D] fp32 running sum of p v
    l_i,  # [BLOCK_M] fp32 running sum of p
    m_i,  # [BLOCK_M] fp32 running row maximum (base 2)
    q,  # [BLOCK_M, BLOCK_D]
    pos_m,  # [BLOCK_M] fp32 positions of the queries
    offs_m,  # [BLOCK_M] query rows (the dropout counter)
    k_plane, stride_kn, stride_kd,  # k of this (batch, head)
    v_plane, stride_vn, stride_vd,
    pos_row, stride_pn,  # positions of this batch row
    pad_row, stride_mn,  # padding mask of this batch row
    qk_scale, slope_2, dropout_p, rng_key, L,
    start, end,  # key range [start, end) of this call, a whole number of blocks
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    MASK_N: tl.constexpr,  # the range holds the ragged last block: mask keys >= L
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        if MASK_N:
            kt_mask = d_ok[:, None] & n_ok[None, :]
            v_mask = n_ok[:, None] & d_ok[None, :]
        else:  # whole blocks: only the head-dim padding (the mask broadcasts over the tile)
            kt_mask = d_ok[:, None]
            v_mask = d_ok[None, :]
        kt = tl.load(k_plane + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kt_mask, other=0.0)
        v = tl.load(v_plane + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=v_mask, other=0.0)
        pos_n = offs_n.to(tl.float32)
        if HAS_ALIBI:
            pos_n = tl.load(pos_row + offs_n * stride_pn, mask=n_ok, other=0).to(tl.float32)
        s = _scores_2(q, kt, pos_m, pos_n, qk_scale, slope_2, HAS_ALIBI, INPUT_PRECISION, UPCAST_DOT)
        if HAS_PADDING:
            pad = tl.load(pad_row + offs_n * stride_mn, mask=n_ok, other=1)
            s = tl.where(pad[None, :] == 0, s, float("-inf"))
        if MASK_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; shift by 0 there instead of by -inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = tl.rand(rng_key, offs_m[:, None] * L + offs_n[None, :]) >= dropout_p
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_prune_configs(_FWD_SPILLS))
@triton.jit
def _attention_fwd_kernel(
    out_ptr, stride_ob, stride_oh, stride_om, stride_od,  # [B, H, L, Dh] out
    lse_ptr,  # [B, H, L] fp32 out, contiguous: base-2 log-sum-exp of each row (+inf for an empty row)
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd,  # [B, H, L, Dh]
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,  # [B, H, L, Dh]
    v_ptr, stride_vb, stride_vh, stride_vn, stride_vd,  # [B, H, L, Dh]
    pos_ptr, stride_pb, stride_pn,  # [B, L] int (read only with HAS_ALIBI)
    slopes_ptr,  # [H] (read only with HAS_ALIBI)
    pad_ptr, stride_mb, stride_mn,  # [B, L] uint8, 1 = padding (read only with HAS_PADDING)
    H, L,
    qk_scale,  # scale * log2(e)
    dropout_p,
    keep_scale,  # 1 / (1 - dropout_p)
    seed,
    L_BUCKET: tl.constexpr,  # next power of two of L: the autotune key, so nearby lengths share a config
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two of HEAD_DIM
    HAS_ALIBI: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Forward: online softmax over key blocks (FlashAttention-2, Dao 2023, algorithm 1)."""
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM
    pos_row = pos_ptr + b * stride_pb
    pad_row = pad_ptr + b * stride_mb

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    slope_2 = 0.0
    pos_m = offs_m.to(tl.float32)
    if HAS_ALIBI:
        slope_2 = tl.load(slopes_ptr + h).to(tl.float32) * 1.4426950408889634
        pos_m = tl.load(pos_row + offs_m * stride_pn, mask=m_ok, other=0).to(tl.float32)
    # Philox key: the seed in the low 32 bits, the (batch, head) plane in the high 32 bits.
    rng_key = seed + pid_bh.to(tl.int64) * 4294967296

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    k_plane = k_ptr + b * stride_kb + h * stride_kh
    v_plane = v_ptr + b * stride_vb + h * stride_vh
    full_end = (L // BLOCK_N) * BLOCK_N
    # Whole key blocks without the length mask, then the ragged last block with it.
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, pos_m, offs_m, k_plane, stride_kn, stride_kd, v_plane, stride_vn, stride_vd,
        pos_row, stride_pn, pad_row, stride_mn, qk_scale, slope_2, dropout_p, rng_key, L, 0, full_end,
        HEAD_DIM, BLOCK_D, BLOCK_N, HAS_ALIBI, HAS_PADDING, HAS_DROPOUT, False, INPUT_PRECISION, UPCAST_DOT,
    )
    if full_end < L:
        acc, l_i, m_i = _attention_fwd_inner(
            acc, l_i, m_i, q, pos_m, offs_m, k_plane, stride_kn, stride_kd, v_plane, stride_vn, stride_vd,
            pos_row, stride_pn, pad_row, stride_mn, qk_scale, slope_2, dropout_p, rng_key, L, full_end,
            full_end + BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_ALIBI, HAS_PADDING, HAS_DROPOUT, True,
            INPUT_PRECISION, UPCAST_DOT,
        )

    empty = l_i == 0.0  # every key of the row is padding: out = 0, and lse = +inf makes p = 0 in backward
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * keep_scale
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(lse_ptr + pid_bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(
    delta_ptr,  # [B, H, L] fp32 out, contiguous: rowsum(dout * out)
    out_ptr, stride_ob, stride_oh, stride_om, stride_od,  # [B, H, L, Dh]
    dout_ptr, stride_gb, stride_gh, stride_gm, stride_gd,  # [B, H, L, Dh]
    H, L,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        mask=mask, other=0.0,
    ).to(tl.float32)
    do = tl.load(
        dout_ptr + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        mask=mask, other=0.0,
    ).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_prune_configs(_BWD_DKDV_SPILLS, _smem_estimate_bwd))
@triton.jit
def _attention_bwd_dkdv_kernel(
    dk_ptr, stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # [B, H, L, Dh] out
    dv_ptr, stride_dvb, stride_dvh, stride_dvn, stride_dvd,  # [B, H, L, Dh] out
    dslope_ptr, stride_sb, stride_sn,  # [B, SLOTS, H] fp32 out: partial slope gradients, one per SLOT_N keys
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd,  # [B, H, L, Dh]
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,  # [B, H, L, Dh]
    v_ptr, stride_vb, stride_vh, stride_vn, stride_vd,  # [B, H, L, Dh]
    dout_ptr, stride_gb, stride_gh, stride_gm, stride_gd,  # [B, H, L, Dh]
    lse_ptr,  # [B, H, L] fp32, contiguous
    delta_ptr,  # [B, H, L] fp32, contiguous
    pos_ptr, stride_pb, stride_pn,  # [B, L] int
    slopes_ptr,  # [H]
    pad_ptr, stride_mb, stride_mn,  # [B, L] uint8
    H, L, qk_scale, sm_scale, dropout_p, keep_scale, seed,
    slots,  # SLOTS = cdiv(L, SLOT_N)
    L_BUCKET: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    SLOPE_GRAD: tl.constexpr,
    SLOT_N: tl.constexpr,  # keys per partial-sum slot: the smallest BLOCK_N of any config
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dk, dv (and the slope partials) of one key block, looping over all query blocks.

    Works on transposed tiles (keys along rows) so dv = p^T dout and dk = ds^T q need no transposes
    of the probabilities (the tutorial's _attn_bwd_dkdv).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    pos_row = pos_ptr + b * stride_pb

    k = tl.load(
        k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=kv_mask, other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    v = tl.load(
        v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=kv_mask, other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    key_ok = n_ok  # keys that take part in the softmax
    if HAS_PADDING:
        pad = tl.load(pad_ptr + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=1)
        key_ok = key_ok & (pad == 0)
    slope_2 = 0.0
    pos_n = offs_n.to(tl.float32)
    if HAS_ALIBI:
        slope_2 = tl.load(slopes_ptr + h).to(tl.float32) * 1.4426950408889634
        pos_n = tl.load(pos_row + offs_n * stride_pn, mask=n_ok, other=0).to(tl.float32)
    rng_key = seed + pid_bh.to(tl.int64) * 4294967296

    q_plane = q_ptr + b * stride_qb + h * stride_qh
    do_plane = dout_ptr + b * stride_gb + h * stride_gh
    lse_row = lse_ptr + pid_bh.to(tl.int64) * L
    delta_row = delta_ptr + pid_bh.to(tl.int64) * L
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dslope = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        qt = tl.load(
            q_plane + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
            mask=m_ok[None, :] & d_ok[:, None], other=0.0,
        )  # [BLOCK_D, BLOCK_M]
        do = tl.load(
            do_plane + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
            mask=m_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        # Rows past L (and empty rows) have lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(lse_row + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_row + offs_m, mask=m_ok, other=0.0)
        pos_m = offs_m.to(tl.float32)
        if HAS_ALIBI:
            pos_m = tl.load(pos_row + offs_m * stride_pn, mask=m_ok, other=0).to(tl.float32)
        # [BLOCK_N, BLOCK_M]: the scores transposed (keys along rows)
        st = _scores_2(k, qt, pos_n, pos_m, qk_scale, slope_2, HAS_ALIBI, INPUT_PRECISION, UPCAST_DOT)
        pt = tl.where(key_ok[:, None], tl.math.exp2(st - lse[None, :]), 0.0)
        dpt = _dot(v, tl.trans(do), INPUT_PRECISION, UPCAST_DOT)  # (dout v^T)^T
        if HAS_DROPOUT:
            keep = tl.rand(rng_key, offs_m[None, :] * L + offs_n[:, None]) >= dropout_p
            pdt = tl.where(keep, pt * keep_scale, 0.0)
            dpt = tl.where(keep, dpt * keep_scale, 0.0)
        else:
            pdt = pt
        dv += _dot(pdt.to(do.dtype), do, INPUT_PRECISION, UPCAST_DOT)
        dst = pt * (dpt - delta[None, :])  # [BLOCK_N, BLOCK_M] gradient wrt the natural-log scores
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), INPUT_PRECISION, UPCAST_DOT)
        if SLOPE_GRAD:
            dslope += tl.sum(dst * tl.abs(pos_n[:, None] - pos_m[None, :]), 1)

    dk *= sm_scale
    tl.store(
        dk_ptr + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
        dk.to(dk_ptr.dtype.element_ty), mask=kv_mask,
    )
    tl.store(
        dv_ptr + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
        dv.to(dv_ptr.dtype.element_ty), mask=kv_mask,
    )
    if SLOPE_GRAD:
        # d s / d slope = -|pos_i - pos_j|; masked keys and rows have ds = 0. This program owns the
        # BLOCK_N / SLOT_N slots of its keys: the sum goes in the first, zeros in the others, so every
        # slot is written whatever config the autotuner runs (no stale partials, no zeroing pass).
        slot = pid_n * (BLOCK_N // SLOT_N)
        slope_base = dslope_ptr + b * stride_sb + h
        tl.store(slope_base + slot * stride_sn, -tl.sum(dslope, 0))
        for r in tl.static_range(1, BLOCK_N // SLOT_N):
            tl.store(slope_base + (slot + r) * stride_sn, 0.0, mask=slot + r < slots)


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_prune_configs(_BWD_DQ_SPILLS, _smem_estimate_bwd))
@triton.jit
def _attention_bwd_dq_kernel(
    dq_ptr, stride_dqb, stride_dqh, stride_dqm, stride_dqd,  # [B, H, L, Dh] out
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd,  # [B, H, L, Dh]
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,  # [B, H, L, Dh]
    v_ptr, stride_vb, stride_vh, stride_vn, stride_vd,  # [B, H, L, Dh]
    dout_ptr, stride_gb, stride_gh, stride_gm, stride_gd,  # [B, H, L, Dh]
    lse_ptr,  # [B, H, L] fp32, contiguous
    delta_ptr,  # [B, H, L] fp32, contiguous
    pos_ptr, stride_pb, stride_pn,  # [B, L] int
    slopes_ptr,  # [H]
    pad_ptr, stride_mb, stride_mn,  # [B, L] uint8
    H, L, qk_scale, sm_scale, dropout_p, keep_scale, seed,
    L_BUCKET: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq of one query block, looping over all key blocks (the tutorial's _attn_bwd_dq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM
    row_mask = m_ok[:, None] & d_ok[None, :]
    pos_row = pos_ptr + b * stride_pb
    pad_row = pad_ptr + b * stride_mb

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_mask, other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    do = tl.load(
        dout_ptr + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        mask=row_mask, other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * L + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
    slope_2 = 0.0
    pos_m = offs_m.to(tl.float32)
    if HAS_ALIBI:
        slope_2 = tl.load(slopes_ptr + h).to(tl.float32) * 1.4426950408889634
        pos_m = tl.load(pos_row + offs_m * stride_pn, mask=m_ok, other=0).to(tl.float32)
    rng_key = seed + pid_bh.to(tl.int64) * 4294967296

    k_plane = k_ptr + b * stride_kb + h * stride_kh
    v_plane = v_ptr + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kv_mask_t = d_ok[:, None] & n_ok[None, :]
        kt = tl.load(k_plane + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kv_mask_t, other=0.0)
        vt = tl.load(v_plane + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=kv_mask_t, other=0.0)
        key_ok = n_ok
        if HAS_PADDING:
            pad = tl.load(pad_row + offs_n * stride_mn, mask=n_ok, other=1)
            key_ok = key_ok & (pad == 0)
        pos_n = offs_n.to(tl.float32)
        if HAS_ALIBI:
            pos_n = tl.load(pos_row + offs_n * stride_pn, mask=n_ok, other=0).to(tl.float32)
        s = _scores_2(q, kt, pos_m, pos_n, qk_scale, slope_2, HAS_ALIBI, INPUT_PRECISION, UPCAST_DOT)
        p = tl.where(key_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, vt, INPUT_PRECISION, UPCAST_DOT)
        if HAS_DROPOUT:
            keep = tl.rand(rng_key, offs_m[:, None] * L + offs_n[None, :]) >= dropout_p
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), INPUT_PRECISION, UPCAST_DOT)

    dq *= sm_scale
    tl.store(
        dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
        dq.to(dq_ptr.dtype.element_ty), mask=row_mask,
    )


# ---------------------------------------------------------------------------------------------------
# Launchers and autograd Function
# ---------------------------------------------------------------------------------------------------


# The shared-memory bound the device filter uses, read by ``trace_launches`` for the compile bench.
_attention_fwd_kernel.smem_estimate = _smem_estimate
_attention_bwd_dkdv_kernel.smem_estimate = _smem_estimate_bwd
_attention_bwd_dq_kernel.smem_estimate = _smem_estimate_bwd


def _int32_addressable(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a contiguous copy when one (batch, head) plane (a row, for [B, L]) spans offsets past
    int32: the kernels address inside a plane in int32 (see the kernel section's note). Only absurd
    strides (a view into a tensor of more than 2**31 elements per plane) pay the copy."""
    if t is None:
        return None
    inner = range(2, 4) if t.dim() == 4 else range(1, 2)
    extent = sum((t.shape[d] - 1) * abs(t.stride(d)) for d in inner)
    return t if extent < 2**31 else t.contiguous()


def _launch_flags(q, positions, alibi_slopes, key_padding_mask, dropout_p):
    """Shared launch arguments: optional inputs as (pointer, strides) with a dummy when absent."""
    batch, _, length, head_dim = q.shape
    has_alibi = alibi_slopes is not None
    if has_alibi and positions is None:
        positions = torch.arange(length, device=q.device, dtype=torch.int32).expand(batch, length)
    pos = positions if has_alibi else q  # dummy pointer, never read
    pos_strides = (positions.stride(0), positions.stride(1)) if has_alibi else (0, 0)
    slopes = alibi_slopes if has_alibi else q
    has_padding = key_padding_mask is not None
    # bool -> uint8 is a view (no copy); Triton then loads plain bytes.
    pad = key_padding_mask.view(torch.uint8) if has_padding else q
    pad_strides = (pad.stride(0), pad.stride(1)) if has_padding else (0, 0)
    upcast_dot = triton_interpret() and q.dtype == torch.bfloat16
    return dict(
        optional=(pos, *pos_strides, slopes, pad, *pad_strides),
        L_BUCKET=max(16, triton.next_power_of_2(length)),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_ALIBI=has_alibi,
        HAS_PADDING=has_padding,
        HAS_DROPOUT=dropout_p > 0.0,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 or upcast_dot else "tf32",
        UPCAST_DOT=upcast_dot,
    )


def _attention_fwd(q, k, v, positions, alibi_slopes, key_padding_mask, dropout_p, scale, seed):
    """Launch the forward; returns out [B, H, L, Dh] (q's dtype) and the base-2 lse [B, H, L] fp32."""
    batch, heads, length, _ = q.shape
    flags = _launch_flags(q, positions, alibi_slopes, key_padding_mask, dropout_p)
    optional = flags.pop("optional")
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, length), device=q.device, dtype=torch.float32)
    keep_scale = 1.0 / (1.0 - dropout_p)

    def grid(meta):
        return (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)

    _attention_fwd_kernel[grid](
        out, *out.stride(), lse, q, *q.stride(), k, *k.stride(), v, *v.stride(), *optional,
        heads, length, scale * LOG2E, dropout_p, keep_scale, seed, **flags,
    )
    return out, lse


def _attention_bwd(dout, q, k, v, out, lse, positions, alibi_slopes, key_padding_mask, dropout_p, scale, seed,
                   slope_grad):
    """Launch the backward; returns dq, dk, dv (q's dtype, contiguous) and dslopes [H] (or None)."""
    batch, heads, length, head_dim = q.shape
    flags = _launch_flags(q, positions, alibi_slopes, key_padding_mask, dropout_p)
    optional = flags.pop("optional")
    keep_scale = 1.0 / (1.0 - dropout_p)

    delta = torch.empty((batch, heads, length), device=q.device, dtype=torch.float32)
    block_m = 16 if triton_interpret() else 64
    # 16 elements of the tile per thread: at 32 (4 warps for Dh 64, 8 for Dh 80) ptxas for sm_100 spilled
    # 12-28 B at 48 registers in bf16 / fp16; at 16 the kernel takes 30-32 registers on sm_80, sm_90 and
    # sm_100 without spills (``d2v2 bench compile``).
    _attention_bwd_preprocess_kernel[(triton.cdiv(length, block_m), batch * heads)](
        delta, out, *out.stride(), dout, *dout.stride(), heads, length,
        HEAD_DIM=head_dim, BLOCK_D=flags["BLOCK_D"], BLOCK_M=block_m,
        num_warps=max(4, block_m * flags["BLOCK_D"] // 512),
    )

    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dv = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    slope_grad = slope_grad and flags["HAS_ALIBI"]
    slots = triton.cdiv(length, _MIN_BWD_BLOCK_N) if slope_grad else 1
    dslope_partial = torch.empty((batch, slots, heads), device=q.device, dtype=torch.float32)
    common = (*optional, heads, length, scale * LOG2E, scale, dropout_p, keep_scale, seed)

    def grid_n(meta):
        return (triton.cdiv(length, meta["BLOCK_N"]), batch * heads)

    def grid_m(meta):
        return (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)

    _attention_bwd_dkdv_kernel[grid_n](
        dk, *dk.stride(), dv, *dv.stride(), dslope_partial, dslope_partial.stride(0), dslope_partial.stride(1),
        q, *q.stride(), k, *k.stride(), v, *v.stride(), dout, *dout.stride(), lse, delta,
        *common, slots, SLOPE_GRAD=slope_grad, SLOT_N=_MIN_BWD_BLOCK_N, **flags,
    )
    _attention_bwd_dq_kernel[grid_m](
        dq, *dq.stride(), q, *q.stride(), k, *k.stride(), v, *v.stride(), dout, *dout.stride(), lse, delta,
        *common, **flags,
    )
    dslopes = dslope_partial.sum(dim=(0, 1)).to(alibi_slopes.dtype) if slope_grad else None
    return dq, dk, dv, dslopes


class AttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels. Inputs keep their strides (no copies); the backward
    recomputes the probabilities from the saved log-sum-exp and, with dropout, the mask from the seed."""

    @staticmethod
    def forward(ctx, q, k, v, positions, alibi_slopes, key_padding_mask, dropout_p, scale, seed):
        q, k, v, positions, key_padding_mask = map(_int32_addressable, (q, k, v, positions, key_padding_mask))
        out, lse = _attention_fwd(q, k, v, positions, alibi_slopes, key_padding_mask, dropout_p, scale, seed)
        ctx.save_for_backward(q, k, v, out, lse, positions, alibi_slopes, key_padding_mask)
        ctx.dropout_p, ctx.scale, ctx.seed = dropout_p, scale, seed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, positions, alibi_slopes, key_padding_mask = ctx.saved_tensors
        dq, dk, dv, dslopes = _attention_bwd(
            _int32_addressable(dout), q, k, v, out, lse, positions, alibi_slopes, key_padding_mask,
            ctx.dropout_p, ctx.scale, ctx.seed, slope_grad=ctx.needs_input_grad[4],
        )
        return dq, dk, dv, None, dslopes, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    impl: str = "auto",
    *,
    seed: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + ALiBi(positions) + padding) v; the Triton path never forms the L x L matrix.

    q, k, v [B, H, L, Dh] -> [B, H, L, Dh]; see the module docstring for the full contract.
    positions int [B, L] (original token positions, used only with alibi_slopes; default 0..L-1),
    alibi_slopes [H] (may require grad), key_padding_mask bool [B, L] (True = padding), dropout_p in
    [0, 1) with ``seed`` (None: drawn from torch's default generator). impl: "auto" | "triton" | "torch".
    """
    check_tensor("q", q, ndim=4)
    batch, heads, length, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device)
        check_shape(name, t, (batch, heads, length, head_dim))
    if positions is not None:
        if alibi_slopes is None:
            raise ValueError("positions is only used by ALiBi: pass alibi_slopes too, or positions=None")
        check_tensor("positions", positions, ndim=2, dtypes=INDEX_DTYPES, device=q.device)
        check_shape("positions", positions, (batch, length))
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, ndim=1, dtypes=FLOAT_DTYPES, device=q.device)
        check_shape("alibi_slopes", alibi_slopes, (heads,))
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,), device=q.device)
        check_shape("key_padding_mask", key_padding_mask, (batch, length))
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise ValueError(f"seed must be an int in [0, 2**31) or None, got {seed!r}")

    impl = resolve_impl(impl, q, k, v, positions, alibi_slopes, key_padding_mask)
    dropout_p = float(dropout_p)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**31, ()).item())  # CPU generator: no device sync
    if impl == "torch" or q.numel() == 0:
        return attention_ref(q, k, v, positions, alibi_slopes, key_padding_mask, dropout_p, scale, seed)

    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q head dim must be at most {MAX_HEAD_DIM} for impl='triton', got {head_dim}")
    if dropout_p > 0.0 and length > MAX_DROPOUT_LENGTH:
        raise ValueError(
            f"q length must be at most {MAX_DROPOUT_LENGTH} with dropout_p > 0 for impl='triton', got {length}"
        )
    return AttentionFunction.apply(
        q, k, v, positions, alibi_slopes, key_padding_mask, dropout_p, scale, seed if dropout_p > 0.0 else 0
    )
