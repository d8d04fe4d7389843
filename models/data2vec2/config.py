"""data2vec 2.0's config: every field with its meaning, the checks, and the released presets (fairseq ``examples/data2vec/config/v2/*``).

``data2vec2_config(modality, size, **overrides)`` gives a released preset's model config; sizes
come from ``sizes.ENCODER_SIZES`` and everything else from ``DATA2VEC2_PRESETS``. Each field
documents the reference's value per modality; the modality objects (``modalities``) check the
fields only they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import (
    AudioFields,
    ConfigChecker,
    Dropouts,
    EncoderConfig,
    ImageFields,
    TeacherTargets,
    TextFields,
    build_preset,
)

__all__ = ["Data2Vec2Config", "DATA2VEC2_PRESETS", "data2vec2_config"]


@dataclass(kw_only=True, slots=True)
class Data2Vec2Config(TeacherTargets, TextFields, AudioFields, ImageFields, Dropouts, EncoderConfig):
    """Everything that defines a data2vec 2.0 model and its training objective.

    Build one with ``data2vec2_config(modality, size, **overrides)`` to get a released preset's values
    (paper Table 7 and fairseq ``examples/data2vec/config/v2/*``); the shared fields are documented
    where ``config`` declares them, the defaults are generic (base width) and the modality-specific
    ones are the reference's model defaults.
    """

    finetune_names: ClassVar[dict[str, tuple[str, ...]]] = {
        "dropout": ("encoder_dropout", "prenet_dropout", "post_mlp_dropout"), "layerdrop": ("layerdrop", "prenet_layerdrop"),
        "dropout_input": (),
    }  # fmt: skip
    """fairseq's fine-tuning sets ``encoder_dropout``, ``prenet_dropout`` and ``post_mlp_drop`` from its
    ``dropout``, ``layerdrop`` and ``prenet_layerdrop`` from its ``layerdrop`` (``wav2vec2_asr.py``)."""

    # -- encoder: data2vec 2.0's prenet split and dropouts --------------------------------------------
    prenet_depth: int = 0
    """Modality-specific blocks before the shared ``depth`` ones (images base 2, audio large 8); not targets."""
    post_mlp_dropout: float = 0.0
    """Dropout on the FFN output before the residual add (0.1 audio, text)."""
    drop_path_rate: float = 0.0
    """Stochastic depth, spaced linearly from 0 over prenet + shared blocks (0 in every preset)."""
    prenet_layerdrop: float = 0.0
    """LayerDrop of the prenet blocks (audio base 0.05)."""
    prenet_dropout: float = 0.0
    """Dropout after the prenet LayerNorm, before the prenet blocks (audio 0.1)."""

    # -- masking (the data loader makes the masks; see make_masks) --------------------------------------
    clone_batch: int = 16
    """K, the number of masked copies of each sample (16 images, 8 or 12 audio, 8 text)."""
    mask_ratio: float = 0.8
    """Fraction of tokens masked (images 0.8 / 0.75, audio 0.5 / 0.55, text 0.48 / 0.5)."""
    mask_length: int = 3
    """Block side for images (3), span length for audio (5); unused for text."""
    mask_prob_adjust: float = 0.07
    """Extra fraction when choosing the number of blocks/spans (images 0.07 / 0.1, audio 0.05 / 0.1)."""

    # -- decoder --------------------------------------------------------------------------------------
    decoder_dim: int = 768
    """Decoder conv width C."""
    decoder_kernel: int = 3
    """Decoder conv kernel, odd (images 3 / 5, audio 7, text 9)."""
    decoder_layers: int = 6
    """Decoder conv blocks."""
    decoder_groups: int = 16
    """Decoder conv groups; must divide embed_dim and decoder_dim (text: 1)."""
    decoder_residual: bool = True
    """Add each block's input when the widths match (text: False)."""
    projection_layers: int = 1
    """Linear layers of the 1-D decoder's head (text 2); the 2-D head is always one Linear."""
    projection_ratio: float = 2.0
    """Widening of the head's first Linear when projection_layers > 1."""
    decoder_input_dropout: float = 0.0
    """Dropout on the student outputs before the decoder (0.1 audio, text)."""
    mask_noise_std: float = 0.01
    """Std of the fresh Gaussian noise the decoder sees at masked positions."""
    local_grad_mult: float = 1.0
    """Gradient into the local encoder (the audio CNN before its projection, the image patch embedding,
    the text token embedding) times this: 1 in every released config; 0 trains it not at all (it keeps its
    initial weights). Pretraining only: fine-tuning freezes the CNN by ``head.freeze_feature_encoder``."""

    # -- loss -----------------------------------------------------------------------------------------
    cls_loss: float = 0.0
    """Weight of the CLS loss (images 0.01; must be 0 for audio and text, which have no CLS token)."""

    def _check_fields(self, check: ConfigChecker) -> None:
        """Raise ValueError naming the field and the fix for every bad value or combination."""
        check.int("prenet_depth", 0)
        for name in ("clone_batch", "mask_length", "decoder_dim", "decoder_kernel", "decoder_layers",
                     "decoder_groups", "projection_layers"):  # fmt: skip
            check.int(name, 1)
        for name in ("post_mlp_dropout", "drop_path_rate", "prenet_layerdrop", "prenet_dropout",
                     "decoder_input_dropout"):  # fmt: skip
            check.fraction(name)
        for name in ("projection_ratio", "mask_noise_std", "mask_prob_adjust", "cls_loss", "local_grad_mult"):
            check.nonnegative(name)
        check.open_fraction("mask_ratio", "mask some but not all tokens")
        for name, channels in (("embed_dim", self.embed_dim), ("decoder_dim", self.decoder_dim)):
            if channels % self.decoder_groups != 0:
                check.fail("decoder_groups", f"({self.decoder_groups}) must divide {name} ({channels})",
                           "change decoder_groups")  # fmt: skip
        if self.decoder_kernel % 2 == 0:
            check.fail("decoder_kernel", f"must be odd (\"same\" padding), got {self.decoder_kernel}",
                       "use e.g. 3, 5, 7 or 9")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Presets: the released configurations (paper Table 7), plus tiny/small ones for CPU runs
# ---------------------------------------------------------------------------------------------------

_IMAGE = dict(
    norm_eps=1e-6, clone_batch=16, mask_length=3, decoder_groups=16, decoder_residual=True,
    decoder_input_dropout=0.0, target_layer_norm="instance", target_final_norm="layer", loss_scale=None,
    cls_loss=0.01, ema_decay=0.9998, min_target_var=0.0, min_pred_var=0.0,
)  # fmt: skip
_AUDIO = dict(
    norm_eps=1e-5, encoder_dropout=0.1, attention_dropout=0.1, post_mlp_dropout=0.1, prenet_dropout=0.1,
    mask_length=5, decoder_kernel=7, decoder_layers=4, decoder_groups=16, decoder_residual=True,
    projection_layers=1, decoder_input_dropout=0.1, target_layer_norm="instance", target_final_norm=None,
    loss_scale=None,
)  # fmt: skip
_TEXT = dict(
    norm_eps=1e-5, encoder_dropout=0.1, attention_dropout=0.1, post_mlp_dropout=0.1, clone_batch=8,
    decoder_dim=768, decoder_kernel=9, decoder_layers=5, decoder_groups=1, decoder_residual=False,
    projection_layers=2, projection_ratio=2.0, decoder_input_dropout=0.1, loss_scale=1.0,
    ema_decay=0.9999, ema_end_decay=0.99999, ema_anneal_end_step=100_000,
)  # fmt: skip
# The tiny presets anneal the EMA over CPU-run lengths; everything else is the base preset scaled down.
_TINY_EMA = dict(ema_decay=0.999, ema_end_decay=0.9999, ema_anneal_end_step=1000)

DATA2VEC2_PRESETS: dict[tuple[str, str], dict] = {
    # images: base_images_only_task, large_images_only_task, huge_images14_only_task
    ("image", "tiny"): dict(_IMAGE, image_size=32, patch_size=4, clone_batch=4, mask_ratio=0.8,
                            mask_prob_adjust=0.07, average_top_k_layers=2, decoder_dim=64, decoder_kernel=3,
                            decoder_layers=2, decoder_groups=4, **_TINY_EMA),
    ("image", "small"): dict(_IMAGE, mask_ratio=0.8, mask_prob_adjust=0.07, average_top_k_layers=10,
                             decoder_dim=384, decoder_kernel=3, decoder_layers=6, ema_end_decay=0.99999,
                             ema_anneal_end_step=100_000),
    ("image", "base"): dict(_IMAGE, mask_ratio=0.8, mask_prob_adjust=0.07, average_top_k_layers=10,
                            decoder_dim=768, decoder_kernel=3, decoder_layers=6, ema_end_decay=0.99999,
                            ema_anneal_end_step=100_000),
    ("image", "large"): dict(_IMAGE, mask_ratio=0.75, mask_prob_adjust=0.1, average_top_k_layers=18,
                             decoder_dim=1024, decoder_kernel=5, decoder_layers=3, ema_end_decay=0.99999,
                             ema_anneal_end_step=150_000),
    ("image", "huge"): dict(_IMAGE, patch_size=14, mask_ratio=0.75, mask_prob_adjust=0.1, average_top_k_layers=24,
                            decoder_dim=1024, decoder_kernel=5, decoder_layers=3, ema_end_decay=1.0,
                            ema_anneal_end_step=300_000),
    # audio: base_audio_only_task, large_audio_only_task
    ("audio", "tiny"): dict(_AUDIO, conv_feature_layers=((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2,
                            layerdrop=0.05, prenet_layerdrop=0.05, clone_batch=4, mask_ratio=0.5,
                            mask_prob_adjust=0.05, average_top_k_layers=2, decoder_dim=32, decoder_layers=2,
                            decoder_groups=4, **_TINY_EMA),
    ("audio", "base"): dict(_AUDIO, layerdrop=0.05, prenet_layerdrop=0.05, clone_batch=8, mask_ratio=0.5,
                            mask_prob_adjust=0.05, average_top_k_layers=8, decoder_dim=384, ema_decay=0.999,
                            ema_end_decay=0.99999, ema_anneal_end_step=75_000),
    ("audio", "large"): dict(_AUDIO, clone_batch=12, mask_ratio=0.55, mask_prob_adjust=0.1, average_top_k_layers=16,
                             decoder_dim=768, ema_decay=0.9997, ema_end_decay=1.0, ema_anneal_end_step=300_000),
    # text: base_text_only_task, large_text_only_task
    ("text", "tiny"): dict(_TEXT, clone_batch=4, mask_ratio=0.48, average_top_k_layers=2,
                           target_layer_norm="instance", target_final_norm=None, decoder_dim=64,
                           decoder_layers=2, **_TINY_EMA),
    ("text", "base"): dict(_TEXT, mask_ratio=0.48, average_top_k_layers=12, target_layer_norm="instance",
                           target_final_norm=None),
    ("text", "large"): dict(_TEXT, mask_ratio=0.5, average_top_k_layers=24, target_layer_norm="layer",
                            target_final_norm="instance"),
}  # fmt: skip


def data2vec2_config(modality: str, size: str, **overrides) -> Data2Vec2Config:
    """The preset ``(modality, size)``'s model config, with ``overrides`` applied (any field).

    Width, heads and the prenet / shared depth split come from ``sizes.ENCODER_SIZES``; the rest from
    ``DATA2VEC2_PRESETS``.
    """
    return build_preset(Data2Vec2Config, DATA2VEC2_PRESETS, "data2vec 2.0", modality, size, overrides, prenet=True)
