"""Checkpoints: ``<run>/checkpoints/step-XXXXXXXX/state.pt`` plus a ``latest`` pointer.

A checkpoint holds only tensors and plain values, so ``torch.load(weights_only=True)`` reads it.
Writes are atomic: the folder is written under a temporary name, its file fsynced, then renamed
into place, and only then is ``latest`` replaced (also via a temporary file and rename). A run
killed at any moment leaves ``latest`` pointing at a complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

STATE_FILE = "state.pt"
LATEST = "latest"


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


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, point ``latest`` at it, prune old ones."""
    final = step_folder(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. the end of a resumed, finished run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    pointer_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(final.name + "\n")
    with open(pointer_tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)
    if keep > 0:
        steps = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder ``latest`` points at, or None when the run has none yet."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / STATE_FILE).exists() else None


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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint (tensors and plain values only)."""
    file = resolve_checkpoint(path)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many types
        raise ValueError(f"checkpoint {file} cannot be read ({type(e).__name__}: {e}); it may be truncated or not a d2v2 checkpoint") from e
