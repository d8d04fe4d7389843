"""The method protocol: what the trainer, probe, export and benches may rely on, written down once.

Every pretraining method (``data2vec2``, ``data2vec`` 1.0 and the baselines) is a ``Method``: an
``nn.Module`` whose ``forward(batch)`` is one training step's loss. The engine never imports a
method's class; it builds methods by name through ``d2v2.models.methods`` and talks to them only
through the members below.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .layers.embeddings import migrate_embed_keys
from .layers.mask_fill import MaskFill
from .layers.masking import mask_to_ids
from .modalities import Modality

__all__ = ["Method", "batch_masks", "check_mask"]


class Method(nn.Module):
    """Base class of every method; subclasses set ``modality`` and ``encoder`` and implement ``forward``.

    Attributes:
        modality: the ``Modality`` object; the data loader calls ``modality.make_masks(batch_size,
            source, generator)`` and ``modality.num_positions(source)`` in its workers.
        encoder: the student encoder (``encoder(source, padding_mask) -> [B, extra + N, D]``), what
            export saves. Audio encoders split it for fine-tuning's masks:
            ``encode_features(*maskable_features(source, padding_mask))``.
    """

    modality: Modality
    encoder: nn.Module
    log_keys: tuple[str, ...] = ()
    """Further ``forward`` outputs the trainer writes to metrics.jsonl on logging steps (rank 0's values)."""
    embedded_encoders: ClassVar[tuple[str, ...]] = ()
    """State-dict prefixes of the encoders that hold a modality ``embed`` module (``"encoder."``,
    ``"teacher."``): where ``upgrade_state_dict`` moves the embedding parts of older checkpoints."""

    @classmethod
    def upgrade_state_dict(cls, state: dict) -> dict:
        """A ``method`` state dict written by an earlier d2v2, in today's names (the one key migration:
        embedding parts moved under ``embed``, see ``embeddings.migrate_embed_keys``)."""
        return migrate_embed_keys(state, cls.embedded_encoders) if cls.embedded_encoders else state

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

    def mask_fill(self) -> MaskFill | None:
        """How fine-tuning with time masks (speech recognition) fills the masked frames of
        ``encoder.maskable_features``: the method's own mask vector or noise, with the fewest spans its
        masking asks for (``layers.mask_fill``); None: the method has no such masking."""
        return None

    @torch.no_grad()
    def probe_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen representation a probe measures, per position: [B, N, D], extra tokens left out.

        The EMA teacher's where a method has one (what data2vec evaluates), else the encoder's.
        """
        return self.forward_features(source, padding_mask)[:, self.modality.num_extra_tokens :]


def batch_masks(
    batch: dict, batch_size: int, clones: int, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's ``mask`` bool [B*clones, N] and ``ids_keep`` int [B*clones, k] on ``device``, validated.

    ``ids_keep`` is derived from ``mask`` when absent (one host sync: make it in the loader with
    ``masking.mask_to_ids``). Its range is checked once here (on the CPU, or on the device without a
    host sync), so the kernels may be told to skip their own checks (``check_ids=False``).
    """
    rows = batch_size * clones
    mask = check_mask(batch, batch_size, clones, length)
    ids_keep = batch.get("ids_keep")
    if ids_keep is None:
        ids_keep = mask_to_ids(mask)  # in range by construction
    elif (
        not isinstance(ids_keep, torch.Tensor)
        or ids_keep.dtype not in (torch.int32, torch.int64)
        or ids_keep.dim() != 2
        or ids_keep.shape[0] != rows
    ):
        got = f"{ids_keep.dtype} {list(ids_keep.shape)}" if isinstance(ids_keep, torch.Tensor) else repr(ids_keep)
        raise ValueError(f"batch['ids_keep'] must be int [B*K = {rows}, kept], got {got}")
    else:
        _check_ids_range(ids_keep, length)
    return mask.to(device), ids_keep.to(device)


def check_mask(batch: dict, batch_size: int, clones: int, length: int) -> torch.Tensor:
    """``batch["mask"]``, checked to be bool [B*clones, N] (clone-major; clones 1: one mask per
    sample), as it came; a ValueError naming the expected shape otherwise."""
    mask = batch.get("mask")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch_size * clones, length):
        got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else repr(mask)
        shape, dims, layout = (
            ("[B, N]", f"[{batch_size}, {length}]", "one mask per sample") if clones == 1
            else ("[B*K, N]", f"[{batch_size}*{clones}, {length}]", "clone-major")
        )  # fmt: skip
        raise ValueError(
            f"batch['mask'] must be bool {shape} = {dims} (True = masked, {layout}), got {got}; "
            "make it with the method's modality.make_masks"
        )
    return mask


def _check_ids_range(ids_keep: torch.Tensor, length: int) -> None:
    """ids_keep must lie in [0, length): checked on the CPU as it comes from the loader, or on the
    device as an asynchronous assertion (no host sync; a bad id fails the next synchronising call)."""
    if ids_keep.numel() == 0:
        return
    if ids_keep.device.type == "cpu":
        lo, hi = int(ids_keep.min()), int(ids_keep.max())
        if lo < 0 or hi >= length:
            raise ValueError(f"batch['ids_keep'] values must lie in [0, {length}), got range [{lo}, {hi}]")
    else:
        torch._assert_async(((ids_keep >= 0) & (ids_keep < length)).all(), "batch['ids_keep'] out of range")
