"""Task metrics, from logits (classification) or predictions (regression) and the true labels.

Each GLUE task reports what its paper and leaderboard report: CoLA Matthews correlation, STS-B
Pearson and Spearman correlation, MRPC and QQP F1 and accuracy, the others accuracy (Wang et al.,
2019, table 1). Images report top-1 and top-5 accuracy, audio classification accuracy, speech
recognition the word and character error rates (``decoding.error_rates``), for which lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

GLUE_METRICS = {
    "cola": ("mcc",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"), "mnli": ("accuracy",), "qnli": ("accuracy",), "rte": ("accuracy",),
}  # fmt: skip


def _predicted(outputs: torch.Tensor) -> np.ndarray:
    return outputs.argmax(-1).cpu().numpy()


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((_predicted(outputs) == labels.cpu().numpy()).mean())


def top5(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Whether the label is among the five highest logits (all of them, with fewer than five classes)."""
    best = outputs.topk(min(5, outputs.shape[-1]), dim=-1).indices
    return float((best == labels.view(-1, 1)).any(-1).float().mean())


def f1(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels.cpu().numpy(), _predicted(outputs), pos_label=1, zero_division=0.0))


def mcc(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels.cpu().numpy(), _predicted(outputs)))


def _regression(outputs: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return outputs.reshape(-1).float().cpu().numpy(), labels.reshape(-1).float().cpu().numpy()


def pearson(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    from scipy.stats import pearsonr

    predicted, true = _regression(outputs, labels)
    return float(pearsonr(predicted, true).statistic) if np.ptp(predicted) > 0 else 0.0  # constant: undefined


def spearman(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    predicted, true = _regression(outputs, labels)
    return float(spearmanr(predicted, true).statistic) if np.ptp(predicted) > 0 else 0.0


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "accuracy": accuracy, "top5": top5, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman,
}  # fmt: skip


def score(names: Sequence[str], outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{name: value}`` for each metric in ``names`` (an unknown name is a ValueError naming the known ones)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    if outputs.shape[0] != labels.shape[0] or outputs.shape[0] == 0:
        raise ValueError(f"need as many outputs as labels, and at least one; got {outputs.shape[0]} and {labels.shape[0]}")
    return {name: METRICS[name](outputs, labels) for name in names}


LOWER_IS_BETTER = frozenset({"wer", "cer"})
"""Metrics where a smaller value is the better model (error rates)."""


def better(name: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of metric ``name`` beats ``best`` (None or not finite: nothing yet)."""
    if best is None or not math.isfinite(best):
        return True
    return value < best if name in LOWER_IS_BETTER else value > best
