"""Preemption-safe stops: SIGTERM and Ctrl-C become a request to stop at the next step boundary.

SLURM, Kubernetes and torchrun send SIGTERM before they kill a job; a user presses Ctrl-C (SIGINT).
Inside ``StopRequest`` the first of either only sets a flag, which the training loop polls after
each optimizer step: it then writes a checkpoint and raises ``RunStopped``, whose ``exit_code`` is
the shell's 128 + signal number (130 for SIGINT, 143 for SIGTERM). A second signal aborts at once
(``KeyboardInterrupt``), for a user who does not want to wait for the step and the checkpoint;
once the run is ending (its checkpoint written, or its loader workers being ended), a further signal
changes nothing.
"""

from __future__ import annotations

import signal
import threading

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """The run stopped on a signal after writing a checkpoint; the message says how to continue."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """A context that turns SIGINT/SIGTERM into ``requested`` (and a second one into an abort)."""

    def __init__(self):
        self.signum: int | None = None
        self.ending = False
        """Set once the run is ending (its stop checkpoint written, or its loader workers being ended):
        a further signal then only sets the flag, as nothing is left to abort, and cutting the ending
        short would leave a live worker (and a ``KeyboardInterrupt`` ignored in its ``__del__``) behind."""
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def request(self, signum: int, _frame=None) -> None:
        if self.signum is not None and not self.ending:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted without a checkpoint")
        self.signum = self.signum or signum

    def agreed(self, dist, device: torch.device, check: bool) -> bool:
        """Whether to stop after this step; under torchrun (``dist``) every rank stops at the same step.

        A single process reads its flag every step (no sync). Under torchrun the flags are all-reduced
        only where ``check`` (the logging steps, which sync anyway), so the loop gains no per-step host
        sync; a signal then stops the job at the next logging step.
        """
        if not dist.distributed:
            return self.requested
        if not check:
            return False
        flag = torch.tensor([self.signum or 0], device=device)
        agreed = int(dist.all_reduce(flag, op="max").item())  # a sync: logging steps only
        if agreed and not self.requested:
            self.signum = agreed  # a rank that got no signal stops with the others, under their signal
        return bool(agreed)

    def __enter__(self) -> StopRequest:
        # Python delivers signals to the main thread only; elsewhere (a test's thread) nothing is hooked.
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self.request)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGINT/SIGTERM to the main process.

    A terminal's Ctrl-C and SLURM's SIGTERM reach every process of the job; a worker that died of
    one would take the batch the main process still needs for the step it is finishing. The main
    process ends its workers itself when it stops.
    """
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
