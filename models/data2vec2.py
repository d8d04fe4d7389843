"""data2vec 2.0: one student-teacher model for images, speech and text, on d2v2's kernels.

Baevski, Babu, Hsu, Auli, "Efficient Self-supervised Learning with Contextualized Target
Representations for Vision, Speech and Language", ICML 2023 (arXiv:2212.07525). Reference code:
fairseq ``examples/data2vec/models/data2vec2.py: Data2VecMultiModel`` and
``examples/data2vec/models/modalities/*``; every behaviour and number below follows
``reference/data2vec2.md`` sections 1.1-1.14 (cited as "ref 1.x").

One training step (``Data2Vec2.forward``), B samples with K masks (clones) each:

    feats   = local encoder(source)                    once per sample               [B, N, D]
    student = gather_tokens(feats, ids_keep, pos, K)   kept tokens of every clone     [B*K, k, D]
              (+ CLS for images) -> prenet LN/dropout/blocks -> shared blocks
    pred    = decoder(student outputs)                 noise at masked positions      [B*K, N, D]
    teacher (no_grad, eval, once per sample, unmasked) -> FFN outputs of its top-k shared blocks
    target  = layer_targets(...)                       per-layer norm, average, final  [B, N, D] fp32
    loss    = masked_regression_loss(pred, target, mask, clones=K)   (+ CLS loss, images)
    after the optimizer step: after_step(step) -> teacher <- EMA of the student

Targets are built for the B samples and indexed per clone (row r uses sample r // K); they are never
repeated K times. The student never sees a masked token: attention runs on k << N tokens.

What the teacher is (ref 1.6):
    images  a full EMA copy of the encoder: patch embedding, CLS, fixed positions, prenet, blocks; it
            embeds the raw image itself.
    audio   an EMA copy without the CNN: conv positional encoder, prenet, ALiBi scales, blocks; it is
            fed the student's CNN features (computed once, detached).
    text    only the shared blocks, fed the student's embedding output (which, as in the reference,
            has the training-mode embedding dropout applied: quirk 1.14.3).

The CLS loss (images, weight 0.01, ref 1.4). The reference multiplies the per-row CLS error by the
number of masked positions before its criterion sums all terms and divides by that number, so the
CLS term ends up *summed* over the B*K rows of a device (quirk 1.14.6). Our loss is normalised by
the number of masked positions, so we write the same quantity directly:

    loss = mean over masked (r, n) of sum_d (pred - target)^2 * s
         + cls_loss * sum over rows r of sum_d (cls_pred[r] - mean_n target[r // K, n])^2 * s

with s = 1/sqrt(D). It is the reference's per-device objective exactly; with data parallelism the
gradient average over ranks (each with the same number of masked positions, which inverse block
masking guarantees) reproduces the reference's global normalisation, and so does dividing each
micro-batch's loss by the accumulation count. The CLS weight therefore scales with the per-device
batch B*K, as in the reference.

Deliberate differences from the reference, all documented where they live:
    - masks arrive with the batch (the reference also precomputes image/audio masks in the loader;
      text masks are made there too instead of on the GPU from hashed ids);
    - no fp16 teacher copy (quirk 1.14.5): the teacher stays fp32 and autocast runs its matmuls in
      bf16; the EMA is fp32 arithmetic, as the reference's fp32 master copy;
    - drop path, 0 in every recipe, is spaced linearly over prenet + shared blocks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from d2v2.kernels.ema import ema_
from d2v2.kernels.gather_tokens import gather_tokens
from d2v2.kernels.layer_targets import layer_targets
from d2v2.kernels.masked_regression_loss import masked_regression_loss

from .blocks import PostNormBlock, forward_blocks, init_bert_params
from .decoders import Decoder1d, Decoder2d
from .encoders import (
    WAV2VEC2_CONV_LAYERS,
    AudioFeatureEncoder,
    ConvPositionalEncoder,
    PatchEmbed,
    TokenEmbedding,
    alibi_slopes,
    audio_num_frames,
    frame_padding_mask,
    sincos_pos_embed_2d,
)
from .masking import inverse_block_mask, mask_to_ids, random_mask, span_mask
from .sizes import encoder_size

__all__ = [
    "Data2Vec2Config",
    "Data2Vec2Encoder",
    "Data2Vec2",
    "data2vec2_config",
    "DATA2VEC2_RECIPES",
    "ema_decay_schedule",
    "make_masks",
    "count_parameters",
]

Modality = Literal["image", "audio", "text"]
TargetNorm = Literal["instance", "layer"]
Impl = Literal["auto", "triton", "torch"]

# The reference checks for collapsed variances only after this many updates (ref 1.2 item 11).
VARIANCE_CHECK_AFTER = 5000


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


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
        return 1 if self.modality == "image" else 0


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

    if cfg.modality == "image":
        if cfg.image_size % cfg.patch_size != 0:
            fail("image_size", f"({cfg.image_size}) must be a multiple of patch_size ({cfg.patch_size})",
                 "change image_size or patch_size")  # fmt: skip
        if cfg.embed_dim % 4 != 0:
            fail("embed_dim", f"must be a multiple of 4 for the 2-D sin-cos positions, got {cfg.embed_dim}",
                 "use a multiple of 4")  # fmt: skip
        if cfg.projection_layers != 1:
            fail("projection_layers", f"must be 1 for images (the 2-D decoder has one Linear head), got "
                 f"{cfg.projection_layers}", "set it to 1")  # fmt: skip
    elif cfg.cls_loss > 0:
        fail("cls_loss", f"must be 0 for {cfg.modality} (only images have a CLS token), got {cfg.cls_loss}",
             "set it to 0")  # fmt: skip

    if cfg.modality == "audio":
        layers = cfg.conv_feature_layers
        try:
            layers = tuple(tuple(int(v) for v in layer) for layer in layers)
        except (TypeError, ValueError):
            layers = ()
        if not layers or any(len(layer) != 3 or min(layer) < 1 for layer in layers):
            fail("conv_feature_layers", f"must be a non-empty list of (channels, kernel, stride) positive "
                 f"ints, got {cfg.conv_feature_layers!r}", "use e.g. [[512, 10, 5], [512, 3, 2]]")  # fmt: skip
        cfg.conv_feature_layers = layers  # YAML gives lists of lists; keep tuples
        kernel = max(3, cfg.conv_pos_width // cfg.conv_pos_depth)
        if kernel % 2 == 0:
            fail("conv_pos_width", f"gives an even positional kernel max(3, {cfg.conv_pos_width} // "
                 f"{cfg.conv_pos_depth}) = {kernel}", "choose a width that gives an odd kernel (95 -> 19)")  # fmt: skip
        if cfg.embed_dim % cfg.conv_pos_groups != 0:
            fail("conv_pos_groups", f"({cfg.conv_pos_groups}) must divide embed_dim ({cfg.embed_dim})",
                 "change conv_pos_groups")  # fmt: skip

    if cfg.modality == "text" and cfg.padding_idx is not None:
        if isinstance(cfg.padding_idx, bool) or not isinstance(cfg.padding_idx, int) or not (
            0 <= cfg.padding_idx < cfg.vocab_size
        ):
            fail("padding_idx", f"must be None or an id in [0, vocab_size={cfg.vocab_size}), got "
                 f"{cfg.padding_idx!r}", "use the tokenizer's pad id")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Encoder (student, and the teacher's copy)
# ---------------------------------------------------------------------------------------------------


class Data2Vec2Encoder(nn.Module):
    """Local encoder -> positions / masking / CLS -> prenet (LayerNorm, dropout, blocks) -> shared blocks.

    Roles (``ModalitySpecificEncoder`` + ``Data2VecMultiModel.blocks`` of the reference):

    - ``local_encoder``: ``PatchEmbed`` / ``AudioFeatureEncoder`` / ``TokenEmbedding``;
    - images: ``pos_embed`` (fixed sin-cos [N, D], a Parameter with requires_grad=False, as MAE) and
      ``cls_token`` [1, 1, D] (N(0, 1) init);
    - audio: ``pos_conv`` (conv positional encoder), ``alibi_scale`` [H] (learned, init 1.0) times the
      fixed geometric ``alibi_slopes`` buffer;
    - ``context_norm`` + ``context_dropout`` (the prenet's LayerNorm and dropout; text has neither
      when it has no prenet blocks), ``prenet`` blocks, shared ``blocks``.

    Teacher copies set the parts they do not own to None (see ``Data2Vec2``).

    Args:
        cfg: the model config.
    """

    def __init__(self, cfg: Data2Vec2Config):
        super().__init__()
        self.modality = cfg.modality
        self.num_extra_tokens = cfg.num_extra_tokens
        self.layerdrop = cfg.layerdrop
        self.prenet_layerdrop = cfg.prenet_layerdrop
        self.impl = cfg.impl
        dim = cfg.embed_dim

        self.pos_embed: nn.Parameter | None = None
        self.cls_token: nn.Parameter | None = None
        self.pos_conv: ConvPositionalEncoder | None = None
        self.alibi_scale: nn.Parameter | None = None
        self.register_buffer("alibi_slopes", None, persistent=False)
        if cfg.modality == "image":
            self.local_encoder = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_chans, dim)
            self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, cfg.grid), requires_grad=False)  # [N, D]
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        elif cfg.modality == "audio":
            self.local_encoder = AudioFeatureEncoder(dim, cfg.conv_feature_layers)
            self.pos_conv = ConvPositionalEncoder(
                dim, cfg.conv_pos_width, cfg.conv_pos_depth, cfg.conv_pos_groups, cfg.impl
            )
            self.alibi_slopes = alibi_slopes(cfg.num_heads)  # fixed [H]; not saved, rebuilt on construction
            self.alibi_scale = nn.Parameter(torch.full((cfg.num_heads,), float(cfg.alibi_scale_init)))
        else:
            self.local_encoder = TokenEmbedding(
                cfg.vocab_size, dim, cfg.max_positions, cfg.padding_idx, cfg.norm_eps, cfg.embed_dropout
            )
        has_prenet_norm = cfg.modality != "text" or cfg.prenet_depth > 0
        self.context_norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if has_prenet_norm else nn.Identity()
        self.context_dropout = nn.Dropout(cfg.prenet_dropout)

        total_depth = cfg.prenet_depth + cfg.depth
        drop_path = [cfg.drop_path_rate * i / max(total_depth - 1, 1) for i in range(total_depth)]

        def block(index: int) -> PostNormBlock:
            return PostNormBlock(
                dim,
                cfg.num_heads,
                cfg.mlp_ratio,
                cfg.norm_eps,
                cfg.encoder_dropout,
                cfg.attention_dropout,
                cfg.activation_dropout,
                cfg.post_mlp_dropout,
                drop_path[index],
                cfg.impl,
            )

        self.prenet = nn.ModuleList(block(i) for i in range(cfg.prenet_depth))
        self.blocks = nn.ModuleList(block(cfg.prenet_depth + i) for i in range(cfg.depth))

    def alibi(self) -> torch.Tensor | None:
        """Effective ALiBi slopes [H]: fixed geometric slopes times the learned scale clamped at 0."""
        if self.alibi_scale is None:
            return None
        return self.alibi_slopes * self.alibi_scale.clamp_min(0)

    def local_features(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """source -> (features [B, N, D], token padding mask [B, N] or None). Runs once per sample."""
        if self.modality == "image":
            return self.local_encoder(source), None
        if self.modality == "audio":
            feats = self.local_encoder(source)
            if padding_mask is None:
                return feats, None
            return feats, frame_padding_mask(padding_mask, feats.shape[1], self.local_encoder.conv_spec)
        return self.local_encoder(source, padding_mask), padding_mask

    def contextualize(
        self,
        feats: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
        clones: int = 1,
    ) -> tuple[torch.Tensor, dict]:
        """Features -> tokens for the shared blocks, and the attention context they need.

        Without ``ids_keep`` every token is kept (the teacher, forward_features). With ``mask``
        [B*clones, N] and ``ids_keep`` [B*clones, k] (clone-major) only the kept tokens of every clone
        come out: [B*clones, extra + k, D].

        Returns:
            (x, context): context holds ``positions`` (original positions of the tokens, for ALiBi),
            ``alibi_slopes`` and ``key_padding_mask``, the keyword arguments of ``run_blocks``.
        """
        masked = ids_keep is not None
        if masked and mask is None and self.modality == "audio":
            raise ValueError("mask is required with ids_keep for audio (masked frames are zeroed before pos_conv)")
        positions = None
        if self.modality == "image":
            if masked:
                x = gather_tokens(feats, ids_keep, pos=self.pos_embed, clones=clones, impl=self.impl)
            else:
                x = feats + self.pos_embed.to(feats.dtype)
            cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)  # [R, 1 + k, D]
        elif self.modality == "audio":
            if masked:
                # encoder_zero_mask: the conv positional encoder sees every clone at full length with
                # its masked frames zeroed; its output at the kept frames is added to the kept features.
                batch, length, dim = feats.shape
                hidden = mask.view(batch, clones, length, 1)
                zeroed = torch.where(hidden, 0.0, feats[:, None]).reshape(batch * clones, length, dim)
                pos = self.pos_conv(zeroed)  # [B*K, N, D]
                x = gather_tokens(feats, ids_keep, clones=clones, impl=self.impl)
                x = x + gather_tokens(pos, ids_keep, impl=self.impl)
                positions = ids_keep
            else:
                x = feats + self.pos_conv(feats)
        else:
            x = gather_tokens(feats, ids_keep, clones=clones, impl=self.impl) if masked else feats

        key_padding_mask = padding_mask
        if padding_mask is not None and masked:
            key_padding_mask = padding_mask.repeat_interleave(clones, dim=0).gather(1, ids_keep.long())
        context = {"positions": positions, "alibi_slopes": self.alibi(), "key_padding_mask": key_padding_mask}

        x = self.context_dropout(self.context_norm(x))
        x, _ = forward_blocks(self.prenet, x, **context, layerdrop=self.prenet_layerdrop)
        return x, context

    def run_blocks(
        self, x: torch.Tensor, context: dict, collect_top: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The shared blocks: (output [R, L, D], FFN outputs of the top ``collect_top`` blocks, bottom up)."""
        collect_from = len(self.blocks) - collect_top if collect_top > 0 else None
        return forward_blocks(self.blocks, x, **context, layerdrop=self.layerdrop, collect_from=collect_from)

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The unmasked encoder: source -> [B, extra + N, D] (images: CLS first). For probes and export."""
        feats, padding_mask = self.local_features(source, padding_mask)
        x, context = self.contextualize(feats, padding_mask)
        return self.run_blocks(x, context)[0]


# Encoder parts a teacher copy does not own (ref 1.6); everything else is EMA-tracked.
_TEACHER_OMITS: dict[str, tuple[str, ...]] = {
    "image": (),
    "audio": ("local_encoder",),
    "text": ("local_encoder", "context_norm", "context_dropout", "prenet"),
}


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------


def ema_decay_schedule(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Teacher decay after ``step`` optimizer updates: linear from ``start`` to ``end`` over
    ``anneal_steps`` updates, ``end`` from then on (the reference's ``get_annealed_rate``)."""
    if step >= anneal_steps:
        return float(end)
    return float(start + (end - start) * step / anneal_steps)


