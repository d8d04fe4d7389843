"""A pretrained encoder with a head, fine-tuned on labelled samples: classification or regression.

``Classifier`` is a ``FinetuneModel`` (``base``: what stays frozen, layer-wise learning-rate decay,
loading the pretrained encoder), so the pretraining trainer drives it unchanged. It takes any method's
encoder (``method.encoder``: data2vec 2.0, data2vec 1.0, MAE, wav2vec 2.0, MLM) with the method's
modality object, which says where the padding of the encoder's output lies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modalities import Modality
from .base import FinetuneModel, layer_ids

__all__ = ["Classifier", "layer_ids"]


class Classifier(FinetuneModel):
    """``encoder`` -> ``head`` -> logits [B, num_outputs], with the loss of its task.

    Batch: ``source`` and optional ``padding_mask`` as for pretraining, and the targets: ``label`` (int
    [B] class indices, or float [B] for regression) or ``target`` (float [B, C] class probabilities, as
    mixup / cutmix make them, label smoothing included).

    Args:
        encoder: a pretrained (or fresh) encoder, ``encoder(source, padding_mask) -> [B, extra + N, D]``.
        modality: the method's modality object (its ``num_extra_tokens`` and ``output_padding``).
        head: a head of ``heads`` (``head(x, padding) -> [B, num_outputs]``).
        regression: a real-valued target (mean squared error, as fairseq's ``sentence_prediction``
            regression), else classes (cross-entropy).
        label_smoothing: for class-index targets.
        layer_decay: learning-rate decay per layer (1 = none).
        layerdrop: whether the encoder skips blocks at random (LayerDrop), so that a step may leave
            parameters without a gradient.
        freeze_feature_encoder: keep an audio encoder's CNN as it is (wav2vec 2.0's and data2vec's
            fine-tuning, ``feature_grad_mult: 0.0``; Hugging Face's ``freeze_feature_encoder()``).
    """

    log_keys = ("accuracy",)

    def __init__(self, encoder: nn.Module, modality: Modality, head: nn.Module, regression: bool = False,
                 label_smoothing: float = 0.0, layer_decay: float = 1.0, layerdrop: bool = False,
                 freeze_feature_encoder: bool = False):  # fmt: skip
        super().__init__(encoder, modality, layer_decay, layerdrop, freeze_feature_encoder)
        self.head = head
        self.regression, self.label_smoothing = regression, label_smoothing
        # A head with its own LayerNorm on the pooled features replaces a pre-norm ViT's final norm
        # (MAE's fine-tuning ``del self.norm`` under global_pool, BEiT's and timm's ``fc_norm``).
        if isinstance(getattr(head, "norm", None), nn.LayerNorm) and isinstance(getattr(encoder, "norm", None), nn.LayerNorm):
            encoder.norm = nn.Identity()
            self.replaced = ("norm.",)

    def logits(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The head's outputs [B, num_outputs] for a batch of sources."""
        x = self.encoder(source, padding_mask)
        extra = self.modality.num_extra_tokens
        padding = self.modality.output_padding(padding_mask, x.shape[1] - extra)
        return self.head(x, padding)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The task's loss (fp32) of ``logits`` for ``batch``'s targets."""
        logits = logits.float()
        if "target" in batch:  # soft targets (mixup / cutmix)
            return torch.sum(-batch["target"] * F.log_softmax(logits, dim=-1), dim=-1).mean()
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), batch["label"].float())
        return F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)

    def forward(self, batch: dict) -> dict:
        """The ``logits`` of a batch and, when it has targets, the step's ``loss`` and (classes) the batch
        ``accuracy`` (against the strongest target class under mixup), a detached tensor the trainer reads
        on logging steps. Prediction goes through here too, so that wrappers' forward hooks (FSDP2) run."""
        logits = self.logits(batch["source"], batch.get("padding_mask"))
        out = {"logits": logits}
        if "label" not in batch and "target" not in batch:
            return out
        out["loss"] = self.loss(logits, batch)
        if not self.regression:
            truth = batch["target"].argmax(-1) if "target" in batch else batch["label"]
            out["accuracy"] = (logits.detach().argmax(-1) == truth).float().mean()
        return out
