"""MAE's config: every field with its meaning, the checks, and the released presets (ref 4.1).

``mae_config(modality, size, **overrides)`` gives a preset's model config; the encoder's width, heads
and depth come from ``sizes.ENCODER_SIZES`` (``total_depth`` plain pre-norm blocks, so that MAE and
data2vec 2.0 compare at equal size), everything else from ``MAE_RECIPES``. MAE is images only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .modalities import MODALITIES
from .sizes import plain_preset

__all__ = ["MAEConfig", "MAE_RECIPES", "mae_config"]


@dataclass(kw_only=True, slots=True)
class MAEConfig:
    """Everything that defines an MAE model and its loss (He et al., "Masked Autoencoders Are Scalable
    Vision Learners", CVPR 2022; ``facebookresearch/mae: models_mae.py``).

    Build one with ``mae_config("image", size, **overrides)``; the defaults are ViT-B/16's.
    """

    modality: Literal["image"] = "image"
    """Input modality; MAE reconstructs pixels, so only "image" (source [B, 3, H, W])."""

    # -- encoder (ViT, pre-norm) --------------------------------------------------------------------
    embed_dim: int = 768
    """Encoder width D."""
    num_heads: int = 12
    """Encoder attention heads; embed_dim must be divisible by it."""
    depth: int = 12
    """Encoder pre-norm blocks (the size table's total_depth: prenet + shared blocks of data2vec 2.0)."""
    mlp_ratio: float = 4.0
    """FFN hidden width as a multiple of the width, in the encoder and the decoder."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon everywhere (MAE's ``partial(nn.LayerNorm, eps=1e-6)``)."""

    # -- images -------------------------------------------------------------------------------------
    image_size: int = 224
    """Input image side in pixels (square); a multiple of patch_size. The data decides it (crop size)."""
    patch_size: int = 16
    """Patch side p; the decoder predicts p * p * in_chans pixel values per patch."""
    in_chans: int = 3
    """Image channels."""

    # -- masking (the data loader makes the masks) ---------------------------------------------------
    mask_ratio: float = 0.75
    """Fraction of patches masked, uniformly at random per image: 147 of 196 at 224 px, 49 kept."""

    # -- decoder ------------------------------------------------------------------------------------
    decoder_dim: int = 512
    """Decoder width (MAE: 512); a multiple of 4 for its 2-D sin-cos positions."""
    decoder_depth: int = 8
    """Decoder pre-norm blocks (MAE: 8)."""
    decoder_heads: int = 16
    """Decoder attention heads (MAE: 16); decoder_dim must be divisible by it."""

    # -- loss ---------------------------------------------------------------------------------------
    norm_pix_loss: bool = True
    """Regress per-patch normalised pixels: (x - mean) / sqrt(var + 1e-6) over each patch's
    p * p * C values, unbiased var (MAE's released setting); False regresses raw pixels."""

    # -- kernels ------------------------------------------------------------------------------------
    impl: Literal["auto", "triton", "torch"] = "auto"
    """Kernel implementation for every d2v2.kernels op: "auto" (Triton on CUDA), "triton" or "torch"."""

    def __post_init__(self) -> None:
        _check_config(self)

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (H, W)."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def patch_values(self) -> int:
        """Pixel values per patch, the decoder's output width: p * p * C (768 for ViT-B/16)."""
        return self.patch_size * self.patch_size * self.in_chans


def _check_config(cfg: MAEConfig) -> None:
    """Raise ValueError naming the field and the fix for every bad value or combination."""

    def fail(field: str, problem: str, fix: str) -> None:
        raise ValueError(f"MAEConfig.{field} {problem}; {fix}")

    if cfg.modality != "image":
        fail("modality", f"must be 'image' (MAE reconstructs pixels), got {cfg.modality!r}",
             "use data2vec2, mlm or wav2vec2 for other modalities")  # fmt: skip
    if cfg.impl not in ("auto", "triton", "torch"):
        fail("impl", f"must be one of ('auto', 'triton', 'torch'), got {cfg.impl!r}", "pick one of those")
    for name in ("embed_dim", "num_heads", "depth", "image_size", "patch_size", "in_chans", "decoder_dim",
                 "decoder_depth", "decoder_heads"):  # fmt: skip
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(name, f"must be an int >= 1, got {value!r}", "set it to an int >= 1")
    for name in ("mlp_ratio", "norm_eps"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            fail(name, f"must be a finite number > 0, got {value!r}", "use e.g. 4.0 / 1e-6")
    if isinstance(cfg.mask_ratio, bool) or not isinstance(cfg.mask_ratio, (int, float)) or not 0 < cfg.mask_ratio < 1:
        fail("mask_ratio", f"must lie in (0, 1), got {cfg.mask_ratio!r}", "mask some but not all patches (MAE: 0.75)")
    if not isinstance(cfg.norm_pix_loss, bool):
        fail("norm_pix_loss", f"must be true or false, got {cfg.norm_pix_loss!r}", "use true (MAE's setting)")
    if cfg.embed_dim % cfg.num_heads != 0:
        fail("embed_dim", f"({cfg.embed_dim}) must be divisible by num_heads ({cfg.num_heads})", "change either")
    if cfg.decoder_dim % cfg.decoder_heads != 0:
        fail("decoder_dim", f"({cfg.decoder_dim}) must be divisible by decoder_heads ({cfg.decoder_heads})",
             "change either")  # fmt: skip
    if cfg.decoder_dim % 4 != 0:
        fail("decoder_dim", f"must be a multiple of 4 for the 2-D sin-cos positions, got {cfg.decoder_dim}",
             "use a multiple of 4")  # fmt: skip
    MODALITIES[cfg.modality].check_config(cfg, fail)
    num_patches = cfg.grid[0] * cfg.grid[1]
    if math.floor(num_patches * (1 - cfg.mask_ratio)) < 1:
        fail("mask_ratio", f"({cfg.mask_ratio}) keeps no patch of {num_patches}", "lower it")


# ---------------------------------------------------------------------------------------------------
# Presets: the MAE paper's ViT-B (ref 4.1), and a tiny one at data2vec 2.0's tiny image size
# ---------------------------------------------------------------------------------------------------

MAE_RECIPES: dict[tuple[str, str], dict] = {
    # The released ViT-B/16: 224 px, mask 0.75, decoder 8 x 512 wide, 16 heads, norm-pix loss.
    ("image", "base"): dict(image_size=224, patch_size=16, mask_ratio=0.75, decoder_dim=512, decoder_depth=8,
                            decoder_heads=16),
    # data2vec 2.0's image tiny (64 wide, 3 blocks, 4 heads, patch 4 on 32 px) with the decoder scaled
    # down the way the encoder is: as wide as the encoder (64), 2 blocks, 4 heads (head dim 16).
    ("image", "tiny"): dict(image_size=32, patch_size=4, mask_ratio=0.75, decoder_dim=64, decoder_depth=2,
                            decoder_heads=4),
}  # fmt: skip


def mae_config(modality: str, size: str, **overrides) -> MAEConfig:
    """The MAE preset ``(modality, size)``'s model config, with ``overrides`` applied (any field).

    The encoder's width, heads and depth (``total_depth``) come from ``sizes.ENCODER_SIZES``.
    """
    return plain_preset(MAEConfig, MAE_RECIPES, "MAE", modality, size, **overrides)
