"""MAE's config: every field with its meaning, the checks, and the released presets (``facebookresearch/mae``).

``mae_config(modality, size, **overrides)`` gives a preset's model config; the encoder's width, heads
and depth come from ``sizes.ENCODER_SIZES`` (``total_depth`` plain pre-norm blocks, so that MAE and
data2vec 2.0 compare at equal size), everything else from ``MAE_PRESETS``. MAE is images only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigChecker, EncoderConfig, ImageFields, build_preset

__all__ = ["MAEConfig", "MAE_PRESETS", "mae_config"]


@dataclass(kw_only=True, slots=True)
class MAEConfig(ImageFields, EncoderConfig):
    """Everything that defines an MAE model and its loss (He et al., "Masked Autoencoders Are Scalable
    Vision Learners", CVPR 2022; ``facebookresearch/mae: models_mae.py``).

    Build one with ``mae_config("image", size, **overrides)``; the encoder is ViT's (pre-norm blocks,
    ``depth`` = the size table's total_depth), the shared fields are documented where ``config``
    declares them, and the defaults below are ViT-B/16's.
    """

    modalities = ("image",)  # MAE reconstructs pixels
    norm_eps: float = 1e-6
    """LayerNorm epsilon everywhere (MAE's ``partial(nn.LayerNorm, eps=1e-6)``)."""

    drop_path_rate: float = 0.0
    """Stochastic depth of the encoder's blocks, rising linearly from 0 to this rate over depth (0 in
    MAE's pretraining; 0.1 in its ViT-B fine-tuning, ``main_finetune.py --drop_path``)."""

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

    @property
    def patch_values(self) -> int:
        """Pixel values per patch, the decoder's output width: p * p * C (768 for ViT-B/16)."""
        return self.patch_size * self.patch_size * self.in_chans

    def _check_fields(self, check: ConfigChecker) -> None:
        """Raise ValueError naming the field and the fix for every bad value or combination."""
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            check.int(name, 1)
        check.fraction("drop_path_rate")
        check.open_fraction("mask_ratio", "mask some but not all patches (MAE: 0.75)")
        if not isinstance(self.norm_pix_loss, bool):
            check.fail("norm_pix_loss", f"must be true or false, got {self.norm_pix_loss!r}", "use true (MAE's setting)")
        if self.decoder_dim % self.decoder_heads != 0:
            check.fail("decoder_dim", f"({self.decoder_dim}) must be divisible by decoder_heads "
                       f"({self.decoder_heads})", "change either")  # fmt: skip
        if self.decoder_dim % 4 != 0:
            check.fail("decoder_dim", f"must be a multiple of 4 for the 2-D sin-cos positions, got {self.decoder_dim}",
                       "use a multiple of 4")  # fmt: skip
        num_patches = self.grid[0] * self.grid[1]
        if self.image_size % self.patch_size == 0 and math.floor(num_patches * (1 - self.mask_ratio)) < 1:
            check.fail("mask_ratio", f"({self.mask_ratio}) keeps no patch of {num_patches}", "lower it")


# ---------------------------------------------------------------------------------------------------
# Presets: the MAE paper's ViT-B (``PRETRAIN.md``), and a tiny one at data2vec 2.0's tiny image size
# ---------------------------------------------------------------------------------------------------

MAE_PRESETS: dict[tuple[str, str], dict] = {
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
    return build_preset(MAEConfig, MAE_PRESETS, "MAE", modality, size, overrides)
