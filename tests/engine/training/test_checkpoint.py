"""Atomic checkpoints, the latest pointer, and weights-only loading."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from d2v2.engine.training.checkpoint import (
    CheckpointWriteError,
    latest_checkpoint,
    load_checkpoint,
    newest_loadable,
    save_checkpoint,
    step_folder,
)


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "trainer": {"step": step, "name": "x"}}


def test_save_load_round_trip_weights_only(tmp_path):
    folder = save_checkpoint(tmp_path, 7, _state(7))
    assert folder == step_folder(tmp_path, 7) and latest_checkpoint(tmp_path) == folder
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["trainer"]["step"] == 7 and torch.equal(state["model"]["w"], torch.full((4,), 7.0))
    assert load_checkpoint(tmp_path)["trainer"]["step"] == 7  # a run folder resolves through latest


def test_keeps_only_the_newest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000004", "step-00000005"]


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    folder = save_checkpoint(tmp_path, 1, _state(1))
    (folder / "state.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(folder)


@pytest.mark.parametrize("errno_, says", [(28, "No space left on device"), (30, "Read-only file system")])
def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, errno_, says):
    save_checkpoint(tmp_path, 1, _state(1))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # part of it reached the disk
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(2**20)})
    message = str(info.value)
    assert says in message and str(tmp_path / "checkpoints") in message and "needs about 4 MB" in message and "MB free" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001"]  # no temporaries
    assert load_checkpoint(tmp_path)["trainer"]["step"] == 1


def test_newest_loadable_skips_what_cannot_be_read(tmp_path):
    assert newest_loadable(tmp_path) is None  # a new run
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _state(step))
    (step_folder(tmp_path, 3) / "state.pt").write_bytes(b"torn")
    lines = []
    folder, state = newest_loadable(tmp_path, lines.append)
    assert folder == step_folder(tmp_path, 2) and state["trainer"]["step"] == 2
    assert lines == ["step-00000003: unreadable; resuming from step-00000002, the newest checkpoint that loads"]
    for step in (1, 2):
        (step_folder(tmp_path, step) / "state.pt").unlink()
    with pytest.raises(ValueError, match="holds checkpoints but none loads"):
        newest_loadable(tmp_path)


def _sharded(run_dir, step: int) -> None:
    """A one-process sharded checkpoint of ``step``: ``state.pt`` and a DCP folder with one shard."""
    import warnings

    import torch.distributed.checkpoint as dcp

    save_checkpoint(run_dir, step, {**_state(step), "sharded": "sharded"}, keep=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"method": {"w": torch.full((4,), float(step))}}, checkpoint_id=step_folder(run_dir, step) / "sharded")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_sharded_checkpoint_missing_a_shard_is_passed_over(tmp_path, damage):
    for step in (1, 2):
        _sharded(tmp_path, step)
    shard = step_folder(tmp_path, 2) / "sharded" / "__0_0.distcp"
    shard.unlink() if damage == "missing" else shard.write_bytes(shard.read_bytes()[:-8])
    for tensors in (False, True):  # the resume of a sharded run reads the metadata only
        lines = []
        folder, state = newest_loadable(tmp_path, lines.append, tensors=tensors)
        assert folder == step_folder(tmp_path, 1) and state["trainer"]["step"] == 1
        assert len(lines) == 1 and lines[0].startswith(f"step-00000002: shard sharded/__0_0.distcp is {damage}")
        assert lines[0].endswith("; resuming from step-00000001, the newest checkpoint that loads")
    with pytest.raises(ValueError, match=f"shard sharded/__0_0.distcp is {damage}"):
        load_checkpoint(step_folder(tmp_path, 2), tensors=False)


def _write_forever(run_dir):
    big = {"model": {"w": torch.randn(2_000_000)}, "trainer": {"step": 0}}
    step = 1
    while True:
        big["trainer"]["step"] = step
        save_checkpoint(run_dir, step, big, keep=2)
        step += 1


def test_kill_during_writes_leaves_a_loadable_latest(tmp_path):
    save_checkpoint(tmp_path, 0, _state(0))
    proc = mp.get_context("fork").Process(target=_write_forever, args=(tmp_path,))
    proc.start()
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    state = load_checkpoint(tmp_path)  # whatever instant it died at, latest is complete
    assert state["trainer"]["step"] >= 0


def _flat_embed_names(state: dict, prefixes: tuple[str, ...]) -> dict:
    """``state`` as d2v2 wrote it before the embeddings were modules: the embedding's parts directly
    under each encoder (``encoder.local_encoder.*`` for today's ``encoder.embed.local_encoder.*``)."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            key = key.replace(f"{prefix}embed.", prefix, 1) if key.startswith(f"{prefix}embed.") else key
        out[key] = value
    return out


@pytest.mark.parametrize("method, modality", [("data2vec2", "image"), ("data2vec2", "audio"), ("data2vec2", "text"),
                                              ("data2vec", "audio"), ("mae", "image"), ("wav2vec2", "audio")])
def test_an_old_format_checkpoint_still_loads(tmp_path, method, modality):
    from d2v2.models import build_method, method_config

    model = build_method(method, method_config(method, modality, "tiny"))
    current = model.state_dict()
    old = _flat_embed_names(current, ("encoder.", "teacher."))
    assert (old != current) == bool(type(model).embedded_encoders)
    save_checkpoint(tmp_path, 1, {"method": old, "config": {"method": method}, "trainer": {"step": 1}})
    loaded = load_checkpoint(tmp_path)["method"]
    assert list(loaded) == list(current)
    fresh = build_method(method, method_config(method, modality, "tiny"))
    fresh.load_state_dict(loaded)  # strict: every key in today's names
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in current.items())


def test_an_old_format_export_still_loads(tmp_path):
    from d2v2.models import build_method, load_pretrained, method_config, save_pretrained

    cfg = method_config("data2vec2", "audio", "tiny")
    encoder = build_method("data2vec2", cfg).encoder.eval()
    old = _flat_embed_names(encoder.state_dict(), ("",))
    folder = save_pretrained(old, "data2vec2", cfg, tmp_path / "export", "student")
    loaded = load_pretrained(folder)
    source = torch.randn(2, 2000)
    assert torch.equal(loaded(source), encoder(source))


def test_an_old_run_folder_resumes(tmp_path, monkeypatch):
    """A run whose checkpoint holds the embedding parts under their old names continues where it stopped."""
    from d2v2.engine.cli import main

    monkeypatch.chdir(tmp_path)
    fast = ["--set", "data.num_workers=0", "--set", "data.batch_size=4", "--set", "train.log_every=1"]
    assert main(["pretrain", "--recipe", "audio-tiny", "--out", "run", "--max-steps", "1", *fast]) == 0
    state_file = latest_checkpoint(tmp_path / "run") / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["method"] = _flat_embed_names(state["method"], ("encoder.", "teacher."))
    assert "encoder.local_encoder.conv_layers.0.conv.weight" in state["method"]  # as d2v2 wrote it before
    torch.save(state, state_file)
    assert main(["pretrain", "--out", "run", "--max-steps", "2", *fast]) == 0
    resumed = load_checkpoint(tmp_path / "run")
    assert resumed["trainer"]["step"] == 2 and "encoder.embed.pos_conv.convs.0.weight" in resumed["method"]
