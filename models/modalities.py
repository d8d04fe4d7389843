"""Modalities: everything that differs between images, speech and text, behind one small interface.

A method (data2vec 2.0, data2vec 1.0, the baselines) never asks which modality it runs on; it asks
its ``Modality`` object (the reference's ``ModalitySpecificEncoder`` split into what builds modules
and what runs them). A modality owns:

- the embedding module (``build_embed(cfg)``: an ``ImageEmbed`` / ``AudioEmbed`` / ``TextEmbed`` from
  ``embeddings``, the local encoder and how positions enter), which the encoder holds as ``embed``;
- extra tokens (``num_extra_tokens``: the image CLS);
- which encoder parts data2vec 2.0's teacher does not copy (``teacher_omits``) and what it is fed
  (``teacher_tokens``);
- data2vec 2.0's decoder (``build_decoder``) and the init fix-ups after BERT init (``reset_init``);
- the data side, run in the loader workers: ``num_positions(source)`` and
  ``make_masks(batch_size, source, generator)`` (all ``clones`` masks of a batch).

Modalities are plain picklable objects (no parameters of their own), built from a method config
with ``modality_for(cfg)``; a method may pass its own masking (``masker``) and clone count.
The config is duck-typed: each modality reads only the fields it documents.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, ClassVar

import torch
from torch import nn

from .layers.decoders import Decoder1d, Decoder2d
from .layers.embeddings import AudioEmbed, ImageEmbed, TextEmbed
from .layers.encoders import audio_num_frames, frame_padding_mask
from .layers.masking import inverse_block_mask, random_mask, span_mask

__all__ = ["Modality", "ImageModality", "AudioModality", "TextModality", "MODALITIES", "modality_for", "MaskFunction"]

# masker(rows, shape, generator=generator) -> bool [rows, N], True = masked, the same count in every row;
# ``shape`` is the modality's mask shape (an (H, W) grid for images, a length otherwise).
MaskFunction = Callable[[int, "int | tuple[int, int]", "torch.Generator | None"], torch.Tensor]


class Modality:
    """The interface every modality implements; see the module docstring.

    Args:
        cfg: the method's config (the fields each subclass documents).
        clones: masks per sample (data2vec 2.0's K; 1 for single-mask methods). Default ``cfg.clone_batch``.
        masker: the masking algorithm; default the data2vec 2.0 one for this modality.
    """

    name: ClassVar[str]
    num_extra_tokens: ClassVar[int] = 0
    """Tokens prepended to every sequence (the image CLS)."""
    teacher_omits: ClassVar[tuple[str, ...]] = ()
    """Encoder submodules (dotted paths) data2vec 2.0's teacher does not own (fairseq
    ``data2vec2.py: make_ema_teacher``); everything else is EMA-tracked."""

    def __init__(self, cfg, clones: int | None = None, masker: MaskFunction | None = None):
        self.cfg = cfg
        self.clones = int(cfg.clone_batch if clones is None else clones)
        self.masker = masker or self.default_masker(cfg)

    # -- data side (loader workers) -------------------------------------------------------------------

    def default_masker(self, cfg) -> MaskFunction:
        raise NotImplementedError

    def mask_shape(self, source: torch.Tensor) -> int | tuple[int, int]:
        """What the masker masks for a collated ``source``: a grid (images) or a length."""
        return self.num_positions(source)

    def num_positions(self, source: torch.Tensor) -> int:
        """Maskable positions N of a collated source [B, ...]: patches, CNN frames or tokens."""
        raise NotImplementedError

    def make_masks(
        self, batch_size: int, source: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """bool [batch_size * clones, N] masks (True = masked, clone-major: rows i*clones .. of sample i)."""
        return self.masker(batch_size * self.clones, self.mask_shape(source), generator=generator)

    # -- model side ---------------------------------------------------------------------------------

    def build_embed(self, cfg) -> nn.Module:
        """The embedding module the encoder holds as ``embed`` (see ``embeddings``)."""
        raise NotImplementedError

    def output_padding(self, padding_mask: torch.Tensor | None, num_positions: int) -> torch.Tensor | None:
        """Which of the encoder's ``num_positions`` output positions (extra tokens left out) are padding,
        given the source's ``padding_mask`` [B, T] (True = padding): what pooling over them leaves out.
        By default the source's positions are the encoder's (text tokens)."""
        return padding_mask

    def teacher_tokens(self, teacher: nn.Module, student: nn.Module, source, feats, padding_mask) -> tuple:
        """data2vec 2.0's teacher input: (tokens, context) for its blocks, unmasked (``Data2VecMultiModel.forward``, ``ema_encoder_only``)."""
        raise NotImplementedError

    def build_decoder(self, cfg) -> nn.Module:
        """data2vec 2.0's conv decoder for this modality (``modalities/modules.py: Decoder1d, Decoder2d``)."""
        return Decoder1d(
            cfg.embed_dim, cfg.decoder_dim, cfg.decoder_kernel, cfg.decoder_layers, cfg.decoder_groups,
            cfg.decoder_residual, cfg.projection_layers, cfg.projection_ratio, cfg.decoder_input_dropout,
            cfg.mask_noise_std, cfg.impl,
        )  # fmt: skip

    def reset_init(self, encoder: nn.Module, decoder: nn.Module | None) -> None:
        """Undo BERT init where the reference keeps PyTorch's default (``Data2VecMultiModel.__init__``)."""

    def has_prenet_norm(self, cfg) -> bool:
        """Whether the encoder has the prenet LayerNorm (text has none without prenet blocks)."""
        return True

    @classmethod
    def check_config(cls, cfg, fail: Callable[[str, str, str], None]) -> None:
        """Modality-specific config checks; ``fail(field, problem, fix)`` raises."""
        if getattr(cfg, "cls_loss", 0) > 0 and cls.num_extra_tokens == 0:
            fail("cls_loss", f"must be 0 for {cls.name} (only images have a CLS token), got {cfg.cls_loss}",
                 "set it to 0")  # fmt: skip

    def __repr__(self) -> str:
        return f"{type(self).__name__}(clones={self.clones})"


