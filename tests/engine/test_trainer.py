"""Trainer behaviour with a stand-in method: schedule, non-finite stop, collapse stop, accumulation."""

from __future__ import annotations

import math
import signal

import pytest
import torch
from torch import nn

from d2v2.engine.signals import StopRequest
from d2v2.engine.trainer import DataUnreadable, OptimConfig, TrainConfig, Trainer, TrainingStopped, lr_at


class Probe(nn.Module):
    """A minimal method: loss = mean((w * x)^2) unless told to return NaN from some call on."""

    def __init__(self, nan_from_call: int | None = None, target_var: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.calls, self.nan_from_call, self.target_var, self.ema_steps = 0, nan_from_call, target_var, []

    def forward(self, batch):
        self.calls += 1
        loss = (self.w * batch["source"]).square().mean()
        if self.nan_from_call is not None and self.calls >= self.nan_from_call:
            loss = loss * float("nan")
        return {"loss": loss, "target_var": torch.tensor(self.target_var), "pred_var": torch.tensor(1.0), "ema_decay": 0.99}

    def after_step(self, step):
        self.ema_steps.append(step)

    def param_groups(self, weight_decay):
        return [{"params": [self.w], "weight_decay": weight_decay}]

    def variance_collapse(self, step, target_var, pred_var):
        return f"target variance {target_var} too low at step {step}" if target_var < 0.1 else None


def batches(position):
    g = torch.Generator().manual_seed(0)
    b = 0
    while True:
        yield {"source": torch.randn(2, 4, generator=g), "mask": torch.ones(4, 3, dtype=torch.bool), "skipped": [], "epoch": 0, "batch": b}
        b += 1


def make_trainer(tmp_path, method, **train):
    optim = OptimConfig(lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.0)
    cfg = TrainConfig(log_every=1, checkpoint_every=2, **train)
    return Trainer(method, batches, optim, cfg, tmp_path, torch.device("cpu"), 2, {}, log=lambda *_: None)


def test_lr_schedule_warms_up_then_follows_the_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.0)
    assert [lr_at(s, cfg, 1.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg, 1.0) == pytest.approx(0.0) and lr_at(100, cfg, 1.0) == pytest.approx(0.0)


def test_non_finite_loss_stops_before_the_update(tmp_path):
    method = Probe(nan_from_call=4)
    trainer = make_trainer(tmp_path, method)
    with pytest.raises(TrainingStopped, match=r"non-finite loss at step 4.*step-00000002"):
        trainer.train()
    assert trainer.step == 3 and method.ema_steps == [1, 2, 3]
    saved = torch.load(tmp_path / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    assert saved["trainer"]["step"] == 2
    assert torch.isfinite(method.w).all()


def test_collapsed_target_variance_stops_the_run(tmp_path):
    trainer = make_trainer(tmp_path, Probe(target_var=0.01))
    with pytest.raises(TrainingStopped, match="collapsed"):
        trainer.train()


def test_accumulation_averages_micro_batches(tmp_path):
    method = Probe()
    trainer = make_trainer(tmp_path, method, accum_steps=2, max_steps=1)
    trainer.train()
    gen = batches(None)
    x1, x2 = next(gen)["source"], next(gen)["source"]
    w = torch.ones(4, requires_grad=True)
    (((w * x1).square().mean() + (w * x2).square().mean()) / 2).backward()
    # AdamW's first step moves each weight by lr * sign(grad) (bias-corrected m / sqrt(v)).
    assert torch.allclose(method.w.detach(), 1 - 0.1 * torch.sign(w.grad), atol=1e-6)
    assert trainer.samples_seen == 4


class OtherRankSignalled:
    """A stand-in for a 2-rank job whose other rank received SIGTERM; counts the all-reduces."""

    distributed, world_size, rank, is_main = True, 2, 0, True

    def __init__(self):
        self.reductions = 0

    def all_reduce(self, tensor, op="sum"):
        self.reductions += 1
        return torch.maximum(tensor, torch.full_like(tensor, int(signal.SIGTERM)))


def test_ranks_agree_on_the_stop_step_at_logging_steps_only(tmp_path):
    trainer = make_trainer(tmp_path, Probe())
    trainer.cfg.log_every = 4
    trainer.dist = OtherRankSignalled()
    stop = StopRequest()
    for step in (1, 2, 3):  # no collective between logging steps: no per-step host sync
        trainer.step = step
        assert not trainer._stop_agreed(stop)
    trainer.step = 4
    assert trainer._stop_agreed(stop) and stop.name == "SIGTERM" and stop.exit_code == 143
    assert trainer.dist.reductions == 1


def test_unreadable_batches_are_bounded(tmp_path):
    def bad(position):
        b = 0
        while True:  # every file of every batch unreadable, forever
            yield {"skipped": [f"/data/x/{b}-{i}.png" for i in range(2)], "epoch": 0, "batch": b}
            b += 1

    trainer = make_trainer(tmp_path, Probe(), max_corrupt=5)
    trainer.loader_fn = bad
    with pytest.raises(DataUnreadable, match=r"every file tried in /data/x was unreadable \(6 files"):
        trainer.train()
