"""The data files a run could not read: each counted once however often it is read, agreed over the
ranks, and the point at which the run stops rather than go on with what is left.

The loader never stops on a bad file: it reports the paths with its batches (``batch["skipped"]``) and
yields batches whose every file was unreadable without ``source``. The trainer passes such batches over
(``next_readable``), but not forever, and records every step's paths (``record``); more distinct bad
files than ``train.max_corrupt`` stop the run with their list.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator


class TrainingStopped(Exception):
    """Training cannot go on (non-finite loss, collapse, too many bad files); the message says why."""


class DataUnreadable(ValueError):
    """The loader yields nothing: every file it tried was unreadable (a bad path or format)."""


class UnreadableFiles:
    """The distinct unreadable files of a run (``seen``, stored in its checkpoints), and this rank's
    ones not yet agreed with the other ranks (``pending``).

    Args:
        max_corrupt: ``train.max_corrupt``.
        log: where the notes go (rank 0's log).
    """

    def __init__(self, max_corrupt: int, log: Callable[[str], None] = print):
        self.max_corrupt, self.log = max_corrupt, log
        self.seen: set[str] = set()
        self.pending: list[str] = []

    def next_readable(self, batches: Iterator[dict], num_samples: float, on_batch: Callable[[dict], None]) -> dict:
        """The next batch with samples; ``on_batch`` sees every batch drawn (the data position), the
        unreadable files go to ``pending``. Passes over batches of unreadable files only until more
        distinct files than ``max_corrupt`` (or all ``num_samples`` of the data set) failed in a row."""
        tried: dict[str, None] = {}  # unreadable files since the last good batch, in order
        while True:
            batch = next(batches)
            on_batch(batch)
            self.pending.extend(batch["skipped"])
            if "source" in batch:
                return batch
            tried.update(dict.fromkeys(batch["skipped"]))
            if len(tried) > self.max_corrupt or len(tried) >= num_samples:
                paths = list(tried)
                folder = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
                raise DataUnreadable(
                    f"every file tried in {folder} was unreadable ({len(paths)} files: {', '.join(paths[:5])}"
                    f"{', ...' if len(paths) > 5 else ''}); check the data path and the files' format"
                )

    def record(self, every_rank: list[list[str]]) -> None:
        """Add the files every rank could not read (each rank's ``pending``, gathered) and clear this
        rank's; more than ``max_corrupt`` distinct ones stop the run."""
        self.pending = []
        paths = sorted({p for rank_paths in every_rank for p in rank_paths})
        if not paths:
            return
        new = [p for p in paths if p not in self.seen]
        self.seen.update(paths)
        self.log(f"skipped {len(paths)} unreadable file(s) ({len(new)} new, {len(self.seen)} in all): {', '.join(paths[:3])}")
        if len(self.seen) > self.max_corrupt:
            listing = "\n  ".join(sorted(self.seen)[:50])
            raise TrainingStopped(
                f"{len(self.seen)} data files could not be read (more than train.max_corrupt="
                f"{self.max_corrupt}); fix or remove them:\n  {listing}"
            )
