"""data2vec 2.0's config: every field with its meaning, the checks, and the released presets (ref 1.11).

``data2vec2_config(modality, size, **overrides)`` gives a released recipe's model config; sizes
come from ``sizes.ENCODER_SIZES`` and everything else from ``DATA2VEC2_RECIPES``. Each field
documents the reference's value per modality; the modality objects (``modalities``) check the
fields only they use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from .encoders import WAV2VEC2_CONV_LAYERS
from .modalities import MODALITIES
from .sizes import encoder_size

__all__ = ["Data2Vec2Config", "DATA2VEC2_RECIPES", "data2vec2_config", "Modality", "TargetNorm", "Impl"]

Modality = Literal["image", "audio", "text"]
TargetNorm = Literal["instance", "layer"]
Impl = Literal["auto", "triton", "torch"]


@dataclass(kw_only=True, slots=True)
class Data2Vec2Config:
    """Everything that defines a data2vec 2.0 model and its training objective.

    Build one with ``data2vec2_config(modality, size, **overrides)`` to get a released recipe's values
    (ref 1.11); the defaults below are generic (base width) and the modality-specific ones are the
    reference's model defaults.
    """

    modality: Modality
    """Input modality: "image" (source [B, 3, H, W]), "audio" (source [B, T] waveforms at 16 kHz) or
    "text" (source [B, L] token ids)."""

    # -- encoder ------------------------------------------------------------------------------------
    embed_dim: int = 768
    """Model width D."""
    num_heads: int = 12
    """Attention heads; embed_dim must be divisible by it."""
    mlp_ratio: float = 4.0
    """FFN hidden width as a multiple of D."""
    prenet_depth: int = 0
    """Modality-specific blocks before the shared ones (images base 2, audio large 8); not targets."""
    depth: int = 12
    """Shared blocks; the teacher's top ``average_top_k_layers`` of them make the targets."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon of the blocks and the prenet norm (1e-6 for images, 1e-5 otherwise)."""
    encoder_dropout: float = 0.0
    """Dropout after each attention output projection (0.1 audio, text)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (0.1 audio, text)."""
    activation_dropout: float = 0.0
    """Dropout inside the FFN, after GELU and after fc2 (0 in every recipe)."""
    post_mlp_dropout: float = 0.0
    """Dropout on the FFN output before the residual add (0.1 audio, text)."""
    drop_path_rate: float = 0.0
    """Stochastic depth, spaced linearly from 0 over prenet + shared blocks (0 in every recipe)."""
    layerdrop: float = 0.0
    """Probability of skipping each shared block of the student in a step (audio base 0.05)."""
    prenet_layerdrop: float = 0.0
    """The same for the prenet blocks (audio base 0.05)."""
    prenet_dropout: float = 0.0
    """Dropout after the prenet LayerNorm, before the prenet blocks (audio 0.1)."""

    # -- images ---------------------------------------------------------------------------------------
    image_size: int = 224
    """Input image side in pixels (square); a multiple of patch_size."""
    patch_size: int = 16
    """Patch side (16; 14 for the huge recipe)."""
    in_chans: int = 3
    """Image channels."""

    # -- audio ----------------------------------------------------------------------------------------
    conv_feature_layers: tuple[tuple[int, int, int], ...] = WAV2VEC2_CONV_LAYERS
    """(channels, kernel, stride) of each CNN layer; default the wav2vec 2.0 spec (stride 320)."""
    conv_pos_width: int = 95
    """Total width of the conv positional encoder; its kernel is max(3, width // depth) (19), odd."""
    conv_pos_depth: int = 5
    """Layers of the conv positional encoder."""
    conv_pos_groups: int = 16
    """Groups of the conv positional encoder's convolutions; must divide embed_dim."""
    alibi_scale_init: float = 1.0
    """Initial value of the learned per-head ALiBi scale (clamped at 0 in use, shared across layers)."""

    # -- text -----------------------------------------------------------------------------------------
    vocab_size: int = 50265
    """Token ids in [0, vocab_size); the default is RoBERTa's GPT-2 BPE dictionary size. Set it from
    the tokenizer."""
    max_positions: int = 512
    """Longest token sequence (learned positions)."""
    padding_idx: int | None = 1
    """Padding token id (fairseq's pad is 1); its embedding row is zero. None for no padding token."""
    embed_dropout: float = 0.1
    """Dropout after the embedding LayerNorm."""

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

    # -- targets and loss -----------------------------------------------------------------------------
    average_top_k_layers: int = 10
    """How many of the teacher's top shared blocks are averaged into the target."""
    target_layer_norm: TargetNorm | None = "instance"
    """Per-layer norm before averaging: "instance" (over time/patches per channel), "layer" (over
    channels; text large), or None."""
    target_final_norm: TargetNorm | None = None
    """Norm after averaging: "layer" (images), "instance" (text large), or None (audio, text base)."""
    loss_beta: float = 0.0
    """0 for the squared error; > 0 for smooth-L1 with this beta."""
    loss_scale: float | None = None
    """Multiplier of the per-token loss; None means 1/sqrt(D) (images, audio); text uses 1."""
    cls_loss: float = 0.0
    """Weight of the CLS loss (images 0.01; must be 0 for audio and text, which have no CLS token)."""

    # -- EMA teacher ----------------------------------------------------------------------------------
    ema_decay: float = 0.999
    """Teacher EMA decay at step 0."""
    ema_end_decay: float = 0.9999
    """Decay reached at ema_anneal_end_step and kept after; 1.0 freezes the teacher (no update)."""
    ema_anneal_end_step: int = 100_000
    """Optimizer steps of the linear anneal from ema_decay to ema_end_decay."""

    # -- safety ---------------------------------------------------------------------------------------
    min_target_var: float = 0.1
    """Training is stopped after 5,000 steps if the target std falls below this (0 disables; images 0)."""
    min_pred_var: float = 0.01
    """The same for the prediction std (0 disables; images 0)."""

    # -- kernels --------------------------------------------------------------------------------------
    impl: Impl = "auto"
    """Kernel implementation for every d2v2.kernels op: "auto" (Triton on CUDA), "triton" or "torch"."""

    def __post_init__(self) -> None:
        _check_config(self)

    @property
    def grid(self) -> tuple[int, int]:
        """The image patch grid (H, W)."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_extra_tokens(self) -> int:
        """Tokens prepended to the student and teacher sequences: one CLS for images, none otherwise."""
        return MODALITIES[self.modality].num_extra_tokens


def _check_config(cfg: Data2Vec2Config) -> None:
    """Raise ValueError naming the field and the fix for every bad value or combination."""

    def fail(field: str, problem: str, fix: str) -> None:
        raise ValueError(f"Data2Vec2Config.{field} {problem}; {fix}")

    def check_choice(field: str, choices: tuple) -> None:
        value = getattr(cfg, field)
        if value not in choices:
            fail(field, f"must be one of {choices}, got {value!r}", "pick one of those")

    def check_int(field: str, minimum: int) -> None:
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            fail(field, f"must be an int >= {minimum}, got {value!r}", f"set it to an int >= {minimum}")

    def check_fraction(field: str) -> None:
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            fail(field, f"must be a probability in [0, 1), got {value!r}", "use a value in [0, 1)")

    def check_nonnegative(field: str) -> None:
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            fail(field, f"must be a finite number >= 0, got {value!r}", "use a value >= 0")

    check_choice("modality", ("image", "audio", "text"))
    check_choice("impl", ("auto", "triton", "torch"))
    check_choice("target_layer_norm", ("instance", "layer", None))
    check_choice("target_final_norm", ("instance", "layer", None))
    for name in ("embed_dim", "num_heads", "depth", "image_size", "patch_size", "in_chans", "conv_pos_width",
                 "conv_pos_depth", "conv_pos_groups", "vocab_size", "max_positions", "clone_batch", "mask_length",
                 "decoder_dim", "decoder_kernel", "decoder_layers", "decoder_groups", "projection_layers",
                 "average_top_k_layers"):  # fmt: skip
        check_int(name, 1)
    check_int("prenet_depth", 0)
    check_int("ema_anneal_end_step", 0)
    for name in ("encoder_dropout", "attention_dropout", "activation_dropout", "post_mlp_dropout",
                 "drop_path_rate", "layerdrop", "prenet_layerdrop", "prenet_dropout", "embed_dropout",
                 "decoder_input_dropout"):  # fmt: skip
        check_fraction(name)
    for name in ("mlp_ratio", "norm_eps", "projection_ratio", "mask_noise_std", "mask_prob_adjust", "loss_beta",
                 "cls_loss", "min_target_var", "min_pred_var", "alibi_scale_init"):  # fmt: skip
        check_nonnegative(name)
    if cfg.norm_eps == 0:
        fail("norm_eps", "must be > 0, got 0", "use 1e-5 (1e-6 for images)")
    if cfg.embed_dim % cfg.num_heads != 0:
        fail("embed_dim", f"({cfg.embed_dim}) must be divisible by num_heads ({cfg.num_heads})", "change either")
    if cfg.average_top_k_layers > cfg.depth:
        fail(
            "average_top_k_layers",
            f"({cfg.average_top_k_layers}) cannot exceed depth ({cfg.depth})",
            "average at most all shared blocks",
        )
    if not 0.0 < cfg.mask_ratio < 1.0:
        fail("mask_ratio", f"must lie in (0, 1), got {cfg.mask_ratio!r}", "mask some but not all tokens")
    for name in ("ema_decay", "ema_end_decay"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            fail(name, f"must lie in [0, 1], got {value!r}", "use a decay such as 0.999")
    if cfg.loss_scale is not None and (
        isinstance(cfg.loss_scale, bool) or not isinstance(cfg.loss_scale, (int, float)) or not cfg.loss_scale > 0
    ):
        fail("loss_scale", f"must be None (1/sqrt(D)) or > 0, got {cfg.loss_scale!r}", "use None or 1.0")
    for name, channels in (("embed_dim", cfg.embed_dim), ("decoder_dim", cfg.decoder_dim)):
        if channels % cfg.decoder_groups != 0:
            fail("decoder_groups", f"({cfg.decoder_groups}) must divide {name} ({channels})", "change decoder_groups")
    if cfg.decoder_kernel % 2 == 0:
        fail("decoder_kernel", f"must be odd (\"same\" padding), got {cfg.decoder_kernel}", "use e.g. 3, 5, 7 or 9")

    MODALITIES[cfg.modality].check_config(cfg, fail)


# ---------------------------------------------------------------------------------------------------
# Recipes: the released configurations (ref 1.11), plus tiny/small ones for CPU runs
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
# The tiny recipes anneal the EMA over CPU-run lengths; everything else is the base recipe scaled down.
_TINY_EMA = dict(ema_decay=0.999, ema_end_decay=0.9999, ema_anneal_end_step=1000)

DATA2VEC2_RECIPES: dict[tuple[str, str], dict] = {
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
    """The recipe ``(modality, size)``'s model config, with ``overrides`` applied (any field).

    Sizes come from ``sizes.ENCODER_SIZES``; the rest from ``DATA2VEC2_RECIPES`` (ref 1.11).
    """
    dims = encoder_size(modality, size)
    if (modality, size) not in DATA2VEC2_RECIPES:
        raise ValueError(f"no data2vec 2.0 recipe for {modality} {size}; known: {sorted(DATA2VEC2_RECIPES)}")
    known = {f.name for f in fields(Data2Vec2Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown Data2Vec2Config fields {unknown}; valid fields: {sorted(known)}")
    values = dict(
        modality=modality,
        embed_dim=dims.embed_dim,
        num_heads=dims.num_heads,
        prenet_depth=dims.prenet_depth,
        depth=dims.depth,
        **DATA2VEC2_RECIPES[(modality, size)],
    )
    values.update(overrides)
    return Data2Vec2Config(**values)
