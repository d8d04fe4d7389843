"""A run does not depend on the directory it was started from: its data paths are stored absolute, and
a text run keeps its tokenizer, so that its probe and export need neither the cwd nor the data."""

from __future__ import annotations

import shutil

import pytest
import yaml

from d2v2.engine.cli import main
from d2v2.engine.data import embedded
from tests.helpers import one_line_error

FAST = ["--set", "data.num_workers=0", "--set", "data.vocab_size=300", "--set", "data.block_size=64",
        "--set", "train.log_every=1"]  # fmt: skip


@pytest.fixture
def text_run(tmp_path, monkeypatch):
    """A text-tiny run started in ``tmp_path`` with the relative ``--data tdata``."""
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tdata").mkdir()
    (tmp_path / "tdata" / "prose.txt").write_text(embedded.pydoc_text()[:40_000])
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--recipe", "text-tiny", "--data", "tdata", "--out", "run", "--max-steps", "1", *FAST]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path / "run"


def test_relative_data_is_stored_absolute_and_the_run_works_from_elsewhere(text_run, tmp_path, monkeypatch, capsys):
    stored = yaml.safe_load((text_run / "config.yaml").read_text())
    assert stored["data"]["path"] == str(tmp_path / "tdata")
    assert (text_run / "tokenizer.json").is_file()
    assert main(["pretrain", "--out", str(text_run), "--max-steps", "2", *FAST]) == 0  # resumed from another cwd
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--out", "run", "--data", "tdata", "--max-steps", "3", *FAST]) == 0  # the same data, relative
    capsys.readouterr()


def test_probe_and_export_need_neither_the_cwd_nor_the_data(text_run, tmp_path, capsys):
    shutil.move(tmp_path / "tdata", tmp_path / "moved")
    shutil.rmtree(tmp_path / "cache")
    assert main(["probe", "--checkpoint", str(text_run)]) == 0
    assert main(["export", "--checkpoint", str(text_run), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "tokenizer.json").read_bytes() == (text_run / "tokenizer.json").read_bytes()
    capsys.readouterr()


def test_export_without_the_tokenizer_is_refused(text_run, tmp_path, capsys):
    shutil.move(tmp_path / "tdata", tmp_path / "moved")
    (text_run / "tokenizer.json").unlink()  # as a run from before the copy was kept
    err = one_line_error(capsys, ["export", "--checkpoint", str(text_run), "--out", str(tmp_path / "exp")])
    assert "the text run's tokenizer cannot be found" in err and f"put it at {text_run / 'tokenizer.json'}" in err
    assert not (tmp_path / "exp").exists()


def _images(folder, count: int) -> None:
    import numpy as np
    from PIL import Image

    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(folder / c / f"{i}.png")


IMAGE = ["--set", "data.num_workers=0", "--set", "train.log_every=1", "--set", "data.batch_size=8"]


def test_a_continued_run_accepts_its_data_moved_and_refuses_other_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path / "cache"))
    _images(tmp_path / "imgs", 8)
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", "image-tiny", "--data", str(tmp_path / "imgs"), "--out", str(run),
                 "--max-steps", "1", *IMAGE]) == 0  # fmt: skip
    shutil.move(tmp_path / "imgs", tmp_path / "moved")
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--data", str(tmp_path / "moved"), "--max-steps", "2", *IMAGE]) == 0
    out = capsys.readouterr().out
    assert f"the run's data moved from {tmp_path / 'imgs'} to {tmp_path / 'moved'} (the same 16 samples)" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["path"] == str(tmp_path / "moved")
    _images(tmp_path / "other", 5)
    err = one_line_error(capsys, ["pretrain", "--out", str(run), "--data", str(tmp_path / "other"), "--max-steps", "3", *IMAGE])
    assert f"--data {tmp_path / 'other'} is not the data run {run} trained on" in err and "16 samples; here 10" in err
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["path"] == str(tmp_path / "moved")
