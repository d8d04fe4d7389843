"""Data-parallel pretraining on the CPU: 2 gloo processes on the tiny image recipe.

The ranks are real processes: torchrun's own launcher, or this file run as a script with torchrun's
variables set by ``_launch`` (which then records each rank's weights, gradients and file writes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d2v2.engine.data.loader import DataPosition, EpochBatchSampler, position_after
from d2v2.engine.training.distributed import DistEnv, detect, deterministic_on_cpu, restart_hazard

WORLD = 2
TIMEOUT_S = 240  # a deadlocked collective fails the test instead of hanging it
TINY = [
    "pretrain", "--recipe", "image-tiny", "--device", "cpu", "--set", "data.num_workers=0",
    "--set", "train.log_every=1", "--set", "data.batch_size=4",
]  # fmt: skip
# The decoder's noise fill is the image model's only random draw in training mode: without it, a
# rank's forward does not depend on its RNG stream, so 2 ranks can match 1 process bit for bit.
NO_NOISE = ["--set", "model.mask_noise_std=0"]
# Rank-dependent randomness: dropout, and LayerDrop (so DDP must find unused parameters).
RANDOM = ["--set", "model.layerdrop=0.3", "--set", "model.encoder_dropout=0.1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "d2v2-cache"


def _env(cache: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "D2V2_CACHE": str(cache)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], record: Path, cache: Path) -> list[str]:
    """Run ``d2v2 <argv>`` on WORLD processes (this file as the worker); each rank's output."""
    record.mkdir(parents=True, exist_ok=True)
    env = {**_env(cache), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(WORLD)}
    logs = [record / f"rank{rank}.log" for rank in range(WORLD)]
    procs = []
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, str(record), *argv],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=out, stderr=subprocess.STDOUT,
                ))  # fmt: skip
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [0] * WORLD, "\n".join(outputs)
    return outputs


