"""FSDP2 (``dist.strategy=fsdp``) on the CPU: 2 gloo processes on the tiny image recipe (data2vec 2.0).

The 2-rank sharded run must train like one unsharded process reading the same global batches, and
its checkpoint (``torch.distributed.checkpoint``, written by both ranks) must resume on one process.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from d2v2.engine.training.checkpoint import SHARDED_DIR, load_checkpoint, read_sharded
from d2v2.engine.training.distributed import DistEnv, check_strategy

from .test_distributed import NO_NOISE, TINY, _checkpoint, _metrics, _torchrun

FSDP = ["--set", "dist.strategy=fsdp"]
STEPS = ["--max-steps", "3", "--set", "train.checkpoint_every=2"]
# A fast teacher, so that a skipped or misplaced EMA update of a shard shows above the tolerance.
EMA = ["--set", "model.ema_decay=0.9", "--set", "model.ema_end_decay=0.9"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "d2v2-cache"


def _main(argv: list[str], cache, monkeypatch) -> int:
    """``d2v2 <argv>`` in this process, on one thread (as each torchrun rank)."""
    from d2v2.engine.cli import main

    monkeypatch.setenv("D2V2_CACHE", str(cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, cache):
    """2 ranks, FSDP2, 3 steps, checkpoints at steps 2 and 3."""
    root = tmp_path_factory.mktemp("fsdp")
    out = _torchrun([*TINY, *NO_NOISE, *EMA, *FSDP, *STEPS, "--out", str(root / "run")], cache)
    return root / "run", out


def test_two_sharded_ranks_train_like_one_process(sharded_run, tmp_path, cache, monkeypatch):
    run, out = sharded_run
    assert "2 processes | fsdp" in out
    # One unsharded process with 2 micro-batches reads the global batches the 2 ranks read.
    single = tmp_path / "single"
    assert _main([*TINY, *NO_NOISE, *EMA, *STEPS, "--out", str(single), "--set", "train.accum_steps=2"], cache, monkeypatch) == 0
    for a, b in zip(_metrics(run), _metrics(single), strict=True):
        for key in ("loss", "grad_norm", "lr", "ema_decay"):  # (target_var: each rank's last micro-batch)
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    folder = run / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in (folder / SHARDED_DIR).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    sharded, plain = load_checkpoint(folder), _checkpoint(single, 3)  # the shards read back whole
    assert "optimizer" not in sharded and sharded["trainer"] == {**plain["trainer"], "world_size": 2}
    assert sharded["method"].keys() == plain["method"].keys()
    for name, tensor in plain["method"].items():  # student and EMA teacher
        torch.testing.assert_close(sharded["method"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    moments = read_sharded(folder / SHARDED_DIR, "optimizer")["state"]
    assert moments.keys() == {name for name in plain["method"] if not name.startswith("teacher.")} - {
        "encoder.embed.pos_embed"  # fixed positions: not trained
    }


def _record_start(monkeypatch) -> dict:
    """Make ``d2v2 pretrain`` record its whole weights and optimizer state as training starts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from d2v2.engine import run as run_module
    from d2v2.engine.training.trainer import Trainer

    start = {}

    class Recording(Trainer):
        def train(self):
            full = StateDictOptions(full_state_dict=True)
            method, optimizer = get_state_dict(self.method, self.optimizer, options=full)
            # Copies: in one process the whole tensors may share the parameters' storage, which trains on.
            method, optimizer = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, (method, optimizer))
            start.update(step=self.step, method=method, optimizer=optimizer)
            return super().train()

    monkeypatch.setattr(run_module, "Trainer", Recording)
    return start


