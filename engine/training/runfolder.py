"""The run folder's guard rails: one process at a time, and never restarted or rewritten by accident.

A run folder can hold a week of GPU time, so:

- ``RunFolder.open`` takes an exclusive OS lock on ``<run>/.lock`` (``fcntl.flock``: the kernel drops
  it when the process dies, even by ``kill -9``, so a lock is never stale; forked loader workers let
  go of it); a second process on the same folder stops at once naming the PID that holds it.
- A folder that already holds a run (its ``config.yaml``) is continued from that configuration:
  ``--recipe`` and ``--set`` may only repeat it, or change the keys in ``CHANGEABLE``
  (``continued_config``); ``config.yaml`` is rewritten only once the run has resumed.
- ``--resume none`` on a folder holding checkpoints is refused: a new run needs a new ``--out``.
- Leftovers of a crashed checkpoint write are removed, and ``metrics.jsonl`` is cut back to the step
  the run resumes from, so every step appears once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import yaml

from .checkpoint import BEST_DIR, LATEST, STATE_FILE, checkpoint_folders
from ..config import apply_overrides, parse_override, to_dict

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DATA_FILE = "data.json"
"""The run's data: its path and ``data.build.fingerprint``, so that a continued run can accept data that moved."""

CHANGEABLE = {
    "train.max_steps": "train further (or stop earlier) on the same schedule",
    "train.log_every": "logging interval",
    "train.checkpoint_every": "checkpoint interval",
    "train.keep_checkpoints": "how many checkpoints are kept",
    "train.max_corrupt": "how many unreadable files are tolerated",
    "train.compile": "torch.compile or not",
    "train.tensorboard": "TensorBoard event files or not",
    "data.num_workers": "loader processes",
    "optim.total_steps": "extends (or shortens) the schedule: the learning rate of the steps to come changes",
}
"""Keys that ``--set`` may change when a run is continued, and what changing each one means."""


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (in use, a file, not writable, would be overwritten)."""


def require_new(out: Path, what: str) -> None:
    """Refuse an ``--out`` that exists and is not an empty folder (``what``, a command, never writes
    over anything), or that cannot be made: the nearest folder that exists is read-only (``os.access``
    says so for a read-only mount and for permissions alike)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunFolderError(f"--out {out} already exists and is not an empty folder; {what} refuses to overwrite it: give a new --out")
    base = Path(os.path.abspath(out))
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise RunFolderError(f"--out {out} cannot be made: {base} is a file, not a folder; give another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {out} cannot be written: {base} is read-only; give a writable --out")


def write_failure(out: Path, error: Exception, created: bool) -> RunFolderError:
    """The one-line error of a command's ``--out`` that failed mid-write, once what it wrote is removed:
    ``out`` itself where the command ``created`` it, else (an empty folder before) its contents."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
    elif out.is_dir():
        for path in out.iterdir():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    cause = os.strerror(error.errno) if getattr(error, "errno", None) else str(error)
    return RunFolderError(f"--out {out} cannot be written ({cause}); give a writable --out with free space (nothing was left there)")


def read_config(run_dir: Path) -> dict | None:
    """The resolved configuration an existing run was started with, or None for a new folder."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RunFolderError(f"{path} is not valid YAML ({e}); restore it or pick a new --out") from e
    if not isinstance(data, dict) or "recipe" not in data or "model" not in data:
        raise RunFolderError(f"{path} is not a d2v2 run configuration; restore it or pick a new --out")
    return data


_ABSENT = object()


def _same(a, b) -> bool:
    return to_dict(a) == to_dict(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))


def continued_config(run_dir: Path, stored: dict, recipe: str | None, overrides: list[str]) -> dict:
    """``stored`` (the run's config.yaml) with the allowed ``--set`` changes; anything else is refused."""
    if recipe is not None and Path(recipe).stem != stored["recipe"]:  # a recipe is stored by its name
        raise RunFolderError(
            f"{run_dir} is a run of recipe {stored['recipe']}, not {recipe}; leave out --recipe to continue it, "
            "or pick a new --out for a new run"
        )
    data = json.loads(json.dumps(stored))  # a deep copy of plain values
    for text in overrides:
        keys, value = parse_override(text)
        node = stored
        for k in keys:
            node = node.get(k, _ABSENT) if isinstance(node, dict) else _ABSENT
        key = ".".join(keys)
        if node is not _ABSENT and _same(node, value):
            continue  # repeats the run's own value
        if key == "data.path" and node and value and (Path(run_dir) / DATA_FILE).is_file():
            apply_overrides(data, [text])  # data that moved: checked against the record once it is read
            continue
        if key not in CHANGEABLE:
            allowed = ", ".join(sorted(CHANGEABLE))
            raise RunFolderError(
                f"--set {text}: {run_dir} is a run with {key}={None if node is _ABSENT else node!r}, and a continued run may change only "
                f"{allowed}; pick a new --out (with --init-from {run_dir} to start from its weights)"
            )
        apply_overrides(data, [text])
    return data


