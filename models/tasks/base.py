"""What every fine-tuning model shares: a pretrained encoder trained under a task's head as a ``Method``.

``FinetuneModel`` is the encoder side of ``Classifier`` and ``SpeechRecognizer``: which encoder parts
stay as pretrained (the audio CNN; parts only pretraining's masked inputs use), layer-wise
learning-rate decay in ``param_groups``, loading the pretrained encoder, and LayerDrop's unused
parameters. The pretraining trainer drives it unchanged (the same kernels, precision, compile, DDP /
FSDP2, checkpoints and resume).

Layer-wise learning-rate decay (BEiT; the reference's ``mae_image_classification`` and MAE's
``lr_decay.py``): the head and everything after the last block learn at the full rate, block i of L
(counted bottom up from 1, a prenet's blocks first) at ``decay ** (L + 1 - i)``, and the embedding at
``decay ** (L + 1)``. ``param_groups`` gives each group an ``lr_scale`` the trainer multiplies in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.encoders import AudioFeatureEncoder
from ..method import Method
from ..modalities import Modality

__all__ = ["FinetuneModel", "layer_ids"]


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


class FinetuneModel(Method):
    """A pretrained (or fresh) ``encoder`` trained with a task's head; subclasses add the head and loss.

    Args:
        encoder: ``encoder(source, padding_mask) -> [B, extra + N, D]`` of any method.
        modality: the method's modality object (its ``num_extra_tokens`` and ``output_padding``).
        layer_decay: learning-rate decay per layer (1 = none).
        layerdrop: whether the encoder skips blocks at random (LayerDrop), so that a step may leave
            parameters without a gradient.
        freeze_feature_encoder: keep an audio encoder's CNN as it is (wav2vec 2.0's and data2vec's
            fine-tuning, ``feature_grad_mult: 0.0``; Hugging Face's ``freeze_feature_encoder()``).
    """

    replaced: tuple[str, ...] = ()
    """Encoder parameter prefixes the head replaced, left out when the pretrained encoder is loaded."""

    def __init__(self, encoder: nn.Module, modality: Modality, layer_decay: float = 1.0, layerdrop: bool = False,
                 freeze_feature_encoder: bool = False):  # fmt: skip
        super().__init__()
        self.encoder, self.modality, self.layer_decay, self.layerdrop = encoder, modality, layer_decay, layerdrop
        # Parts only pretraining's masked inputs use (wav2vec 2.0's mask embedding) get no gradient here:
        # frozen, so that data-parallel training does not wait for them (fine-tuning's own masks have a
        # ``MaskFill`` of their own).
        for name in getattr(encoder, "masking_only", ()):
            getattr(encoder, name).requires_grad_(False)
        if freeze_feature_encoder:
            for module in encoder.modules():
                if isinstance(module, AudioFeatureEncoder):
                    module.conv_layers.requires_grad_(False)

    def load_encoder(self, state: dict[str, torch.Tensor], method: Method | None = None) -> None:
        """Load a pretrained encoder's weights (its own names), leaving out the parts the head replaced;
        ``method`` is the pretrained method, for what a task takes from it beyond the encoder."""
        self.encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith(self.replaced)})

    @property
    def skips_parameters(self) -> bool:
        return self.layerdrop

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