def _torchrun(argv: list[str], cache: Path) -> str:
    """Run ``python -m d2v2.engine.cli <argv>`` under torchrun itself, as the docs say to."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    cmd = [*torchrun, "-m", "d2v2.engine.cli", *argv]
    done = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _one_process(argv: list[str]) -> None:
    """``d2v2 <argv>`` in this process on one thread, as each torchrun rank runs (OMP_NUM_THREADS=1)."""
    from d2v2.engine.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def _checkpoint(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=True)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------- units
def test_ranks_share_out_the_single_process_batches():
    single = iter(EpochBatchSampler(23, seed=5, batch_size=4))  # 5 batches per epoch
    shards = [iter(EpochBatchSampler(23, seed=5, batch_size=4, rank=r, world_size=2)) for r in range(2)]
    expected = [next(single) for _ in range(10)]  # two epochs
    got = [next(shards[i % 2]) for i in range(8)]  # the 5th batch of each epoch is left out
    assert got == expected[0:4] + expected[5:9]
    for batch in got:  # the positions stay global, and the position after a group is the same on both ranks
        epoch, b = batch[0][2], batch[0][3]
        assert position_after(epoch, b, b % 2, 2) == DataPosition(epoch, b - b % 2 + 2)
    start = DataPosition(0, 1)
    resumed = [iter(EpochBatchSampler(23, seed=5, batch_size=4, start=start, rank=r, world_size=2)) for r in range(2)]
    # From batch 1 the groups are (1, 2), (3, 4), then epoch 1 from its start.
    got = [next(resumed[0]), next(resumed[1]), next(resumed[0]), next(resumed[1]), next(resumed[0])]
    assert got == expected[1:5] + expected[5:6]
    assert len(EpochBatchSampler(23, seed=5, batch_size=4, rank=1, world_size=2)) == 2


def test_sampler_rejects_bad_shards():
    with pytest.raises(ValueError, match="rank must lie in"):
        EpochBatchSampler(10, seed=0, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        next(iter(EpochBatchSampler(10, seed=0, batch_size=4, world_size=4)))  # 2 batches per epoch


def test_detect_reads_torchrun_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert detect() == DistEnv() and not detect().distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="LOCAL_RANK is not set"):
        detect()
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer, got 'x'"):
        detect()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert detect() == DistEnv(rank=3, local_rank=1, world_size=8) and detect().distributed
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ValueError, match=r"RANK must lie in \[0, WORLD_SIZE=8\), got 8"):
        detect()


def test_a_restart_that_cannot_reconnect_is_warned_of(monkeypatch):
    # What torchrun's agent sets in each process: a shared store, restarts allowed, 2 nodes.
    for name, value in {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "1", "GROUP_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_hazard()
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")  # one node: fine
    assert restart_hazard() is None
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on the agents
    assert restart_hazard() is None


# ------------------------------------------------------------------------------- 2 processes, gloo
def test_two_ranks_train_like_one_process_with_accumulation(tmp_path, cache, monkeypatch):
    """2 ranks x 2 micro-batches read the global batches 1 process x 4 micro-batches reads."""
    args = [*TINY, *NO_NOISE, "--max-steps", "3", "--resume", "none"]
    _torchrun([*args, "--out", str(tmp_path / "ranks"), "--set", "train.accum_steps=2"], cache)

    monkeypatch.setenv("D2V2_CACHE", str(cache))
    _one_process([*args, "--out", str(tmp_path / "single"), "--set", "train.accum_steps=4"])

    ranks, single = _metrics(tmp_path / "ranks"), _metrics(tmp_path / "single")
    assert len(ranks) == len(single) == 3
    for a, b in zip(ranks, single):
        # (target_var and pred_var are those of each rank's last micro-batch: not comparable.)
        for key in ("loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    a, b = _checkpoint(tmp_path / "ranks", 3), _checkpoint(tmp_path / "single", 3)
    assert a["trainer"]["samples_seen"] == b["trainer"]["samples_seen"] == 3 * 16
    assert (a["trainer"]["epoch"], a["trainer"]["batch"]) == (b["trainer"]["epoch"], b["trainer"]["batch"]) == (0, 12)
    assert "rng_ranks" in a and "rng_ranks" not in b
    for name, tensor in b["method"].items():  # student and teacher
        torch.testing.assert_close(a["method"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, cache):
    """2 ranks, accumulation 2, dropout and LayerDrop, 4 steps with a checkpoint every 2."""
    root = tmp_path_factory.mktemp("random")
    argv = [*TINY, *RANDOM, "--set", "train.accum_steps=2", "--set", "train.checkpoint_every=2", "--max-steps", "4"]
    outputs = _launch([*argv, "--out", str(root / "run")], root / "record", cache)
    return root, argv, outputs


def test_replicas_stay_identical(random_run):
    root, _, _ = random_run
    for step in (2, 4):
        ranks = [torch.load(root / "record" / f"rank{r}-step{step}.pt", weights_only=True) for r in range(WORLD)]
        for kind in ("method", "grads"):
            assert ranks[0][kind].keys() == ranks[1][kind].keys() and ranks[0][kind]
            for name, tensor in ranks[0][kind].items():
                assert torch.equal(tensor, ranks[1][kind][name]), (step, kind, name)
    state = _checkpoint(root / "run", 4)
    assert len(state["rng_ranks"]) == WORLD  # each rank's own dropout / LayerDrop stream
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
    assert torch.equal(state["rng_ranks"][0]["torch"], state["rng"]["torch"])


def test_rank_zero_alone_logs_and_writes(random_run):
    root, _, outputs = random_run
    writes = [json.loads((root / "record" / f"rank{r}-writes.json").read_text()) for r in range(WORLD)]
    assert writes[1] == [] and any("metrics.jsonl" in w for w in writes[0]) and any("state.pt" in w for w in writes[0])
    assert "effective batch 16 samples (4 x 2 accumulation x 2 processes)" in outputs[0]
    assert sum(line.startswith("step ") for line in outputs[0].splitlines()) == 4
    assert "step " not in outputs[1] and "run folder" not in outputs[1]
    assert [m["step"] for m in _metrics(root / "run")] == [1, 2, 3, 4]


def test_resume_on_two_ranks_continues_exactly(random_run, tmp_path, cache):
    root, argv, _ = random_run
    straight, resumed = root / "run", tmp_path / "resumed"
    # The straight run as it stood had it been stopped right after its step-2 checkpoint.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    (resumed / "checkpoints" / "latest").write_text("step-00000002\n")
    lines = (straight / "metrics.jsonl").read_text().splitlines(keepends=True)
    (resumed / "metrics.jsonl").write_text("".join(lines[:2]))

    out = _torchrun([*argv, "--out", str(resumed)], cache)
    assert "resumed from" in out and "at step 2 (epoch 0, batch 8)" in out
    for a, b in zip(_metrics(straight), _metrics(resumed), strict=True):
        assert {k: a[k] for k in ("step", "loss", "target_var", "pred_var", "grad_norm", "lr")} == {
            k: b[k] for k in ("step", "loss", "target_var", "pred_var", "grad_norm", "lr")
        }
    a, b = _checkpoint(straight, 4), _checkpoint(resumed, 4)
    for name, tensor in a["method"].items():
        assert torch.equal(tensor, b["method"][name]), name


# --------------------------------------------------------------------- 2 nodes, elastic restart
def _ranks_of(agent: subprocess.Popen) -> dict[int, int]:
    """The training processes a torchrun agent started: {RANK: pid}."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent.pid:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(entry.name)
    return ranks


