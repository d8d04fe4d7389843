"""SIGTERM and Ctrl-C: finish the step, write a checkpoint, say how to continue, exit 143 / 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from d2v2.engine.cli import main
from d2v2.engine.training.signals import StopRequest

FAST = ["--set", "data.num_workers=2", "--set", "train.log_every=1", "--set", "data.batch_size=8"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


def test_a_second_signal_aborts_at_once():
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # handled: only a flag
        assert stop.requested and stop.exit_code == 143 and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, signum, code):
    run = tmp_path / "run"
    argv = ["pretrain", "--recipe", "image-tiny", "--out", str(run), "--max-steps", "1000", *FAST]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "d2v2.engine.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        for line in proc.stdout:  # the loop has begun: send the signal
            if line.startswith("step 2/"):
                proc.send_signal(signum)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    stopped = logged[-1]
    assert f"{signal.Signals(signum).name} at step {stopped}: checkpoint" in err
    assert f"continue with: d2v2 pretrain --out {run} --resume auto" in err
    summary = out.splitlines()[-5:]  # and how far it got, on stdout
    assert summary[0].startswith(f"pretrain stopped on {signal.Signals(signum).name}: {stopped}/1000 updates")
    assert summary[2] == f"checkpoint: {run / 'checkpoints' / f'step-{stopped:08d}'}"
    state = torch.load(run / "checkpoints" / f"step-{stopped:08d}" / "state.pt", weights_only=True)
    assert state["trainer"]["step"] == stopped >= 2
    # Continuing loses nothing and repeats nothing.
    assert main(["pretrain", "--out", str(run), "--max-steps", str(stopped + 1)]) == 0
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, stopped + 2))


def test_a_second_signal_while_the_workers_end_changes_nothing(tmp_path, monkeypatch, capsys):
    # Two Ctrl-C 0.3 s apart: the first stops the run at a step boundary, the second lands while the
    # run ends its loader workers, and must neither cut that short nor print anything.
    from d2v2.engine.training import trainer

    step, close, workers = trainer.Trainer.train_step, trainer.close_batches, []

    def train_step(self, batches):
        result = step(self, batches)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    def close_under_fire(batches):
        workers.extend(batches._workers)
        os.kill(os.getpid(), signal.SIGINT)
        close(batches)

    monkeypatch.setattr(trainer.Trainer, "train_step", train_step)
    monkeypatch.setattr(trainer, "close_batches", close_under_fire)
    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN under a shell's background job
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", "image-tiny", "--out", str(run), "--max-steps", "1000", *FAST]) == 130
    err = capsys.readouterr().err
    assert "SIGINT at step 2: checkpoint" in err and len(err.strip().splitlines()) == 1, err
    assert workers and not any(w.is_alive() for w in workers)
    assert signal.getsignal(signal.SIGINT) is before  # the run put back what it found


def test_two_ctrl_c_in_a_row_exit_130_without_noise(tmp_path):
    # Wherever the second lands (the last step: an abort; the ending; the interpreter's exit), the
    # process exits 130 with one line, never dies of the signal nor prints an ignored exception.
    run = tmp_path / "run"
    argv = ["pretrain", "--recipe", "image-tiny", "--out", str(run), "--max-steps", "1000", *FAST]
    proc = subprocess.Popen(
        [sys.executable, "-m", "d2v2.engine.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                proc.send_signal(signal.SIGINT)
                time.sleep(0.3)
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "Exception ignored" not in err, err


class OtherRankSignalled:
    """A stand-in for a 2-rank job whose other rank received SIGTERM; counts the all-reduces."""

    distributed, world_size, rank, is_main = True, 2, 0, True

    def __init__(self):
        self.reductions = 0

    def all_reduce(self, tensor, op="sum"):
        self.reductions += 1
        return torch.maximum(tensor, torch.full_like(tensor, int(signal.SIGTERM)))


def test_ranks_agree_on_the_stop_step_at_logging_steps_only():
    dist, stop, cpu = OtherRankSignalled(), StopRequest(), torch.device("cpu")
    for step in (1, 2, 3):  # no collective between logging steps (every 4th): no per-step host sync
        assert not stop.agreed(dist, cpu, check=step % 4 == 0)
    assert stop.agreed(dist, cpu, check=True) and stop.name == "SIGTERM" and stop.exit_code == 143
    assert dist.reductions == 1
