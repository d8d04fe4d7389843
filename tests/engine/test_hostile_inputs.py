"""Every bad input a hostile tester tried: exit 2, one line naming the cause, no traceback, nothing lost.

Inputs aimed at an existing run must leave its checkpoints and config.yaml byte for byte as they
were; inputs that start a new run must stop before any checkpoint is written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from d2v2.engine.cli import main
from tests.helpers import one_line_error

FAST = ["--set", "data.num_workers=0", "--set", "train.log_every=1"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["pretrain", "--recipe", "image-tiny", "--out", str(run), "--max-steps", "2", *FAST, "--set", "data.batch_size=8"]) == 0
    return run


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-data")
    unreadable = root / "unreadable" / "cls"
    unreadable.mkdir(parents=True)
    for i in range(5):
        (unreadable / f"{i}.png").write_bytes(b"not a png")
    few = root / "few" / "cls"
    few.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(few / f"{i}.png")
    labelled = root / "labelled"
    for c in ("a", "b"):
        (labelled / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(labelled / c / f"{i}.png")
    (labelled / "b" / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "manifest.tsv").write_text(f"{root / 'no-such-root'}\nx.wav\t40000\ny.wav\t40000\n")
    (root / "a-file").write_text("not a folder")
    return root


def snapshot(run) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name not in (".lock", "metrics.jsonl")}


ON_THE_RUN = [  # (arguments after `pretrain --out RUN`, what the message must say)
    (["--max-steps", "-1"], "train.max_steps must be >= 0"),
    (["--max-steps", "5000"], "optim.total_steps=1000"),
    (["--set", "optim.betas=[0.9,2]"], "optim.betas"),
    (["--recipe", "audio-tiny"], "is a run of recipe image-tiny"),
    (["--data", "/elsewhere"], "data.path"),
    (["--resume", "none"], "--resume none would restart"),
    (["--set", "train.max_corrupt=-1x"], "train.max_corrupt must be an integer"),
]


@pytest.mark.parametrize("extra, says", ON_THE_RUN, ids=[" ".join(a) for a, _ in ON_THE_RUN])
def test_bad_input_on_an_existing_run_changes_nothing(run, capsys, extra, says):
    before = snapshot(run)
    assert says in one_line_error(capsys, ["pretrain", "--out", str(run), *extra])
    assert snapshot(run) == before


def test_max_steps_and_betas_are_checked_on_a_new_run_too(tmp_path, capsys):
    new = ["pretrain", "--recipe", "image-tiny", "--out", str(tmp_path / "new")]
    assert "train.max_steps must be >= 0" in one_line_error(capsys, [*new, "--max-steps", "-1"])
    err = one_line_error(capsys, [*new, "--max-steps", "1001"])
    assert "goes past the schedule's optim.total_steps=1000" in err and "--set optim.total_steps=1001" in err
    assert "optim.betas must both lie in [0, 1)" in one_line_error(capsys, [*new, "--set", "optim.betas=[0.9,2]"])
    assert not (tmp_path / "new").exists()


NEW_RUN = [  # (arguments after `pretrain`, what the message must say); {data} is the bad-data folder
    (["--recipe", "image-tiny", "--data", "{data}/unreadable", "--set", "data.batch_size=2"], "every file tried in {data}/unreadable/cls was unreadable"),
    (["--recipe", "audio-tiny", "--data", "{data}/manifest.tsv"], "no-such-root, which does not exist"),
    (["--recipe", "image-tiny", "--data", "{data}/few", "--set", "data.batch_size=8"], "--set data.batch_size=N"),
    (["--recipe", "image-tiny", "--out", "{data}/a-file"], "is a file"),
]


@pytest.mark.parametrize("argv, says", NEW_RUN, ids=["all-unreadable", "manifest-root", "tiny-data", "out-file"])
def test_bad_data_stops_a_new_run_before_any_checkpoint(bad_data, tmp_path, capsys, argv, says):
    argv = [a.replace("{data}", str(bad_data)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    argv += [*FAST, "--max-steps", "3"]
    assert says.replace("{data}", str(bad_data)) in one_line_error(capsys, ["pretrain", *argv])
    assert not (tmp_path / "new" / "checkpoints").exists()
    assert (bad_data / "a-file").read_text() == "not a folder"


def test_probe_bad_inputs(run, bad_data, capsys):
    before = snapshot(run)
    err = one_line_error(capsys, ["probe", "--checkpoint", str(run), "--data", str(bad_data / "labelled")])
    assert "broken.png cannot be read as an image" in err
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in one_line_error(capsys, ["probe", "--checkpoint", str(run), "--device", "cuda"])
    assert "no checkpoint" in one_line_error(capsys, ["probe", "--checkpoint", str(bad_data)])
    assert snapshot(run) == before


def test_a_bug_keeps_its_traceback(monkeypatch):
    # A ValueError raised inside a library (here torch, by a bad tensor op) is no user error.
    def broken(*_args, **_kwargs):
        torch.zeros(2).view(3)

    monkeypatch.setattr("d2v2.engine.run.pretrain", broken)
    with pytest.raises(RuntimeError):
        main(["pretrain", "--max-steps", "1"])

    def torch_value_error(*_args, **_kwargs):
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], betas=(0.9, 2.0))

    monkeypatch.setattr("d2v2.engine.run.pretrain", torch_value_error)
    with pytest.raises(ValueError, match="beta"):
        main(["pretrain", "--max-steps", "1"])
