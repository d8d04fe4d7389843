"""A RoBERTa-style masked language model, as a baseline on d2v2's blocks, kernels and trainer.

Liu et al., "RoBERTa: A Robustly Optimized BERT Pretraining Approach", 2019 (arXiv:1907.11692);
Devlin et al., BERT, NAACL 2019, for the 80/10/10 corruption. Reference code: fairseq
``models/roberta/model.py`` (``RobertaEncoder``, ``RobertaLMHead``), ``data/mask_tokens_dataset.py``
and ``criterions/masked_lm.py``.

One training step (``MLM.forward``), B sequences of L tokens, M = L - kept selected per sequence:

    selected = batch mask (15 % of the tokens, uniformly, from the loader), minus any padding
    u        = uniform draws on the device, one per token
    tokens   = <mask> where selected and u < 0.8; a random token where selected and 0.8 <= u < 0.9;
               the original token elsewhere (so 10 % of the selected ones are left unchanged)
    x        = token + learned positions -> LayerNorm -> dropout -> post-norm blocks     [B, L, D]
    h        = x at the M selected positions of each row (a gather: the head runs on 15 % only)
    logits   = LayerNorm(GELU(dense(h))) @ embed_tokens.weight^T + bias                 [B, M, V]
    loss     = cross-entropy with the original tokens, averaged over the selected tokens

The encoder is data2vec 2.0's text encoder (``TokenEmbedding`` + ``PostNormBlock``s, the same
parameter names), so the two compare at equal size. The ``<mask>`` id is documented in
``mlm_config``. Differences from fairseq, none of which changes the objective: the selection comes
with the batch (exactly floor-rounded 15 % per sequence instead of a per-sequence random rounding)
and the 80/10/10 draw happens on the device in the step (no host sync); random replacements are
drawn uniformly from the ids other than ``<mask>`` and padding (fairseq draws from the dictionary
without its four special symbols); the loss is in nats per selected token (fairseq logs base 2).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.blocks import PostNormBlock, forward_blocks, init_bert_params
from ..layers.encoders import TokenEmbedding
from ..layers.masking import random_mask
from ..method import Method, batch_masks
from ..modalities import Modality, modality_for
from .config import MLM_PRESETS, MLMConfig, mlm_config

__all__ = [
    "MLM", "MLMConfig", "MLMEncoder", "LMHead", "mlm_config", "MLM_PRESETS", "corrupt_tokens",
    "standard_architecture",
]  # fmt: skip


class MLMEncoder(nn.Module):
    """The text encoder: ``local_encoder`` (``TokenEmbedding``: tokens + learned positions, LayerNorm,
    dropout; ``num_embeddings`` rows) and post-norm ``blocks``, on the whole sequence.

    Args:
        cfg: the model config (``MLMConfig``).
        modality: the text modality object that runs the embedding.
    """

    def __init__(self, cfg: MLMConfig, modality: Modality):
        super().__init__()
        self.modality = modality
        self.layerdrop = cfg.layerdrop
        # Built here rather than by the modality: the table may have the reserved <mask> row.
        self.local_encoder = TokenEmbedding(
            cfg.num_embeddings, cfg.embed_dim, cfg.max_positions, cfg.padding_idx, cfg.norm_eps, cfg.embed_dropout
        )
        self.blocks = nn.ModuleList(
            PostNormBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.encoder_dropout,
                          cfg.attention_dropout, cfg.activation_dropout, cfg.post_mlp_dropout, impl=cfg.impl)
            for _ in range(cfg.depth)
        )  # fmt: skip

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, L] (and padding [B, L], True = padding) -> [B, L, D]."""
        x = self.local_encoder(source, padding_mask)
        return forward_blocks(self.blocks, x, key_padding_mask=padding_mask, layerdrop=self.layerdrop)[0]


