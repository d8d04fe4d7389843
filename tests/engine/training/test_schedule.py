"""The learning-rate schedules: a pure function of the step, per schedule kind."""

from __future__ import annotations

import math

import pytest

from d2v2.engine.training.schedule import OptimConfig, lr_at


def test_lr_schedule_warms_up_then_follows_the_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.0)
    assert [lr_at(s, cfg, 1.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg, 1.0) == pytest.approx(0.0) and lr_at(100, cfg, 1.0) == pytest.approx(0.0)


def test_polynomial_and_tri_stage_schedules():
    linear = OptimConfig(lr=1.0, warmup_steps=2, total_steps=12, schedule="polynomial", power=1.0, min_lr=0.0)
    assert [lr_at(s, linear, 1.0) for s in (0, 1, 2, 7, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    tri = OptimConfig(lr=1.0, total_steps=100, schedule="tri_stage", phase_ratio=(0.1, 0.5, 0.4))
    assert lr_at(0, tri, 2.0) == pytest.approx(0.02) and lr_at(5, tri, 2.0) == pytest.approx(0.02 + 1.98 * 0.5)
    assert lr_at(10, tri, 2.0) == lr_at(59, tri, 2.0) == 2.0
    assert lr_at(80, tri, 2.0) == pytest.approx(2.0 * 0.05**0.5) and lr_at(100, tri, 2.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.phase_ratio"):
        OptimConfig(schedule="tri_stage", phase_ratio=(0.5, 0.5, 0.5))