def write_config(run_dir: Path, resolved: dict) -> None:
    """Write ``config.yaml`` atomically (temporary file, then rename)."""
    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_name(f".{CONFIG_FILE}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def check_moved_data(run_dir: Path, path: str | None, found: dict | None, log) -> None:
    """A continued run's data at ``path`` (``found``: its fingerprint) against the run's record
    (``DATA_FILE``): the same data elsewhere is accepted, saying so; other data is refused."""
    record = Path(run_dir) / DATA_FILE
    if not record.is_file():
        return
    stored = json.loads(record.read_text(encoding="utf-8"))
    if stored.get("path") == path:
        return
    if found is None or {k: stored.get(k) for k in found} != found:
        samples = "?" if found is None else found["samples"]
        raise RunFolderError(
            f"--data {path} is not the data run {run_dir} trained on ({stored.get('path')}: {stored.get('samples')} "
            f"samples; here {samples}, or other files); give that data where it is now, or pick a new --out"
        )
    log(f"data.path: the run's data moved from {stored.get('path')} to {path} (the same {found['samples']} samples); "
        "continuing with it")


def record_data(run_dir: Path, path: str | None, found: dict | None) -> None:
    """Write ``DATA_FILE`` atomically (nothing for embedded data, which does not move)."""
    if path is None or found is None:
        return
    target = Path(run_dir) / DATA_FILE
    tmp = target.with_name(f".{DATA_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"path": path, **found}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, target)


def keep_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically (temporary file, then rename), if it differs."""
    if not Path(source).is_file() or (target.is_file() and target.read_bytes() == Path(source).read_bytes()):
        return
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _parsed(lines: list[str]) -> list[tuple[str, dict]]:
    """The lines of ``metrics.jsonl`` that hold a logged step, each with its row; a line torn by a crash
    mid-write is left out."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
            if isinstance(row["step"], int):
                rows.append((line, row))
        except (ValueError, KeyError, TypeError):
            pass
    return rows


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's logged rows (``metrics.jsonl``), torn lines left out."""
    path = Path(run_dir) / METRICS_FILE
    return [row for _, row in _parsed(path.read_text(encoding="utf-8").splitlines())] if path.is_file() else []


def export_command(checkpoint) -> str:
    """The ``d2v2 export`` a finished run or probe suggests next, into ``exports/<name>``."""
    return f"d2v2 export --checkpoint {checkpoint} --out {Path('exports') / Path(checkpoint).name}"


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Drop the lines of ``metrics.jsonl`` after ``step`` (and any torn last line), atomically.

    A resumed run logs again the steps that followed its checkpoint; cutting them here keeps every
    step once. Returns how many lines were dropped.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line, row in _parsed(lines) if row["step"] <= step]
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(kept)


def remove_temporaries(run_dir: Path) -> list[str]:
    """Remove what a crashed checkpoint write left behind (``.step-*.tmp-*``, ``.latest.tmp-*``, and the
    best checkpoint's ``best/.state.pt.tmp-*``)."""
    root, best = Path(run_dir) / "checkpoints", Path(run_dir) / BEST_DIR
    found = sorted([*root.glob(".step-*.tmp-*"), *root.glob(f".{LATEST}.tmp-*")]) if root.is_dir() else []
    found += sorted(best.glob(f".{STATE_FILE}.tmp-*")) if best.is_dir() else []
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return [p.name for p in found]


_HELD: set[int] = set()
"""The file descriptors of this process's run-folder locks."""


def _drop_locks_in_child() -> None:
    """After a fork: the child (a loader worker) lets go of the parent's locks.

    A flock belongs to the open file, which a fork shares: a worker orphaned by its killed parent would
    hold the lock for the seconds until it notices, and a rank torchrun restarts at once would find
    its own run folder "in use". The child's descriptor is replaced by /dev/null (closed, the lock is
    the parent's alone; never unlocked, which would free it for the parent too).
    """
    if not _HELD:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _HELD:
        os.dup2(null, fd)
    os.close(null)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


class RunFolder:
    """An open, locked run folder; ``close()`` releases the lock (and removes a folder it made, if still empty)."""

    def __init__(self, path: Path, lock_file, created: bool):
        self.path, self._lock_file, self._created = path, lock_file, created
        self.removed_temporaries: list[str] = []
        _HELD.add(lock_file.fileno())

    @classmethod
    def open(cls, path: str | os.PathLike, resume: str) -> RunFolder:
        """Create (if needed) and lock ``path``; refuse what would lose an existing run's work."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"--out {path} is a file, not a folder; give a folder path")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock_file = open(path / LOCK_FILE, "a+", encoding="utf-8")
        except OSError as e:
            raise RunFolderError(f"--out {path} cannot be written ({os.strerror(e.errno or 0) or e}); pick another --out") from e
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise RunFolderError(
                f"run folder {path} is in use by process {holder}; wait for it to end, or pick another --out"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        folder = cls(path, lock_file, created)
        try:
            if resume == "none" and checkpoint_folders(path):
                raise RunFolderError(
                    f"--resume none would restart {path}, which holds checkpoints; pick a new --out for a new run "
                    "(or --resume auto to continue this one)"
                )
            removed = remove_temporaries(path)
        except BaseException:
            folder.close()
            raise
        folder.removed_temporaries = removed
        return folder

    def close(self) -> None:
        if self._lock_file is None:
            return
        _HELD.discard(self._lock_file.fileno())
        self._lock_file.close()
        self._lock_file = None
        if self._created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(self.path, ignore_errors=True)  # a failed start leaves no empty folder behind
