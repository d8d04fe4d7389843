"""The RoBERTa-style masked LM's config: every field with its meaning, the checks, and the presets.

``mlm_config(modality, size, **overrides)`` gives a preset's model config; width, heads and depth
come from ``sizes.ENCODER_SIZES`` (``total_depth`` post-norm blocks: the same text encoder as
data2vec 2.0's), everything else from ``MLM_PRESETS``. Text only.

The ``<mask>`` token. The text data gives the tokenizer's ``<mask>`` id as ``mask_idx`` (the BPE
d2v2 trains has RoBERTa's special tokens, ``<mask>`` = 4); the embedding then has ``vocab_size``
rows. A tokenizer without one (a given tokenizer.json) gives None: the model then reserves the id
``vocab_size``, which the tokenizer never produces, and the token embedding, and so the tied output
layer, has ``vocab_size + 1`` rows (``num_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigChecker, Dropouts, EncoderConfig, MaskToken, TextFields, build_preset

__all__ = ["MLMConfig", "MLM_PRESETS", "mlm_config"]


@dataclass(kw_only=True, slots=True)
class MLMConfig(MaskToken, TextFields, Dropouts, EncoderConfig):
    """Everything that defines a RoBERTa-style masked LM (Liu et al., "RoBERTa: A Robustly Optimized
    BERT Pretraining Approach", 2019; fairseq ``models/roberta/model.py``, ``data/mask_tokens_dataset.py``,
    ``criterions/masked_lm.py``).

    Build one with ``mlm_config("text", size, **overrides)``: the encoder is data2vec 2.0's post-norm
    text encoder (``depth`` = the size table's total_depth); the shared fields are documented where
    ``config`` declares them, and the presets hold RoBERTa's dropouts (0.1).
    """

    modalities = ("text",)  # a masked language model
    post_mlp_dropout: float = 0.0
    """Dropout on the FFN output before the residual add (RoBERTa's dropout 0.1)."""

    # -- masking (the data loader selects the tokens; the corruption is drawn in the step) -------------
    mask_ratio: float = 0.15
    """Fraction of tokens selected for prediction (RoBERTa: 0.15; floor(L * 0.85) tokens kept: 435 of 512)."""
    mask_token_prob: float = 0.8
    """Of the selected tokens, the fraction replaced by ``<mask>`` (0.8)."""
    random_token_prob: float = 0.1
    """Of the selected tokens, the fraction replaced by a uniformly random token (0.1); the remaining
    1 - mask_token_prob - random_token_prob (0.1) are left unchanged."""

    @property
    def mask_token_id(self) -> int:
        """The ``<mask>`` id the model feeds: mask_idx, or the reserved vocab_size."""
        return self.vocab_size if self.mask_idx is None else self.mask_idx

    def _check_fields(self, check: ConfigChecker) -> None:
        """Raise ValueError naming the field and the fix for every bad value or combination."""
        check.fraction("post_mlp_dropout")
        for name in ("mask_token_prob", "random_token_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                check.fail(name, f"must be a probability in [0, 1], got {value!r}", "use a value in [0, 1]")
        if self.mask_token_prob + self.random_token_prob > 1.0 + 1e-9:
            check.fail("random_token_prob", f"({self.random_token_prob}) + mask_token_prob ({self.mask_token_prob}) "
                       "exceeds 1", "lower either (RoBERTa: 0.8 and 0.1)")  # fmt: skip
        check.open_fraction("mask_ratio", "select some but not all tokens (0.15)")
        if self.num_embeddings - (self.padding_idx is not None) < 2:
            check.fail("vocab_size", f"({self.vocab_size}) leaves no token to draw as a random replacement",
                       "use a real vocabulary")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Presets: RoBERTa base (ref: the RoBERTa paper and fairseq's roberta.base), and a tiny one
# ---------------------------------------------------------------------------------------------------

_ROBERTA = dict(norm_eps=1e-5, encoder_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
                post_mlp_dropout=0.1, embed_dropout=0.1, layerdrop=0.0, mask_ratio=0.15, mask_token_prob=0.8,
                random_token_prob=0.1)  # fmt: skip

MLM_PRESETS: dict[tuple[str, str], dict] = {
    ("text", "base"): dict(_ROBERTA),  # 768 wide, 12 blocks, 12 heads
    ("text", "tiny"): dict(_ROBERTA),  # data2vec 2.0's text tiny: 64 wide, 2 blocks, 4 heads
}


def mlm_config(modality: str, size: str, **overrides) -> MLMConfig:
    """The masked-LM preset ``(modality, size)``'s model config, with ``overrides`` applied (any field).

    Width, heads and depth (``total_depth``) come from ``sizes.ENCODER_SIZES``.
    """
    return build_preset(MLMConfig, MLM_PRESETS, "masked-LM", modality, size, overrides)
