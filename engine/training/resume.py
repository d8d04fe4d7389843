"""Where a run's state comes from: its own newest checkpoint (resume, exactly), another run's weights
(``--init-from``, weights only), and the RNG states a checkpoint keeps so that a resumed run draws
what the uninterrupted one would have."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, newest_loadable, resolve_checkpoint


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain values (``weights_only``-loadable)."""
    _, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_gauss": (int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_weights_from(trainer, path) -> None:
    """Start a new run from another run's weights (student, teacher, decoder); nothing else."""
    state = load_checkpoint(path)
    check_same_model(state["method"], trainer.method, path)
    if trainer.sharded:  # every rank takes its shards of the whole weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(trainer.method, state["method"], options=StateDictOptions(full_state_dict=True))
    else:
        trainer.method.load_state_dict(state["method"])
    trainer.log(f"initialised the weights from {path}")


def resume_from_checkpoint(trainer, mode: str) -> bool:
    """``auto``: continue from this run's newest checkpoint that loads, if any; a path: from it."""
    if mode == "none":
        return False
    found, error = None, None
    if trainer.dist.is_main:  # rank 0 picks: every rank loads the same checkpoint
        try:
            found = (
                newest_loadable(trainer.run_dir, trainer.log, tensors=not trainer.sharded)
                if mode == "auto"
                else (Path(mode), load_checkpoint(mode, tensors=not trainer.sharded))
            )
        except (ValueError, FileNotFoundError) as e:
            error = e
    path, message = trainer.dist.broadcast_object((None if found is None else str(found[0]), error and str(error)))
    if message:  # every rank stops, not rank 0 alone
        raise error if error is not None else ValueError(message)
    if path is None:
        return False
    state = found[1] if found is not None else load_checkpoint(path, tensors=not trainer.sharded)
    if "optimizer" not in state and "sharded" not in state:  # weights only, e.g. a fairseq import
        raise ValueError(f"checkpoint {path} holds weights only (no optimizer or trainer state), so it "
                         "cannot be resumed; start a new run from it with --init-from and a new --out")
    check_same_model(state["method"], trainer.method, path)
    if ("sharded" in state) != trainer.sharded:
        kinds = ("a sharded (fsdp)", "a ddp") if "sharded" in state else ("a ddp", "a sharded (fsdp)")
        raise ValueError(
            f"checkpoint {path} is {kinds[0]} checkpoint and this is {kinds[1]} run; start a new --out "
            f"with --init-from {path} (weights only), or resume with the strategy it was written by"
        )
    trainer.load_state_dict(state, resolve_checkpoint(path).parent)
    trainer.last_checkpoint = Path(path)
    trainer.log(f"resumed from {path} at step {trainer.step} (epoch {trainer.position.epoch}, batch {trainer.position.batch})")
    _note_world_size(trainer, int(state["trainer"].get("world_size", len(state.get("rng_ranks") or [0]))))
    return True


def _note_world_size(trainer, saved: int) -> None:
    """Say so when a run resumes on another number of processes: its effective batch changed."""
    world = trainer.dist.world_size
    if saved == world:
        return
    if not trainer.samples_per_batch_hint:
        trainer.log(f"resumed on {world} process(es), the checkpoint's run had {saved}: each update now sees "
                 f"{world / saved:g} x the samples")
        return
    per_process = trainer.samples_per_batch_hint * trainer.cfg.accum_steps
    before, after = per_process * saved, per_process * world
    lr_before = trainer.optim_cfg.lr * before / trainer.optim_cfg.ref_batch if trainer.optim_cfg.ref_batch else trainer.optim_cfg.lr
    trainer.log(
        f"resumed on {world} process(es), the checkpoint's run had {saved}: effective batch {before} -> {after} "
        f"samples, peak learning rate {lr_before:.3g} -> {trainer.peak_lr:.3g}"
    )


def check_same_model(saved: dict, model: torch.nn.Module, path) -> None:
    """A checkpoint of another model (modality, size or architecture) is a clear error, not a crash."""
    current = model.state_dict()
    for name, tensor in saved.items():
        if name not in current or (torch.is_tensor(tensor) and tuple(tensor.shape) != tuple(current[name].shape)):
            there = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            here = tuple(current[name].shape) if name in current else "absent"
            raise ValueError(
                f"checkpoint {path} is of another model ({name}: {there} there, {here} here); "
                "use the recipe and --set overrides it was trained with, or a new --out folder"
            )
    missing = sorted(set(current) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {path} is of another model (it lacks {missing[0]}); use the recipe it was trained with")
