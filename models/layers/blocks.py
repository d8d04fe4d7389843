"""Transformer blocks shared by every method: post-norm (data2vec 2.0) and pre-norm (MAE), on our attention.

Both blocks return ``(x, ffn_out)``: the block output and the output of its feed-forward network
(fc2, after its internal dropout) *before* the post-FFN dropout, the residual add and any LayerNorm.
data2vec 2.0 regresses the average of the teacher's normalised ``ffn_out`` of its top-k blocks
(``end_of_block_targets=false`` in every released config).

Post-norm block (fairseq ``examples/data2vec/models/modalities/modules.py: AltBlock`` with
``layer_norm_first=False``)::

    x   = x + drop_path(attn(x))           attention output already through proj and proj dropout
    r   = norm1(x)
    t   = mlp(r)                           fc1 -> GELU -> dropout -> fc2 -> dropout (activation_dropout)
    x   = norm2(r + drop_path(post_mlp_dropout(t)))
    return x, t

Pre-norm block (the ViT/MAE block; the reference's pre-norm branch drops the input residual of the
FFN, a quirk of the reference, which we do not copy), optionally with BEiT's
layer-scale (CaiT; per-channel gammas g1, g2 initialised to ``layer_scale_init``, as data2vec 1.0's
vision blocks)::

    x   = x + drop_path(g1 * attn(norm1(x)))
    t   = mlp(norm2(x))
    x   = x + drop_path(g2 * post_mlp_dropout(t))
    return x, t

Attention is ``d2v2.kernels.attention.attention``: q, k, v [B, H, L, Dh] straight from the fused qkv
projection (views, no copy), optional ALiBi from the original positions of the kept tokens, optional
key padding mask, dropout on the probabilities only in training mode.

References: data2vec 2.0, Baevski et al., "Efficient Self-supervised Learning with Contextualized
Target Representations for Vision, Speech and Language", ICML 2023 (arXiv:2212.07525); MAE, He et
al., CVPR 2022; LayerDrop, Fan et al., ICLR 2020; BERT initialisation as fairseq's ``init_bert_params``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from d2v2.kernels.attention import attention

__all__ = [
    "Attention",
    "Mlp",
    "DropPath",
    "PostNormBlock",
    "PreNormBlock",
    "forward_blocks",
    "init_bert_params",
    "TwoStageEncoder",
]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias), running ``kernels.attention``.

    Args:
        dim: model width D.
        num_heads: number of heads H; D must be divisible by H.
        attention_dropout: dropout on the attention probabilities (training mode only).
        proj_dropout: dropout on the output projection (``encoder_dropout`` in the reference).
        impl: kernel implementation, "auto" | "triton" | "torch".
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        impl: str = "auto",
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_dropout = attention_dropout
        self.impl = impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        alibi_slopes: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)  # [B, L, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, Dh], views of qkv
        out = attention(
            q,
            k,
            v,
            positions=positions,
            alibi_slopes=alibi_slopes,
            key_padding_mask=key_padding_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            impl=self.impl,
        )
        out = out.transpose(1, 2).reshape(batch, length, dim)  # [B, L, H * Dh]
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, attention_dropout={self.attention_dropout}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm's Mlp, as the reference uses it)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample: zero a residual branch for a random subset of rows (training only)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class _Block(nn.Module):
    """Parts shared by both block flavours; the subclasses differ only in where the norms sit."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        encoder_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        post_mlp_dropout: float = 0.0,
        drop_path: float = 0.0,
        impl: str = "auto",
    ):
        """
        Args:
            dim: model width D.
            num_heads: attention heads.
            mlp_ratio: FFN hidden width as a multiple of D.
            norm_eps: LayerNorm epsilon (1e-6 for the image presets, 1e-5 otherwise).
            encoder_dropout: dropout after the attention output projection.
            attention_dropout: dropout on the attention probabilities.
            activation_dropout: dropout inside the FFN (after GELU and after fc2).
            post_mlp_dropout: dropout on the FFN output before the residual add.
            drop_path: stochastic-depth probability of this block's residual branches.
            impl: kernel implementation for attention, "auto" | "triton" | "torch".
        """
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, attention_dropout, encoder_dropout, impl)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation_dropout)
        self.post_mlp_drop = nn.Dropout(post_mlp_dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()


class PostNormBlock(_Block):
    """data2vec 2.0's block (post-norm). ``forward`` returns ``(x, ffn_out)``; see the module docstring."""

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        alibi_slopes: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.drop_path(self.attn(x, positions, alibi_slopes, key_padding_mask))
        r = self.norm1(x)
        ffn_out = self.mlp(r)
        x = self.norm2(r + self.drop_path(self.post_mlp_drop(ffn_out)))
        return x, ffn_out


class PreNormBlock(_Block):
    """The ViT/MAE block (pre-norm, both residuals kept). ``forward`` returns ``(x, ffn_out)``.

    Takes ``_Block``'s arguments plus ``layer_scale_init``: > 0 adds BEiT's learned per-channel
    scales ``gamma_1``, ``gamma_2`` [D] of both residual branches, initialised to it; 0 adds none.
    """

    def __init__(self, *args, layer_scale_init: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        dim = self.norm1.normalized_shape[0]
        self.gamma_1 = self.gamma_2 = None
        if layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        alibi_slopes: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.attn(self.norm1(x), positions, alibi_slopes, key_padding_mask)
        x = x + self.drop_path(attn if self.gamma_1 is None else self.gamma_1 * attn)
        ffn_out = self.mlp(self.norm2(x))
        branch = self.post_mlp_drop(ffn_out)
        x = x + self.drop_path(branch if self.gamma_2 is None else self.gamma_2 * branch)
        return x, ffn_out


def forward_blocks(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    positions: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    *,
    layerdrop: float = 0.0,
    collect_from: int | None = None,
    collect: str = "ffn",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``blocks`` in order, with LayerDrop in training mode, and collect FFN (or block) outputs.

    Args:
        blocks: the blocks (each ``block(x, positions, alibi_slopes, key_padding_mask) -> (x, ffn_out)``).
        x: [B, L, D] input tokens.
        positions, alibi_slopes, key_padding_mask: passed to every block's attention.
        layerdrop: probability of skipping each block while ``blocks`` are training (as the reference,
            one draw per block per step for the whole batch, from torch's default CPU generator).
        collect_from: return the ``ffn_out`` of blocks ``collect_from ..`` (index into ``blocks``);
            None collects nothing.
        collect: "ffn" collects each block's ``ffn_out``, "block" its output ``x`` (data2vec 1.0
            vision's ``end_of_block_targets``).

    Returns:
        (x, outs): the output [B, L, D] and the collected outputs, bottom to top.
    """
    ffn_outs: list[torch.Tensor] = []
    for index, block in enumerate(blocks):
        # A CPU draw: no device sync. Only the student ever trains with LayerDrop, and it collects nothing.
        if layerdrop > 0 and block.training and float(torch.rand(())) < layerdrop:
            continue
        x, ffn_out = block(x, positions, alibi_slopes, key_padding_mask)
        if collect_from is not None and index >= collect_from:
            ffn_outs.append(x if collect == "block" else ffn_out)
    return x, ffn_outs


@torch.no_grad()
def init_bert_params(module: nn.Module) -> None:
    """BERT initialisation (fairseq ``init_bert_params``): Linear and Embedding weights N(0, 0.02),
    Linear biases zero, an Embedding's padding row zero. Other modules keep their own init.
    Use as ``model.apply(init_bert_params)``."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, 0.02)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, 0.02)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()


class TwoStageEncoder(nn.Module):
    """An encoder in the two stages fine-tuning runs apart: ``local_features`` (the embedding's local
    encoder; what fine-tuning's mask vector, ``MaskFill``, replaces) and ``contextualize`` (positions,
    CLS, input norm) + ``run_blocks``. Subclasses define those three; this joins them."""

    def maskable_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """The features fine-tuning masks: the local features [B, N, D] and their padding."""
        return self.local_features(source, padding_mask)

    def encode_features(self, feats: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(Masked) local features [B, N, D] -> the encoder's output [B, extra + N, D], every token kept."""
        return self.run_blocks(*self.contextualize(feats, padding_mask))[0]

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The unmasked encoder: source -> [B, extra + N, D] (images: CLS first). For probes and export."""
        return self.encode_features(*self.maskable_features(source, padding_mask))
