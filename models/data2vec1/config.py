"""data2vec 1.0's config: every field with its meaning, the checks, and the released presets (fairseq
``examples/data2vec/config``).

``data2vec1_config(modality, size, **overrides)`` gives a released model's config: width, heads and
depth from ``sizes.ENCODER_SIZES`` (data2vec 1.0 has no prenet: ``total_depth`` plain blocks, the same
size as data2vec 2.0's), everything else from ``DATA2VEC1_PRESETS`` (fairseq
``examples/data2vec/config/{audio,text,vision}/pretraining/*``). What differs by modality is data
here (which blocks, which mask, which teacher parts are copied), never a branch in the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..config import (
    AudioFields,
    ConfigChecker,
    Dropouts,
    EncoderConfig,
    ImageFields,
    MaskToken,
    TeacherTargets,
    TextFields,
    build_preset,
)

__all__ = ["Data2Vec1Config", "DATA2VEC1_PRESETS", "data2vec1_config"]


@dataclass(kw_only=True, slots=True)
class Data2Vec1Config(TeacherTargets, MaskToken, TextFields, AudioFields, ImageFields, Dropouts, EncoderConfig):
    """Everything that defines a data2vec 1.0 model and its training objective.

    Build one with ``data2vec1_config(modality, size, **overrides)``; the shared fields are documented
    where ``config`` declares them, and the presets set the per-modality values of the reference.
    """

    finetune_names: ClassVar[dict[str, tuple[str, ...]]] = {
        "dropout": ("encoder_dropout", "post_mlp_dropout", "input_dropout"), "dropout_input": (),
    }  # fmt: skip
    """fairseq's ``dropout`` is the transformer's: after attention, after the FFN and after the input
    LayerNorm (``TransformerEncoder``), which this config splits in three."""

    # -- encoder: data2vec 1.0's block flavours -----------------------------------------------------------
    layer_norm_first: bool = False
    """Pre-norm blocks followed by a final LayerNorm (vision, BEiT's blocks) instead of post-norm blocks
    (audio: wav2vec 2.0's, text: RoBERTa's)."""
    layer_scale_init: float = 0.0
    """Initial value of BEiT's per-channel layer-scale gammas (vision 1e-4); 0 = none. Pre-norm only."""
    input_norm: bool = False
    """LayerNorm on the positioned tokens before the blocks (audio: wav2vec 2.0's encoder layer_norm;
    text has its embedding LayerNorm inside the token embedding instead)."""
    input_dropout: float = 0.0
    """Dropout after the input norm, before the blocks (audio 0.1)."""
    post_mlp_dropout: float = 0.0
    """Dropout on the FFN output before the residual add (0.1 audio, text)."""
    drop_path_rate: float = 0.0
    """Stochastic depth, spaced linearly from 0 over the blocks (vision 0.25)."""
    alibi: bool = False
    """ALiBi with a learned per-head scale in the audio attention (data2vec 2.0's); data2vec 1.0 has
    only the conv positions, so False."""

    # -- text -----------------------------------------------------------------------------------------
    vocab_size: int = 50264
    """Token ids of the data in [0, vocab_size); set from the tokenizer. The default is RoBERTa's
    GPT-2 BPE dictionary without its ``<mask>``, which ``mask_idx=None`` appends as id 50264."""

    # -- masking (the data loader makes one mask per sample) -----------------------------------------
    masking: Literal["wav2vec_span", "mlm_span", "beit_block"] = "wav2vec_span"
    """The mask algorithm (``masking``): "wav2vec_span" (audio: ``compute_mask_indices``), "mlm_span"
    (text: ``MaskTokensDataset`` with ``mask_multiple_length``), "beit_block" (vision: BEiT)."""
    mask_prob: float = 0.65
    """Span masking probability of a start (audio 0.65, text 0.35)."""
    mask_length: int = 10
    """Span length (audio 10, text 4)."""
    min_masks: int = 2
    """Fewest spans per row for "wav2vec_span" (fairseq's 2)."""
    num_mask_patches: int = 75
    """Patches masked per image for "beit_block" (75 of 196)."""
    min_mask_patches: int = 16
    """Smallest BEiT block area in patches (16)."""
    mask_min_aspect: float = 0.3
    """Smallest BEiT block aspect ratio (0.3; the largest is 1 / 0.3)."""
    mask_fill: Literal["uniform", "normal", "token"] = "uniform"
    """What the student sees at masked positions: a learned vector replacing the local features,
    initialised U(0, 1) ("uniform", audio ``mask_emb``) or trunc-normal std 0.02 ("normal", vision),
    or the input token ``mask_idx`` ("token", text)."""

    # -- head, targets and loss ---------------------------------------------------------------------
    head_layers: int = 1
    """Prediction head: 1 = Linear(D -> D) (``final_proj``); 2 = Linear(D -> 2D), GELU, Linear(2D -> D)
    (text ``regression_head``)."""
    end_of_block_targets: bool = False
    """Average block outputs (vision) instead of FFN outputs before the last residual (audio, text)."""
    # -- EMA teacher ----------------------------------------------------------------------------------
    teacher_omits: tuple[str, ...] = ("local_encoder",)
    """Encoder parts the teacher does not own; it then uses the student's (detached) output of them:
    audio and vision the local encoder (CNN / patch embedding), text nothing."""
    teacher_copies: tuple[str, ...] = ("pos_conv",)
    """Teacher parameters copied from the student every step instead of averaged (fairseq
    ``skip_keys``): audio the conv positions, text the token/position embeddings and their LayerNorm
    (``local_encoder``), vision the CLS token and the fixed positions (the reference feeds the EMA
    transformer the student's)."""

    @property
    def mask_token(self) -> int:
        """The ``<mask>`` id the text student sees (``mask_idx``, or vocab_size when appended)."""
        return self.vocab_size if self.mask_idx is None else self.mask_idx

    def _check_fields(self, check: ConfigChecker) -> None:
        """Raise ValueError naming the field and the fix for every bad value or combination."""
        fail = check.fail
        check.choice("masking", ("wav2vec_span", "mlm_span", "beit_block"))
        check.choice("mask_fill", ("uniform", "normal", "token"))
        for name in ("mask_length", "num_mask_patches", "min_mask_patches"):
            check.int(name, 1)
        check.int("min_masks", 0)
        for name in ("input_dropout", "post_mlp_dropout", "drop_path_rate"):
            check.fraction(name)
        check.nonnegative("layer_scale_init")
        check.open_fraction("mask_prob", "use e.g. 0.65 (audio) or 0.35 (text)")
        if not 0.0 < self.mask_min_aspect <= 1.0:
            fail("mask_min_aspect", f"must lie in (0, 1], got {self.mask_min_aspect!r}", "use 0.3")
        if self.head_layers not in (1, 2):
            fail("head_layers", f"must be 1 or 2, got {self.head_layers!r}", "use 1 (audio, vision) or 2 (text)")
        if self.layer_scale_init > 0 and not self.layer_norm_first:
            fail("layer_scale_init", f"({self.layer_scale_init}) needs layer_norm_first (pre-norm blocks)",
                 "set layer_norm_first: true or layer_scale_init: 0")  # fmt: skip
        # The one place the modality is asked: which mask and mask fill fit its input.
        if self.masking != _MASKING_OF[self.modality]:
            fail("masking", f"must be {_MASKING_OF[self.modality]!r} for {self.modality}, got {self.masking!r}",
                 "use the modality's masking")  # fmt: skip
        if (self.mask_fill == "token") != (self.modality == "text"):
            fail("mask_fill", f"{self.mask_fill!r} does not fit {self.modality} (text masks token ids with 'token'; "
                 "audio and vision replace features with 'uniform' or 'normal')", "use the preset's value")  # fmt: skip
        if self.modality == "image" and self.num_mask_patches >= self.grid[0] * self.grid[1]:
            fail("num_mask_patches", f"({self.num_mask_patches}) must be below the {self.grid[0] * self.grid[1]} "
                 "patches", "mask fewer patches")  # fmt: skip


_MASKING_OF = {"audio": "wav2vec_span", "text": "mlm_span", "image": "beit_block"}


# ---------------------------------------------------------------------------------------------------
# Presets: the released configurations (fairseq ``examples/data2vec/config``), plus tiny ones for CPU runs
# ---------------------------------------------------------------------------------------------------

# base_librispeech: wav2vec 2.0's post-norm encoder (conv positions, LayerNorm, dropout 0.1, blocks).
_AUDIO = dict(
    norm_eps=1e-5, encoder_dropout=0.1, attention_dropout=0.1, post_mlp_dropout=0.1, input_norm=True,
    input_dropout=0.1, layerdrop=0.05, alibi=False, masking="wav2vec_span", mask_prob=0.65, mask_length=10,
    mask_fill="uniform", head_layers=1, average_top_k_layers=8, end_of_block_targets=False,
    target_layer_norm="instance", target_final_norm=None, loss_beta=0.0, loss_scale=None,
    teacher_omits=("local_encoder",), teacher_copies=("pos_conv",), ema_decay=0.999, ema_end_decay=0.9999,
    ema_anneal_end_step=30_000,
)  # fmt: skip
# text base: RoBERTa's post-norm encoder (embedding LayerNorm + dropout inside the token embedding).
_TEXT = dict(
    norm_eps=1e-5, encoder_dropout=0.1, attention_dropout=0.1, post_mlp_dropout=0.1, embed_dropout=0.1,
    masking="mlm_span", mask_prob=0.35, mask_length=4, mask_fill="token", head_layers=2,
    average_top_k_layers=10, end_of_block_targets=False, target_layer_norm="layer", target_final_norm=None,
    loss_beta=4.0, loss_scale=1.0, teacher_omits=(), teacher_copies=("local_encoder",), ema_decay=0.999,
    ema_end_decay=0.9999, ema_anneal_end_step=300_000,
)  # fmt: skip
# base_imagenet_d2v1 (fairseq's re-implementation): BEiT pre-norm blocks with layer-scale; fixed
# sin-cos positions stand in for BEiT's shared relative position bias (see the README).
_IMAGE = dict(
    norm_eps=1e-6, layer_norm_first=True, layer_scale_init=1e-4, drop_path_rate=0.25, masking="beit_block",
    num_mask_patches=75, min_mask_patches=16, mask_min_aspect=0.3, mask_fill="normal", head_layers=1,
    average_top_k_layers=6, end_of_block_targets=True, target_layer_norm=None, target_final_norm="layer",
    loss_beta=2.0, loss_scale=None, teacher_omits=("local_encoder",), teacher_copies=("cls_token", "pos_embed"),
    ema_decay=0.999, ema_end_decay=0.9998, ema_anneal_end_step=375_300, min_target_var=0.0, min_pred_var=0.0,
)  # fmt: skip

DATA2VEC1_PRESETS: dict[tuple[str, str], dict] = {
    ("audio", "base"): _AUDIO,
    ("text", "base"): _TEXT,
    ("image", "base"): _IMAGE,
    # tiny: the data2vec 2.0 tiny sizes and local encoders, top-2 targets, EMA annealed over a CPU run.
    ("audio", "tiny"): dict(_AUDIO, conv_feature_layers=((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2,
                            average_top_k_layers=2, ema_anneal_end_step=200),
    ("text", "tiny"): dict(_TEXT, average_top_k_layers=2, ema_anneal_end_step=200),
    ("image", "tiny"): dict(_IMAGE, image_size=32, patch_size=4, num_mask_patches=24, min_mask_patches=4,
                            average_top_k_layers=2, ema_anneal_end_step=300),
}  # fmt: skip


def data2vec1_config(modality: str, size: str, **overrides) -> Data2Vec1Config:
    """The preset ``(modality, size)``'s model config, with ``overrides`` applied (any field).

    Width and heads come from ``sizes.ENCODER_SIZES``, depth is its ``total_depth`` (no prenet); the
    rest from ``DATA2VEC1_PRESETS``.
    """
    return build_preset(Data2Vec1Config, DATA2VEC1_PRESETS, "data2vec 1.0", modality, size, overrides)
