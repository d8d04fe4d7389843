"""Checkpoints: ``<run>/checkpoints/step-XXXXXXXX/state.pt`` plus a ``latest`` pointer.

Runs sharded with FSDP2 (``dist.strategy=fsdp``) keep the model and optimizer in a
``torch.distributed.checkpoint`` (DCP) folder beside it, ``step-XXXXXXXX/sharded/``, written by every
process and readable by any number of them; their ``state.pt`` holds the rest (``"sharded"`` names
the folder). ``load_checkpoint`` reads the weights of either kind in one process.

A checkpoint holds only tensors and plain values, so ``torch.load(weights_only=True)`` reads it.
Writes are atomic: the folder is written under a temporary name, its file fsynced, then renamed
into place, and only then is ``latest`` replaced (also via a temporary file and rename). A run
killed at any moment leaves ``latest`` pointing at a complete checkpoint; a write that fails (disk
full, read-only folder) removes its temporary folder and leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from .distributed import DistEnv
from .safe_load import UnsafePickleError, load_torch

STATE_FILE = "state.pt"
LATEST = "latest"
SHARDED_DIR = "sharded"
BEST_DIR = "best"
"""A fine-tuning run's best checkpoint on validation: ``<run>/best/state.pt`` (``save_best``)."""


def step_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, read-only folder); the previous one is intact."""


def _state_bytes(state) -> int:
    """About how many bytes ``torch.save(state)`` writes: the tensors' payload."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def _staging(run_dir: Path, step: int, tag: int) -> Path:
    """The temporary folder a checkpoint is written into before it is renamed into place."""
    final = step_folder(run_dir, step)
    return final.parent / f".{final.name}.tmp-{tag}"


def _begin(tmp: Path) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()


