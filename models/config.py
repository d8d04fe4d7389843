"""What every method config shares: the checks, the encoder fields, the modality field groups and the presets.

A method config is a keyword-only, slotted dataclass that inherits ``EncoderConfig`` (modality, width,
heads, depth, MLP ratio, LayerNorm epsilon, kernel implementation) and the field groups it uses:
``Dropouts`` (the transformer's dropouts and LayerDrop), ``ImageFields``, ``AudioFields``,
``TextFields`` and ``TeacherTargets`` (data2vec's EMA teacher and layer-averaged targets). Each field
is documented once, where it is declared; a method adds only what is its own. Recipe YAML keys stay
flat: the dataclass's fields are one namespace whatever class declares them.

Checks: every class in a config's MRO may define ``_check_fields(self, check)``; ``EncoderConfig``
runs them base first, then the modality's own checks (``Modality.check_config``). Each failure is one
``ValueError("<Config>.<field> <problem>; <fix>")`` (the CLI prints it as a one-line error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

from .layers.encoders import WAV2VEC2_CONV_LAYERS
from .modalities import MODALITIES
from .sizes import encoder_size

__all__ = [
    "ConfigChecker", "EncoderConfig", "Dropouts", "ImageFields", "AudioFields", "TextFields", "MaskToken",
    "TeacherTargets",
    "Impl", "ModalityName", "TargetNorm", "build_preset",
]  # fmt: skip

ModalityName = Literal["image", "audio", "text"]
TargetNorm = Literal["instance", "layer"]
Impl = Literal["auto", "triton", "torch"]


class ConfigChecker:
    """Checks of the fields of one config dataclass instance ``cfg`` (named by its class)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.name = type(cfg).__name__

    def fail(self, field: str, problem: str, fix: str) -> None:
        raise ValueError(f"{self.name}.{field} {problem}; {fix}")

    def choice(self, field: str, choices: tuple) -> None:
        value = getattr(self.cfg, field)
        if value not in choices:
            self.fail(field, f"must be one of {choices}, got {value!r}", "pick one of those")

    def int(self, field: str, minimum: int) -> None:
        value = getattr(self.cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(field, f"must be an int >= {minimum}, got {value!r}", f"set it to an int >= {minimum}")

    def fraction(self, field: str) -> None:
        """A probability in [0, 1)."""
        value = getattr(self.cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            self.fail(field, f"must be a probability in [0, 1), got {value!r}", "use a value in [0, 1)")

    def open_fraction(self, field: str, fix: str) -> None:
        """A fraction in (0, 1): some but not all (mask ratios)."""
        value = getattr(self.cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            self.fail(field, f"must lie in (0, 1), got {value!r}", fix)

    def decay(self, field: str) -> None:
        """An EMA decay in [0, 1] (1 freezes)."""
        value = getattr(self.cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            self.fail(field, f"must lie in [0, 1], got {value!r}", "use a decay such as 0.999")

    def nonnegative(self, field: str) -> None:
        value = getattr(self.cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            self.fail(field, f"must be a finite number >= 0, got {value!r}", "use a value >= 0")

    def positive(self, field: str) -> None:
        self.nonnegative(field)
        if getattr(self.cfg, field) == 0:
            self.fail(field, "must be > 0, got 0", "use a positive value")


@dataclass(kw_only=True, slots=True)
class EncoderConfig:
    """The transformer encoder every method builds; the base of every method config."""

    modalities: ClassVar[tuple[str, ...]] = ("image", "audio", "text")
    """The modalities a method supports (a subclass narrows it)."""

    modality: ModalityName
    """Input modality: "image" (source [B, 3, H, W]), "audio" (source [B, T] waveforms at 16 kHz) or
    "text" (source [B, L] token ids)."""
    embed_dim: int = 768
    """Model width D."""
    num_heads: int = 12
    """Attention heads; embed_dim must be divisible by it (D / heads = 64 for every released size)."""
    mlp_ratio: float = 4.0
    """FFN hidden width as a multiple of D."""
    depth: int = 12
    """Transformer blocks (data2vec 2.0: the shared blocks after its prenet; the other methods: the size
    table's ``total_depth``, so that every method compares at equal size)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon of the blocks and the encoder's norms (1e-6 for images, 1e-5 otherwise)."""
    impl: Impl = "auto"
    """Kernel implementation for every d2v2.kernels op: "auto" (Triton on CUDA), "triton" or "torch"."""

    def __post_init__(self) -> None:
        check = ConfigChecker(self)
        if self.modality not in self.modalities:
            allowed = repr(self.modalities[0]) if len(self.modalities) == 1 else f"one of {self.modalities}"
            check.fail("modality", f"must be {allowed} (what {type(self).__name__} supports), got {self.modality!r}",
                       "pick another method for that modality")  # fmt: skip
        for klass in reversed(type(self).__mro__):  # base first: each class checks the fields it declares
            own = klass.__dict__.get("_check_fields")
            if own is not None:
                own(self, check)
        MODALITIES[self.modality].check_config(self, check.fail)

    @property
    def num_extra_tokens(self) -> int:
        """Tokens prepended to the encoder's sequences: one CLS for images, none otherwise."""
        return MODALITIES[self.modality].num_extra_tokens

    def _check_fields(self, check: ConfigChecker) -> None:
        check.choice("impl", ("auto", "triton", "torch"))
        for name in ("embed_dim", "num_heads", "depth"):
            check.int(name, 1)
        for name in ("mlp_ratio", "norm_eps"):
            check.positive(name)
        if self.embed_dim % self.num_heads != 0:
            check.fail("embed_dim", f"({self.embed_dim}) must be divisible by num_heads ({self.num_heads})",
                       "change either")  # fmt: skip


@dataclass(kw_only=True)
class Dropouts:
    """The transformer's dropouts and LayerDrop (0 in the base class; the presets set the released ones)."""

    __slots__ = ()
    encoder_dropout: float = 0.0
    """Dropout after each attention output projection (0.1 audio, text; wav2vec 2.0 also uses it on
    each FFN output and after its positional LayerNorm)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (0.1 audio, text)."""
    activation_dropout: float = 0.0
    """Dropout inside the FFN, after GELU and after fc2 (0 in every preset)."""
    layerdrop: float = 0.0
    """Probability of skipping each block of the student in a step (audio base 0.05)."""

    finetune_names: ClassVar[dict[str, tuple[str, ...]]] = {"dropout": ("encoder_dropout",), "dropout_input": ()}
    """The names fairseq's wav2vec 2.0 fine-tuning overrides in any pretrained model (``wav2vec2_asr.py``
    ``arg_overrides``: ``dropout``, ``dropout_input``, ``layerdrop`` ...), each with the fields of this
    config it sets (none: the method has no such dropout); other names are the fields themselves."""

    def _check_fields(self, check: ConfigChecker) -> None:
        for name in ("encoder_dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            check.fraction(name)


def finetune_fields(config: type, overrides: dict) -> dict:
    """A fine-tuning recipe's ``model`` overrides as ``config``'s fields: fairseq's fine-tuning names
    (``Dropouts.finetune_names``) spread over the fields they set in this method, the others as given."""
    names = getattr(config, "finetune_names", {})
    return {field: value for key, value in overrides.items() for field in names.get(key, (key,))}


@dataclass(kw_only=True)
class ImageFields:
    """The image side: square images cut into square patches."""

    __slots__ = ()
    image_size: int = 224
    """Input image side in pixels (square); a multiple of patch_size. The data decides it (crop size)."""
    patch_size: int = 16
    """Patch side (16; 14 for data2vec 2.0's huge preset)."""
    in_chans: int = 3
    """Image channels."""

    def _check_fields(self, check: ConfigChecker) -> None:
        for name in ("image_size", "patch_size", "in_chans"):
            check.int(name, 1)

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (H, W)."""
        side = self.image_size // self.patch_size
        return side, side


@dataclass(kw_only=True)
class AudioFields:
    """The audio side of data2vec: the wav2vec 2.0 CNN and the multi-layer conv positional encoder."""

    __slots__ = ()
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

    def _check_fields(self, check: ConfigChecker) -> None:
        for name in ("conv_pos_width", "conv_pos_depth", "conv_pos_groups"):
            check.int(name, 1)
        check.nonnegative("alibi_scale_init")


@dataclass(kw_only=True)
class TextFields:
    """The text side: token ids with learned absolute positions."""

    __slots__ = ()
    vocab_size: int = 50265
    """Token ids in [0, vocab_size); the default is RoBERTa's GPT-2 BPE dictionary size. The data sets
    it from the tokenizer."""
    max_positions: int = 512
    """Longest token sequence (learned positions)."""
    padding_idx: int | None = 1
    """Padding token id (fairseq's pad is 1); its embedding row is zero. None for no padding token."""
    embed_dropout: float = 0.1
    """Dropout after the embedding LayerNorm."""

    def _check_fields(self, check: ConfigChecker) -> None:
        for name in ("vocab_size", "max_positions"):
            check.int(name, 1)
        check.fraction("embed_dropout")


@dataclass(kw_only=True)
class MaskToken:
    """A ``<mask>`` token id for text methods that corrupt the input tokens (data2vec 1.0, the MLM)."""

    __slots__ = ()
    mask_idx: int | None = None
    """Id of the ``<mask>`` token: the tokenizer's own, in [0, vocab_size) (the data sets it), or None
    to reserve the id vocab_size, which the tokenizer never produces (one extra embedding row)."""

    @property
    def num_embeddings(self) -> int:
        """Rows of the token table (read by ``TextModality``): vocab_size, + 1 for a reserved ``<mask>``."""
        return self.vocab_size + (1 if self.mask_idx is None else 0)

    def _check_fields(self, check: ConfigChecker) -> None:
        if self.mask_idx is not None and (
            isinstance(self.mask_idx, bool) or not isinstance(self.mask_idx, int)
            or not 0 <= self.mask_idx < self.vocab_size or self.mask_idx == self.padding_idx
        ):  # fmt: skip
            check.fail("mask_idx", f"must be None or an id in [0, vocab_size={self.vocab_size}) other than "
                       f"padding_idx, got {self.mask_idx!r}",
                       "use None to reserve the id vocab_size, or the tokenizer's <mask> id")  # fmt: skip


@dataclass(kw_only=True)
class TeacherTargets:
    """data2vec's targets (the EMA teacher's top blocks, normalised and averaged) and its safety stops."""

    __slots__ = ()
    average_top_k_layers: int = 10
    """How many of the teacher's top blocks are averaged into the target."""
    target_layer_norm: TargetNorm | None = "instance"
    """Per-layer norm before averaging: "instance" (over time/patches per channel), "layer" (over
    channels), or None."""
    target_final_norm: TargetNorm | None = None
    """Norm after averaging: "layer", "instance", or None."""
    loss_beta: float = 0.0
    """0 for the squared error; > 0 for smooth-L1 with this beta."""
    loss_scale: float | None = None
    """Multiplier of the per-token loss; None means 1/sqrt(D) (images, audio); text uses 1."""
    ema_decay: float = 0.999
    """Teacher EMA decay at step 0."""
    ema_end_decay: float = 0.9999
    """Decay reached at ema_anneal_end_step and kept after; 1.0 freezes the teacher (no update)."""
    ema_anneal_end_step: int = 100_000
    """Optimizer steps of the linear anneal from ema_decay to ema_end_decay."""
    min_target_var: float = 0.1
    """Training is stopped after 5,000 steps if the target std falls below this (0 disables; images 0)."""
    min_pred_var: float = 0.01
    """The same for the prediction std (0 disables; images 0)."""

    def _check_fields(self, check: ConfigChecker) -> None:
        check.choice("target_layer_norm", ("instance", "layer", None))
        check.choice("target_final_norm", ("instance", "layer", None))
        check.int("average_top_k_layers", 1)
        check.int("ema_anneal_end_step", 0)
        for name in ("loss_beta", "min_target_var", "min_pred_var"):
            check.nonnegative(name)
        for name in ("ema_decay", "ema_end_decay"):
            check.decay(name)
        if self.average_top_k_layers > self.depth:
            check.fail("average_top_k_layers", f"({self.average_top_k_layers}) cannot exceed depth ({self.depth})",
                       "average at most all blocks")  # fmt: skip
        scale = self.loss_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
            check.fail("loss_scale", f"must be None (1/sqrt(D)) or > 0, got {scale!r}", "use None or 1.0")


def build_preset(config_type: type, presets: dict, label: str, modality: str, size: str, overrides: dict,
                 prenet: bool = False):  # fmt: skip
    """A method's preset for (modality, size): width and heads from the size table (``sizes``), the
    depth split into ``prenet_depth`` + ``depth`` (``prenet=True``, data2vec 2.0) or ``depth =
    total_depth`` plain blocks (every other method, so all compare at equal size), the rest from
    ``presets[(modality, size)]``, then ``overrides`` (any field of ``config_type``). ``label`` names
    the method in the errors."""
    dims = encoder_size(modality, size)
    if (modality, size) not in presets:
        raise ValueError(f"no {label} preset for {modality} {size}; known: {sorted(presets)}")
    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {config_type.__name__} fields {unknown}; valid fields: {sorted(known)}")
    values = dict(modality=modality, embed_dim=dims.embed_dim, num_heads=dims.num_heads)
    if prenet:
        values.update(prenet_depth=dims.prenet_depth, depth=dims.depth)
    else:
        values.update(depth=dims.total_depth)
    values.update(presets[(modality, size)])
    values.update(overrides)
    return config_type(**values)
