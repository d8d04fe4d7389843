"""Hugging Face's side of an exported speech recogniser: config.json's CTC fields and the processor files.

``Wav2Vec2ForCTC`` / ``Data2VecAudioForCTC`` read ``vocab_size``, the special ids and the masks of
fine-tuning from config.json; ``Wav2Vec2Processor.from_pretrained(folder)`` reads ``vocab.json``,
``tokenizer_config.json`` and ``special_tokens_map.json`` (``Wav2Vec2CTCTokenizer``) and
``preprocessor_config.json`` (``Wav2Vec2FeatureExtractor``). All are written as plain JSON: exporting
needs no transformers.

The vocabulary keeps our rows (``engine.data.letters``: fairseq's ``Dictionary`` order), so the logits
need no reordering; only the names of rows 0 and 1 swap, as in the checkpoints Hugging Face converted
from fairseq: our blank ``<s>`` (0) is HF's ``<pad>`` (its CTC blank is the pad token), our ``<pad>`` (1)
its ``<s>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.audio import SAMPLE_RATE
from ..data.letters import BLANK, PAD, WORD_BOUNDARY

__all__ = ["PROCESSOR_FILES", "hf_vocabulary", "ctc_config", "write_processor"]

PROCESSOR_FILES = ("vocab.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
"""``Wav2Vec2CTCTokenizer``'s special tokens, under HF's names of our rows (``hf_vocabulary``)."""


def hf_vocabulary(symbols) -> dict[str, int]:
    """Our vocabulary (``Letters.symbols``: specials first, blank at 0) as HF's ``vocab.json``: token -> row."""
    names = list(symbols)
    names[BLANK], names[PAD] = "<pad>", "<s>"
    return {name: row for row, name in enumerate(names)}


def ctc_config(symbols, dropout: float, head, min_spans: int) -> dict:
    """config.json's fields of a CTC model over ``symbols``: the vocabulary, the blank as HF's pad id,
    the loss, the head's dropout (``final_dropout``) and fine-tuning's masks (``head``: the run's
    ``HeadConfig``; ``min_spans``: the fewest time spans, the method's ``MaskFill.min_spans``)."""
    vocab = hf_vocabulary(symbols)
    return {
        "vocab_size": len(vocab),
        "pad_token_id": BLANK,
        "bos_token_id": vocab["<s>"],
        "eos_token_id": vocab["</s>"],
        # fairseq's (and ours): the summed CTC loss, which we also divide by the utterances (a constant)
        "ctc_loss_reduction": "sum",
        "ctc_zero_infinity": True,
        "final_dropout": dropout,
        "use_weighted_layer_sum": False,
        "apply_spec_augment": head.mask_prob > 0 or head.mask_channel_prob > 0,
        "mask_time_prob": head.mask_prob,
        "mask_time_length": head.mask_length,
        "mask_time_min_masks": min_spans,
        "mask_feature_prob": head.mask_channel_prob,
        "mask_feature_length": head.mask_channel_length,
        "mask_feature_min_masks": 0,
    }


def write_processor(folder: Path, symbols, layer_norm_cnn: bool) -> list[str]:
    """``Wav2Vec2Processor``'s files for ``symbols`` into ``folder``; returns their names.

    The feature extractor normalises each utterance (as d2v2's data and ``transcribe`` do) and returns
    an attention mask where the CNN has a LayerNorm in every layer (HF's rule: a GroupNorm CNN was
    trained on zero-padded batches without one)."""
    files = {
        "vocab.json": hf_vocabulary(symbols),
        "tokenizer_config.json": {
            "tokenizer_class": "Wav2Vec2CTCTokenizer", "processor_class": "Wav2Vec2Processor", **SPECIAL_TOKENS,
            "word_delimiter_token": WORD_BOUNDARY, "replace_word_delimiter_char": " ", "do_lower_case": False,
            # a transcript of letters has nothing to clean up, and the clean-up would join a lone "'" to its words
            "clean_up_tokenization_spaces": False,
        },
        "special_tokens_map.json": SPECIAL_TOKENS,
        "preprocessor_config.json": {
            "feature_extractor_type": "Wav2Vec2FeatureExtractor", "processor_class": "Wav2Vec2Processor",
            "feature_size": 1, "sampling_rate": SAMPLE_RATE, "padding_value": 0.0, "padding_side": "right",
            "do_normalize": True, "return_attention_mask": layer_norm_cnn,
        },
    }  # fmt: skip
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
    return list(files)
