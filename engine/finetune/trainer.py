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

from ..training.checkpoint import BEST_DIR, save_best
from ..training.metrics_log import MetricsLog
from ..training.trainer import Trainer
from .metrics import LOWER_IS_BETTER, better

@torch.no_grad()
def run_scorer(model, batches, scorer, device: torch.device, autocast_dtype=None):
    """Feed ``model``'s outputs on ``batches`` (in eval mode) to ``scorer`` (``add(out, batch)``); returns
    ``scorer.result()``."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in ("source", "padding_mask") if k in batch}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(inputs)
            scorer.add(out, batch)
    finally:
        model.train(was_training)
    return scorer.result()


class FinetuneTrainer(Trainer):
    """``Trainer`` for a fine-tuning model (``d2v2.models.FinetuneModel``), scoring the validation split
    every ``eval_every`` updates.

    Args (beyond ``Trainer``'s):
        valid_batches: ``valid_batches() -> iterable of batches``, the validation split in order.
        scorer: ``scorer() -> a fresh scorer`` (``add(out, batch)``, ``result() -> {metric: value}``).
        metric_names: what to report, the first deciding the best checkpoint (``metrics.better``: error
            rates lower, the others higher).
        eval_every: updates between validations.
    """

    command = "finetune"

    def __init__(self, *args, valid_batches, scorer, metric_names: tuple[str, ...], eval_every: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.valid_batches, self.scorer, self.metric_names, self.eval_every = valid_batches, scorer, tuple(metric_names), eval_every
        self.best = {"step": 0, "score": -math.inf, "metrics": {}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best": dict(self.best)}

    def load_state_dict(self, state: dict, folder: Path | None = None) -> None:
        super().load_state_dict(state, folder)
        self.best = dict(state.get("best", self.best))
        # A fine-tuning model keeps nothing from after_step but the update count (the frozen-encoder
        # phase), which its weights do not hold: tell it where the run resumes.
        self.method.after_step(self.step)

    def evaluate(self) -> dict[str, float]:
        """The metrics of the validation split now."""
        return run_scorer(self.method, self.valid_batches(), self.scorer(), self.device, self.autocast_dtype)

    def after_update(self, metrics_file: MetricsLog | None) -> None:
        if self.step % self.eval_every != 0 and self.step != self.max_steps:
            return
        start = time.perf_counter()
        metrics = self.evaluate()
        main = self.metric_names[0]
        if metrics_file is not None:
            metrics_file.write({"step": self.step, **{f"valid_{k}": v for k, v in metrics.items()}})
        improved = better(main, metrics[main], self.best["score"])
        if improved:
            self.best = {"step": self.step, "score": metrics[main], "metrics": metrics}
            self._save_best()
        shown = " | ".join(f"{k} {_shown(v, k)}" for k, v in metrics.items())
        self.log(f"step {self.step}/{self.max_steps} valid: {shown} ({time.perf_counter() - start:.1f} s)"
                 + (" | best so far, kept" if improved else f" | best {_shown(self.best['score'], main)} at step {self.best['step']}"))

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
            shown = " | ".join(f"{k} {_shown(v, k)}" for k, v in best["metrics"].items())
            lines.append(f"best:       step {best['step']}: valid {shown} ({self.run_dir / BEST_DIR})")
        lines.append(f"evaluate:   d2v2 evaluate --checkpoint {self.run_dir}")
        return lines


def _shown(value: float, name: str = "") -> str:
    """A metric for the console: fractions (and error rates, which may pass 1) as percentages."""
    return f"{100 * value:.2f} %" if -1 <= value <= 1 or name in LOWER_IS_BETTER else f"{value:.4f}"
