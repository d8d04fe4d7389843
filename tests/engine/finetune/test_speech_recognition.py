"""Speech recognition end to end: a tiny data2vec 2.0 pretraining run fine-tunes with CTC on the embedded
speech, ``evaluate`` prints WER / CER, ``transcribe`` one line per file (resampling another rate), resume is
exact; the LibriSpeech recipes carry fairseq's released values and take a step at the released sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v2.engine.training.checkpoint import load_checkpoint
from d2v2.engine.cli import main
from d2v2.engine.data.letters import STANDARD
from d2v2.engine.finetune.config import resolve_finetune_config
from d2v2.engine.finetune.run import build_model
from d2v2.engine.finetune.speech import speech_collater
from d2v2.models import METHODS, SpeechRecognizer, load_pretrained, method_config
from d2v2.models.config import finetune_fields

from ...helpers import one_line_error

FAST = ["--set", "data.max_batch_samples=96000", "--set", "data.valid_fraction=0.02", "--set", "train.eval_every=2",
        "--set", "train.log_every=1", "--set", "train.checkpoint_every=1", "--set", "optim.total_steps=2"]  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


def test_finetune_evaluate_transcribe_and_resume(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(["pretrain", "--recipe", "audio-tiny", "--out", str(pre), "--max-steps", "1", "--set", "data.max_tokens=48000",
                 "--set", "data.num_workers=0"]) == 0  # fmt: skip
    run = tmp_path / "ft"
    common = ["--recipe", "finetune-speech-tiny", "--checkpoint", str(pre), *FAST]
    assert main(["finetune", *common, "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "speech-recognition: embedded synthetic speech" in printed and "valid: wer" in printed
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "valid_wer" in r] == [2] and np.isfinite(rows[0]["loss"])

    assert main(["evaluate", "--checkpoint", str(run)]) == 0
    assert "cer" in capsys.readouterr().out
    result = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert set(result["metrics"]) == {"wer", "cer"} and result["decoding"] == "greedy" and result["examples"]

    wav = tmp_path / "eight-khz.wav"
    sf.write(wav, np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32), 8000)  # 1 s at 8 kHz
    assert main(["transcribe", "--checkpoint", str(run), str(wav), str(wav)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith(f"{wav}\t") and len(out.splitlines()) == 2
    assert "2 file(s), 2.0 s of audio, 2 resampled to 16 kHz" in err

    halves = tmp_path / "halves"  # one update, then the second on resume: the same weights
    assert main(["finetune", *common, "--out", str(halves), "--max-steps", "1"]) == 0
    assert main(["finetune", "--out", str(halves), "--max-steps", "2"]) == 0
    a, b = load_checkpoint(run / "checkpoints" / "step-00000002"), load_checkpoint(halves / "checkpoints" / "step-00000002")
    for name, tensor in a["method"].items():
        torch.testing.assert_close(b["method"][name], tensor, rtol=0, atol=0, msg=name)

    assert "is not a fine-tuned run" in one_line_error(capsys, ["transcribe", "--checkpoint", str(pre), str(wav)])
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x")]) == 0  # d2v2's own format (ALiBi)
    assert isinstance(load_pretrained(tmp_path / "x"), SpeechRecognizer)
    not_audio = str(pre / "config.yaml")
    assert "cannot be read as audio" in one_line_error(capsys, ["transcribe", "--checkpoint", str(run), not_audio])


# Each recipe's (lr, updates, freeze, mask_prob, channel_prob, layerdrop, samples per batch, accumulation) from
# fairseq's examples/wav2vec/config/finetuning/{base,vox}_*.yaml.
RELEASED = {
    "base-10m": (5e-5, 13_000, 10_000, 0.65, 0.25, 0.1, 3_200_000, 8),
    "base-1h": (5e-5, 13_000, 10_000, 0.65, 0.25, 0.1, 3_200_000, 8),
    "base-10h": (5e-5, 20_000, 10_000, 0.65, 0.5, 0.05, 3_200_000, 8),
    "base-100h": (3e-5, 80_000, 0, 0.65, 0.5, 0.1, 3_200_000, 8),
    "base-960h": (1e-4, 320_000, 0, 0.5, 0.1, 0.1, 3_200_000, 8),
    "large-10m": (1e-4, 13_000, 10_000, 0.65, 0.25, 0.1, 1_280_000, 20),
    "large-1h": (3e-4, 13_000, 10_000, 0.75, 0.25, 0.1, 1_280_000, 20),
    "large-10h": (1e-4, 20_000, 10_000, 0.75, 0.25, 0.1, 1_280_000, 20),
    "large-100h": (3e-5, 80_000, 10_000, 0.5, 0.5, 0.1, 1_280_000, 20),
    "large-960h": (3e-5, 320_000, 10_000, 0.5, 0.25, 0.1, 1_280_000, 24),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_recipes_carry_the_released_values(name):
    cfg = resolve_finetune_config(f"finetune-speech-{name}", ["pretrained.checkpoint=/pretrained"])
    lr, updates, freeze, mask_prob, channel_prob, layerdrop, samples, accum = RELEASED[name]
    assert (cfg.task, cfg.optim.lr, cfg.optim.total_steps, cfg.head.freeze_updates) == ("speech-recognition", lr, updates, freeze)
    assert (cfg.head.mask_prob, cfg.head.mask_length, cfg.head.mask_channel_prob, cfg.head.mask_channel_length) == (mask_prob, 10, channel_prob, 64)
    assert (cfg.model["layerdrop"], cfg.model["activation_dropout"], cfg.model["dropout"], cfg.data.max_batch_samples,
            cfg.train.accum_steps) == (layerdrop, 0.1, 0.0, samples, accum)  # fmt: skip
    assert (cfg.optim.schedule, cfg.optim.phase_ratio, cfg.optim.final_lr_scale, cfg.optim.betas) == ("tri_stage", (0.1, 0.4, 0.5), 0.05, (0.9, 0.98))
    assert cfg.head.freeze_feature_encoder and cfg.data.valid_split == "dev_other"


@pytest.mark.parametrize("name,method", [("base-10m", "wav2vec2"), ("base-960h", "data2vec2")])
def test_base_recipes_build_at_the_released_size_and_take_a_step(name, method):
    """The splits' recipes differ only in the values above: two of them, on two methods, build and step."""
    cfg = resolve_finetune_config(f"finetune-speech-{name}", ["pretrained.checkpoint=/pretrained"])
    model_cfg = method_config(method, "audio", "base", **finetune_fields(METHODS[method].config, cfg.model))
    # fairseq's fine-tuning names reach every dropout of the method they name (wav2vec2_asr.py arg_overrides)
    zeroed = {"wav2vec2": ("encoder_dropout", "dropout_input"), "data2vec2": ("encoder_dropout", "prenet_dropout", "post_mlp_dropout")}
    assert all(getattr(model_cfg, name) == 0.0 for name in zeroed[method]) and model_cfg.layerdrop == 0.1
    model = build_model(cfg, method, model_cfg, list(STANDARD.symbols))
    assert sum(p.numel() for p in model.encoder.parameters()) > 90e6 and model.head.linear.out_features == 32
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".conv_layers." in n or n == "encoder.mask_emb" for n in frozen)  # the CNN, as released
    model.after_step(cfg.head.freeze_updates)  # past the frozen phase: the whole encoder learns
    rng = np.random.default_rng(0)
    items = [{"source": torch.from_numpy(rng.normal(size=n).astype(np.float32)), "label": STANDARD.encode("A | B |", "x"),
              "words": "A B", "epoch": 0, "batch": 0} for n in (16000, 12000)]  # fmt: skip
    batch = speech_collater(cfg, None, model, 0, True)(items)
    assert batch["mask"].any() and batch["channel_mask"].any()
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=cfg.optim.lr)
    out = model({k: v for k, v in batch.items() if torch.is_tensor(v)})
    out["loss"].backward()
    optimizer.step()
    assert torch.isfinite(out["loss"]) and out["logits"].shape[:2] == (2, 49)
