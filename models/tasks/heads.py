"""Task heads: what turns an encoder's output [B, extra + N, D] into one prediction per sample.

- ``PooledHead``: the mean over the positions (extra tokens and padding left out), an optional
  LayerNorm, dropout and a linear layer. For images it is the reference's ``mae_image_classification``
  head (mean of the patches, ``fc_norm``, linear; MAE's ``global_pool``); for audio the utterance-level
  classifier (mean over the frames that are not padding, linear).
- ``SentenceHead``: RoBERTa's classification head on the first token (``<s>``): dropout, dense D -> D,
  tanh, dropout, linear (fairseq ``RobertaClassificationHead``; Hugging Face's
  ``RobertaClassificationHead`` has the same layers and names).

``build_head`` also rebuilds speech recognition's per-frame ``CTCHead`` (``ctc``) from its spec.
"""

from __future__ import annotations

import torch
from torch import nn

from .ctc import CTCHead

__all__ = ["HEADS", "PooledHead", "SentenceHead", "build_head", "masked_mean"]


def masked_mean(x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``x`` [B, N, D], leaving out the positions where ``padding`` [B, N] is True."""
    if padding is None:
        return x.mean(dim=1)
    keep = (~padding).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class PooledHead(nn.Module):
    """Mean-pooled positions -> [LayerNorm] -> dropout -> Linear(D, num_outputs).

    Args:
        dim: the encoder's width D.
        num_outputs: classes (1 for a regression target).
        skip_tokens: extra tokens at the start of the sequence that the mean leaves out (the image CLS).
        norm: LayerNorm the pooled features first (``fc_norm`` of the image head).
        norm_eps: its epsilon.
        dropout: before the linear layer.
        init_std: the linear weight's truncated-normal std (MAE fine-tuning: 2e-5, so that the first
            updates go to the head as much as to the encoder); the bias starts at 0.
    """

    def __init__(self, dim: int, num_outputs: int, skip_tokens: int = 0, norm: bool = True, norm_eps: float = 1e-6,
                 dropout: float = 0.0, init_std: float = 2e-5):  # fmt: skip
        super().__init__()
        self.spec = {"kind": "pooled", "dim": dim, "num_outputs": num_outputs, "skip_tokens": skip_tokens, "norm": norm,
                     "norm_eps": norm_eps, "dropout": dropout}  # fmt: skip  (build_head's input; exports keep it)
        self.skip_tokens = skip_tokens
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, num_outputs)
        nn.init.trunc_normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, extra + N, D], ``padding`` [B, N] or None -> [B, num_outputs]."""
        pooled = masked_mean(x[:, self.skip_tokens :], padding)
        return self.linear(self.dropout(self.norm(pooled)))


class SentenceHead(nn.Module):
    """RoBERTa's sentence classification head on the first token: dropout, dense, tanh, dropout, out_proj.

    Args:
        dim: the encoder's width D (also the dense layer's, as RoBERTa's ``inner_dim``).
        num_outputs: classes (1 for a regression target such as STS-B).
        dropout: ``pooler_dropout``.
    """

    def __init__(self, dim: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.spec = {"kind": "sentence", "dim": dim, "num_outputs": num_outputs, "dropout": dropout}  # build_head's input
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, num_outputs)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, L, D] (the first token at position 0) -> [B, num_outputs]; padding is irrelevant to it."""
        x = torch.tanh(self.dense(self.dropout(x[:, 0])))
        return self.out_proj(self.dropout(x))


HEADS = {"pooled": PooledHead, "sentence": SentenceHead, "ctc": CTCHead}


def build_head(spec: dict) -> nn.Module:
    """The head a ``spec`` (a head's ``.spec``) describes, freshly initialised; a ValueError for an unknown kind."""
    values = dict(spec)
    kind = values.pop("kind", None)
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(HEADS)}")
    return HEADS[kind](**values)
