"""TensorBoard beside metrics.jsonl (``train.tensorboard``): the same scalars, read back from the event file."""

from __future__ import annotations

import importlib.util
import json

import pytest

from d2v2.engine.cli import main

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
