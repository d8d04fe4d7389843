"""A fairseq CTC fine-tune (``wav2vec_ctc``) as a d2v2 speech-recognition run folder.

fairseq's ``Wav2VecCtc`` (``fairseq/models/wav2vec/wav2vec2_asr.py``) keeps its encoder under
``w2v_encoder.w2v_model.`` and its head as ``w2v_encoder.proj``: the logits are ``proj(final_dropout(x))``
of the encoder's output x, d2v2's ``CTCHead``. The head's rows are fairseq's ``Dictionary`` over the
fine-tuning data's ``dict.ltr.txt`` (``<s>``, ``<pad>``, ``</s>``, ``<unk>``, then the file's letters in its
order), the blank ``<s>`` at 0 (``audio_finetuning``'s ``blank_symbol``): d2v2's letter vocabulary
(``engine.data.letters``) row for row, so the head is copied as it is, given the dictionary it was
trained with (LibriSpeech's unless ``--dict``).

The run folder is the one ``d2v2 finetune`` writes for ``speech-recognition``: ``config.yaml`` (the
``finetune-speech-*`` recipe of the encoder's size, with the checkpoint's fine-tuning settings over it:
dropouts, LayerDrop, masks, frozen updates; the encoder's method and whole config; the letters) and the
recogniser's weights in ``checkpoints/step-00000000``, weights only, which ``evaluate``, ``transcribe``
and ``export`` read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from d2v2.models import ENCODER_SIZES

from ..training.checkpoint import CheckpointWriteError, save_checkpoint, step_folder
from ..config import to_dict
from ..data.letters import SPECIALS, STANDARD, Letters, read_dictionary
from ..training.runfolder import write_config, write_failure

__all__ = ["HEAD", "ctc_head", "recognizer_letters", "write_recognizer"]

HEAD = "w2v_encoder.proj."
"""The CTC head's names in a ``wav2vec_ctc`` checkpoint (``weight`` [V, D], ``bias`` [V])."""
SETTINGS = (
    ("dropout", "model.dropout"), ("activation_dropout", "model.activation_dropout"),
    ("attention_dropout", "model.attention_dropout"), ("dropout_input", "model.dropout_input"),
    ("layerdrop", "model.layerdrop"), ("final_dropout", "head.dropout"), ("mask_prob", "head.mask_prob"),
    ("mask_length", "head.mask_length"), ("mask_channel_prob", "head.mask_channel_prob"),
    ("mask_channel_length", "head.mask_channel_length"), ("freeze_finetune_updates", "head.freeze_updates"),
)  # fmt: skip
"""fairseq's fine-tuning settings (``Wav2Vec2AsrConfig``) and the fine-tuning run's fields they set (a
recipe's ``model`` section takes fairseq's names, which each method spreads over its own fields)."""


def ctc_head(outside: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (weight, bias) of a CTC fine-tune's head among the checkpoint's tensors outside the encoder,
    or None when it has none."""
    weight, bias = outside.get(HEAD + "weight"), outside.get(HEAD + "bias")
    if not torch.is_tensor(weight) or not torch.is_tensor(bias):
        return None
    if weight.dim() != 2 or tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"the checkpoint's CTC head {HEAD}weight / bias has shapes {list(weight.shape)} / "
                         f"{list(bias.shape)}, not [V, D] / [V]; it is not a wav2vec_ctc head")  # fmt: skip
    return weight, bias


def recognizer_letters(rows: int, dictionary: str | Path | None) -> Letters:
    """The letter vocabulary of a CTC head of ``rows`` outputs: ``dictionary`` (a ``dict.ltr.txt``) or
    LibriSpeech's; a one-line error when their sizes differ."""
    letters = read_dictionary(dictionary) if dictionary is not None else STANDARD
    if len(letters) != rows:
        where = f"--dict {dictionary}" if dictionary is not None else "LibriSpeech's dict.ltr.txt (the default)"
        raise ValueError(f"the checkpoint's CTC head has {rows} outputs but {where} makes {len(letters)} ({len(SPECIALS)} "
                         f"specials + {len(letters) - len(SPECIALS)} letters); give the dict.ltr.txt it was fine-tuned "
                         "with: --dict PATH")  # fmt: skip
    return letters


def _settings(fine_tune_cfg: dict, notes: list[str]) -> list[str]:
    """The fine-tuning run's overrides from a ``wav2vec_ctc`` config (values that are not numbers, such
    as unresolved interpolations, leave the recipe's, saying so)."""
    overrides = []
    for source, field in SETTINGS:
        value = fine_tune_cfg.get(source)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            notes.append(f"model.{source}={value!r} is not a number: the recipe's {field} is kept")
            continue
        overrides.append(f"{field}={json.dumps(value)}")
    if fine_tune_cfg.get("apply_mask") is False:
        overrides.append("head.mask_prob=0.0")
    if isinstance(fine_tune_cfg.get("feature_grad_mult"), (int, float)):
        overrides.append(f"head.freeze_feature_encoder={json.dumps(fine_tune_cfg['feature_grad_mult'] == 0)}")
    return overrides


def write_recognizer(out: Path, method_name: str, method, head: tuple[torch.Tensor, torch.Tensor], letters: Letters,
                     fine_tune_cfg: dict, provenance: dict, notes: list[str]) -> Path:  # fmt: skip
    """Write the recogniser of ``method``'s encoder (with the checkpoint's weights) and the CTC ``head``
    over ``letters`` into the new run folder ``out``; returns the checkpoint folder.

    The run's config is the ``finetune-speech`` recipe of the encoder's width (base or large, 10 h;
    else the tiny one) with the checkpoint's fine-tuning settings (``fine_tune_cfg``) over it; what
    was not carried over goes to ``notes``.
    """
    # Here, not at the top: the engine's export and fine-tuning import this package's key tables.
    from ..export import encoder_state
    from ..finetune.config import resolve_finetune_config
    from ..finetune.run import build_model, encoder_config, resolved_config

    sizes = ENCODER_SIZES["audio"]
    size = min(("tiny", "base", "large"), key=lambda s: abs(sizes[s].embed_dim - method.cfg.embed_dim))
    recipe = "finetune-speech-tiny" if size == "tiny" else f"finetune-speech-{size}-10h"
    cfg = resolve_finetune_config(recipe, [f"pretrained.checkpoint={json.dumps(provenance['source'])}", "data.path=null",
                                           *_settings(fine_tune_cfg, notes)])  # fmt: skip
    model_cfg = encoder_config(method_name, to_dict(method.cfg), cfg.model, "model")
    model = build_model(cfg, method_name, model_cfg, list(letters.symbols))
    model.load_encoder(encoder_state(method, "student"), method)
    weight, bias = head
    if weight.shape[1] != model_cfg.embed_dim:
        raise ValueError(f"the checkpoint's CTC head takes {weight.shape[1]} features, its encoder gives "
                         f"{model_cfg.embed_dim}; the config and weights disagree")  # fmt: skip
    with torch.no_grad():
        model.head.linear.weight.copy_(weight)
        model.head.linear.bias.copy_(bias)
    resolved = resolved_config(cfg, method_name, model_cfg, list(letters.symbols))
    state = {"method": model.state_dict(), "config": resolved, "imported": {**provenance, "notes": notes}}
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out, 0, state, keep=0)
        write_config(out, resolved)
    except (OSError, CheckpointWriteError) as e:
        raise write_failure(out, e.__cause__ or e, created) from e
    return step_folder(out, 0)
