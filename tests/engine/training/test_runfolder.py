"""The run folder's guard rails: lock, continuing a run from its own config, checkpoint fallback, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from d2v2.engine.cli import main
from tests.helpers import one_line_error
from d2v2.engine.training.runfolder import RunFolder, RunFolderError, remove_temporaries, truncate_metrics

FAST = ["--set", "data.num_workers=0", "--set", "train.log_every=1", "--set", "data.batch_size=8"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


def steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(run) -> dict:
    """Every file of a run folder but its lock, with its bytes: to check that nothing changed."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step image-tiny run with checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    argv = ["pretrain", "--recipe", "image-tiny", "--out", str(run), "--max-steps", "4", *FAST, "--set", "train.checkpoint_every=2"]
    assert main(argv) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    (copy / ".lock").unlink()
    return copy


def test_a_run_continues_from_its_folder_alone(run, capsys):
    # The README's own example: no --recipe, the run's config.yaml (with its --set values) is used.
    config = (run / "config.yaml").read_text()
    assert main(["pretrain", "--out", str(run), "--max-steps", "5"]) == 0
    assert steps(run) == [1, 2, 3, 4, 5]  # log_every=1 came from the run's config
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 5
    assert config.replace("max_steps: 4", "max_steps: 5") == (run / "config.yaml").read_text()
    assert "resumed from" in capsys.readouterr().out


def test_another_recipe_or_setting_on_a_run_is_refused(run, capsys):
    before = snapshot(run)
    assert "is a run of recipe image-tiny, not text-tiny" in one_line_error(capsys, ["pretrain", "--recipe", "text-tiny", "--out", str(run)])
    err = one_line_error(capsys, ["pretrain", "--out", str(run), "--set", "optim.lr=0.1"])
    assert "optim.lr=0.002" in err and "train.max_steps" in err and "new --out" in err
    assert snapshot(run) == before
    # Repeating the run's own values is no change.
    assert main(["pretrain", "--recipe", "image-tiny", "--out", str(run), "--max-steps", "4", *FAST]) == 0


def test_resume_none_on_a_run_with_checkpoints_is_refused(run, capsys):
    before = snapshot(run)
    assert "--resume none would restart" in one_line_error(capsys, ["pretrain", "--out", str(run), "--resume", "none"])
    assert snapshot(run) == before


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(run, capsys):
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000004")  # latest names a folder that is gone
    assert main(["pretrain", "--out", str(run), "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "step-00000004: no state.pt; resuming from step-00000002" in out
    assert steps(run) == [1, 2, 3]  # cut back to step 2, then step 3 once
    (run / "checkpoints" / "step-00000003" / "state.pt").write_bytes(b"torn")
    assert main(["pretrain", "--out", str(run), "--max-steps", "3"]) == 0
    assert "step-00000003: unreadable; resuming from step-00000002" in capsys.readouterr().out


def test_a_run_whose_checkpoints_all_fail_to_load_stops(run, capsys):
    for folder in (run / "checkpoints").glob("step-*"):
        (folder / "state.pt").write_bytes(b"torn")
    before = snapshot(run)
    err = one_line_error(capsys, ["pretrain", "--out", str(run), "--max-steps", "6"])
    assert "holds checkpoints but none loads" in err and "step-00000002: unreadable" in err
    assert snapshot(run) == before


def test_metrics_are_cut_back_atomically_and_temporaries_removed(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert truncate_metrics(tmp_path, 2) == 3
    assert steps(tmp_path) == [1, 2]
    assert truncate_metrics(tmp_path, 2) == 0
    (tmp_path / "checkpoints" / ".step-00000009.tmp-77").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".latest.tmp-77").write_text("x")
    (tmp_path / "checkpoints" / "step-00000008").mkdir()
    assert remove_temporaries(tmp_path) == [".latest.tmp-77", ".step-00000009.tmp-77"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000008"]


HOLD = "import sys, time; from d2v2.engine.training.runfolder import RunFolder; held = RunFolder.open(sys.argv[1], 'auto'); print('locked', flush=True); time.sleep(300)"


def test_a_locked_run_folder_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = one_line_error(capsys, ["pretrain", "--out", str(run), "--max-steps", "1", *FAST])
        assert f"in use by process {holder.pid}" in err
        with pytest.raises(RunFolderError, match="in use"):
            RunFolder.open(run, "auto")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    RunFolder.open(run, "auto").close()  # the kernel released the dead process's lock


# A holder that forks, as the loader makes its workers: the child (sleeping) outlives the holder.
HOLD_AND_FORK = HOLD.replace("print(", "import os; child = os.fork() or time.sleep(300); print(child, ")


def test_the_lock_dies_with_its_process_not_with_its_loader_workers(tmp_path):
    # torchrun restarts a killed rank 0 at once, while its orphaned loader workers may live on for seconds.
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(run)], stdout=subprocess.PIPE, text=True)
    child, _ = holder.stdout.readline().split()
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        os.kill(int(child), 0)  # the forked child still lives
        RunFolder.open(run, "auto").close()
    finally:
        os.kill(int(child), signal.SIGKILL)


def test_out_naming_a_file_or_an_unwritable_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("mine")
    assert "is a file" in one_line_error(capsys, ["pretrain", "--out", str(tmp_path / "file"), "--max-steps", "1", *FAST])
    assert (tmp_path / "file").read_text() == "mine"

    def read_only(*_args, **_kwargs):
        raise PermissionError(13, os.strerror(13))

    monkeypatch.setattr("pathlib.Path.mkdir", read_only)
    assert "cannot be written (Permission denied)" in one_line_error(capsys, ["pretrain", "--out", str(tmp_path / "ro" / "run"), *FAST])


def test_a_failed_start_leaves_no_empty_folder(tmp_path, capsys):
    one_line_error(capsys, ["pretrain", "--out", str(tmp_path / "new"), "--data", str(tmp_path / "missing"), *FAST])
    assert not (tmp_path / "new").exists()


def test_resuming_on_another_number_of_processes_says_so(run, capsys):
    state_file = run / "checkpoints" / "step-00000004" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["trainer"]["world_size"] = 2
    torch.save(state, state_file)
    assert main(["pretrain", "--out", str(run), "--max-steps", "5"]) == 0
    assert "the checkpoint's run had 2: effective batch 16 -> 8 samples, peak learning rate 0.002 -> 0.002" in capsys.readouterr().out
