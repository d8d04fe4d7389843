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

from .runfolder import METRICS_FILE, read_metrics

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


def log_row(
    step: int, logged: dict, lr: float, out: dict, seconds: float, skipped_files: int, log_keys: tuple[str, ...] = ()
) -> dict:
    """One logging step's line of metrics.jsonl: ``logged`` holds the values agreed over the ranks
    (loss, variances, gradient norm, peak memory, the window's samples and tokens), ``out`` the
    method's own outputs (the EMA decay; ``log_keys``, rank 0's), ``seconds`` the window's length."""
    seconds = max(seconds, 1e-9)
    return {
        "step": step,
        "loss": logged["loss"],
        "lr": lr,
        "ema_decay": float(out.get("ema_decay", float("nan"))),
        "target_var": logged["target_var"],
        "pred_var": logged["pred_var"],
        "grad_norm": logged["grad_norm"],
        "samples_per_s": logged["samples"] / seconds,
        "tokens_per_s": logged["tokens"] / seconds,
        "peak_memory_mb": logged["peak_memory_mb"],
        "skipped_files": skipped_files,
        **{k: float(out[k]) for k in log_keys if k in out},
    }


def progress_line(metrics: dict, max_steps: int) -> str:
    """The console line of a logging step (without a progress bar)."""
    variances = "".join(  # the methods with a teacher log these; the others do not
        f"{key} {metrics[key]:.3f} " for key in ("target_var", "pred_var") if math.isfinite(metrics[key])
    )
    return (f"step {metrics['step']}/{max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} "
            f"{variances}{metrics['samples_per_s']:.1f} samples/s")  # fmt: skip


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def closing_summary(
    run_dir: Path, *, step: int, max_steps: int, start_step: int, seconds: float, samples: float,
    checkpoint: Path | None, stopped_by: str | None = None, command: str = "pretrain",
) -> list[str]:
    """The lines a training run (``command``) ends with: updates, final and best loss (over the whole
    run's ``metrics.jsonl``), wall time and samples/s of this session, and the checkpoint; the trainer
    adds what to run next."""
    losses = [
        (row["step"], row["loss"]) for row in read_metrics(run_dir)
        if isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"])
    ]  # fmt: skip
    ended = f"stopped on {stopped_by}" if stopped_by else "done"
    rate = f", {samples / seconds:.1f} samples/s" if seconds > 0 and samples else ""
    lines = [f"{command} {ended}: {step}/{max_steps} updates ({step - start_step} in this session) "
             f"in {_duration(seconds)}{rate}"]  # fmt: skip
    if losses:
        best_step, best = min(losses, key=lambda sl: sl[1])
        lines.append(f"loss: final {losses[-1][1]:.4f} (update {losses[-1][0]}), best {best:.4f} (update {best_step})")
    lines.append(f"checkpoint: {checkpoint if checkpoint is not None else 'none written'}")
    return lines
