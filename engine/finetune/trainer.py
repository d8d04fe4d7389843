"""The fine-tuning loop: pretraining's ``Trainer`` with validation and the best checkpoint.

Every ``train.eval_every`` updates (and after the last) the validation split is scored; the row goes to
metrics.jsonl as ``valid_<metric>`` values, and when the first metric beats the best so far, the
weights are written to ``<run>/best/state.pt`` (atomically, beside the ``checkpoints/`` that pruning
manages, so pruning never reaches it). The best score is part of the trainer's state, so a resumed run
keeps comparing against it. Every process scores the whole split (FSDP2 needs all of them in each
forward); rank 0 writes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from d2v2.models import Classifier

from ..checkpoint import BEST_DIR, save_best
from ..metrics_log import MetricsLog
from ..trainer import Trainer
from .data import valid_batches
from .metrics import score

@torch.no_grad()
def predict(model: Classifier, dataset, batch_size: int, pad_value, device: torch.device, autocast_dtype=None):
    """Outputs [M, C] (fp32, on the CPU) and labels [M] of ``model`` on ``dataset``, in order, in eval mode."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    try:
        for batch in valid_batches(dataset, batch_size, pad_value):
            padding = batch.get("padding_mask")
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                inputs = {"source": batch["source"].to(device)} | ({} if padding is None else {"padding_mask": padding.to(device)})
                logits = model(inputs)["logits"]
            outputs.append(logits.float().cpu())
            labels.append(batch["label"])
    finally:
        model.train(was_training)
    return torch.cat(outputs), torch.cat(labels)


class FinetuneTrainer(Trainer):
    """``Trainer`` for a ``d2v2.models.Classifier``, scoring ``valid`` every ``eval_every`` updates.

    Args (beyond ``Trainer``'s):
        valid: the validation data set (``(index, seed) -> {"source", "label"}``).
        metric_names: what to report, the first deciding the best checkpoint (higher is better).
        eval_every: updates between validations.
        eval_batch_size: samples per validation batch.
        pad_value: the sources' padding value (None: images, stacked).
    """

    command = "finetune"

    def __init__(self, *args, valid, metric_names: tuple[str, ...], eval_every: int, eval_batch_size: int,
                 pad_value=None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.valid, self.metric_names, self.eval_every = valid, tuple(metric_names), eval_every
        self.eval_batch_size, self.pad_value = eval_batch_size, pad_value
        self.best = {"step": 0, "score": -math.inf, "metrics": {}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best": dict(self.best)}

    def load_state_dict(self, state: dict, folder: Path | None = None) -> None:
        super().load_state_dict(state, folder)
        self.best = dict(state.get("best", self.best))

    def evaluate(self) -> dict[str, float]:
        """The metrics of the validation split now."""
        outputs, labels = predict(self.method, self.valid, self.eval_batch_size, self.pad_value, self.device, self.autocast_dtype)
        return score(self.metric_names, outputs, labels)

    def after_update(self, metrics_file: MetricsLog | None) -> None:
        if self.step % self.eval_every != 0 and self.step != self.max_steps:
            return
        start = time.perf_counter()
        metrics = self.evaluate()
        main = self.metric_names[0]
        if metrics_file is not None:
            metrics_file.write({"step": self.step, **{f"valid_{k}": v for k, v in metrics.items()}})
        improved = metrics[main] > self.best["score"]
        if improved:
            self.best = {"step": self.step, "score": metrics[main], "metrics": metrics}
            self._save_best()
        shown = " | ".join(f"{k} {_shown(v)}" for k, v in metrics.items())
        self.log(f"step {self.step}/{self.max_steps} valid: {shown} ({time.perf_counter() - start:.1f} s)"
                 + (" | best so far, kept" if improved else f" | best {_shown(self.best['score'])} at step {self.best['step']}"))

    def _save_best(self) -> None:
        if self.sharded:  # the whole weights, gathered from every rank's shards (a collective)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            weights = get_model_state_dict(self.method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            weights = self.method.state_dict()
        if self.dist.is_main:
            save_best(self.run_dir, {
                "method": {k: v.detach().cpu() for k, v in weights.items()}, "config": self.config_dict,
                "trainer": {"step": self.step}, "valid": dict(self.best["metrics"]),
            })  # fmt: skip
        self.dist.barrier()

    def closing_lines(self) -> list[str]:
        best = self.best
        lines = []
        if best["metrics"]:
            shown = " | ".join(f"{k} {_shown(v)}" for k, v in best["metrics"].items())
            lines.append(f"best:       step {best['step']}: valid {shown} ({self.run_dir / BEST_DIR})")
        lines.append(f"evaluate:   d2v2 evaluate --checkpoint {self.run_dir}")
        return lines


def _shown(value: float) -> str:
    """A metric for the console: fractions as percentages."""
    return f"{100 * value:.2f} %" if -1 <= value <= 1 else f"{value:.4f}"
