"""The transformer encoder data2vec 2.0's student and teacher share: modality embedding -> prenet ->
shared blocks, on the kept tokens of every masked copy or on the whole input.

What differs by modality (local encoder, positions, CLS, ALiBi) is the ``Modality`` object's; this
module only sequences it. Parameter names follow the roles of the reference's
``ModalitySpecificEncoder`` + ``Data2VecMultiModel.blocks``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.blocks import PostNormBlock, TwoStageEncoder, forward_blocks
from ..modalities import Modality

__all__ = ["Data2Vec2Encoder"]


class Data2Vec2Encoder(TwoStageEncoder):
    """Local encoder -> positions / masking / CLS -> prenet (LayerNorm, dropout, blocks) -> shared blocks.

    Roles (``ModalitySpecificEncoder`` + ``Data2VecMultiModel.blocks`` of the reference):

    - ``embed``: the modality's ``ImageEmbed`` / ``AudioEmbed`` / ``TextEmbed`` (``embeddings``): the
      ``local_encoder`` (``PatchEmbed`` / ``AudioFeatureEncoder`` / ``TokenEmbedding``) and the
      positional parts (images ``pos_embed`` and ``cls_token``; audio ``pos_conv`` and ``alibi_scale``);
    - ``context_norm`` + ``context_dropout`` (the prenet's LayerNorm and dropout; text has neither
      when it has no prenet blocks), ``prenet`` blocks, shared ``blocks``.

    Teacher copies set the parts they do not own to None (see ``Data2Vec2``).

    Args:
        cfg: the model config (``Data2Vec2Config`` or a config with the same encoder fields).
        modality: the modality object that builds and runs the modality-specific parts.
    """

    def __init__(self, cfg, modality: Modality):
        super().__init__()
        self.modality = modality
        self.num_extra_tokens = modality.num_extra_tokens
        self.layerdrop = cfg.layerdrop
        self.prenet_layerdrop = cfg.prenet_layerdrop
        self.impl = cfg.impl
        dim = cfg.embed_dim

        self.embed = modality.build_embed(cfg)
        has_prenet_norm = modality.has_prenet_norm(cfg)
        self.context_norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if has_prenet_norm else nn.Identity()
        self.context_dropout = nn.Dropout(cfg.prenet_dropout)

        total_depth = cfg.prenet_depth + cfg.depth
        drop_path = [cfg.drop_path_rate * i / max(total_depth - 1, 1) for i in range(total_depth)]

        def block(index: int) -> PostNormBlock:
            return PostNormBlock(
                dim,
                cfg.num_heads,
                cfg.mlp_ratio,
                cfg.norm_eps,
                cfg.encoder_dropout,
                cfg.attention_dropout,
                cfg.activation_dropout,
                cfg.post_mlp_dropout,
                drop_path[index],
                cfg.impl,
            )

        self.prenet = nn.ModuleList(block(i) for i in range(cfg.prenet_depth))
        self.blocks = nn.ModuleList(block(cfg.prenet_depth + i) for i in range(cfg.depth))

    def alibi(self) -> torch.Tensor | None:
        """Effective ALiBi slopes [H] (audio: fixed geometric slopes times the learned scale clamped at 0)."""
        return self.embed.alibi()

    def local_features(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None, grad_mult: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """source -> (features [B, N, D], token padding mask [B, N] or None). Runs once per sample; the
        gradient into the local encoder times ``grad_mult`` (``local_grad_mult``; 0 = none)."""
        return self.embed.local_features(source, padding_mask, grad_mult)

    def contextualize(
        self,
        feats: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
        clones: int = 1,
        check_ids: bool = True,
    ) -> tuple[torch.Tensor, dict]:
        """Features -> tokens for the shared blocks, and the attention context they need.

        Without ``ids_keep`` every token is kept (the teacher, forward_features). With ``mask``
        [B*clones, N] and ``ids_keep`` [B*clones, k] (clone-major) only the kept tokens of every clone
        come out: [B*clones, extra + k, D]. ``check_ids=False`` skips the kernels' range check of
        ``ids_keep`` (a host sync) when the caller has validated it.

        Returns:
            (x, context): context holds ``positions`` (original positions of the tokens, for ALiBi),
            ``alibi_slopes`` and ``key_padding_mask``, the keyword arguments of ``run_blocks``.
        """
        masked = ids_keep is not None
        x, positions = self.embed(feats, mask, ids_keep, clones, check_ids)
        key_padding_mask = padding_mask
        if padding_mask is not None and masked:
            key_padding_mask = padding_mask.repeat_interleave(clones, dim=0).gather(1, ids_keep.long())
        context = {"positions": positions, "alibi_slopes": self.alibi(), "key_padding_mask": key_padding_mask}

        x = self.context_dropout(self.context_norm(x))
        x, _ = forward_blocks(self.prenet, x, **context, layerdrop=self.prenet_layerdrop)
        return x, context

    def run_blocks(
        self, x: torch.Tensor, context: dict, collect_top: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The shared blocks: (output [R, L, D], FFN outputs of the top ``collect_top`` blocks, bottom up)."""
        collect_from = len(self.blocks) - collect_top if collect_top > 0 else None
        return forward_blocks(self.blocks, x, **context, layerdrop=self.layerdrop, collect_from=collect_from)