class LMHead(nn.Module):
    """RoBERTa's LM head: dense D -> D, GELU, LayerNorm, then the output layer tied to the token
    embedding (passed to ``forward``, so the weight has one owner) plus a bias per token.

    Args:
        dim: model width D.
        num_tokens: output classes (the embedding's rows).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, num_tokens: int, norm_eps: float = 1e-5):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.layer_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.bias = nn.Parameter(torch.zeros(num_tokens))

    def forward(self, x: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        """x [..., D], the token embedding [V, D] -> logits [..., V]."""
        return F.linear(self.layer_norm(self.act(self.dense(x))), embed_weight, self.bias)


def corrupt_tokens(
    tokens: torch.Tensor,
    selected: torch.Tensor,
    mask_id: int,
    num_tokens: int,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
    exclude: tuple[int, ...] = (),
) -> torch.Tensor:
    """BERT's corruption of the selected tokens, drawn on the tokens' device (no host sync).

    Args:
        tokens: ids [B, L].
        selected: bool [B, L], the tokens to corrupt (and later predict).
        mask_id: the ``<mask>`` id.
        num_tokens: ids lie in [0, num_tokens).
        mask_token_prob: fraction of the selected tokens replaced by ``mask_id``.
        random_token_prob: fraction replaced by a uniformly random id in [0, num_tokens) other than
            ``exclude``; the rest are left unchanged.
        exclude: ids never drawn as random replacements (``<mask>``, padding).

    Returns:
        the corrupted ids [B, L] (a new tensor).
    """
    draw = torch.rand(tokens.shape, device=tokens.device)  # one uniform per token picks its fate
    excluded = sorted({int(i) for i in exclude if 0 <= int(i) < num_tokens})
    # A uniform draw over [0, num_tokens - len(excluded)) mapped onto the allowed ids, in order.
    random_ids = torch.randint(0, num_tokens - len(excluded), tokens.shape, device=tokens.device)
    for banned in excluded:
        random_ids += (random_ids >= banned).to(random_ids.dtype)
    to_mask = selected & (draw < mask_token_prob)
    to_random = selected & (draw >= mask_token_prob) & (draw < mask_token_prob + random_token_prob)
    out = torch.where(to_random, random_ids.to(tokens.dtype), tokens)
    return out.masked_fill(to_mask, mask_id)


class MLM(Method):
    """RoBERTa-style masked LM for text: corrupt 15 % of the tokens, predict them with a tied LM head.

    A ``Method`` (see ``method``): no teacher, one selection per sequence (the modality's clones = 1).

    Batch (made by the data loader): ``source`` ids [B, L]; optional ``padding_mask`` bool [B, L];
    ``mask`` bool [B, L], True = selected for prediction, the same count in every row
    (``modality.make_masks``); ``ids_keep`` [B, kept] (only its width is used: M = L - kept).

    Args:
        cfg: the model config (``mlm_config("text", size)`` for a preset).
    """

    def __init__(self, cfg: MLMConfig):
        super().__init__()
        self.cfg = cfg
        self.modality = modality_for(cfg, clones=1, masker=partial(random_mask, mask_ratio=cfg.mask_ratio))
        self.encoder = MLMEncoder(cfg, self.modality)
        self.lm_head = LMHead(cfg.embed_dim, cfg.num_embeddings, cfg.norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """RoBERTa's init (fairseq ``init_bert_params``): Linear and Embedding weights N(0, 0.02), zero
        biases and padding row, LayerNorm 1 / 0; the LM head's bias starts at zero."""
        self.apply(init_bert_params)

    @property
    def skips_parameters(self) -> bool:
        return self.cfg.layerdrop > 0

    def no_weight_decay(self) -> set[str]:
        """None: fairseq's Adam decays every RoBERTa parameter (biases, norms and embeddings included)."""
        return set()

    def forward(self, batch: dict) -> dict:
        """One masked-LM step (see the module docstring). Returns ``loss`` (fp32 scalar, nats per
        selected token) and ``sample_size`` (selected tokens, a tensor); no host sync."""
        cfg = self.cfg
        source = batch["source"]
        padding_mask = batch.get("padding_mask")
        batch_size, length = source.shape
        mask, ids_keep = batch_masks(batch, batch_size, 1, length, source.device)
        selected = mask if padding_mask is None else mask & ~padding_mask
        num_selected = length - ids_keep.shape[1]  # the same in every row: a shape, not a sync
        # The selected positions of each row, ascending (a stable sort puts True first).
        ids_selected = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :num_selected]  # [B, M]

        exclude = (cfg.mask_token_id,) + (() if cfg.padding_idx is None else (cfg.padding_idx,))
        tokens = corrupt_tokens(source, selected, cfg.mask_token_id, cfg.num_embeddings, cfg.mask_token_prob,
                                cfg.random_token_prob, exclude)  # fmt: skip
        x = self.encoder(tokens, padding_mask)  # [B, L, D]
        x = x.gather(1, ids_selected[..., None].expand(-1, -1, x.shape[-1]))  # [B, M, D]
        logits = self.lm_head(x, self.encoder.local_encoder.embed_tokens.weight)  # [B, M, V]
        targets = source.gather(1, ids_selected)
        weights = selected.gather(1, ids_selected).float()  # 0 at padding, which is never predicted
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().long(), reduction="none")
        sample_size = weights.sum()
        loss = (nll * weights.flatten()).sum() / sample_size.clamp_min(1.0)
        return {"loss": loss, "sample_size": sample_size.detach()}


def standard_architecture(cfg: MLMConfig) -> tuple[str | None, str]:
    """The standard class this encoder is, for export: RoBERTa's."""
    return "roberta", "RoBERTa's encoder"
