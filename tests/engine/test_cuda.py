"""CUDA mode only: a few bf16 steps of each tiny recipe on the GPU through the command line, and the
training step making no host sync between logging steps (CUDA's own sync detector)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from d2v2.engine.cli import main
from d2v2.engine.training.schedule import OptimConfig
from d2v2.engine.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("recipe", ["image-tiny", "audio-tiny", "text-tiny"])
def test_tiny_recipe_trains_bf16_steps_on_cuda(recipe, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--recipe", recipe, "--device", "cuda", "--max-steps", "4", "--out", str(out), "--resume", "none",
            "--set", "train.precision=bf16", "--set", "train.log_every=1", "--set", "data.num_workers=0"]  # fmt: skip
    assert main(args) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert all(m["peak_memory_mb"] > 0 and m["samples_per_s"] > 0 for m in metrics)


class Regression(nn.Module):
    """A stand-in method whose forward itself never syncs (no tensors made from Python values)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))

    def forward(self, batch):
        pred = self.net(batch["source"])
        loss = (pred - batch["source"]).square().mean()
        return {"loss": loss, "target_var": loss.detach(), "pred_var": pred.detach().var(), "ema_decay": 0.999}

    def after_step(self, step):
        pass

    def param_groups(self, weight_decay):
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]

    def health(self, step, metrics):
        return None


def _batches(position):
    b = 0
    while True:
        source = torch.randn(8, 16, device="cpu").pin_memory()
        mask = torch.ones(8, 4, dtype=torch.bool, device="cpu").pin_memory()
        yield {"source": source, "mask": mask, "skipped": [], "epoch": 0, "batch": b}
        b += 1


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_train_step_makes_no_host_sync_between_logging_steps(tmp_path, monkeypatch, precision):
    for name in ("_logged_values", "save"):  # the permitted syncs
        original = getattr(Trainer, name)

        def permitted(self, *args, _original=original, **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return _original(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        monkeypatch.setattr(Trainer, name, permitted)
    optim = OptimConfig(lr=1e-3, total_steps=12, clip_grad=1.0)
    cfg = TrainConfig(log_every=4, checkpoint_every=100, max_steps=12, accum_steps=2, precision=precision)
    trainer = Trainer(Regression(), _batches, optim, cfg, tmp_path, torch.device("cuda"), 8, {}, log=lambda *_: None)
    trainer.train_step(_batches(None))  # the first step creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert metrics["step"] == 12 and math.isfinite(metrics["loss"])
