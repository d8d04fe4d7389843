"""``d2v2 import-fairseq CKPT.pt --out RUN``: a released fairseq checkpoint as a d2v2 run folder.

What is imported: data2vec 2.0 checkpoints (pretrained, or fine-tuned for classification or speech),
and wav2vec 2.0 and data2vec 1.0 audio checkpoints (pretrained, or CTC fine-tunes: ``wav2vec_ctc``). The checkpoint is read by
``safe_pickle`` (no fairseq, no omegaconf, no pickled code run), its model config mapped by
``fairseq_config`` and its weights renamed by ``fairseq_keys``.

A CTC fine-tune (the head ``w2v_encoder.proj``) becomes a speech-recognition run folder, as ``d2v2
finetune`` writes one (``fairseq_ctc``): the encoder and the head over the letter dictionary (``--dict
dict.ltr.txt``, else LibriSpeech's), which ``evaluate``, ``transcribe`` and ``export`` read. Anything
else (and a CTC fine-tune with ``--encoder-only``) becomes a pretraining run folder of its method (a
wav2vec 2.0 / data2vec 1.0 one holds the encoder and mask vector, its pretraining objective's parts
fresh: for ``finetune``, ``probe`` and ``export``). Every weight of the d2v2 model must come from the checkpoint, except these
documented cases, which are printed:

- the teacher: fairseq's EMA (``_ema``) where it holds the part, else a copy of the imported student
  (fine-tunes have no EMA; ``ema_encoder_only`` EMAs hold only the shared blocks);
- the decoder: newly initialised when the checkpoint has none (fine-tunes drop it);
- dropped: a fine-tune's head (unless it is kept: CTC) and everything outside its encoder, fairseq's
  ``recon_proj`` (and a wav2vec 2.0 model's pretraining parts: quantiser, projections), the EMA's
  parts d2v2's teacher does not own, and text position rows 0 .. padding_idx (never read by a real token).

Anything else missing or left over is an error listing the names. A pretraining run folder holds
``config.yaml`` (the engine's run config: the closest recipe's data / optim / train sections and the
imported model config) and ``checkpoints/step-00000000`` with the student, decoder and teacher weights
(no optimizer state: ``pretrain --init-from RUN`` starts a new run from it; ``probe --checkpoint RUN``
evaluates it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from d2v2.models import build_method
from d2v2.models.data2vec2 import Data2Vec2

from ..training.checkpoint import CheckpointWriteError, save_checkpoint, step_folder
from ..config import method_recipe, recipe_names
from ..training.runfolder import require_new, write_config, write_failure
from .fairseq_config import WAV2VEC_MODELS, ImportedConfig, data2vec2_from_fairseq, pretraining_config, wav2vec_from_fairseq
from .fairseq_ctc import HEAD, ctc_head, recognizer_letters, write_recognizer
from .fairseq_keys import d2v2_tensor, fairseq_name, wav2vec_fairseq_names
from .safe_pickle import ConfigShapeError, load_checkpoint_safely, plain
from .standard_targets import join_qkv, split_qkv

__all__ = ["FairseqCheckpoint", "import_fairseq", "read_fairseq"]

ENCODERS = "modality_encoders."
CNN = "feature_extractor.conv_layers."
"""What a wav2vec 2.0 / data2vec 1.0 encoder's names start with after the fine-tune's prefix."""
# Weights of a pretraining checkpoint that d2v2 has no place for and that do not change the encoder.
DROPPED_PREFIXES = ("recon_proj.",)
# wav2vec 2.0's pretraining parts, which a fine-tune usually drops already (remove_pretraining_modules).
WAV2VEC_PRETRAINING = ("quantizer.", "project_q.", "final_proj.", "target_glu.")


@dataclass
class FairseqCheckpoint:
    """A fairseq checkpoint, read safely (``read_fairseq``): the parts the import uses, as plain data."""

    model_cfg: dict
    """The pretraining model's config (a fine-tune's ``w2v_args`` / ``pretrained_model_args`` model)."""
    student: dict[str, torch.Tensor]
    """The encoder's (student's) weights, ``prefix`` stripped."""
    ema: dict | None
    """The EMA teacher's weights, or None."""
    prefix: str
    """What the encoder's names start with in the checkpoint (``w2v_encoder.w2v_model.`` in a CTC fine-tune)."""
    fine_tune: str | None
    """The fine-tuning model's name (``wav2vec_ctc``), or None for a pretraining checkpoint."""
    outside: dict[str, torch.Tensor]
    """The tensors outside the encoder (a fine-tune's head), under their own names."""
    fine_tune_cfg: dict
    """The fine-tuning model's own settings (dropouts, masks, ...); empty for a pretraining checkpoint."""
    task_cfg: dict
    """The checkpoint's task settings (``normalize``, ``labels``, ...); empty where it has none."""

    @property
    def name(self) -> str | None:
        """The pretraining model's fairseq name (``data2vec_multi``, ``wav2vec2``, ``data2vec_audio``)."""
        return self.model_cfg.get("_name") or self.model_cfg.get("arch")


