"""However a run ends, it ends: exit code, message, and no process of it left alive.

Each run is a real process tree (the CLI and its loader workers, under torchrun its ranks) whose
processes all carry a marker in their environment, so the test finds them in /proc, wherever
they were reparented to, and kills any that outlived the run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

TIMEOUT_S = 60  # a hung run fails the test instead of hanging it


@pytest.fixture
def marker():
    """An environment marker for a run's processes; any still alive at the end are killed."""
    mark = f"D2V2_TEST_RUN={uuid.uuid4().hex}"
    yield mark
    for pid in marked(mark):
        os.kill(pid, signal.SIGKILL)


def marked(mark: str) -> list[int]:
    """The live processes whose environment holds ``mark`` (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if mark.encode() in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def no_survivors(mark: str, within_s: float = 10.0) -> list[int]:
    """Wait up to ``within_s`` for every marked process to end; the ones still alive."""
    deadline = time.monotonic() + within_s
    while (alive := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def start(argv: list[str], mark: str, cwd: Path, cache: Path, extra_env: dict | None = None) -> subprocess.Popen:
    key, value = mark.split("=")
    env = {**os.environ, **(extra_env or {}), key: value, "D2V2_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "d2v2.engine.cli", *argv], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_an_error_in_a_loader_worker_ends_the_run_and_its_workers(tmp_path, marker):
    # An 8 kHz file is a ValueError raised inside the loader worker that reads it.
    (tmp_path / "wav").mkdir()
    for i in range(2):
        sf.write(tmp_path / "wav" / f"{i}.wav", np.random.default_rng(i).normal(0, 0.1, 40_000).astype(np.float32), 8000)
    (tmp_path / "train.tsv").write_text(f"{tmp_path / 'wav'}\n0.wav\t40000\n1.wav\t40000\n")
    argv = ["pretrain", "--recipe", "audio-tiny", "--data", str(tmp_path / "train.tsv"), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--set", "data.num_workers=1", "--set", "data.min_samples=100"]  # fmt: skip
    proc = start(argv, marker, tmp_path, tmp_path / "cache")
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 2, err
    assert "sample rate 8000 Hz, the recipe needs 16000 Hz" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert no_survivors(marker) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy, victim", [("ddp", 1), ("fsdp", 1), ("ddp", 0)])
def test_a_rank_that_loses_its_peer_exits_with_its_workers(tmp_path, marker, strategy, victim):
    # Two ranks as torchrun starts them, without the agent (as when it died too): nothing but the
    # rank itself can end it and its loader workers. Rank 0 also hosts the job's store.
    argv = ["pretrain", "--recipe", "image-tiny", "--out", str(tmp_path / "run"), "--device", "cpu", "--max-steps", "1000",
            "--set", "data.num_workers=1", "--set", "data.batch_size=4", "--set", "train.log_every=1",
            "--set", f"dist.strategy={strategy}"]  # fmt: skip
    dist_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    ranks = [start(argv, marker, tmp_path, tmp_path / "cache", {**dist_env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]  # fmt: skip
    survivor = 1 - victim
    try:
        for line in ranks[0].stdout:  # both train: kill one mid-run
            if line.startswith("step 2/"):
                break
        ranks[victim].kill()
        ranks[victim].wait()
        start_s = time.monotonic()
        _, err = ranks[survivor].communicate(timeout=TIMEOUT_S)
        took = time.monotonic() - start_s
    finally:
        for p in ranks:
            p.kill()
    assert ranks[survivor].returncode == 1, err
    assert f"rank {survivor} lost another process of the job" in err and len(err.strip().splitlines()) == 1, err
    assert took < 30, f"rank {survivor} took {took:.0f} s to stop"
    assert no_survivors(marker) == []
