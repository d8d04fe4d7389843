"""``d2v2 finetune`` / ``d2v2 evaluate`` end to end on the embedded data: every method's tiny run
fine-tunes, the best checkpoint is kept and scored alike by evaluate, resume is exact, bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch

from d2v2.engine.training.checkpoint import load_checkpoint
from d2v2.engine.cli import main

from ...helpers import one_line_error

PRETRAIN_FAST = {
    "image": ["--set", "data.batch_size=8", "--set", "data.num_workers=0"],
    "audio": ["--set", "data.max_tokens=48000", "--set", "data.num_workers=0"],
    "text": ["--set", "data.batch_size=4", "--set", "data.num_workers=0"],
}
FINETUNE_FAST = ["--set", "data.batch_size=8", "--set", "train.eval_every=2", "--set", "train.log_every=1",
                 "--set", "optim.warmup_steps=1", "--set", "optim.total_steps=4", "--set", "train.checkpoint_every=2"]  # fmt: skip
MODALITY_FAST = {"audio": ["--set", "data.valid_fraction=0.05", "--set", "data.batch_size=4"], "image": [], "text": []}


def pretrain(tmp_path, recipe: str, modality: str, steps: int = 2):
    out = tmp_path / f"pre-{recipe}"
    assert main(["pretrain", "--recipe", recipe, "--out", str(out), "--max-steps", str(steps), *PRETRAIN_FAST[modality]]) == 0
    return out


def finetune(*args) -> int:
    return main(["finetune", *map(str, args)])


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("image"), "image-tiny", "image", steps=3)


def test_finetune_keeps_the_best_checkpoint_and_evaluate_scores_it_alike(image_run, tmp_path, capsys):
    out = tmp_path / "ft"
    assert finetune("--recipe", "finetune-image-tiny", "--checkpoint", image_run, "--out", out, *FINETUNE_FAST) == 0
    printed = capsys.readouterr().out
    assert "starting from the student's weights of data2vec2" in printed and "evaluate:   d2v2 evaluate --checkpoint" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if "valid_accuracy" in r]
    assert [r["step"] for r in valid] == [2, 4] and all("valid_top5" in r for r in valid)
    best = load_checkpoint(out / "best")
    chosen = max(valid, key=lambda r: r["valid_accuracy"])  # the first best on a tie
    assert best["trainer"]["step"] == chosen["step"] and best["valid"]["accuracy"] == chosen["valid_accuracy"]
    assert "optimizer" not in best  # weights only: resume uses checkpoints/
    assert main(["evaluate", "--checkpoint", str(out)]) == 0
    result = json.loads(next((out / "eval").glob("*.json")).read_text())
    assert result["step"] == chosen["step"]
    assert result["metrics"]["accuracy"] == pytest.approx(chosen["valid_accuracy"], abs=1e-6)
    assert "evaluate done" in capsys.readouterr().out


def test_a_torn_best_write_is_cleaned_up_and_the_best_kept(image_run, tmp_path, capsys):
    out = tmp_path / "ft"
    common = ["--recipe", "finetune-image-tiny", "--checkpoint", image_run, *FINETUNE_FAST]
    assert finetune(*common, "--out", out, "--max-steps", 2) == 0
    kept = (out / "best" / "state.pt").read_bytes()
    (out / "best" / ".state.pt.tmp-99999").write_bytes(kept[:100])  # what a kill -9 mid-write leaves
    assert finetune("--out", out, "--max-steps", 4) == 0
    assert "removed the leftovers of an interrupted checkpoint write: .state.pt.tmp-99999" in capsys.readouterr().out
    assert [p.name for p in (out / "best").iterdir()] == ["state.pt"]
    assert load_checkpoint(out / "best")["trainer"]["step"] in (2, 4)


def test_resume_is_exact(image_run, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    common = ["--recipe", "finetune-image-tiny", "--checkpoint", image_run, *FINETUNE_FAST]
    assert finetune(*common, "--out", straight) == 0
    assert finetune(*common, "--out", halves, "--max-steps", 2) == 0
    assert finetune("--out", halves, "--max-steps", 4) == 0  # continued from its own config and checkpoint
    a = load_checkpoint(straight / "checkpoints" / "step-00000004")
    b = load_checkpoint(halves / "checkpoints" / "step-00000004")
    for name, tensor in a["method"].items():
        torch.testing.assert_close(b["method"][name], tensor, rtol=0, atol=0, msg=name)
    assert a["best"] == b["best"]


@pytest.mark.parametrize(
    "recipe,modality",
    [("mae-image-tiny", "image"), ("d2v1-image-tiny", "image"), ("audio-tiny", "audio"), ("d2v1-audio-tiny", "audio"),
     ("wav2vec2-audio-tiny", "audio"), ("text-tiny", "text"), ("d2v1-text-tiny", "text"), ("mlm-text-tiny", "text")],
)  # fmt: skip
def test_every_method_fine_tunes(recipe, modality, tmp_path):
    run = pretrain(tmp_path, recipe, modality, steps=1)
    out = tmp_path / "ft"
    assert finetune("--recipe", f"finetune-{modality}-tiny", "--checkpoint", run, "--out", out, "--max-steps", 2,
                    *FINETUNE_FAST, *MODALITY_FAST[modality]) == 0  # fmt: skip
    assert (out / "best" / "state.pt").is_file()
    assert main(["evaluate", "--checkpoint", str(out)]) == 0


def test_no_pretraining_baseline_and_teacher_weights(tmp_path, capsys):
    out = tmp_path / "fresh"
    assert finetune("--recipe", "finetune-text-tiny", "--checkpoint", "none", "--out", out, "--max-steps", 2, *FINETUNE_FAST) == 0
    assert "starting from a fresh encoder (no pretraining)" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()  # evaluate reads the text with it
    run = pretrain(tmp_path, "image-tiny", "image", steps=1)
    assert finetune("--recipe", "finetune-image-tiny", "--checkpoint", run, "--weights", "teacher", "--out",
                    tmp_path / "teacher", "--max-steps", 2, *FINETUNE_FAST) == 0  # fmt: skip
    assert "starting from the teacher's weights of data2vec2" in capsys.readouterr().out


def test_bad_input_is_one_line(image_run, tmp_path, capsys):
    ft = ["finetune", "--out", str(tmp_path / "x")]
    assert "give --checkpoint RUN" in one_line_error(capsys, [*ft, "--recipe", "finetune-image-tiny"])
    assert "takes audio encoders; the pretrained one is image" in one_line_error(
        capsys, [*ft, "--recipe", "finetune-audio-tiny", "--checkpoint", str(image_run)]
    )
    assert "unknown task 'video'" in one_line_error(capsys, [*ft, "--recipe", "finetune-image-tiny", "--checkpoint",
                                                             str(image_run), "--set", "task=video"])  # fmt: skip
    assert "unknown recipe 'nonsense'; choose one of finetune-audio-base," in one_line_error(capsys, [*ft, "--recipe", "nonsense"])
    assert "is not a fine-tuned run" in one_line_error(capsys, ["evaluate", "--checkpoint", str(image_run)])
    assert "is a fine-tuning recipe" in one_line_error(capsys, ["pretrain", "--recipe", "finetune-image-tiny", "--out", str(tmp_path / "p")])
    assert "has no EMA teacher" in one_line_error(
        capsys, [*ft, "--recipe", "finetune-image-tiny", "--checkpoint", str(pretrain(tmp_path, "mae-image-tiny", "image", 1)),
                 "--weights", "teacher"],
    )  # fmt: skip
    assert not (tmp_path / "x" / "checkpoints").exists()
