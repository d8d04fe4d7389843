"""``d2v2 import-fairseq CKPT.pt --out RUN``: a released fairseq data2vec 2.0 checkpoint as a d2v2 run folder.

The checkpoint is read by ``safe_pickle`` (no fairseq, no omegaconf, no pickled code run), its model
config mapped by ``fairseq_config`` and its weights renamed by ``fairseq_keys``. Every weight of the
d2v2 model must come from the checkpoint, except these documented cases, which are printed:

- the teacher: fairseq's EMA (``_ema``) where it holds the part, else a copy of the imported student
  (fine-tunes have no EMA; ``ema_encoder_only`` EMAs hold only the shared blocks);
- the decoder: newly initialised when the checkpoint has none (fine-tunes drop it);
- dropped: a fine-tune's head and everything outside its data2vec 2.0 encoder, fairseq's
  ``recon_proj``, the EMA's parts d2v2's teacher does not own, and text position rows
  0 .. padding_idx (never read by a real token).

Anything else missing or left over is an error listing the names. The run folder holds
``config.yaml`` (the engine's run config: the closest recipe's data / optim / train sections and the
imported model config) and ``checkpoints/step-00000000`` with the student, decoder and teacher weights
(no optimizer state: ``pretrain --init-from RUN`` starts a new run from it; ``probe --checkpoint RUN``
evaluates it).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from d2v2.models.data2vec2 import Data2Vec2

from ..checkpoint import CheckpointWriteError, save_checkpoint, step_folder
from ..config import recipe_names
from ..runfolder import require_new, write_config, write_failure
from .fairseq_config import data2vec2_from_fairseq, pretraining_config
from .fairseq_keys import d2v2_tensor, fairseq_name
from .safe_pickle import ConfigShapeError, load_checkpoint_safely, plain

__all__ = ["import_fairseq", "read_fairseq"]

ENCODERS = "modality_encoders."
# Weights of a pretraining checkpoint that d2v2 has no place for and that do not change the encoder.
DROPPED_PREFIXES = ("recon_proj.",)


def read_fairseq(path: str | Path) -> tuple[dict, dict, dict | None, str, str | None, list[str]]:
    """Read a fairseq data2vec 2.0 checkpoint safely.

    Returns (model config as plain data, student weights with the fine-tune prefix stripped, the
    EMA teacher's weights or None, the stripped prefix, the fine-tuning model's name or None, the
    names dropped from outside the encoder).
    """
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
        model_cfg = root.get("model") if isinstance(root, dict) else None
    else:
        model_cfg = root.get("model") if isinstance(root, dict) and isinstance(root.get("model"), dict) else root
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{path}: the checkpoint's config has no model section")
    model_cfg, fine_tune = pretraining_config(model_cfg)

    weights = dict(ckpt["model"])
    prefixes = {key[: key.index(ENCODERS)] for key in weights if ENCODERS in key}
    if not prefixes:
        raise ValueError(f"{path} has no data2vec 2.0 encoder weights ({ENCODERS}*)")
    if len(prefixes) > 1:
        raise ValueError(f"{path} has data2vec 2.0 encoders under several prefixes {sorted(prefixes)}")
    prefix = prefixes.pop()
    ema = weights.pop(prefix + "_ema", None)
    student = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix) and torch.is_tensor(v)}
    dropped = sorted(k for k in weights if not k.startswith(prefix))
    return model_cfg, student, ema if isinstance(ema, dict) and ema else None, prefix, fine_tune, dropped


def _summary(names: list[str], limit: int = 6) -> str:
    """``names`` grouped by their first two components, e.g. ``w2v_encoder.proj (2)``."""
    groups = Counter(".".join(name.split(".")[:2]) for name in names)
    items = [f"{group} ({count})" if count > 1 else group for group, count in sorted(groups.items())]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def import_fairseq(checkpoint: str | Path, out: str | Path, log=print) -> Path:
    """Import ``checkpoint`` into the new run folder ``out``; returns the checkpoint folder written.

    ``out`` must not exist or be an empty folder (nothing is ever overwritten); it is created only
    once the checkpoint has been read and mapped completely.
    """
    out = Path(out)
    require_new(out, "import-fairseq")
    model_cfg, student, ema, prefix, fine_tune, dropped = read_fairseq(checkpoint)
    imported = data2vec2_from_fairseq(model_cfg, student)
    cfg = imported.config
    modality = cfg.modality
    model = Data2Vec2(cfg)
    target = model.state_dict()
    notes = list(imported.notes)

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
    if not has_decoder:
        notes.append("decoder: newly initialised (the checkpoint has none)")
    # Before the teacher, which copies student weights where the checkpoint has no EMA of them.
    unexpected = sorted(k for k in set(student) - used if not k.startswith(DROPPED_PREFIXES))
    if missing or unexpected:
        parts = ([f"missing {len(missing)}: {', '.join(missing[:5])}"] if missing else []) + (
            [f"unexpected {len(unexpected)}: {', '.join(unexpected[:5])}"] if unexpected else []
        )
        raise ValueError(f"{checkpoint} does not match the data2vec 2.0 model its config describes ("
                         f"{'; '.join(parts)}); it is not a d2v2-importable variant")  # fmt: skip

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
    if ema is None:
        notes.append("teacher: a copy of the student (the checkpoint has no EMA teacher)")
    else:
        used_ema = {fairseq_name(n, modality, teacher_blocks_only=blocks_only) for n in teacher_names}
        unused_ema = sorted(set(ema) - used_ema)
        notes.append(f"teacher: {from_ema} of {len(teacher_names)} tensors from the EMA teacher"
                     + ("" if from_ema == len(teacher_names) else ", the rest copied from the student"))  # fmt: skip
        if unused_ema:
            notes.append(f"dropped from the EMA (parts d2v2's teacher does not own): {_summary(unused_ema)}")

    dropped += sorted(prefix + k for k in student if k.startswith(DROPPED_PREFIXES))
    model.load_state_dict(filled, strict=True)

    resolved = _run_config(cfg, imported.size)
    provenance = {
        "source": str(Path(checkpoint).resolve()),
        "format": "fairseq data2vec 2.0" + (f" (fine-tuned: {fine_tune})" if fine_tune else ""),
        "dropped": dropped,
        "notes": notes,
    }
    state = {"method": model.state_dict(), "config": resolved, "imported": provenance}
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        folder = save_checkpoint(out, 0, state, keep=0)
        write_config(out, resolved)
    except (OSError, CheckpointWriteError) as e:  # its "--resume auto" advice is for a run, not a new import
        raise write_failure(out, e.__cause__ or e, created) from e

    log(f"imported {Path(checkpoint).name}: data2vec 2.0 {modality}, D={cfg.embed_dim}, {cfg.num_heads} heads, "
        f"{cfg.prenet_depth}+{cfg.depth} blocks (preset {modality} {imported.size} with overrides)"
        + (f", fine-tuned by {fine_tune}" if fine_tune else ""))  # fmt: skip
    if dropped:
        log(f"dropped {len(dropped)} tensors outside the encoder: {_summary(dropped)}")
    for note in notes:
        log(note)
    log(f"wrote {folder} and {out / 'config.yaml'}")
    return step_folder(out, 0)


def _run_config(cfg, size: str) -> dict:
    """The run folder's config.yaml: the closest recipe's sections, the imported model config."""
    from ..run import resolve_config

    recipe = f"{cfg.modality}-{size}"
    run_cfg = resolve_config(recipe if recipe in recipe_names() else f"{cfg.modality}-base")
    run_cfg.model.method = "data2vec2"  # fairseq's data2vec 2.0 checkpoints
    resolved = run_cfg.resolved(cfg)
    resolved["model"]["size"] = size
    # The data setting the model's shape fixes, so that config.yaml is a recipe this model runs with
    # (`pretrain --recipe RUN/config.yaml --init-from RUN`): the crop is the model's image side.
    if cfg.modality == "image":
        resolved["data"]["crop_size"] = cfg.image_size
    return resolved
