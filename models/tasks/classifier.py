"""A pretrained encoder with a head, fine-tuned on labelled samples: classification or regression.

``Classifier`` is a ``Method`` (``forward(batch)`` is one step's loss), so the pretraining trainer
drives it unchanged: the same kernels, precision, compile, DDP / FSDP2, checkpoints and resume. It
takes any method's encoder (``method.encoder``: data2vec 2.0, data2vec 1.0, MAE, wav2vec 2.0, MLM) with
the method's modality object, which says where the padding of the encoder's output lies.

Layer-wise learning-rate decay (BEiT; the reference's ``mae_image_classification`` and MAE's
``lr_decay.py``): the head and everything after the last block learn at the full rate, block i of L
(counted bottom up from 1, a prenet's blocks first) at ``decay ** (L + 1 - i)``, and the embedding at
``decay ** (L + 1)``. ``param_groups`` gives each group an ``lr_scale`` the trainer multiplies in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.encoders import AudioFeatureEncoder
from ..method import Method
from ..modalities import Modality

__all__ = ["Classifier", "layer_ids"]


def layer_ids(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """Each encoder parameter's layer for learning-rate decay, and the number of blocks L.

    Read from the order in which the encoder registers its parts (every encoder declares them in
    ``__init__``, input side first): parts before its first block list are layer 0, the blocks of every
    ``nn.ModuleList`` of blocks (data2vec 2.0's ``prenet``, then ``blocks``) layers 1..L in order,
    parts after them (a final LayerNorm) layer L + 1, and parameters held directly by the encoder
    layer 0.
    """
    ids: dict[str, int] = {name: 0 for name, _ in encoder.named_parameters(recurse=False)}
    depth, after_blocks = 0, False
    for child_name, child in encoder.named_children():
        if isinstance(child, nn.ModuleList) and len(child) > 0:
            for index, block in enumerate(child):
                for name, _ in block.named_parameters():
                    ids[f"{child_name}.{index}.{name}"] = depth + index + 1
            depth += len(child)
            after_blocks = True
            continue
        for name, _ in child.named_parameters():
            ids[f"{child_name}.{name}"] = -1 if after_blocks else 0  # -1: after the blocks, resolved below
    return {name: depth + 1 if layer == -1 else layer for name, layer in ids.items()}, depth


class Classifier(Method):
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
        super().__init__()
        self.encoder, self.modality, self.head = encoder, modality, head
        self.regression, self.label_smoothing, self.layer_decay = regression, label_smoothing, layer_decay
        self.layerdrop = layerdrop
        # Parts only masked inputs use (wav2vec 2.0's mask embedding) get no gradient here: frozen, so
        # that data-parallel training does not wait for them.
        for name in getattr(encoder, "masking_only", ()):
            getattr(encoder, name).requires_grad_(False)
        if freeze_feature_encoder:
            for module in encoder.modules():
                if isinstance(module, AudioFeatureEncoder):
                    module.conv_layers.requires_grad_(False)
        # A head with its own LayerNorm on the pooled features replaces a pre-norm ViT's final norm
        # (MAE's fine-tuning ``del self.norm`` under global_pool, BEiT's and timm's ``fc_norm``).
        self.replaced: tuple[str, ...] = ()
        if isinstance(getattr(head, "norm", None), nn.LayerNorm) and isinstance(getattr(encoder, "norm", None), nn.LayerNorm):
            encoder.norm = nn.Identity()
            self.replaced = ("norm.",)

    def load_encoder(self, state: dict[str, torch.Tensor]) -> None:
        """Load a pretrained encoder's weights (its own names), leaving out the parts the head replaced."""
        self.encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith(self.replaced)})

    @property
    def skips_parameters(self) -> bool:
        return self.layerdrop

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

    def no_weight_decay(self) -> set[str]:
        """Norms, biases and scales (``Method``'s rule), and the CLS token and positions (timm's ViT
        ``no_weight_decay``, which MAE's and the reference's fine-tuning keep)."""
        tokens = {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in ("cls_token", "pos_embed")}
        return super().no_weight_decay() | tokens

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups by (layer, decayed or not), each with its ``lr_scale`` (``layer_decay ** (L + 1 - layer)``)."""
        skip = self.no_weight_decay()
        ids, depth = layer_ids(self.encoder)
        groups: dict[tuple[int, bool], dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            layer = ids[name[len("encoder.") :]] if name.startswith("encoder.") else depth + 1
            decayed = name not in skip
            group = groups.setdefault((layer, decayed), {
                "params": [], "weight_decay": weight_decay if decayed else 0.0,
                "lr_scale": self.layer_decay ** (depth + 1 - layer),
            })  # fmt: skip
            group["params"].append(param)
        return [groups[key] for key in sorted(groups)]

    def forward_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(source, padding_mask)
