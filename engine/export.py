"""``d2v2 export``: a run's pretrained encoder as ``model.safetensors`` + ``config.json`` (+ tokenizer).

Where d2v2's encoder really is the architecture of a standard class, the export uses that class's
parameter names and config, so the folder loads straight into it. Each method says which class its
encoder is for a config (``MethodEntry.export`` in ``d2v2.models.methods``); the classes' key tables,
state mappings and config.json writers are in ``interop/standard_targets.py``:

| method, modality        | target                                   | what makes it the same model |
|-------------------------|------------------------------------------|------------------------------|
| data2vec 2.0 text       | HF ``Data2VecTextModel``                  | no prenet: token + learned positions, LayerNorm, post-norm blocks = RoBERTa |
| data2vec 1.0 text       | HF ``Data2VecTextModel``                  | RoBERTa's encoder |
| mlm text                | HF ``RobertaModel``                       | RoBERTa's encoder |
| data2vec 1.0 audio      | HF ``Data2VecAudioModel``                 | LayerNorm CNN, 5-layer conv positions, LayerNorm, post-norm blocks |
| wav2vec2 audio          | HF ``Wav2Vec2Model``                      | CNN, one weight-normalised conv position, LayerNorm, post-norm blocks |
| data2vec 1.0 image      | HF ``Data2VecVisionModel``                | BEiT's pre-norm layer-scale blocks and final LayerNorm, absolute positions |
| mae image               | timm ``vit_*`` (``VisionTransformer``)    | pre-norm ViT, CLS, final LayerNorm |

Everything else (data2vec 2.0 images: a LayerNorm on the embeddings and post-norm blocks; data2vec
2.0 audio: ALiBi attention bias; data2vec 2.0 text with prenet blocks; configs off the standard
values) is written in d2v2's own format (``d2v2.models.pretrained``), which ``d2v2.models.load_pretrained``
reads; ``--format d2v2`` asks for it for any method.

A fine-tuned run (``finetune/export.py``) exports with its head: the table's class with a
classification head (``*ForSequenceClassification``, ``Data2VecVisionForImageClassification``) or, for a
speech recogniser, its CTC class (``Wav2Vec2ForCTC``, ``Data2VecAudioForCTC``) with ``Wav2Vec2Processor``'s
vocabulary and feature extractor; d2v2's own format (a ``Classifier`` or ``SpeechRecognizer``) elsewhere.

Exact mappings (differences that change nothing, checked to 1e-5 by tests/engine/test_export.py):
the fused qkv projection is split into query/key/value; text positions get RoBERTa's offset of
padding_idx + 1 zero rows and a zero token-type row; the image positions get a zero CLS row (d2v2's
CLS has no position); BEiT has no key bias, and ours is dropped: it adds q . b_k to every score of a
query, which the softmax cancels. Limits: HF's text models derive positions from the pad ids, so
give them the same padding as the ids (pad tokens where padding_mask is True); HF's audio models
zero padded frames before the conv positions, which data2vec 1.0's encoder does not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from d2v2.models import DEFAULT_METHOD, method_entry, save_pretrained
from d2v2.models.pretrained import CONFIG_FILE, WEIGHTS_FILE, write_folder

from .training.checkpoint import load_checkpoint, method_from_state, run_folder_of
from .interop.standard_targets import REFUSALS, TARGETS, Target
from .training.runfolder import require_new, write_failure

WEIGHTS = ("teacher", "student")
FORMATS = ("auto", "d2v2")


def standard_target(method: str, cfg) -> tuple[Target | None, str]:
    """The standard class whose architecture ``method`` with ``cfg`` really is, or (None, why not):
    the method's own answer (``MethodEntry.export``), then the target's refusals."""
    name, why = method_entry(method).export(cfg)
    if name is None:
        return None, why
    refusal = REFUSALS.get(name, lambda _cfg: None)(cfg)
    return (None, refusal) if refusal else (TARGETS[name], why)


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------


def encoder_state(method, weights: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors (d2v2 names): the student's, or the EMA teacher's with the student's for
    the parts the teacher does not own (what ``probe_features`` runs: e.g. the audio CNN, the text
    embedding)."""
    state = dict(method.encoder.state_dict())
    if weights == "teacher":
        teacher = method.teacher.state_dict()
        unknown = sorted(set(teacher) - set(state))
        if unknown:  # a teacher part with no student twin: the encoder could not hold it
            raise RuntimeError(f"teacher weights {unknown[:3]} have no place in the encoder")
        state.update(teacher)
    return state