class ImageModality(Modality):
    """Images [B, C, H, W]: patch embedding, fixed 2-D sin-cos positions added before masking, a CLS
    token (N(0, 1) init) without position, inverse block masking on the patch grid, the 2-D decoder.

    Config fields: image_size, patch_size, in_chans, embed_dim, mask_ratio, mask_length,
    mask_prob_adjust, clone_batch and the decoder fields.
    """

    name = "image"
    num_extra_tokens = 1

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    def default_masker(self, cfg) -> MaskFunction:
        return partial(inverse_block_mask, mask_ratio=cfg.mask_ratio, block=cfg.mask_length, adjust=cfg.mask_prob_adjust)

    def mask_shape(self, source: torch.Tensor) -> tuple[int, int]:
        return self.grid

    def num_positions(self, source: torch.Tensor | None = None) -> int:
        return self.grid[0] * self.grid[1]

    def build_embed(self, cfg) -> nn.Module:
        return ImageEmbed(cfg.image_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.impl)

    def output_padding(self, padding_mask, num_positions):
        return None  # images come whole

    def teacher_tokens(self, teacher, student, source, feats, padding_mask):
        # A full EMA copy: it embeds the raw image itself.
        teacher_feats, _ = teacher.local_features(source)
        return teacher.contextualize(teacher_feats)

    def build_decoder(self, cfg) -> nn.Module:
        return Decoder2d(
            cfg.embed_dim, cfg.decoder_dim, cfg.decoder_kernel, cfg.decoder_layers, cfg.decoder_groups,
            self.grid, cfg.decoder_residual, cfg.decoder_input_dropout, cfg.mask_noise_std, cfg.impl,
        )  # fmt: skip

    def reset_init(self, encoder, decoder) -> None:
        if decoder is not None:
            decoder.reset_projection()

    @classmethod
    def check_config(cls, cfg, fail) -> None:
        if cfg.image_size % cfg.patch_size != 0:
            fail("image_size", f"({cfg.image_size}) must be a multiple of patch_size ({cfg.patch_size})",
                 "change image_size or patch_size")  # fmt: skip
        if cfg.embed_dim % 4 != 0:
            fail("embed_dim", f"must be a multiple of 4 for the 2-D sin-cos positions, got {cfg.embed_dim}",
                 "use a multiple of 4")  # fmt: skip
        if getattr(cfg, "projection_layers", 1) != 1:
            fail("projection_layers", f"must be 1 for images (the 2-D decoder has one Linear head), got "
                 f"{cfg.projection_layers}", "set it to 1")  # fmt: skip