def test_saved_on_two_ranks_resumes_on_one(sharded_run, tmp_path, cache, monkeypatch, capsys):
    straight, resumed = sharded_run[0], tmp_path / "resumed"
    shutil.copytree(straight, resumed)  # as it stood when stopped right after its step-2 checkpoint
    shutil.rmtree(resumed / "checkpoints" / "step-00000003")
    (resumed / "checkpoints" / "latest").write_text("step-00000002\n")
    loaded = _record_start(monkeypatch)
    assert _main([*TINY, *NO_NOISE, *EMA, *FSDP, "--max-steps", "4", "--out", str(resumed)], cache, monkeypatch) == 0
    text = capsys.readouterr().out
    assert "at step 2 (epoch 0, batch 4)" in text and "resumed on 1 process(es), the checkpoint's run had 2" in text
    # What one process loaded is what two saved: weights and AdamW moments, whole.
    saved = straight / "checkpoints" / "step-00000002"
    assert loaded["step"] == 2
    for name, tensor in load_checkpoint(saved)["method"].items():
        assert torch.equal(loaded["method"][name], tensor), name
    moments = read_sharded(saved / SHARDED_DIR, "optimizer")["state"]
    for name, state in moments.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded["optimizer"]["state"][name][key], state[key]), (name, key)
    # ... and it trained on: steps 3 and 4 logged, a one-process sharded checkpoint at step 4.
    assert [m["step"] for m in _metrics(resumed)] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in _metrics(resumed))
    last = resumed / "checkpoints" / "step-00000004" / SHARDED_DIR
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp"]
    assert load_checkpoint(last.parent)["trainer"]["world_size"] == 1