def export(
    checkpoint: str, out: str, weights: str | None = None, fmt: str = "auto", tokenizer: bool = True, log=print
) -> dict:
    """Export a checkpoint's encoder into folder ``out`` (written whole under a temporary name, then
    renamed). Returns what was written: target, weights, files.

    Args:
        checkpoint: a run folder, checkpoint folder or state.pt.
        out: a new (or empty) folder.
        weights: "teacher" (default where the method has an EMA teacher) or "student".
        fmt: "auto" (the standard class where one matches, else d2v2's own format) or "d2v2".
        tokenizer: copy a text run's tokenizer.json (and its HF tokenizer_config.json).
    """
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"--weights must be teacher or student, got {weights!r}")
    if fmt not in FORMATS:
        raise ValueError(f"--format must be auto or d2v2, got {fmt!r}")
    out_dir = Path(out)
    require_new(out_dir, "export")
    from .finetune.export import export_finetuned
    from .finetune.run import finetuned_state_file

    state_file = finetuned_state_file(checkpoint)  # a fine-tuning run's best checkpoint, else what it names
    loaded = load_checkpoint(state_file)  # read once: a checkpoint may hold gigabytes
    if "task" in (loaded.get("config") or {}):
        if weights is not None:
            raise ValueError("--weights applies to pretraining runs; a fine-tuned run exports its fine-tuned weights")
        return export_finetuned(loaded, state_file, out_dir, fmt, tokenizer, log)
    method, run_config = method_from_state(loaded, checkpoint)
    name = run_config.get("method", DEFAULT_METHOD)
    has_teacher = getattr(method, "teacher", None) is not None
    weights = weights or ("teacher" if has_teacher else "student")
    if weights == "teacher" and not has_teacher:
        raise ValueError(f"--weights teacher: {name} has no EMA teacher; use --weights student")
    cfg = method.cfg
    state = encoder_state(method, weights)
    step = _step_of(state_file)
    provenance = {"method": name, "weights": weights, "source": str(state_file), "step": step}

    target, why = standard_target(name, cfg) if fmt == "auto" else (None, "--format d2v2")

    def write(folder: Path) -> None:
        if target is None:
            save_pretrained(state, name, cfg, folder, weights, source=provenance["source"], step=step)
        else:
            # data2vec 1.0's mask vector (the student's) lives on the method; HF has a slot for it.
            mask_emb = getattr(method, "mask_emb", None)
            extra = {} if mask_emb is None or "mask_emb" in state else {"mask_emb": mask_emb}
            _save_standard(target, {**state, **extra}, cfg, folder, provenance)

    files = write_export(out_dir, write, cfg, (run_config, run_folder_of(state_file)) if tokenizer else None)
    label = f"{target.name} ({target.library})" if target else "d2v2's own format (d2v2.models.load_pretrained)"
    log(f"{name} {cfg.modality}, {weights} weights, step {step} -> {out_dir}: {label}")
    if target is None and fmt == "auto":
        log(f"no standard class: {why}")
    return {"target": target.name if target else "d2v2", "library": target.library if target else "d2v2",
            "weights": weights, "why": why, "files": files, "out": str(out_dir)}  # fmt: skip


def write_export(out_dir: Path, write, cfg, tokenizer_of: tuple[dict, Path | None] | None) -> list[str]:
    """``write(folder)`` (the weights, config.json, and the names of any other files it writes, or None)
    and, for text, the run's tokenizer (``tokenizer_of``: its run config and folder; None: none) into
    ``out_dir``, whole or not at all; returns the files.

    An empty ``out_dir`` (perhaps a mount point, which can be neither removed nor renamed over) is
    written into; a new one is written whole under a temporary name beside it, then renamed.
    """
    into = out_dir.is_dir()
    tmp = out_dir / f".export.tmp-{os.getpid()}" if into else out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        files = [WEIGHTS_FILE, CONFIG_FILE, *(write(tmp) or ())]
        if tokenizer_of is not None and cfg.modality == "text":
            run_config, run_dir = tokenizer_of
            files += copy_tokenizer(run_config, cfg, tmp, run_dir)
        if into:
            for path in tmp.iterdir():
                os.replace(path, out_dir / path.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out_dir)
    except OSError as e:  # read-only or full: nothing is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(out_dir, e, created=not into) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def _step_of(state_file: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", state_file.parent.name)
    return int(match[1]) if match else 0


def _save_standard(target: Target, state: dict, cfg, folder: Path, provenance: dict) -> None:
    config = target.config(cfg)
    config["d2v2"] = provenance  # where the weights came from; the libraries ignore unknown keys
    write_folder(folder, target.state(state, cfg), config)


def copy_tokenizer(run_config: dict, cfg, folder: Path, run_dir: Path | None) -> list[str]:
    """The run's tokenizer.json and an HF tokenizer_config.json beside it. A text encoder is useless
    without the tokenizer it was trained with, so a run whose tokenizer cannot be found stops the export."""
    from .probe_sets import TOKENIZER_FILE, run_tokenizer

    try:
        tok = run_tokenizer(run_config, run_dir)
    except (ValueError, FileNotFoundError) as e:
        where = f"{run_dir / TOKENIZER_FILE}" if run_dir is not None else "the run folder's tokenizer.json"
        raise ValueError(f"the text run's tokenizer cannot be found ({str(e).splitlines()[0]}); put it at {where}, "
                         f"or restore the run's data.path {run_config.get('data', {}).get('path')!r}") from e
    tok.save(str(folder / "tokenizer.json"))
    special = {name: token for name, token in (("bos_token", "<s>"), ("pad_token", "<pad>"), ("eos_token", "</s>"),
               ("unk_token", "<unk>"), ("mask_token", "<mask>")) if tok.token_to_id(token) is not None}  # fmt: skip
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_positions, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