def read_fairseq(path: str | Path) -> FairseqCheckpoint:
    """Read a fairseq data2vec 2.0, wav2vec 2.0 or data2vec 1.0 checkpoint (pretrained or fine-tuned), safely."""
    ckpt = load_checkpoint_safely(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} is not a fairseq checkpoint (no 'model' state dict)")
    key = "cfg" if ckpt.get("cfg") is not None else "args"  # fairseq before Hydra: one flat argparse Namespace
    if ckpt.get(key) is None:
        raise ValueError(f"{path} holds neither 'cfg' nor 'args': its model config is unknown")
    try:
        root = plain(ckpt[key])
    except ConfigShapeError as e:
        raise ValueError(f"{path}: {e}; it is not a config fairseq writes") from None
    if key == "cfg":
        outer = root.get("model") if isinstance(root, dict) else None
    else:
        outer = root.get("model") if isinstance(root, dict) and isinstance(root.get("model"), dict) else root
    if not isinstance(outer, dict):
        raise ValueError(f"{path}: the checkpoint's config has no model section")
    model_cfg, fine_tune = pretraining_config(outer)
    task_cfg = root.get("task") if key == "cfg" else root
    name = model_cfg.get("_name") or model_cfg.get("arch")

    weights = dict(ckpt["model"])
    anchor = CNN if name in WAV2VEC_MODELS else ENCODERS
    prefixes = {key[: key.index(anchor)] for key in weights if anchor in key}
    if not prefixes:
        what = "wav2vec 2.0 / data2vec 1.0 CNN" if anchor == CNN else "data2vec 2.0 encoder"
        raise ValueError(f"{path} has no {what} weights ({anchor}*)")
    if len(prefixes) > 1:
        raise ValueError(f"{path} has encoders under several prefixes {sorted(prefixes)}")
    prefix = prefixes.pop()
    ema = weights.pop(prefix + "_ema", None)
    student = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix) and torch.is_tensor(v)}
    outside = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    return FairseqCheckpoint(model_cfg, student, ema if isinstance(ema, dict) and ema else None, prefix, fine_tune, outside,
                             outer if fine_tune else {}, task_cfg if isinstance(task_cfg, dict) else {})  # fmt: skip


