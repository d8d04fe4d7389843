"""wav2vec 2.0's config: every field with its meaning, the checks, and the released presets.

``wav2vec2_config(modality, size, **overrides)`` gives a preset's model config. Width, heads and
depth come from ``sizes.ENCODER_SIZES`` (wav2vec 2.0 has no prenet: ``total_depth`` blocks, so it
compares with data2vec 2.0 at equal size); the rest from ``WAV2VEC2_PRESETS``. The base preset is
fairseq's ``examples/wav2vec/config/pretraining/wav2vec2_base_librispeech.yaml`` on the
``Wav2Vec2Config`` defaults (``fairseq/models/wav2vec/wav2vec2.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..config import ConfigChecker, Dropouts, EncoderConfig, build_preset
from ..layers.encoders import WAV2VEC2_CONV_LAYERS

__all__ = ["Wav2Vec2Config", "WAV2VEC2_PRESETS", "wav2vec2_config"]


@dataclass(kw_only=True, slots=True)
class Wav2Vec2Config(Dropouts, EncoderConfig):
    """Everything that defines a wav2vec 2.0 model and its contrastive objective (speech only).

    Build one with ``wav2vec2_config("audio", size, **overrides)``: post-norm blocks (``depth`` = the
    size table's total_depth); the shared fields are documented where ``config`` declares them
    (wav2vec 2.0's ``dropout`` is ``encoder_dropout``), the defaults below are wav2vec 2.0 base's and
    the presets hold its dropouts (0.1) and LayerDrop (0.05).
    """

    finetune_names: ClassVar[dict[str, tuple[str, ...]]] = {"dropout": ("encoder_dropout",), "dropout_input": ("dropout_input",)}
    """fairseq's names are this model's own (``dropout`` is ``encoder_dropout``)."""

    modalities = ("audio",)  # a speech method

    # -- feature encoder ------------------------------------------------------------------------------
    conv_feature_layers: tuple[tuple[int, int, int], ...] = WAV2VEC2_CONV_LAYERS
    """(channels, kernel, stride) of each CNN layer; default the wav2vec 2.0 spec (stride 320)."""
    extractor_mode: Literal["default", "layer_norm"] = "default"
    """CNN norms: "default" (one GroupNorm per channel on the first layer: base) or "layer_norm"
    (a LayerNorm in every layer: wav2vec 2.0 large LV-60, data2vec)."""
    feature_grad_mult: float = 0.1
    """Gradients flowing into the CNN are multiplied by this (0 would freeze it; 1 leaves them)."""
    feature_penalty: float = 10.0
    """Weight of the L2 penalty: the mean squared CNN output (fairseq's second ``loss_weights``)."""
    dropout_input: float = 0.1
    """Dropout on the projected features before masking."""
    dropout_features: float = 0.1
    """Dropout on the unmasked (normalised, unprojected) features the quantiser turns into targets."""

    # -- positional embedding -------------------------------------------------------------------------
    conv_pos_kernel: int = 128
    """Kernel of the single weight-normalised positional convolution (fairseq's ``conv_pos``)."""
    conv_pos_groups: int = 16
    """Its groups; must divide embed_dim."""

    # -- masking (the data loader makes the masks) ------------------------------------------------------
    mask_prob: float = 0.65
    """Probability of each frame starting a span (compute_mask_indices): about 49 % of frames masked."""
    mask_length: int = 10
    """Frames per masked span."""
    mask_min_spans: int = 2
    """At least this many spans per utterance."""

    # -- quantiser -----------------------------------------------------------------------------------
    latent_vars: int = 320
    """Codes per codebook group V."""
    latent_groups: int = 2
    """Codebook groups G; one code is picked from each and the codes are concatenated."""
    latent_dim: int = 256
    """Width of the concatenated code (G x per-group width: 2 x 128), then Linear(latent_dim ->
    final_dim) (``project_q``); divisible by latent_groups."""
    max_temp: float = 2.0
    """Gumbel-softmax temperature at update 0."""
    min_temp: float = 0.5
    """The temperature never falls below this."""
    temp_decay: float = 0.999995
    """The temperature is max(max_temp * temp_decay ** update, min_temp)."""
    diversity_weight: float = 0.1
    """Weight of the diversity loss (G V - perplexity) / (G V) (fairseq's first ``loss_weights``)."""

    # -- contrastive loss -----------------------------------------------------------------------------
    final_dim: int = 256
    """Width of the space the contrastive loss compares in (``final_proj``: Linear(D -> final_dim))."""
    num_negatives: int = 100
    """Distractors per masked frame, uniformly from the other masked frames of the same utterance."""
    logit_temp: float = 0.1
    """kappa: cosine similarities are divided by it."""

    def _check_fields(self, check: ConfigChecker) -> None:
        """Raise ValueError naming the field and the fix for every bad value or combination."""
        check.choice("extractor_mode", ("default", "layer_norm"))
        for name in ("conv_pos_kernel", "conv_pos_groups", "mask_length", "latent_vars", "latent_groups", "latent_dim",
                     "final_dim", "num_negatives"):  # fmt: skip
            check.int(name, 1)
        check.int("mask_min_spans", 0)
        for name in ("dropout_input", "dropout_features", "mask_prob"):
            check.fraction(name)
        for name in ("logit_temp", "max_temp", "min_temp", "mask_prob", "temp_decay"):
            check.positive(name)
        for name in ("feature_grad_mult", "feature_penalty", "diversity_weight"):
            check.nonnegative(name)
        if self.temp_decay > 1:
            check.fail("temp_decay", f"must be at most 1 (1 keeps max_temp), got {self.temp_decay}", "use e.g. 0.999995")
        if self.min_temp > self.max_temp:
            check.fail("min_temp", f"({self.min_temp}) cannot exceed max_temp ({self.max_temp})", "swap them")
        if self.latent_dim % self.latent_groups != 0:
            check.fail("latent_dim", f"({self.latent_dim}) must be divisible by latent_groups ({self.latent_groups})",
                       "change either")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------

_BASE = dict(encoder_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, layerdrop=0.05)

WAV2VEC2_PRESETS: dict[tuple[str, str], dict] = {
    # wav2vec2_base_librispeech: the Wav2Vec2Config defaults with final_dim 256, quantised targets,
    # layerdrop 0.05, dropout_input/dropout_features 0.1, feature_grad_mult 0.1.
    ("audio", "base"): dict(_BASE),
    # CPU size, the width/depth of data2vec 2.0's audio tiny (64 wide, 4 heads, 1 + 2 = 3 blocks) and
    # its 64-channel CNN; the codebook, the contrastive space and the negatives scaled down with the
    # width (2 x 32 codes of 16, final_dim 32, 10 distractors); the temperature reaches its floor in
    # about 140 updates, as base reaches it at ~70 % of its 400k (the tiny recipe runs 200).
    ("audio", "tiny"): dict(
        _BASE,
        conv_feature_layers=((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2,
        latent_vars=32, latent_dim=32, final_dim=32, num_negatives=10, temp_decay=0.99,
    ),
}  # fmt: skip


def wav2vec2_config(modality: str, size: str, **overrides) -> Wav2Vec2Config:
    """The preset ``(modality, size)``'s model config, with ``overrides`` applied (any field)."""
    return build_preset(Wav2Vec2Config, WAV2VEC2_PRESETS, "wav2vec 2.0", modality, size, overrides)
