"""Task metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from d2v2.engine.finetune.metrics import GLUE_METRICS, METRICS, score

LOGITS = torch.tensor([[2.0, 1.0], [0.1, 0.9], [3.0, -1.0], [0.0, 1.0]])  # predicts 0, 1, 0, 1
LABELS = torch.tensor([0, 1, 1, 1])


def test_classification_metrics():
    got = score(["accuracy", "f1", "mcc"], LOGITS, LABELS)
    assert got["accuracy"] == 0.75
    assert got["f1"] == pytest.approx(2 * 1.0 * (2 / 3) / (1.0 + 2 / 3))  # precision 1, recall 2/3
    # tp 2, tn 1, fp 0, fn 1: (2*1 - 0*1) / sqrt(2 * 3 * 1 * 2)
    assert got["mcc"] == pytest.approx(2 / 12**0.5)


def test_top5_counts_a_label_among_the_five_best():
    logits = torch.arange(12.0).repeat(2, 1)  # best are classes 11..7
    assert score(["top5"], logits, torch.tensor([7, 6]))["top5"] == 0.5
    assert score(["top5"], LOGITS, LABELS)["top5"] == 1.0  # fewer classes than five: all


def test_regression_metrics():
    predicted, true = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 5.0])
    got = score(["pearson", "spearman"], predicted, true)
    assert got["spearman"] == pytest.approx(0.8)
    assert got["pearson"] == pytest.approx(torch.corrcoef(torch.stack([predicted, true]))[0, 1].item())
    assert score(["pearson"], torch.ones(4), true)["pearson"] == 0.0  # a constant prediction has none


def test_every_glue_metric_is_known_and_bad_requests_are_errors():
    assert {m for names in GLUE_METRICS.values() for m in names} <= set(METRICS)
    with pytest.raises(ValueError, match="unknown metric"):
        score(["bleu"], LOGITS, LABELS)
    with pytest.raises(ValueError, match="as many outputs as labels"):
        score(["accuracy"], LOGITS, LABELS[:3])
