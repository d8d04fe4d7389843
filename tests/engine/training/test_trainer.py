"""Trainer behaviour with a stand-in method: schedule, non-finite skip and stop, collapse stop,
accumulation, and no host sync outside logging and checkpoint steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from d2v2.engine.training.schedule import OptimConfig
from d2v2.engine.training.trainer import TrainConfig, Trainer
from d2v2.engine.training.unreadable import DataUnreadable, TrainingStopped


class NanGrad(torch.autograd.Function):
    """0 forward, NaN gradient: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, w):
        ctx.shape = w.shape
        return w.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("nan"))


class Probe(nn.Module):
    """A minimal method: loss = mean((w * x)^2), made non-finite (the loss, or only its gradient)
    on the calls in ``nan_calls`` or from call ``nan_from_call`` on."""

    def __init__(self, nan_from_call: int | None = None, target_var: float = 1.0, nan_calls=(), nan_in="loss"):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.calls, self.nan_from_call, self.target_var, self.ema_steps = 0, nan_from_call, target_var, []
        self.nan_calls, self.nan_in, self.weights = set(nan_calls), nan_in, []

    def forward(self, batch):
        self.calls += 1
        loss = (self.w * batch["source"]).square().mean()
        if self.calls in self.nan_calls or (self.nan_from_call is not None and self.calls >= self.nan_from_call):
            loss = loss * float("nan") if self.nan_in == "loss" else loss + NanGrad.apply(self.w)
        return {"loss": loss, "target_var": torch.tensor(self.target_var), "pred_var": torch.tensor(1.0), "ema_decay": 0.99}

    def after_step(self, step):
        self.ema_steps.append(step)
        self.weights.append(self.w.detach().clone())

    def param_groups(self, weight_decay):
        return [{"params": [self.w], "weight_decay": weight_decay}]

    def health(self, step, metrics):
        if metrics["target_var"] < 0.1:
            return f"target variance {metrics['target_var']} too low at step {step}: the representations collapsed"
        return None


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


def test_non_finite_loss_stops_at_the_next_logging_step_without_touching_the_weights(tmp_path):
    method = Probe(nan_from_call=4)
    trainer = make_trainer(tmp_path, method)
    with pytest.raises(TrainingStopped, match=r"non-finite loss at step 4.*stopped at step 4.*step-00000002"):
        trainer.train()
    assert method.ema_steps == [1, 2, 3, 4]
    saved = torch.load(tmp_path / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    assert saved["trainer"]["step"] == 2
    # The skipped update left the weights and the optimizer's moments and step count as they were.
    assert torch.equal(method.weights[3], method.weights[2]) and torch.isfinite(method.w).all()
    assert int(trainer.optimizer.state[method.w]["step"]) == 3


@pytest.mark.parametrize("nan_in,what", [("loss", "loss"), ("grad", "gradient norm")])
def test_a_non_finite_step_between_logging_steps_is_skipped_then_named(tmp_path, nan_in, what):
    # Step 2 alone is bad; the run goes on to the logging step 3 (the step itself never reads the
    # device), then stops naming step 2. No checkpoint is written after a non-finite step.
    method = Probe(nan_calls={2}, nan_in=nan_in)
    optim = OptimConfig(lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.0)
    cfg = TrainConfig(log_every=3, checkpoint_every=2)
    trainer = Trainer(method, batches, optim, cfg, tmp_path, torch.device("cpu"), 2, {}, log=lambda *_: None)
    with pytest.raises(TrainingStopped, match=rf"non-finite {what} at step 2;.*stopped at step 2 \(no checkpoint"):
        trainer.train()
    assert torch.equal(method.weights[1], method.weights[0])  # step 2 skipped
    assert not (tmp_path / "checkpoints").exists()


def test_no_host_sync_outside_logging_and_checkpoint_steps(tmp_path, monkeypatch):
    # Every way Python code reads a tensor back to the host, patched to record where it was called.
    reads, allowed = [], []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if not allowed:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for name in ("_logged_values", "save"):  # where a sync is expected
        original = getattr(Trainer, name)

        def permitted(self, *args, _original=original, **kwargs):
            allowed.append(True)
            try:
                return _original(self, *args, **kwargs)
            finally:
                allowed.pop()

        monkeypatch.setattr(Trainer, name, permitted)
    method = Probe()
    optim = OptimConfig(lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.0, clip_grad=1.0)
    cfg = TrainConfig(log_every=4, checkpoint_every=100, max_steps=8, accum_steps=2)
    trainer = Trainer(method, batches, optim, cfg, tmp_path, torch.device("cpu"), 2, {}, log=lambda *_: None)
    metrics = trainer.train()
    assert reads == []
    assert metrics["step"] == 8 and math.isfinite(metrics["loss"]) and trainer.samples_seen == 32
    # The spies are live: a read outside the permitted places is recorded.
    allowed.clear()
    torch.ones(1).item()
    assert reads == ["item"]


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