def _summary(names: list[str], limit: int = 6) -> str:
    """``names`` grouped by their first two components, e.g. ``w2v_encoder.proj (2)``."""
    groups = Counter(".".join(name.split(".")[:2]) for name in names)
    items = [f"{group} ({count})" if count > 1 else group for group, count in sorted(groups.items())]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def import_fairseq(checkpoint: str | Path, out: str | Path, dictionary: str | Path | None = None,
                   encoder_only: bool = False, log=print) -> Path:  # fmt: skip
    """Import ``checkpoint`` into the new run folder ``out``; returns the checkpoint folder written.

    A CTC fine-tune becomes a speech-recognition run with its head over ``dictionary`` (a
    ``dict.ltr.txt``; LibriSpeech's by default), or with ``encoder_only`` a pretraining run of its
    encoder, as a pretrained checkpoint becomes. ``out`` must not exist or be an empty folder (nothing is ever
    overwritten); it is created only once the checkpoint has been read and mapped completely.
    """
    out = Path(out)
    require_new(out, "import-fairseq")
    ckpt = read_fairseq(checkpoint)
    head = None if encoder_only else ctc_head(ckpt.outside)
    if dictionary is not None and head is None:
        has = "is imported without it (--encoder-only)" if encoder_only else f"has none ({HEAD}*)"
        raise ValueError(f"--dict gives the letters of a CTC fine-tune's head; {checkpoint} {has}")
    source = str(Path(checkpoint).resolve())
    if ckpt.name in WAV2VEC_MODELS:
        imported = wav2vec_from_fairseq(ckpt.model_cfg)
        model, dropped = _wav2vec_model(ckpt, imported, checkpoint)
        cfg = imported.config
        what = f"{imported.description}, D={cfg.embed_dim}, {cfg.num_heads} heads, {cfg.depth} blocks"
        if head is None:
            imported.notes.append(
                "the encoder (and mask vector) is imported, the pretraining objective's parts are not: fine-tune, "
                "probe or export the run; pretraining on from it (--init-from) starts them afresh")  # fmt: skip
    else:
        imported = data2vec2_from_fairseq(ckpt.model_cfg, ckpt.student)
        cfg = imported.config
        if head is not None and cfg.modality != "audio":
            raise ValueError(f"{checkpoint} has a CTC head ({HEAD}*) on a data2vec 2.0 {cfg.modality} encoder; speech "
                             "recognition takes audio encoders (--encoder-only imports the encoder alone)")  # fmt: skip
        model, dropped = _data2vec2_model(ckpt, imported, checkpoint, training_parts=head is None)
        what = f"data2vec 2.0 {cfg.modality}, D={cfg.embed_dim}, {cfg.num_heads} heads, {cfg.prenet_depth}+{cfg.depth} blocks"
    notes = imported.notes
    what += f" (preset {cfg.modality} {imported.size} with overrides)"
    fine_tune = f" (fine-tuned: {ckpt.fine_tune})" if ckpt.fine_tune else ""
    provenance = {"source": source, "format": f"fairseq {imported.description}{fine_tune}", "dropped": dropped}
    fine_tune = f", fine-tuned by {ckpt.fine_tune}" if ckpt.fine_tune else ""

    if head is not None:
        provenance["dropped"] = [name for name in dropped if not name.startswith(HEAD)]  # the head is kept
        letters = recognizer_letters(head[0].shape[0], dictionary)
        if ckpt.task_cfg.get("normalize") is False:
            notes.append("the checkpoint was fine-tuned on raw waveforms (task.normalize false); d2v2 normalises every "
                         "utterance, which the GroupNorm of a wav2vec 2.0 base CNN all but cancels")  # fmt: skip
        folder = write_recognizer(out, imported.method, model, head, letters, ckpt.fine_tune_cfg, provenance, notes)
        named = f"--dict {dictionary}" if dictionary is not None else "LibriSpeech dict.ltr.txt"
        log(f"imported {Path(checkpoint).name}: {what}{fine_tune}, with its CTC head over {len(letters)} letters and "
            f"specials ({named})")
        _report(provenance["dropped"], notes, log)
        log(f"wrote {folder} and {out / 'config.yaml'}: a speech-recognition run (d2v2 evaluate / transcribe / export)")
        return folder

    resolved = _run_config(imported.config, imported.size, imported.method)
    state = {"method": model.state_dict(), "config": resolved, "imported": {**provenance, "notes": notes}}
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        folder = save_checkpoint(out, 0, state, keep=0)
        write_config(out, resolved)
    except (OSError, CheckpointWriteError) as e:  # its "--resume auto" advice is for a run, not a new import
        raise write_failure(out, e.__cause__ or e, created) from e

    log(f"imported {Path(checkpoint).name}: {what}{fine_tune}")
    _report(dropped, notes, log)
    log(f"wrote {folder} and {out / 'config.yaml'}")
    return step_folder(out, 0)


def _report(dropped: list[str], notes: list[str], log) -> None:
    """Say what was left out of the checkpoint and what the mapping had to say."""
    if dropped:
        log(f"dropped {len(dropped)} tensors outside the encoder: {_summary(dropped)}")
    for note in notes:
        log(note)


def _mismatch(checkpoint, what: str, missing: list[str], unexpected: list[str]) -> ValueError:
    """The one-line error of weights that do not fit the model the config describes, naming the first few."""
    parts = ([f"missing {len(missing)}: {', '.join(missing[:5])}"] if missing else []) + (
        [f"unexpected {len(unexpected)}: {', '.join(unexpected[:5])}"] if unexpected else []
    )
    return ValueError(f"{checkpoint} does not match the {what} model its config describes ({'; '.join(parts)}); "
                      "it is not a d2v2-importable variant")  # fmt: skip