def test_two_nodes_restart_a_killed_rank_from_the_newest_checkpoint(tmp_path, cache):
    """Two torchrun agents on loopback (two "nodes" of one process each, c10d rendezvous, gloo): kill -9
    one rank mid-run; torchrun restarts both, which resume from the newest complete checkpoint and end
    with the weights of an uninterrupted run, bit for bit."""
    argv = [*TINY, "--max-steps", "8", "--set", "train.checkpoint_every=2"]
    _torchrun([*argv, "--out", str(tmp_path / "straight")], cache)  # the same 2 processes, one node

    run, port = tmp_path / "restarted", _free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
            "--local-addr", "127.0.0.1", "--max-restarts", "1", "--monitor-interval", "0.5"]  # fmt: skip
    # The restart needs each round's process group on a store of its own (pytorch#135712).
    env = {**_env(cache), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    agents = []
    try:
        for log in logs:
            with open(log, "w") as out:
                agents.append(subprocess.Popen(
                    [*node, "-m", "d2v2.engine.cli", *argv, "--out", str(run)],
                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))  # fmt: skip
        deadline = time.monotonic() + TIMEOUT_S
        while not (run / "checkpoints" / "step-00000002").exists():
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), "\n".join(map(Path.read_text, logs))
            time.sleep(0.05)
        victim = next(pid for agent in agents for rank, pid in _ranks_of(agent).items() if rank == 1)
        os.kill(victim, signal.SIGKILL)
        codes = [a.wait(timeout=TIMEOUT_S) for a in agents]
    finally:
        for a in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(a.pid, signal.SIGKILL)
    outputs = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0], outputs
    assert "lost another process of the job" in outputs and "resumed from" in outputs, outputs
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in outputs  # no warning: the store is not shared
    a, b = _checkpoint(tmp_path / "straight", 8), _checkpoint(run, 8)
    for name, tensor in a["method"].items():
        assert torch.equal(tensor, b["method"][name]), name
    assert [m["step"] for m in _metrics(run)] == list(range(1, 9))


# ------------------------------------------------------------------------------------ the worker
def _worker(record: str, argv: list[str]) -> int:
    """One rank: the CLI, recording this rank's weights and gradients at each checkpoint, and every
    file it writes, creates, renames or removes under the run folder."""
    from d2v2.engine import run
    from d2v2.engine.training import trainer
    from d2v2.engine.cli import main

    rank, record_dir = int(os.environ["RANK"]), Path(record)
    run_dir = str(Path(argv[argv.index("--out") + 1]).resolve())
    writes: list[str] = []

    def audit(event: str, args: tuple) -> None:
        writing = event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree") or (
            event == "open" and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing and isinstance(args[0], (str, os.PathLike)) and os.path.abspath(args[0]).startswith(run_dir):
            writes.append(f"{event} {args[0]}")

    class Recording(trainer.Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.grads: dict = {}
            names = {id(p): n for n, p in self.method.named_parameters()}

            def keep_grads(optimizer, *_):
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                self.grads = {names[id(p)]: p.grad.clone() for p in params}

            self.optimizer.register_step_pre_hook(keep_grads)

        def save(self):
            folder = super().save()
            state = {"method": self.method.state_dict(), "grads": self.grads}
            torch.save(state, record_dir / f"rank{rank}-step{self.step}.pt")
            return folder

    run.Trainer = Recording
    sys.addaudithook(audit)
    code = main(argv)
    (record_dir / f"rank{rank}-writes.json").write_text(json.dumps(writes))
    return code


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2:]))


def test_cpu_training_adds_index_gradients_in_a_fixed_order():
    # The backward of x[sample, ids] (gather_tokens_ref) is index_put_(accumulate=True): parallel float
    # atomics on CPU above 32768 elements, whose order (and so the last bits) follows thread timing.
    x = torch.randn(3, 300, 64, requires_grad=True)
    ids = torch.stack([torch.randperm(300, generator=torch.Generator().manual_seed(i))[:150] for i in range(24)])
    sample = torch.arange(24) // 8
    g = torch.randn(24, 150, 64)

    def grad():
        x.grad = None
        x[sample[:, None], ids].backward(g)
        return x.grad.clone()

    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_on_cpu(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
        first = grad()
        assert all(torch.equal(grad(), first) for _ in range(10))
    assert torch.are_deterministic_algorithms_enabled() == before  # restored after the run


def test_fine_tuning_on_two_ranks_matches_one_process(tmp_path, cache, monkeypatch):
    """``d2v2 finetune`` under torchrun: 2 ranks x 1 micro-batch train as 1 process x 2, and keep the best."""
    from d2v2.engine.cli import main

    monkeypatch.setenv("D2V2_CACHE", str(cache))
    pretrained = tmp_path / "pretrained"
    assert main([*TINY, "--max-steps", "2", "--out", str(pretrained)]) == 0
    args = ["finetune", "--recipe", "finetune-image-tiny", "--checkpoint", str(pretrained), "--device", "cpu",
            "--max-steps", "3", "--set", "data.batch_size=4", "--set", "train.log_every=1", "--set", "train.eval_every=2",
            "--set", "model.drop_path_rate=0"]  # fmt: skip
    _torchrun([*args, "--out", str(tmp_path / "ranks")], cache)
    _one_process([*args, "--out", str(tmp_path / "single"), "--set", "train.accum_steps=2"])
    ranks, single = _metrics(tmp_path / "ranks"), _metrics(tmp_path / "single")
    assert [r["step"] for r in ranks] == [r["step"] for r in single] == [1, 2, 2, 3, 3]  # train rows and valid rows
    for a, b in zip(ranks, single):
        for key in ("loss", "grad_norm", "valid_accuracy"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert (tmp_path / "ranks" / "best" / "state.pt").is_file()