class Data2Vec2(nn.Module):
    """data2vec 2.0 for one modality: student encoder, conv decoder, EMA teacher and the loss.

    Interface shared by every d2v2 method:
        ``forward(batch) -> dict`` with ``loss`` (scalar, differentiable) and logged values;
        ``after_step(step)`` after each optimizer step (the EMA update).

    Batch (made by the data loader):
        ``source``: images [B, C, H, W] float, waveforms [B, T] float, or token ids [B, L] long;
        ``padding_mask`` (optional, audio and text): bool [B, T] / [B, L], True = padding;
        ``mask``: bool [B*K, N], True = masked, clone-major (rows i*K .. i*K+K-1 are sample i's masks),
            the same number of masked positions in every row (``make_masks`` makes them);
        ``ids_keep`` (optional): int [B*K, k], the sorted kept positions of each row; derived from
            ``mask`` when absent (one host sync: make it in the loader with ``masking.mask_to_ids``).

    Submodules: ``encoder`` (the student's ``Data2Vec2Encoder``), ``decoder`` (``Decoder2d`` or
    ``Decoder1d``) and ``teacher`` (a pruned copy of the encoder, never trained by the optimizer: its
    parameters have requires_grad=False and it always stays in eval mode). Optimizers should take
    ``param_groups(weight_decay)``, which lists only the student's trainable parameters.

    Args:
        cfg: the model config (``data2vec2_config(modality, size)`` for a released recipe).
    """

    def __init__(self, cfg: Data2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = Data2Vec2Encoder(cfg)
        if cfg.modality == "image":
            self.decoder: Decoder1d | Decoder2d = Decoder2d(
                cfg.embed_dim, cfg.decoder_dim, cfg.decoder_kernel, cfg.decoder_layers, cfg.decoder_groups,
                cfg.grid, cfg.decoder_residual, cfg.decoder_input_dropout, cfg.mask_noise_std, cfg.impl,
            )  # fmt: skip
        else:
            self.decoder = Decoder1d(
                cfg.embed_dim, cfg.decoder_dim, cfg.decoder_kernel, cfg.decoder_layers, cfg.decoder_groups,
                cfg.decoder_residual, cfg.projection_layers, cfg.projection_ratio, cfg.decoder_input_dropout,
                cfg.mask_noise_std, cfg.impl,
            )  # fmt: skip
        self.init_weights()
        self.teacher = self._make_teacher()
        self.num_updates = 0

    # -- construction ---------------------------------------------------------------------------------

    def init_weights(self) -> None:
        """The reference's init: BERT init (N(0, 0.02) Linear/Embedding, zero biases) over the student,
        then PyTorch's default init again for the decoder head (images, audio) and the audio feature
        projection (ref 1.5, 1.10). Convolutions, the CLS token and the ALiBi scales keep their own."""
        self.encoder.apply(init_bert_params)
        self.decoder.apply(init_bert_params)
        if self.cfg.modality in ("image", "audio"):
            self.decoder.reset_projection()
        if self.cfg.modality == "audio":
            self.encoder.local_encoder.reset_projection()

    def _make_teacher(self) -> Data2Vec2Encoder:
        teacher = copy.deepcopy(self.encoder)
        for name in _TEACHER_OMITS[self.cfg.modality]:
            setattr(teacher, name, None)
        teacher.requires_grad_(False)
        return teacher.eval()

    def train(self, mode: bool = True) -> "Data2Vec2":
        """As nn.Module.train, but the teacher always stays in eval mode (no dropout/LayerDrop)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # -- the training step ----------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict:
        """One data2vec 2.0 step on ``batch`` (see the class docstring).

        Returns a dict: ``loss`` (scalar fp32, differentiable), ``loss_regression`` and, for images,
        ``loss_cls`` (detached), ``target_var`` and ``pred_var`` (detached 0-dim tensors: mean over
        channels of the per-channel std over all masked tokens, ref 1.2 item 11), ``ema_decay``
        (float, the decay at the last ``after_step``, as the reference logs it) and ``sample_size``
        (int, masked positions).
        Logged values are tensors, so reading them is the caller's (one) sync.
        """
        cfg = self.cfg
        clones = cfg.clone_batch
        source = batch["source"]
        feats, padding_mask = self.encoder.local_features(source, batch.get("padding_mask"))
        batch_size, length, dim = feats.shape
        mask, ids_keep = self._mask_and_ids(batch, batch_size, length, feats.device)
        num_kept = ids_keep.shape[1]
        extra = cfg.num_extra_tokens

        # Student: the kept tokens of every clone only.
        x, context = self.encoder.contextualize(feats, padding_mask, mask, ids_keep, clones)
        x, _ = self.encoder.run_blocks(x, context)  # [B*K, extra + k, D]
        pred = self.decoder(x[:, extra:], ids_keep, length)  # [B*K, N, D]

        # Teacher: once per sample, unmasked.
        with torch.no_grad():
            target = self.teacher_targets(source, feats.detach(), padding_mask)  # [B, N, D] fp32

        loss_regression = masked_regression_loss(
            pred, target, mask, clones=clones, scale=cfg.loss_scale, beta=cfg.loss_beta, impl=cfg.impl
        )
        out = {"loss_regression": loss_regression.detach()}
        loss = loss_regression
        if cfg.cls_loss > 0:
            cls_pred = x[:, 0].float().view(batch_size, clones, dim)  # [B, K, D]
            cls_target = target.mean(dim=1)[:, None, :]  # [B, 1, D], shared by the sample's clones
            loss_cls = cfg.cls_loss * self._elementwise_loss(cls_pred, cls_target).sum() * self._loss_scale()
            out["loss_cls"] = loss_cls.detach()
            loss = loss + loss_cls

        with torch.no_grad():
            out["target_var"] = _target_std(target, mask.view(batch_size, clones, length))
            out["pred_var"] = _masked_std(pred, mask)
        out["loss"] = loss
        out["ema_decay"] = self.ema_decay(self.num_updates)
        out["sample_size"] = batch_size * clones * (length - num_kept)
        return out

    @torch.no_grad()
    def teacher_targets(
        self, source: torch.Tensor, feats: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Regression targets [B, N, D] fp32 from the teacher's top-k FFN outputs (ref 1.3).

        Args:
            source: the batch's source (the image teacher embeds it itself).
            feats: the student's local features [B, N, D] (audio, text teachers start from them).
            padding_mask: token padding [B, N] or None.
        """
        cfg = self.cfg
        if cfg.modality == "image":
            teacher_feats, _ = self.teacher.local_features(source)
            x, context = self.teacher.contextualize(teacher_feats)
        elif cfg.modality == "audio":
            x, context = self.teacher.contextualize(feats, padding_mask)
        else:
            # ema_encoder_only: the student's (identity for prenet_depth 0) contextualisation, unmasked.
            x, context = self.encoder.contextualize(feats, padding_mask)
        _, layers = self.teacher.run_blocks(x, context, collect_top=cfg.average_top_k_layers)
        extra = cfg.num_extra_tokens
        layers = [layer[:, extra:] for layer in layers]  # drop CLS: [B, N, D] each
        return layer_targets(layers, per_layer=cfg.target_layer_norm, final=cfg.target_final_norm, impl=cfg.impl)

    def _mask_and_ids(
        self, batch: dict, batch_size: int, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = batch_size * self.cfg.clone_batch
        mask = batch.get("mask")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (rows, length):
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else repr(mask)
            raise ValueError(
                f"batch['mask'] must be bool [B*K, N] = [{batch_size}*{self.cfg.clone_batch}, {length}] "
                f"(True = masked, clone-major), got {got}; make it with make_masks"
            )
        ids_keep = batch.get("ids_keep")
        if ids_keep is None:
            ids_keep = mask_to_ids(mask)
        elif (
            not isinstance(ids_keep, torch.Tensor)
            or ids_keep.dtype not in (torch.int32, torch.int64)
            or ids_keep.dim() != 2
            or ids_keep.shape[0] != rows
        ):
            got = f"{ids_keep.dtype} {list(ids_keep.shape)}" if isinstance(ids_keep, torch.Tensor) else repr(ids_keep)
            raise ValueError(f"batch['ids_keep'] must be int [B*K = {rows}, kept], got {got}")
        return mask.to(device), ids_keep.to(device)

    def _loss_scale(self) -> float:
        return 1.0 / math.sqrt(self.cfg.embed_dim) if self.cfg.loss_scale is None else float(self.cfg.loss_scale)

    def _elementwise_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element squared error (loss_beta = 0) or smooth-L1 with loss_beta, in fp32, broadcasting."""
        if self.cfg.loss_beta == 0:
            return (pred.float() - target.float()).square()
        pred, target = torch.broadcast_tensors(pred.float(), target.float())
        return F.smooth_l1_loss(pred, target, reduction="none", beta=self.cfg.loss_beta)

    # -- EMA ------------------------------------------------------------------------------------------

    def ema_decay(self, step: int) -> float:
        """The teacher decay after ``step`` optimizer updates (a pure function of the step)."""
        cfg = self.cfg
        return ema_decay_schedule(step, cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_end_step)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Update the teacher after optimizer update number ``step`` (1 after the first update).

        With tau = ema_decay(step) < 1: every teacher parameter whose student twin trains becomes
        tau * teacher + (1 - tau) * student (``kernels.ema``, fp32 arithmetic); parameters the student
        does not train (the fixed image positions) and buffers are copied. With tau = 1 nothing changes
        (the teacher is frozen). A repeated call for the same step is ignored, so the update fires
        once per optimizer step, as the reference guards it.
        """
        if step == self.num_updates:
            return
        self.num_updates = step
        decay = self.ema_decay(step)
        if decay >= 1.0:
            return
        student = dict(self.encoder.named_parameters())
        averaged_t, averaged_s, copied_t, copied_s = [], [], [], []
        for name, t in self.teacher.named_parameters():
            s = student[name]
            (averaged_t if s.requires_grad else copied_t).append(t)
            (averaged_s if s.requires_grad else copied_s).append(s)
        student_buffers = dict(self.encoder.named_buffers())
        for name, t in self.teacher.named_buffers():
            copied_t.append(t)
            copied_s.append(student_buffers[name])
        ema_(averaged_t, averaged_s, decay, impl=self.cfg.impl)
        for t, s in zip(copied_t, copied_s):
            t.copy_(s)

    def variance_collapse(self, step: int, target_var: float, pred_var: float) -> str | None:
        """Why training must stop (ref 1.2 item 11: after 5,000 updates, target std < min_target_var or
        prediction std < min_pred_var), or None. Call it on logging steps with the logged values."""
        if step <= VARIANCE_CHECK_AFTER:
            return None
        if target_var < self.cfg.min_target_var:
            return f"target variance {target_var:.4g} < min_target_var {self.cfg.min_target_var} at step {step}"
        if pred_var < self.cfg.min_pred_var:
            return f"prediction variance {pred_var:.4g} < min_pred_var {self.cfg.min_pred_var} at step {step}"
        return None

    # -- encoder use, optimizer, data -----------------------------------------------------------------

    def forward_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The student encoder alone, unmasked: [B, extra + N, D] (images: CLS first). For probes and export."""
        return self.encoder(source, padding_mask)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters excluded from weight decay, as the reference tags them: every 1-D
        parameter (norms, biases, ALiBi scales), every ``.bias``, the ALiBi scales, plus the fixed image
        positions (not trained at all). The CLS token [1, 1, D] is decayed, as in the reference."""
        names = set()
        for name, param in self.named_parameters():
            if name.startswith("teacher."):
                continue
            if param.dim() <= 1 or name.endswith(".bias") or "alibi_scale" in name or name.endswith("pos_embed"):
                names.add(name)
        return names

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups over the student's trainable parameters: decayed and not decayed."""
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad and not name.startswith("teacher."):
                (no_decay if name in skip else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_frames(self, num_samples):
        """Audio: frames the CNN makes from ``num_samples`` samples (int or integer tensor)."""
        if self.cfg.modality != "audio":
            raise ValueError(f"num_frames is for audio models, this one is {self.cfg.modality!r}")
        return audio_num_frames(num_samples, self.cfg.conv_feature_layers)

    def make_masks(
        self, batch_size: int, length: int | None = None, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Masks for ``batch_size`` samples with this model's recipe; see the module function ``make_masks``."""
        return make_masks(self.cfg, batch_size, length, generator=generator)


def make_masks(
    cfg: Data2Vec2Config, batch_size: int, length: int | None = None, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """bool [batch_size * K, N] masks (True = masked, clone-major) for a batch, on the CPU.

    Images: inverse block masks on the patch grid (``length`` may be omitted). Audio: span masks over
    ``length`` frames (``num_frames(T)``). Text: uniform random masks over ``length`` tokens.
    """
    rows = batch_size * cfg.clone_batch
    if cfg.modality == "image":
        grid = cfg.grid
        if length is not None and length != grid[0] * grid[1]:
            raise ValueError(f"length must be the number of patches {grid[0] * grid[1]} (or None), got {length}")
        return inverse_block_mask(rows, grid, cfg.mask_ratio, cfg.mask_length, cfg.mask_prob_adjust, generator)
    if length is None:
        unit = "frames (num_frames(T))" if cfg.modality == "audio" else "tokens"
        raise ValueError(f"length is required for {cfg.modality}: the number of {unit}")
    if cfg.modality == "audio":
        return span_mask(rows, length, cfg.mask_ratio, cfg.mask_length, cfg.mask_prob_adjust, generator)
    return random_mask(rows, length, cfg.mask_ratio, generator)


def _target_std(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the per-channel std of the target over every masked (clone, position),
    computed without repeating the target: position (b, n) counts as many times as clones mask it.
    target [B, N, D] fp32, mask [B, K, N] bool."""
    weights = mask.sum(dim=1).to(target.dtype)  # [B, N]
    count = weights.sum()
    mean = torch.einsum("bn,bnd->d", weights, target) / count
    var = torch.einsum("bn,bnd->d", weights, (target - mean).square()) / (count - 1)
    return torch.sqrt(var + 1e-6).mean()


def _masked_std(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the per-channel std of pred [R, N, D] over the masked positions [R, N]."""
    masked = pred.detach()[mask].float()  # [M, D]
    return torch.sqrt(masked.var(dim=0) + 1e-6).mean()


def count_parameters(module: nn.Module, trainable: bool | None = None) -> int:
    """Number of parameter elements: all (None), only trainable (True) or only frozen (False) ones."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


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
