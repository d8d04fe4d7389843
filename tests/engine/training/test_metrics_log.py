"""metrics.jsonl and TensorBoard beside it (``train.tensorboard``), and the closing summary read from them."""

from __future__ import annotations

import importlib.util
import json

import pytest

from d2v2.engine.cli import main
from d2v2.engine.training.metrics_log import closing_summary

TINY = [
    "pretrain", "--recipe", "image-tiny", "--device", "cpu", "--set", "data.num_workers=0",
    "--set", "data.batch_size=4", "--set", "train.log_every=1", "--max-steps", "3",
]  # fmt: skip


def test_tensorboard_holds_the_metrics_jsonl_scalars(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("D2V2_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main([*TINY, "--set", "train.tensorboard=true", "--out", str(run)]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/target_var"} <= set(events.Tags()["scalars"])
    for key in ("loss", "lr", "grad_norm"):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [m["step"] for m in logged] == [1, 2, 3]
        assert [e.value for e in scalars] == pytest.approx([m[key] for m in logged], rel=1e-6)  # stored as fp32


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path / "cache"))
    assert main([*TINY, "--set", "train.tensorboard=true", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the tensorboard package: pip install 'd2v2[tensorboard]'" in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any work


def test_closing_summary_reads_the_whole_run(tmp_path):
    rows = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 1.5}, {"step": 30, "loss": float("nan")}, {"step": 40, "loss": 2.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 50, "lo'  # a torn last line
    (tmp_path / "metrics.jsonl").write_text(text)
    checkpoint = tmp_path / "checkpoints" / "step-00000040"
    lines = closing_summary(
        tmp_path, step=40, max_steps=100, start_step=20, seconds=90.0, samples=1800, checkpoint=checkpoint, stopped_by="SIGTERM"
    )
    assert lines[0] == "pretrain stopped on SIGTERM: 40/100 updates (20 in this session) in 1 min 30 s, 20.0 samples/s"
    assert lines[1] == "loss: final 2.0000 (update 40), best 1.5000 (update 20)"
    assert lines[2] == f"checkpoint: {checkpoint}"
    assert len(lines) == 3  # the trainer adds the commands to run next (probe and export, or evaluate)


def test_closing_summary_without_metrics_or_checkpoint(tmp_path):
    lines = closing_summary(tmp_path, step=0, max_steps=5, start_step=0, seconds=0.2, samples=0, checkpoint=None)
    assert lines[0] == "pretrain done: 0/5 updates (0 in this session) in 0.2 s"
    assert lines[1] == "checkpoint: none written"
