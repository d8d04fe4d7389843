"""Where rank 0's logged scalars go: ``<run>/metrics.jsonl``, and TensorBoard on request.

``--set train.tensorboard=true`` writes the same scalars (``train/<key>`` at the step) through
``torch.utils.tensorboard.SummaryWriter`` into ``<run>/tensorboard/``; view them with
``tensorboard --logdir <run>/tensorboard``. A resumed run hides the events its checkpoint did not
keep (``purge_step``), as ``metrics.jsonl`` drops their lines.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from .runfolder import METRICS_FILE

TENSORBOARD_DIR = "tensorboard"


def check_tensorboard() -> None:
    """A one-line error when ``train.tensorboard`` is asked for without the tensorboard package."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "train.tensorboard=true needs the tensorboard package: pip install 'd2v2[tensorboard]' "
            "(or leave train.tensorboard false)"
        )


class MetricsLog:
    """Appends each logging step's metrics to ``metrics.jsonl`` (and TensorBoard), flushed at once.

    Args:
        run_dir: the run folder.
        tensorboard: also write TensorBoard event files into ``<run>/tensorboard/``.
        start_step: the step the run starts (or resumes) at; later events of an earlier attempt are hidden.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = False, start_step: int = 0):
        self.file = open(Path(run_dir) / METRICS_FILE, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def write(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = metrics["step"]
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and not math.isnan(value):
                    self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
