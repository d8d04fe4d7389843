"""The method protocol: what the trainer, probe, export and benches may rely on, written down once.

Every pretraining method (``data2vec2``, ``data2vec`` 1.0 and the baselines) is a ``Method``: an
``nn.Module`` whose ``forward(batch)`` is one training step's loss. The engine never imports a
method's class; it builds methods by name through ``d2v2.models.methods`` and talks to them only
through the members below.
"""

from __future__ import annotations

import torch
from torch import nn

from .modalities import Modality

__all__ = ["Method"]


class Method(nn.Module):
    """Base class of every method; subclasses set ``modality`` and ``encoder`` and implement ``forward``.

    Attributes:
        modality: the ``Modality`` object; the data loader calls ``modality.make_masks(batch_size,
            source, generator)`` and ``modality.num_positions(source)`` in its workers.
        encoder: the student encoder (``encoder(source, padding_mask) -> [B, extra + N, D]``), what
            export saves.
    """

    modality: Modality
    encoder: nn.Module

    def forward(self, batch: dict) -> dict:
        """One training step's loss on ``batch`` (``source``, optional ``padding_mask``, ``mask`` and
        ``ids_keep`` from the loader).

        Returns a dict with ``loss`` (a differentiable fp32 scalar) and the values the trainer logs as
        detached tensors or floats (``target_var``, ``pred_var``, ``ema_decay`` where they apply).
        Reading them is the trainer's job, on logging steps only: a method makes no host sync.
        """
        raise NotImplementedError

    @property
    def skips_parameters(self) -> bool:
        """True when a step may leave trainable parameters without a gradient (LayerDrop), so that
        data-parallel training must look for them."""
        return False

    def after_step(self, step: int) -> None:
        """Called after optimizer update number ``step`` (1 after the first): e.g. the EMA update."""

    def health(self, step: int, metrics: dict) -> str | None:
        """Why training must stop given the logged ``metrics`` at ``step`` (e.g. collapsed
        representations), or None. Called on logging steps."""
        return None

    def no_weight_decay(self) -> set[str]:
        """Names of the trainable parameters excluded from weight decay: by default every 1-D
        parameter (norms, biases, scales) and every ``.bias``."""
        return {name for name, p in self.named_parameters() if p.dim() <= 1 or name.endswith(".bias")}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The optimizer's groups over the trainable parameters: decayed, and not decayed."""
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if name in skip else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def forward_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The student encoder on the unmasked input: [B, extra + N, D] (images: CLS first). For export."""
        return self.encoder(source, padding_mask)

    @torch.no_grad()
    def probe_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen representation a probe measures, per position: [B, N, D], extra tokens left out.

        The EMA teacher's where a method has one (what data2vec evaluates), else the encoder's.
        """
        return self.forward_features(source, padding_mask)[:, self.modality.num_extra_tokens :]
