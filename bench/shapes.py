"""The shapes every kernel bench case runs at, read from the base recipes and the models' own presets.

A ``ShapeSpec`` is one modality's per-GPU step of data2vec 2.0 at the base recipe
(``engine/recipes/<modality>-base.yaml`` resolved as ``d2v2 pretrain`` resolves it, whose model
section is the preset ``d2v2.models.data2vec2_config(modality, "base")``):

    vit-b       image-base: B = data.batch_size images, M = clone_batch, N = the patch grid, K = the
                kept patches of one real mask (``modality.make_masks``), D, heads, top-k targets and
                their norms, the decoder conv (width, kernel, groups, residual); EMA over every tensor
                the image teacher averages (the preset's model built on the ``meta`` device)
    audio-base  audio-base: B = max_tokens // max_samples clips of max_samples, N = the CNN's frames
                of max_samples, ALiBi on the original frame positions
    text-base   text-base: B = data.batch_size blocks of block_size tokens

Nothing here is a copied number: change a preset or a recipe and the bench follows. ``QUICK_SHAPES``
keeps each structure at toy sizes (odd lengths, D not a power of two, groups > 1 where the reference
has them) so that ``--quick`` runs the same code paths in seconds on a CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

__all__ = ["ShapeSpec", "REFERENCE_SHAPES", "QUICK_SHAPES", "spec_from_recipe", "ema_parameter_shapes"]


@dataclass(frozen=True)
class ShapeSpec:
    """One modality's per-GPU sizes of a data2vec 2.0 step."""

    name: str
    modality: str  # "image" | "audio" | "text"
    size: str  # the preset size (the EMA case builds that model's teacher)
    batch: int  # B samples per GPU
    clones: int  # M masked views of each sample
    length: int  # N tokens per sample: patches, frames or BPE tokens
    kept: int  # K unmasked tokens per clone
    dim: int  # D, the model width
    heads: int  # attention heads
    target_layers: int  # top-k teacher layers averaged into the target
    target_per_layer: str | None  # per-layer target norm: "instance" for every base recipe
    target_final: str | None  # final target norm: "layer" for images
    dec_dim: int  # decoder channels
    dec_kernel: int
    dec_groups: int
    dec_residual: bool
    loss_scale: float | None  # None = 1/sqrt(D)
    has_pos: bool  # gather adds a fixed position table (images); audio and text add their positions earlier
    alibi: bool  # the student's attention has ALiBi on the original positions (data2vec 2.0 audio)
    pos_conv: bool  # a conv positional encoder runs over every clone's frames (audio)
    extra_tokens: int  # tokens the student prepends to the kept ones (the CLS token of images)
    grid: tuple[int, int] | None = None  # (H, W) patch grid for images; None for sequences

    @property
    def rows(self) -> int:
        return self.batch * self.clones


def spec_from_recipe(name: str, recipe: str) -> ShapeSpec:
    """The ShapeSpec of a data2vec 2.0 recipe (``<modality>-<size>``): data sizes from its data
    section, model sizes from the preset it names, K from one mask its modality makes."""
    from d2v2.engine.data.kinds import data_kind
    from d2v2.engine.run import resolve_config
    from d2v2.models import modality_for

    run = resolve_config(recipe)
    data, modality, kind = run.data, run.model.modality, data_kind(run.model.modality)
    cfg = run.model.build_config(**kind.model_fields(data))
    source, batch = kind.source(data, 1, device="meta"), kind.batch_size(data)
    seam = modality_for(cfg)
    masks = seam.make_masks(1, source, torch.Generator().manual_seed(0))  # [M, N], equal counts
    with torch.device("meta"):  # what the embedding holds, without building weights
        embed = seam.build_embed(cfg)
    return ShapeSpec(
        name, modality, run.model.size, batch=batch, clones=masks.shape[0], length=masks.shape[1],
        kept=int((~masks[0]).sum()), dim=cfg.embed_dim, heads=cfg.num_heads,
        target_layers=cfg.average_top_k_layers, target_per_layer=cfg.target_layer_norm,
        target_final=cfg.target_final_norm, dec_dim=cfg.decoder_dim, dec_kernel=cfg.decoder_kernel,
        dec_groups=cfg.decoder_groups, dec_residual=cfg.decoder_residual, loss_scale=cfg.loss_scale,
        has_pos=getattr(embed, "pos_embed", None) is not None, alibi=embed.alibi() is not None,
        pos_conv=getattr(embed, "pos_conv", None) is not None, extra_tokens=seam.num_extra_tokens,
        grid=getattr(seam, "grid", None),
    )  # fmt: skip


@functools.cache
def ema_parameter_shapes(modality: str, size: str) -> tuple[torch.Size, ...]:
    """Every tensor the data2vec 2.0 teacher of (modality, size) averages in one EMA update (the
    parameters ``models.layers.teacher.ema_update`` passes to ``ema_``: those whose student twin trains),
    from the preset's model built on the ``meta`` device (no memory, no init cost)."""
    from d2v2.models import build_method, data2vec2_config

    with torch.device("meta"):
        model = build_method("data2vec2", data2vec2_config(modality, size))
    trains = {name for name, p in model.encoder.named_parameters() if p.requires_grad}
    return tuple(p.shape for name, p in model.teacher.named_parameters() if name in trains)


REFERENCE_SHAPES = {
    spec.name: spec
    for spec in (
        spec_from_recipe("vit-b", "image-base"),
        spec_from_recipe("audio-base", "audio-base"),
        spec_from_recipe("text-base", "text-base"),
    )
}
# The same structure at toy sizes; the EMA case of the toy image spec averages the image-tiny teacher.
_TOY = dict(size="tiny", batch=2, clones=2, dim=48, heads=1, target_layers=2)
QUICK_SHAPES = {
    s.name: s
    for s in (
        replace(REFERENCE_SHAPES["vit-b"], **_TOY, length=16, grid=(4, 4), kept=5, dec_dim=48, dec_groups=4),
        replace(REFERENCE_SHAPES["audio-base"], **_TOY, length=25, kept=12, dec_dim=24, dec_groups=4),
        replace(REFERENCE_SHAPES["text-base"], **_TOY, length=24, kept=13, dec_dim=48),
    )
}
