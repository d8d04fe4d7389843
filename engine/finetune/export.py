"""``d2v2 export`` of a fine-tuned run: the encoder with its head.

Where the encoder's standard class has a class whose head is ours, the folder loads into it:

- classification (``interop.standard_targets.HEAD_TARGETS``): Hugging Face's ``Data2VecText`` /
  ``Roberta`` / ``Wav2Vec2`` / ``Data2VecAudio`` ``ForSequenceClassification`` and
  ``Data2VecVisionForImageClassification``, with the class names as its labels;
- speech recognition (``CTC_TARGETS``): ``Wav2Vec2ForCTC`` (wav2vec 2.0) and ``Data2VecAudioForCTC``
  (data2vec 1.0), the CTC head as ``lm_head``, with ``Wav2Vec2Processor``'s files (``interop.hf_ctc``:
  the letter vocabulary in our row order, the feature extractor) and fine-tuning's mask vector as
  ``masked_spec_embed``.

Everything else (data2vec 2.0 images and audio, MAE) is written in d2v2's own format, which
``d2v2.models.load_pretrained`` reads back as a ``Classifier`` or a ``SpeechRecognizer`` with its head.
"""

from __future__ import annotations

from pathlib import Path

from d2v2.models import SpeechRecognizer, save_pretrained
from d2v2.models.pretrained import write_folder

from ..export import standard_target, write_export
from ..interop.hf_ctc import ctc_config, write_processor
from ..interop.standard_targets import CTC_TARGETS, HEAD_TARGETS
from .config import finetune_config_from_dict
from .run import finetune_run_dir, finetuned_model_from


def labels_config(classes: list[str] | None) -> dict:
    """Hugging Face's label fields: the class names, or one regression output."""
    if classes is None:
        return {"num_labels": 1, "problem_type": "regression"}
    return {"num_labels": len(classes), "id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)},
            "problem_type": "single_label_classification"}  # fmt: skip


def export_finetuned(state: dict, state_file: Path, out_dir: Path, fmt: str, tokenizer: bool, log) -> dict:
    """Write the fine-tuned model of checkpoint ``state`` (read from ``state_file``: a run's best checkpoint
    by default) into ``out_dir``."""
    model, method, cfg, config, _, step = finetuned_model_from(state, state_file)
    classes, task = config.get("classes"), config["task"]
    speech = isinstance(model, SpeechRecognizer)
    provenance = {"method": method, "weights": "fine-tuned", "task": task, "source": str(state_file), "step": step}
    base, why = standard_target(method, cfg) if fmt == "auto" else (None, "--format d2v2")
    head = (CTC_TARGETS if speech else HEAD_TARGETS).get(base.name) if base is not None else None
    if base is not None and head is None:
        why = f"{base.name} has no class with this task's head"

    def write(folder: Path) -> list[str]:
        if head is None:
            spec = {"name": task, "head": model.head.spec, "classes": classes, "regression": classes is None}
            save_pretrained(model.state_dict(), method, cfg, folder, "fine-tuned", source=str(state_file), step=step,
                            task={**spec, "blank": model.blank} if speech else spec)  # fmt: skip
            return []
        state = {f"{head.prefix}{k}": v for k, v in base.state(model.encoder.state_dict(), cfg).items()}
        state.update(head.state(model.head.state_dict(), cfg))
        hf = {**base.config(cfg), **head.config(cfg), "architectures": [head.name], "d2v2": provenance}
        if not speech:
            write_folder(folder, state, {**hf, **labels_config(classes), "classifier_dropout": model.head.spec["dropout"]})
            return []
        head_cfg = finetune_config_from_dict(config).head
        fields = ctc_config(classes, model.head.spec["dropout"], head_cfg, model.fill.min_spans)
        # HF keeps the mask vector only where its config masks; fine-tuning's (trained) vector is the fill's.
        state.pop(f"{head.prefix}masked_spec_embed", None)
        if fields["apply_spec_augment"] and model.fill.embedding is not None:
            state[f"{head.prefix}masked_spec_embed"] = model.fill.embedding
        hf = {**hf, **fields}
        write_folder(folder, state, hf)
        return write_processor(folder, classes, hf.get("feat_extract_norm", "layer") == "layer")

    files = write_export(out_dir, write, cfg, (config, finetune_run_dir(state_file)) if tokenizer else None)
    label = f"{head.name} (transformers)" if head else "d2v2's own format (d2v2.models.load_pretrained)"
    log(f"{method} {cfg.modality}, fine-tuned for {task}, step {step} -> {out_dir}: {label}")
    if head is None and fmt == "auto":
        log(f"no standard class: {why}")
    return {"target": head.name if head else "d2v2", "library": "transformers" if head else "d2v2",
            "weights": "fine-tuned", "why": why, "files": files, "out": str(out_dir)}  # fmt: skip