def _data2vec2_model(ckpt: FairseqCheckpoint, imported: ImportedConfig, checkpoint,
                     training_parts: bool = True) -> tuple[Data2Vec2, list[str]]:  # fmt: skip
    """The ``Data2Vec2`` with the checkpoint's weights, and the names dropped; what there is to say goes
    to ``imported.notes``, where the decoder and teacher came from only with ``training_parts`` (a
    recogniser uses neither)."""
    cfg, student, ema = imported.config, ckpt.student, ckpt.ema
    modality = cfg.modality
    model = Data2Vec2(cfg)
    target = model.state_dict()
    notes = imported.notes

    filled: dict[str, torch.Tensor] = {}
    used, missing = set(), []
    has_decoder = any(ENCODERS in k and ".decoder." in k for k in student)
    for name, like in target.items():
        if name.startswith("teacher."):
            continue
        source = fairseq_name(name, modality)
        if source in student:
            filled[name] = d2v2_tensor(name, student[source], like, cfg.padding_idx)
            used.add(source)
        elif name.startswith("decoder.") and not has_decoder:
            filled[name] = like  # the fresh init of the model just built
        else:
            missing.append(source)
    if not has_decoder and training_parts:
        notes.append("decoder: newly initialised (the checkpoint has none)")
    # Before the teacher, which copies student weights where the checkpoint has no EMA of them.
    unexpected = sorted(k for k in set(student) - used if not k.startswith(DROPPED_PREFIXES))
    if missing or unexpected:
        raise _mismatch(checkpoint, "data2vec 2.0", missing, unexpected)

    teacher_names = [name for name in target if name.startswith("teacher.")]
    blocks_only = ema is not None and not any(k.startswith(("blocks.", ENCODERS)) for k in ema)
    from_ema = 0
    for name in teacher_names:
        source = fairseq_name(name, modality, teacher_blocks_only=blocks_only)
        if ema is not None and source in ema:
            filled[name] = d2v2_tensor(name, ema[source], target[name], cfg.padding_idx)
            from_ema += 1
        else:
            filled[name] = filled["encoder." + name[len("teacher.") :]].clone()
    if ema is None and training_parts:
        notes.append("teacher: a copy of the student (the checkpoint has no EMA teacher)")
    elif ema is not None:
        used_ema = {fairseq_name(n, modality, teacher_blocks_only=blocks_only) for n in teacher_names}
        unused_ema = sorted(set(ema) - used_ema)
        notes.append(f"teacher: {from_ema} of {len(teacher_names)} tensors from the EMA teacher"
                     + ("" if from_ema == len(teacher_names) else ", the rest copied from the student"))  # fmt: skip
        if unused_ema:
            notes.append(f"dropped from the EMA (parts d2v2's teacher does not own): {_summary(unused_ema)}")
    model.load_state_dict(filled, strict=True)
    dropped = sorted(ckpt.outside) + sorted(ckpt.prefix + k for k in student if k.startswith(DROPPED_PREFIXES))
    return model, dropped


def _wav2vec_model(ckpt: FairseqCheckpoint, imported: ImportedConfig, checkpoint) -> tuple[object, list[str]]:
    """The wav2vec 2.0 / data2vec 1.0 method with the checkpoint's encoder and mask vector (what a
    recogniser takes from it; the pretraining objective's parts stay as built), and the names dropped."""
    cfg, student = imported.config, ckpt.student
    method = build_method(imported.method, cfg)
    # data2vec 1.0 keeps its mask vector on the method, wav2vec 2.0 in its encoder
    own_mask = getattr(method, "mask_emb", None) is not None
    target = {**split_qkv(method.encoder.state_dict()), **({"mask_emb": method.mask_emb} if own_mask else {})}
    names = wav2vec_fairseq_names(target, imported.method, getattr(cfg, "extractor_mode", "layer_norm"))
    filled, missing = {}, []
    for name, source in names.items():
        if source not in student and source.endswith(("weight_g", "weight_v")):  # torch's newer weight-norm names
            source = source[: -len("weight_g")] + f"parametrizations.weight.original{int(source[-1] == 'v')}"
        if source in student:
            filled[name] = d2v2_tensor(name, student[source], target[name])
            names[name] = source
        else:
            missing.append(source)
    extra = sorted(k for k in set(student) - set(names.values()) if not k.startswith(WAV2VEC_PRETRAINING))
    if missing or extra:
        raise _mismatch(checkpoint, imported.description, missing, extra)
    with torch.no_grad():
        if own_mask:
            method.mask_emb.copy_(filled.pop("mask_emb"))
    method.encoder.load_state_dict(join_qkv(filled), strict=True)
    dropped = sorted(ckpt.outside) + sorted(ckpt.prefix + k for k in student if k.startswith(WAV2VEC_PRETRAINING))
    return method, dropped


def _run_config(cfg, size: str, method: str) -> dict:
    """The run folder's config.yaml: the closest recipe's sections, the imported model config."""
    from ..run import resolve_config

    recipe = method_recipe(method, cfg.modality, size)
    run_cfg = resolve_config(recipe if recipe in recipe_names() else method_recipe(method, cfg.modality, "base"))
    run_cfg.model.method = method
    resolved = run_cfg.resolved(cfg)
    resolved["model"]["size"] = size
    # The data setting the model's shape fixes, so that config.yaml is a recipe this model runs with
    # (`pretrain --recipe RUN/config.yaml --init-from RUN`): the crop is the model's image side.
    if cfg.modality == "image":
        resolved["data"]["crop_size"] = cfg.image_size
    return resolved