class AudioModality(Modality):
    """Waveforms [B, T] at 16 kHz: the wav2vec 2.0 CNN, a 5-layer conv positional encoder (added to the
    features), ALiBi with a learned per-head scale on the original frame positions, span masking over
    CNN frames, the 1-D decoder.

    Config fields: conv_feature_layers, conv_pos_width, conv_pos_depth, conv_pos_groups,
    alibi_scale_init, num_heads, embed_dim, mask_ratio, mask_length, mask_prob_adjust, clone_batch;
    optional ``alibi`` (default True): False builds no ALiBi (data2vec 1.0 and wav2vec 2.0 have only
    the conv positions).
    """

    name = "audio"
    teacher_omits = ("embed.local_encoder",)

    def default_masker(self, cfg) -> MaskFunction:
        return partial(span_mask, mask_ratio=cfg.mask_ratio, span=cfg.mask_length, adjust=cfg.mask_prob_adjust)

    def num_positions(self, source: torch.Tensor) -> int:
        return int(audio_num_frames(source.shape[-1], self.cfg.conv_feature_layers))

    def num_frames(self, num_samples):
        """Frames the CNN makes from ``num_samples`` samples (int or integer tensor)."""
        return audio_num_frames(num_samples, self.cfg.conv_feature_layers)

    def build_embed(self, cfg) -> nn.Module:
        return AudioEmbed(cfg.embed_dim, cfg.conv_feature_layers, cfg.conv_pos_width, cfg.conv_pos_depth,
                          cfg.conv_pos_groups, cfg.num_heads, getattr(cfg, "alibi", True), cfg.alibi_scale_init,
                          cfg.impl)  # fmt: skip

    def output_padding(self, padding_mask, num_positions):
        if padding_mask is None:
            return None
        return frame_padding_mask(padding_mask, num_positions, self.cfg.conv_feature_layers)

    def teacher_tokens(self, teacher, student, source, feats, padding_mask):
        # An EMA copy without the CNN, fed the student's CNN features (computed once, detached).
        return teacher.contextualize(feats, padding_mask)

    def reset_init(self, encoder, decoder) -> None:
        if decoder is not None:
            decoder.reset_projection()
        encoder.embed.local_encoder.reset_projection()

    @classmethod
    def check_config(cls, cfg, fail) -> None:
        super().check_config(cfg, fail)
        cls.check_conv_feature_layers(cfg, fail)
        kernel = max(3, cfg.conv_pos_width // cfg.conv_pos_depth) if hasattr(cfg, "conv_pos_width") else 3
        if kernel % 2 == 0:  # the multi-layer conv positions (wav2vec 2.0 has one conv of any kernel)
            fail("conv_pos_width", f"gives an even positional kernel max(3, {cfg.conv_pos_width} // "
                 f"{cfg.conv_pos_depth}) = {kernel}", "choose a width that gives an odd kernel (95 -> 19)")  # fmt: skip
        if cfg.embed_dim % cfg.conv_pos_groups != 0:
            fail("conv_pos_groups", f"({cfg.conv_pos_groups}) must divide embed_dim ({cfg.embed_dim})",
                 "change conv_pos_groups")  # fmt: skip

    @staticmethod
    def check_conv_feature_layers(cfg, fail) -> None:
        """The CNN spec check every audio method shares; stores ``cfg.conv_feature_layers`` as tuples."""
        layers = cfg.conv_feature_layers
        try:
            layers = tuple(tuple(int(v) for v in layer) for layer in layers)
        except (TypeError, ValueError):
            layers = ()
        if not layers or any(len(layer) != 3 or min(layer) < 1 for layer in layers):
            fail("conv_feature_layers", f"must be a non-empty list of (channels, kernel, stride) positive "
                 f"ints, got {cfg.conv_feature_layers!r}", "use e.g. [[512, 10, 5], [512, 3, 2]]")  # fmt: skip
        cfg.conv_feature_layers = layers  # YAML gives lists of lists; keep tuples


class TextModality(Modality):
    """Token ids [B, L]: token + learned absolute positions (padding-aware) + LayerNorm + dropout,
    uniform random masking, the 1-D decoder; data2vec 2.0's teacher is only the shared blocks, fed the
    student's embedding output (with its training-mode dropout, as the reference).

    Config fields: vocab_size, max_positions, padding_idx, embed_dim, norm_eps, embed_dropout,
    prenet_depth, mask_ratio, clone_batch; optional ``num_embeddings`` (default vocab_size): rows of
    the token table, more than vocab_size when a method appends its own tokens (data2vec 1.0's
    ``<mask>``).
    """

    name = "text"
    teacher_omits = ("embed.local_encoder", "context_norm", "context_dropout", "prenet")

    def default_masker(self, cfg) -> MaskFunction:
        return partial(random_mask, mask_ratio=cfg.mask_ratio)

    def num_positions(self, source: torch.Tensor) -> int:
        return source.shape[-1]

    def build_embed(self, cfg) -> nn.Module:
        return TextEmbed(getattr(cfg, "num_embeddings", cfg.vocab_size), cfg.embed_dim, cfg.max_positions,
                         cfg.padding_idx, cfg.norm_eps, cfg.embed_dropout, cfg.impl)  # fmt: skip

    def teacher_tokens(self, teacher, student, source, feats, padding_mask):
        # ema_encoder_only: the student's (identity for prenet_depth 0) contextualisation, unmasked.
        return student.contextualize(feats, padding_mask)

    def has_prenet_norm(self, cfg) -> bool:
        return cfg.prenet_depth > 0

    @classmethod
    def check_config(cls, cfg, fail) -> None:
        super().check_config(cfg, fail)
        if cfg.padding_idx is not None and (
            isinstance(cfg.padding_idx, bool) or not isinstance(cfg.padding_idx, int)
            or not 0 <= cfg.padding_idx < cfg.vocab_size
        ):  # fmt: skip
            fail("padding_idx", f"must be None or an id in [0, vocab_size={cfg.vocab_size}), got "
                 f"{cfg.padding_idx!r}", "use the tokenizer's pad id")  # fmt: skip


MODALITIES: dict[str, type[Modality]] = {m.name: m for m in (ImageModality, AudioModality, TextModality)}


def modality_for(cfg, clones: int | None = None, masker: MaskFunction | None = None) -> Modality:
    """The modality object of a method config (``cfg.modality`` names it)."""
    if cfg.modality not in MODALITIES:
        raise ValueError(f"modality must be one of {sorted(MODALITIES)}, got {cfg.modality!r}")
    return MODALITIES[cfg.modality](cfg, clones, masker)