def test_resume_falls_back_past_a_missing_shard(sharded_run, tmp_path, cache, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(sharded_run[0], run)
    (run / "checkpoints" / "step-00000003" / SHARDED_DIR / "__0_0.distcp").unlink()
    assert _main([*TINY, *NO_NOISE, *EMA, *FSDP, "--max-steps", "4", "--out", str(run)], cache, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "step-00000003: shard sharded/__0_0.distcp is missing; resuming from step-00000002" in out
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_sharded_checkpoint_initialises_a_new_run(sharded_run, strategy, tmp_path, cache, monkeypatch):
    checkpoint = sharded_run[0] / "checkpoints" / "step-00000003"
    start = _record_start(monkeypatch)
    argv = [*TINY, "--max-steps", "1", "--set", f"dist.strategy={strategy}", "--init-from", str(checkpoint)]
    assert _main([*argv, "--out", str(tmp_path / "new")], cache, monkeypatch) == 0
    assert start["step"] == 0  # weights only: no AdamW moments (get_state_dict fills a fresh AdamW with zeros)
    assert all(not state["exp_avg"].any() for state in start["optimizer"]["state"].values())
    for name, tensor in load_checkpoint(checkpoint)["method"].items():
        assert torch.equal(start["method"][name], tensor), name


def test_a_sharded_checkpoint_is_not_resumed_by_a_ddp_run(sharded_run, tmp_path, cache, monkeypatch, capsys):
    checkpoint = sharded_run[0] / "checkpoints" / "step-00000002"
    code = _main([*TINY, "--max-steps", "3", "--resume", str(checkpoint), "--out", str(tmp_path / "ddp")], cache, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "is a sharded (fsdp) checkpoint and this is a ddp run" in err[-1]
    assert f"--init-from {checkpoint}" in err[-1]


def test_unsupported_combinations_are_one_line_errors(tmp_path, cache, monkeypatch, capsys):
    code = _main([*TINY, *FSDP, "--set", "model.layerdrop=0.3", "--max-steps", "1", "--out", str(tmp_path / "r")], cache, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dist.strategy=fsdp cannot train with LayerDrop" in err[0]
    with pytest.raises(ValueError, match="does not train in fp16"):
        check_strategy("fsdp", False, "fp16")
    check_strategy("ddp", True, "fp16")  # DDP takes both
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        DistEnv().shard(torch.nn.Linear(2, 2), torch.device("cpu"), "fp32")
    with pytest.raises(ValueError, match="dist.strategy must be one of 'ddp', 'fsdp', got 'zero'"):
        from d2v2.engine.run import resolve_config

        resolve_config("image-tiny", ["dist.strategy=zero"])


def test_a_failed_sharded_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from d2v2.engine.training import checkpoint
    from d2v2.engine.training.checkpoint import CheckpointWriteError, save_sharded
    from d2v2.engine.training.distributed import setup, teardown

    setup(DistEnv(), "cpu", strategy="fsdp")  # a one-process group
    try:
        model = DistEnv().shard(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.device("cpu"), "fp32")
        optimizer = torch.optim.AdamW(model.parameters())
        method, moments = get_state_dict(model, optimizer)
        weight = model[0].weight.full_tensor().clone()
        state = {"trainer": {"step": 1}}
        save_sharded(tmp_path, 1, state, {"method": method, "optimizer": moments}, DistEnv())

        def full_disk(tmp, state):
            raise OSError(28, os.strerror(28))

        monkeypatch.setattr(checkpoint, "_write_state", full_disk)
        with pytest.raises(CheckpointWriteError, match="No space left on device.*the previous checkpoint is intact"):
            save_sharded(tmp_path, 2, state, {"method": method, "optimizer": moments}, DistEnv())
        assert dist.is_initialized()
    finally:
        teardown()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001"]  # no temporaries
    saved = load_checkpoint(tmp_path)
    assert saved["trainer"] == {"step": 1} and saved["sharded"] == SHARDED_DIR
    assert torch.equal(saved["method"]["0.weight"], weight)


def _in_earlier_names(folder) -> set[str]:
    """Rewrite DCP folder ``folder`` with the parameter names d2v2 wrote before the embeddings were
    modules (``encoder.local_encoder.*``, not ``encoder.embed.local_encoder.*``); the names changed."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    from d2v2.engine.training.safe_dcp import load_sharded

    def earlier(name: str) -> str:
        owner, _, rest = name.partition(".embed.")
        return f"{owner}.{rest}" if rest and owner in ("encoder", "teacher") else name

    whole = load_sharded(folder, keys={"method", "optimizer"})
    optimizer = whole["optimizer"]
    old = {
        "method": {earlier(k): v for k, v in whole["method"].items()},
        "optimizer": {"state": {earlier(k): v for k, v in optimizer["state"].items()},
                      "param_groups": [{**g, "params": [earlier(p) for p in g["params"]]} for g in optimizer["param_groups"]]},
    }  # fmt: skip
    shutil.rmtree(folder)
    save(old, storage_writer=FileSystemWriter(str(folder)), no_dist=True)
    return {k for k in whole["method"] if earlier(k) != k}


def test_a_sharded_checkpoint_in_earlier_parameter_names_resumes(sharded_run, tmp_path, cache, monkeypatch, capsys):
    straight, resumed = sharded_run[0], tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000003")
    (resumed / "checkpoints" / "latest").write_text("step-00000002\n")
    moved = _in_earlier_names(resumed / "checkpoints" / "step-00000002" / SHARDED_DIR)
    assert {"encoder.embed.local_encoder.proj.weight", "teacher.embed.pos_embed"} <= moved
    loaded = _record_start(monkeypatch)
    assert _main([*TINY, *NO_NOISE, *EMA, *FSDP, "--max-steps", "4", "--out", str(resumed)], cache, monkeypatch) == 0
    assert "at step 2 (epoch 0, batch 4)" in capsys.readouterr().out
    saved = straight / "checkpoints" / "step-00000002"  # as written, in today's names
    for name, tensor in load_checkpoint(saved)["method"].items():
        assert torch.equal(loaded["method"][name], tensor), name
    for name, state in read_sharded(saved / SHARDED_DIR, "optimizer")["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded["optimizer"]["state"][name][key], state[key]), (name, key)
    assert [m["step"] for m in _metrics(resumed)] == [1, 2, 3, 4]