def _write_state(tmp: Path, state: dict, name: str = STATE_FILE) -> None:
    with open(tmp / name, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def save_best(run_dir: Path, state: dict) -> Path:
    """``state`` (weights, no optimizer) as ``<run>/best/state.pt``, replaced atomically: written beside it
    under a temporary name, then renamed over it, so a run killed at any moment keeps a whole best
    checkpoint. Outside ``checkpoints/``: pruning never reaches it. A write that fails leaves the previous
    one as it was and raises ``CheckpointWriteError``."""
    folder = Path(run_dir) / BEST_DIR
    name = f".{STATE_FILE}.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_state(folder, state, name)
        os.replace(folder / name, folder / STATE_FILE)
        _fsync_dir(folder)
    except OSError as e:
        (folder / name).unlink(missing_ok=True)
        raise CheckpointWriteError(_write_failure(folder, e, _state_bytes(state))) from e
    return folder / STATE_FILE


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, point ``latest`` at it, prune old ones."""
    tmp = _staging(run_dir, step, os.getpid())
    try:
        _begin(tmp)
        _write_state(tmp, state)
    except OSError as e:
        # Nothing has been renamed yet: the previous checkpoint and ``latest`` are untouched.
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(_write_failure(tmp.parent, e, _state_bytes(state))) from e
    return _publish(run_dir, step, tmp, keep)


def _publish(run_dir: Path, step: int, tmp: Path, keep: int) -> Path:
    """Rename the complete ``tmp`` folder into place, then point ``latest`` at it; prune old ones."""
    final = step_folder(run_dir, step)
    root = final.parent
    pointer_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    try:
        pointer_tmp.write_text(final.name + "\n")
        with open(pointer_tmp, "rb") as f:
            os.fsync(f.fileno())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer_tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(_write_failure(root, e, 0)) from e
    if final.exists():  # re-saving the same step (e.g. the end of a resumed, finished run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)
    if keep > 0:
        steps = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded(run_dir: Path, step: int, state: dict | None, sharded: dict, env: DistEnv, keep: int = 3) -> Path:
    """The checkpoint of an FSDP2 run, written by every process (a collective), published as ``save_checkpoint``.

    Args:
        state: rank 0's plain part (trainer, RNGs, config; None on the other ranks), into ``state.pt``.
        sharded: this process's ``{"method": ..., "optimizer": ...}`` from ``torch.distributed.checkpoint.
            state_dict.get_state_dict`` (DTensor shards), into the DCP folder ``sharded/``.
    """
    import torch.distributed.checkpoint as dcp

    tmp = _staging(run_dir, step, env.broadcast_object(os.getpid()))  # one folder for every rank
    error = None
    if env.is_main:
        try:
            _begin(tmp)
        except OSError as e:
            error = _write_failure(tmp.parent, e, _state_bytes(sharded))  # DTensors count whole
    if (error := env.broadcast_object(error)) is None:
        try:
            dcp.save(sharded, checkpoint_id=tmp / SHARDED_DIR)  # every rank its shards; rank 0 the metadata
            if env.is_main:
                _write_state(tmp, {**state, "sharded": SHARDED_DIR})
        except (OSError, dcp.api.CheckpointException) as e:
            # DCP gathers every rank's failure into one exception: report the first, as a plain write's.
            cause = next(iter(e.failures.values()))[0] if isinstance(e, dcp.api.CheckpointException) else e
            if not isinstance(cause, OSError):
                raise
            error = _write_failure(tmp.parent, cause, _state_bytes(sharded))
        error = next((e for e in env.all_gather_object(error) if e), None)
    if error is None and env.is_main:
        try:
            _publish(run_dir, step, tmp, keep)
        except CheckpointWriteError as e:
            error = str(e)
    elif error is not None and env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint and ``latest`` are untouched
    if (error := env.broadcast_object(error)) is not None:
        raise CheckpointWriteError(error)
    return step_folder(run_dir, step)


def read_sharded(folder: Path, key: str, tensors: bool = True) -> dict:
    """Entry ``key`` ("method" or "optimizer") of a DCP folder as a plain state dict in this process.

    ``tensors=False`` gives meta tensors of the saved shapes and dtypes (reads the metadata only).
    Under an initialised process group every rank must call it (the read is a collective). Both check
    that every shard the metadata names is there whole (``check_shards``), and run no pickled code.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .safe_dcp import load_sharded

    entries = check_shards(folder).state_dict_metadata
    if not tensors:
        prefix = f"{key}."
        return {
            name[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype, device="meta")
            for name, meta in entries.items()
            if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
        }
    return load_sharded(folder, keys={key})[key]


def sharded_renames(folder: Path, upgrade) -> dict[str, str]:
    """{today's name: the name stored} for the method parameters a DCP folder holds under an earlier
    d2v2's names, ``upgrade`` being the method's ``upgrade_state_dict`` (empty for a current folder).
    A sharded checkpoint loads in place, by name, so a resumed run asks for the stored names."""
    prefix = "method."
    stored = [name[len(prefix):] for name in check_shards(folder).state_dict_metadata if name.startswith(prefix)]
    return {new: old for new, old in upgrade({name: name for name in stored}).items() if new != old}


def renamed_sharded(state: dict, names: dict[str, str]) -> dict:
    """A sharded ``{"method", "optimizer"}`` state (``Trainer.sharded_state``) with its parameter names
    mapped by ``names`` (others kept): the method's keys, the optimizer's per-parameter state and its
    param groups' parameter lists. The tensors are the same objects (DCP loads into them in place)."""
    name = lambda key: names.get(key, key)  # noqa: E731
    optimizer = state["optimizer"]
    return {
        "method": {name(k): v for k, v in state["method"].items()},
        "optimizer": {
            **optimizer, "state": {name(k): v for k, v in optimizer["state"].items()},
            "param_groups": [{**g, "params": [name(p) for p in g["params"]]} for g in optimizer["param_groups"]],
        },
    }  # fmt: skip


def check_shards(folder: Path):
    """The metadata of the DCP folder ``folder`` once every shard file it names is present and holds
    the bytes it names; else a ValueError naming the shard (a sharded checkpoint is complete only then)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from .safe_dcp import read_metadata

    folder = Path(folder)
    metadata = read_metadata(folder)
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(name, str) or Path(name).name != name:
            raise ValueError(f"{folder / '.metadata'} names a shard {name!r} outside its folder; it is not a d2v2 checkpoint")
        ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(ends.items()):
        file = folder / name
        if not file.is_file():
            raise IncompleteCheckpoint(f"shard {folder.name}/{name} is missing")
        if file.stat().st_size < end:
            raise IncompleteCheckpoint(f"shard {folder.name}/{name} is truncated ({file.stat().st_size} of {end} bytes)")
    return metadata


class IncompleteCheckpoint(ValueError):
    """A sharded checkpoint lacks a shard (or part of one) that its metadata names."""


def _write_failure(root: Path, error: OSError, needed: int) -> str:
    mb = 2**20
    try:
        free = f"{shutil.disk_usage(root if root.exists() else root.parent).free / mb:.0f} MB free"
    except OSError:
        free = "free space unknown"
    cause = os.strerror(error.errno) if error.errno else str(error)
    fix = "free some space or move the run" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return (
        f"cannot write a checkpoint to {root}: {cause} (it needs about {needed / mb:.0f} MB, {free}); "
        f"{fix}, then continue with --resume auto (the previous checkpoint is intact)"
    )


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's ``step-*`` checkpoint folders, newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []


def newest_loadable(run_dir: Path, log=print, tensors: bool = True) -> tuple[Path, dict] | None:
    """The checkpoint ``latest`` names, or else the newest one that loads: (folder, state).

    None when the run has no checkpoint at all. When it has some but none loads, a ValueError lists
    each one and why, so that a damaged run is never taken for a new one and restarted over.
    ``tensors``: as ``load_checkpoint``.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    candidates = ([named] if named is not None else []) + [p for p in checkpoint_folders(run_dir) if p != named]
    failures = []
    for folder in candidates:
        file = folder / STATE_FILE
        if not file.is_file():
            failures.append(f"{folder.name}: no {STATE_FILE}")
            continue
        try:
            state = load_checkpoint(file, tensors)
        except UnsafePickleError:
            raise  # not damage to fall back from: a planted file, which nothing may read on
        except ValueError as e:
            incomplete = isinstance(e.__cause__, IncompleteCheckpoint)
            failures.append(f"{folder.name}: {e.__cause__ if incomplete else 'unreadable'}")
            continue
        if failures:
            log(f"{'; '.join(failures)}; resuming from {folder.name}, the newest checkpoint that loads")
        return folder, state
    if failures:
        raise ValueError(
            f"run folder {run_dir} holds checkpoints but none loads ({'; '.join(failures)}); "
            "resume from a copy with --resume PATH, or pick a new --out"
        )
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder ``latest`` points at, or None when the run has none yet."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / STATE_FILE).exists() else None


def run_folder_of(state_file: Path) -> Path | None:
    """The run folder a checkpoint's ``state.pt`` lies in (``RUN/checkpoints/step-X/state.pt``), if any."""
    folder = Path(state_file).parent
    return folder.parent.parent if folder.parent.name == "checkpoints" else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint given as its folder, its state file, a run folder or a checkpoints folder."""
    p = Path(path)
    candidates = [p, p / STATE_FILE]
    for root in (p, p / "checkpoints"):
        latest = root / LATEST
        if latest.exists():
            candidates.append(root / latest.read_text().strip() / STATE_FILE)
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no checkpoint at {path}; give a run folder, a checkpoints/step-XXXXXXXX folder or its {STATE_FILE}")


def load_checkpoint(path: str | os.PathLike, tensors: bool = True) -> dict:
    """Read a checkpoint (tensors and plain values only), the ``method`` weights of a sharded one included.

    ``tensors=False``: a sharded checkpoint's weights as meta tensors (shapes only; its ``optimizer``
    is never read here: ``Trainer`` loads both shard by shard).
    """
    file = resolve_checkpoint(path)
    try:
        state = load_torch(file)
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not a dict")
        if "sharded" in state:
            if state["sharded"] != SHARDED_DIR:
                raise ValueError(f"its 'sharded' entry is {state['sharded']!r}, not {SHARDED_DIR!r}")
            state["method"] = read_sharded(file.parent / SHARDED_DIR, "method", tensors)
    except UnsafePickleError:
        if _is_fairseq(file):
            raise ValueError(f"{file} is a fairseq checkpoint, not a d2v2 one; import it first with "
                             f"`d2v2 import-fairseq {file} --out RUN`, then give RUN") from None
        raise
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"checkpoint {file} cannot be read ({type(e).__name__}: {reason}); it may be truncated, "
                         "incomplete or not a d2v2 checkpoint") from e
    return upgrade_weights(state)


def method_from_checkpoint(path: str):
    """Rebuild the method a checkpoint was trained as, with its weights; returns (method, config dict).
    What probe and export load."""
    return method_from_state(load_checkpoint(path), path)


def method_from_state(state: dict, path) -> tuple:
    """``method_from_checkpoint`` of a checkpoint already read (``load_checkpoint``) from ``path``."""
    from d2v2.models import DEFAULT_METHOD, build_method, method_entry

    from ..config import from_dict

    if "config" not in state or "method" not in state:
        raise ValueError(f"{path} is not a d2v2 pretraining checkpoint (it has no config/method entries)")
    if "task" in state["config"]:
        raise ValueError(f"{path} is a fine-tuned run ({state['config']['task']}); probe and export take pretraining "
                         f"runs (score a fine-tuned one with d2v2 evaluate --checkpoint {path})")  # fmt: skip
    name = state["config"].get("method", DEFAULT_METHOD)
    model_cfg = dict(state["config"]["model"])
    model_cfg.pop("size", None)
    model = build_method(name, from_dict(method_entry(name).config, model_cfg, "model"))
    model.load_state_dict(state["method"])
    return model.eval(), state["config"]


def upgrade_weights(state: dict) -> dict:
    """A checkpoint's ``method`` weights in today's names, whatever d2v2 wrote them: the one key
    migration, the method's own ``upgrade_state_dict`` (e.g. the embedding parts under ``embed``)."""
    from d2v2.models.methods import DEFAULT_METHOD, METHODS

    config = state.get("config")
    if isinstance(state.get("method"), dict) and isinstance(config, dict):
        name = config.get("method", DEFAULT_METHOD)
        if name in METHODS:
            state["method"] = METHODS[name].model.upgrade_state_dict(state["method"])
    return state


def _is_fairseq(file: Path) -> bool:
    """Whether ``file`` reads as a fairseq checkpoint through import-fairseq's restricted unpickler
    (which runs no pickled code either): a ``model`` state dict and a ``cfg`` or ``args`` config."""
    from ..interop.safe_pickle import load_checkpoint_safely

    try:
        ckpt = load_checkpoint_safely(file)
    except (ValueError, OSError):
        return False
    return isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and ("cfg" in ckpt or "args" in ckpt)
