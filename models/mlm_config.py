"""The RoBERTa-style masked LM's config: every field with its meaning, the checks, and the presets.

``mlm_config(modality, size, **overrides)`` gives a preset's model config; width, heads and depth
come from ``sizes.ENCODER_SIZES`` (``total_depth`` post-norm blocks: the same text encoder as
data2vec 2.0's), everything else from ``MLM_RECIPES``. Text only.

The ``<mask>`` token. The text data gives the tokenizer's ``<mask>`` id as ``mask_idx`` (the BPE
d2v2 trains has RoBERTa's special tokens, ``<mask>`` = 4); the embedding then has ``vocab_size``
rows. A tokenizer without one (a given tokenizer.json) gives None: the model then reserves the id
``vocab_size``, which the tokenizer never produces, and the token embedding, and so the tied output
layer, has ``vocab_size + 1`` rows (``num_embeddings``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .modalities import MODALITIES
from .sizes import plain_preset

__all__ = ["MLMConfig", "MLM_RECIPES", "mlm_config"]


@dataclass(kw_only=True, slots=True)
class MLMConfig:
    """Everything that defines a RoBERTa-style masked LM (Liu et al., "RoBERTa: A Robustly Optimized
    BERT Pretraining Approach", 2019; fairseq ``models/roberta/model.py``, ``data/mask_tokens_dataset.py``,
    ``criterions/masked_lm.py``).

    Build one with ``mlm_config("text", size, **overrides)``; the defaults are RoBERTa base's.
    """

    modality: Literal["text"] = "text"
    """Input modality: only "text" (source [B, L] token ids)."""

    # -- encoder (post-norm, as data2vec 2.0's text encoder) ------------------------------------------
    embed_dim: int = 768
    """Model width D."""
    num_heads: int = 12
    """Attention heads; embed_dim must be divisible by it."""
    depth: int = 12
    """Post-norm blocks (the size table's total_depth)."""
    mlp_ratio: float = 4.0
    """FFN hidden width as a multiple of D."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon of the embedding, the blocks and the LM head."""
    encoder_dropout: float = 0.1
    """Dropout after each attention output projection (RoBERTa's dropout 0.1)."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities (0.1)."""
    activation_dropout: float = 0.0
    """Dropout inside the FFN, after GELU and after fc2 (0)."""
    post_mlp_dropout: float = 0.1
    """Dropout on the FFN output before the residual add (RoBERTa's dropout 0.1)."""
    layerdrop: float = 0.0
    """Probability of skipping each block in a step (0 for RoBERTa)."""

    # -- text -----------------------------------------------------------------------------------------
    vocab_size: int = 50265
    """Token ids the tokenizer produces, [0, vocab_size); the default is RoBERTa's GPT-2 BPE dictionary
    size. The data sets it from the tokenizer."""
    max_positions: int = 512
    """Longest token sequence (learned positions)."""
    padding_idx: int | None = 1
    """Padding token id (fairseq's pad is 1); its embedding row is zero, it is never selected for
    prediction and never drawn as a random replacement. None for no padding token."""
    embed_dropout: float = 0.1
    """Dropout after the embedding LayerNorm."""
    mask_idx: int | None = None
    """Id of the ``<mask>`` token: the tokenizer's own, in [0, vocab_size) (the data sets it), or None
    to reserve the id vocab_size (one extra embedding row; see the module docstring)."""

    # -- masking (the data loader selects the tokens; the corruption is drawn in the step) -------------
    mask_ratio: float = 0.15
    """Fraction of tokens selected for prediction (RoBERTa: 0.15; floor(L * 0.85) tokens kept: 435 of 512)."""
    mask_token_prob: float = 0.8
    """Of the selected tokens, the fraction replaced by ``<mask>`` (0.8)."""
    random_token_prob: float = 0.1
    """Of the selected tokens, the fraction replaced by a uniformly random token (0.1); the remaining
    1 - mask_token_prob - random_token_prob (0.1) are left unchanged."""

    # -- kernels ------------------------------------------------------------------------------------
    impl: Literal["auto", "triton", "torch"] = "auto"
    """Kernel implementation for every d2v2.kernels op: "auto" (Triton on CUDA), "triton" or "torch"."""

    def __post_init__(self) -> None:
        _check_config(self)

    @property
    def mask_token_id(self) -> int:
        """The ``<mask>`` id the model feeds: mask_idx, or the reserved vocab_size."""
        return self.vocab_size if self.mask_idx is None else self.mask_idx

    @property
    def num_embeddings(self) -> int:
        """Rows of the token embedding and outputs of the LM head: vocab_size, + 1 for a reserved ``<mask>``."""
        return self.vocab_size + (1 if self.mask_idx is None else 0)


def _check_config(cfg: MLMConfig) -> None:
    """Raise ValueError naming the field and the fix for every bad value or combination."""

    def fail(field: str, problem: str, fix: str) -> None:
        raise ValueError(f"MLMConfig.{field} {problem}; {fix}")

    if cfg.modality != "text":
        fail("modality", f"must be 'text' (a masked language model), got {cfg.modality!r}",
             "use data2vec2, mae or wav2vec2 for other modalities")  # fmt: skip
    if cfg.impl not in ("auto", "triton", "torch"):
        fail("impl", f"must be one of ('auto', 'triton', 'torch'), got {cfg.impl!r}", "pick one of those")
    for name in ("embed_dim", "num_heads", "depth", "vocab_size", "max_positions"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(name, f"must be an int >= 1, got {value!r}", "set it to an int >= 1")
    for name in ("mlp_ratio", "norm_eps"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            fail(name, f"must be a finite number > 0, got {value!r}", "use e.g. 4.0 / 1e-5")
    for name in ("encoder_dropout", "attention_dropout", "activation_dropout", "post_mlp_dropout", "layerdrop",
                 "embed_dropout", "mask_token_prob", "random_token_prob"):  # fmt: skip
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            fail(name, f"must be a probability in [0, 1], got {value!r}", "use a value in [0, 1]")
    if cfg.mask_token_prob + cfg.random_token_prob > 1.0 + 1e-9:
        fail("random_token_prob", f"({cfg.random_token_prob}) + mask_token_prob ({cfg.mask_token_prob}) exceeds 1",
             "lower either (RoBERTa: 0.8 and 0.1)")  # fmt: skip
    if isinstance(cfg.mask_ratio, bool) or not isinstance(cfg.mask_ratio, (int, float)) or not 0 < cfg.mask_ratio < 1:
        fail("mask_ratio", f"must lie in (0, 1), got {cfg.mask_ratio!r}", "select some but not all tokens (0.15)")
    if cfg.embed_dim % cfg.num_heads != 0:
        fail("embed_dim", f"({cfg.embed_dim}) must be divisible by num_heads ({cfg.num_heads})", "change either")
    MODALITIES[cfg.modality].check_config(cfg, fail)  # padding_idx
    if cfg.mask_idx is not None and (
        isinstance(cfg.mask_idx, bool) or not isinstance(cfg.mask_idx, int) or not 0 <= cfg.mask_idx < cfg.vocab_size
        or cfg.mask_idx == cfg.padding_idx
    ):  # fmt: skip
        fail("mask_idx", f"must be None or an id in [0, vocab_size={cfg.vocab_size}) other than padding_idx, got "
             f"{cfg.mask_idx!r}", "use None to reserve the id vocab_size, or the tokenizer's <mask> id")  # fmt: skip
    if cfg.num_embeddings - (cfg.padding_idx is not None) < 2:
        fail("vocab_size", f"({cfg.vocab_size}) leaves no token to draw as a random replacement", "use a real vocabulary")


# ---------------------------------------------------------------------------------------------------
# Presets: RoBERTa base (ref: the RoBERTa paper and fairseq's roberta.base), and a tiny one
# ---------------------------------------------------------------------------------------------------

_ROBERTA = dict(norm_eps=1e-5, encoder_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
                post_mlp_dropout=0.1, embed_dropout=0.1, layerdrop=0.0, mask_ratio=0.15, mask_token_prob=0.8,
                random_token_prob=0.1)  # fmt: skip

MLM_RECIPES: dict[tuple[str, str], dict] = {
    ("text", "base"): dict(_ROBERTA),  # 768 wide, 12 blocks, 12 heads
    ("text", "tiny"): dict(_ROBERTA),  # data2vec 2.0's text tiny: 64 wide, 2 blocks, 4 heads
}


def mlm_config(modality: str, size: str, **overrides) -> MLMConfig:
    """The masked-LM preset ``(modality, size)``'s model config, with ``overrides`` applied (any field).

    Width, heads and depth (``total_depth``) come from ``sizes.ENCODER_SIZES``.
    """
    return plain_preset(MLMConfig, MLM_RECIPES, "masked-LM", modality, size, **overrides)
