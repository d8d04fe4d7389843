"""The d2v2 command line end to end on the tiny recipes (CPU, a few steps each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from PIL import Image

from d2v2.engine.cli import main
from tests.helpers import one_line_error

FAST = ["--set", "data.num_workers=0", "--set", "train.log_every=1"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    # One cache per test session: the synthetic speech and token caches are built once.
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("image-tiny", ["--set", "data.batch_size=8"]),
        ("audio-tiny", ["--set", "data.embedded_utterances=12", "--set", "data.max_tokens=160000"]),
        ("text-tiny", ["--set", "data.batch_size=4"]),
    ],
)
def test_pretrain_writes_config_metrics_and_checkpoint(tmp_path, capsys, recipe, extra):
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", recipe, "--out", str(run), "--max-steps", "2", *FAST, *extra]) == 0
    summary = capsys.readouterr().out.splitlines()[-5:]  # the run says how it ended and what comes next
    assert summary[0].startswith("pretrain done: 2/2 updates (2 in this session) in ") and "samples/s" in summary[0]
    final, best = losses(run)[-1], min(losses(run))
    assert summary[1].startswith(f"loss: final {final:.4f} (update 2), best {best:.4f}")
    assert summary[2] == f"checkpoint: {run / 'checkpoints' / 'step-00000002'}"
    assert summary[3:] == [f"probe:      d2v2 probe --checkpoint {run}", f"export:     d2v2 export --checkpoint {run} --out exports/run"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["recipe"] == recipe and config["model"]["modality"] == recipe.split("-")[0]
    lines = losses(run)
    assert len(lines) == 2 and all(np.isfinite(lines))
    state = torch.load(run / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    assert state["trainer"]["step"] == 2 and "teacher.blocks.0.attn.qkv.weight" in state["method"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"


def test_resume_continues_exactly(tmp_path):
    args = ["pretrain", "--recipe", "image-tiny", *FAST, "--set", "data.batch_size=8", "--set", "train.checkpoint_every=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*args, "--out", str(straight), "--max-steps", "6"]) == 0
    assert main([*args, "--out", str(resumed), "--max-steps", "3"]) == 0
    assert main([*args, "--out", str(resumed), "--max-steps", "6"]) == 0  # --resume auto by default
    assert losses(resumed) == losses(straight)
    a = torch.load(straight / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    for name, tensor in a["method"].items():
        assert torch.equal(tensor, b["method"][name]), name


def test_probe_beats_chance_after_a_short_pretraining(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", "image-tiny", "--out", str(run), "--max-steps", "20", *FAST]) == 0
    capsys.readouterr()
    assert main(["probe", "--checkpoint", str(run)]) == 0
    result = json.loads((run / "probe" / "step-00000020.json").read_text())  # in the run folder: never pruned
    assert result["classes"] == 10 and result["linear_accuracy"] > 0.5  # chance is 0.1
    out = capsys.readouterr().out
    assert "linear probe" in out
    summary = out.splitlines()[-3:]  # the probe says what it measured, where it wrote it and what comes next
    assert summary[0].startswith(f"probe done: step 20 of {run} in ") and f"linear probe {100 * result['linear_accuracy']:.1f} %" in summary[0]
    assert summary[1] == f"results:    {run / 'probe' / 'step-00000020.json'}"
    assert summary[2] == f"export:     d2v2 export --checkpoint {run} --out exports/run"


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "r"), "--max-steps", "1", *FAST]
    assert "does not exist" in one_line_error(capsys, ["pretrain", "--recipe", "image-tiny", "--data", str(tmp_path / "none"), *out])
    (tmp_path / "empty").mkdir()
    assert "no images" in one_line_error(capsys, ["pretrain", "--recipe", "image-tiny", "--data", str(tmp_path / "empty"), *out])
    err = one_line_error(capsys, ["pretrain", "--recipe", "image-tiny", "--set", "optim.lrr=1", *out])
    assert "unknown config key optim.lrr" in err and "lr" in err
    assert "must be a number" in one_line_error(capsys, ["pretrain", "--recipe", "image-tiny", "--set", "optim.lr=fast", *out])
    assert "mask_ratio must lie in" in one_line_error(capsys, ["pretrain", "--recipe", "image-tiny", "--set", "model.mask_ratio=2", *out])
    assert "unknown recipe" in one_line_error(capsys, ["pretrain", "--recipe", "image-gigantic", *out])


def test_wrong_sample_rate_is_a_clear_error(tmp_path, capsys):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    sf.write(wavs / "a.wav", np.zeros(48_000, np.float32), 8_000)
    assert main(["manifest", str(wavs), "--dest", str(tmp_path / "m")]) == 0
    assert "a.wav (8000 Hz); resample them" in capsys.readouterr().err  # the manifest already warns
    err = one_line_error(capsys, ["pretrain", "--recipe", "audio-tiny", "--data", str(tmp_path / "m"), "--out", str(tmp_path / "r"), *FAST])
    assert "a.wav: sample rate 8000 Hz, the recipe needs 16000 Hz" in err and "Caught" not in err


def test_manifest_leaves_out_unreadable_files_and_writes_whole_manifests(tmp_path, capsys, monkeypatch):
    wavs, dest = tmp_path / "wavs", tmp_path / "m"
    wavs.mkdir()
    sf.write(wavs / "a.wav", np.zeros(48_000, np.float32), 16_000)
    (wavs / "notes.wav").write_text("a text file, whatever its name")
    assert main(["manifest", str(wavs), "--dest", str(dest)]) == 0
    out, err = capsys.readouterr()
    assert "1 files ->" in out and "left out 1 unreadable file(s): notes.wav (Format not recognised)" in err
    assert (dest / "train.tsv").read_text() == f"{wavs}\na.wav\t48000\n"
    # Nothing readable: a one-line error, and the earlier manifest stays.
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "x.wav").write_text("no audio")
    err = one_line_error(capsys, ["manifest", str(tmp_path / "text"), "--dest", str(dest)])
    assert "none of the 1 audio files" in err and "x.wav (Format not recognised)" in err
    assert (dest / "train.tsv").read_text() == f"{wavs}\na.wav\t48000\n"
    # A --dest that cannot be written: under a regular file (no folder can be made there, even as root) ...
    (wavs / "notes.wav").unlink()  # no warning line beside the errors below
    (tmp_path / "a-file").write_text("")
    err = one_line_error(capsys, ["manifest", str(wavs), "--dest", str(tmp_path / "a-file" / "m")])
    assert "cannot write the manifest into" in err and "Not a directory" in err and "--dest" in err
    # ... or a read-only folder (root ignores permission bits, so its write is made to fail as it would).
    import pathlib

    def read_only(*_args, **_kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    err = one_line_error(capsys, ["manifest", str(wavs), "--dest", str(dest), "--valid-percent", "0.5"])
    assert f"cannot write the manifest into {dest} (Read-only file system)" in err
    monkeypatch.undo()
    assert sorted(p.name for p in dest.iterdir()) == ["train.tsv"]  # as it was: no valid.tsv, no temporaries
    assert (dest / "train.tsv").read_text() == f"{wavs}\na.wav\t48000\n"


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", "image-tiny", "--out", str(run), "--max-steps", "1", *FAST]) == 0
    err = one_line_error(capsys, ["pretrain", "--recipe", "text-tiny", "--out", str(run), "--max-steps", "2", *FAST])
    assert "is a run of recipe image-tiny, not text-tiny" in err  # the folder's own recipe is checked first
    other = ["pretrain", "--recipe", "text-tiny", "--out", str(tmp_path / "text"), "--max-steps", "2", *FAST]
    assert "another model" in one_line_error(capsys, [*other, "--resume", str(run)])


def test_corrupt_images_are_skipped_then_stop_the_run(tmp_path, capsys):
    data = tmp_path / "imgs" / "only"
    data.mkdir(parents=True)
    for i in range(12):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "zz-bad.png").write_bytes(b"garbage")
    base = ["pretrain", "--recipe", "image-tiny", "--data", str(tmp_path / "imgs"), *FAST, "--set", "data.batch_size=13"]
    # One batch per epoch: the bad file is read 3 times, but it is one file, within max_corrupt=1.
    assert main([*base, "--out", str(tmp_path / "ok"), "--max-steps", "3", "--set", "train.max_corrupt=1"]) == 0
    state = torch.load(tmp_path / "ok" / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)
    assert state["trainer"]["skipped"] == [str(data / "zz-bad.png")]
    for name in ("zz-bad2.png", "zz-bad3.png"):
        (data / name).write_bytes(b"garbage")
    base[-1] = "data.batch_size=15"  # every batch holds the three bad files
    assert main([*base, "--out", str(tmp_path / "stop"), "--max-steps", "5", "--set", "train.max_corrupt=2"]) == 1
    assert "zz-bad3.png" in capsys.readouterr().err
