"""The wav2vec 2.0 recipes: the base one carries wav2vec2_base_librispeech's values, the tiny one
data2vec 2.0 audio-tiny's size and data settings, and it trains and resumes from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from d2v2.engine.cli import main
from d2v2.engine.run import resolve_config

FAST = ["--set", "data.num_workers=0", "--set", "train.log_every=1"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


def test_base_recipe_is_the_released_one():
    cfg = resolve_config("wav2vec2-audio-base")
    assert cfg.method == "wav2vec2" and (cfg.model.modality, cfg.model.size) == ("audio", "base")
    optim = cfg.optim
    assert (optim.lr, optim.betas, optim.eps, optim.weight_decay) == (5e-4, (0.9, 0.98), 1e-6, 0.01)
    assert (optim.schedule, optim.power, optim.warmup_steps, optim.total_steps, optim.clip_grad) == (
        "polynomial", 1.0, 32_000, 400_000, 0.0)  # fmt: skip
    assert (cfg.data.max_tokens, cfg.data.max_samples, cfg.data.min_samples) == (1_400_000, 250_000, 32_000)
    model = cfg.model.build_config()
    assert (model.embed_dim, model.depth, model.num_negatives, model.latent_vars) == (768, 12, 100, 320)


def test_tiny_recipe_has_data2vec2_audio_tiny_size_and_data():
    ours, theirs = resolve_config("wav2vec2-audio-tiny"), resolve_config("audio-tiny")
    assert ours.optim.total_steps <= 1000 and ours.optim.schedule == "polynomial"
    assert ours.data == theirs.data
    model, reference = ours.model.build_config(), theirs.model.build_config()
    assert (model.embed_dim, model.num_heads, model.depth) == (
        reference.embed_dim, reference.num_heads, reference.prenet_depth + reference.depth)  # fmt: skip
    assert model.conv_feature_layers == reference.conv_feature_layers


def test_tiny_recipe_trains_and_resumes_from_the_command_line(tmp_path):
    run = tmp_path / "run"
    data = ["--set", "data.embedded_utterances=12", "--set", "data.max_tokens=160000", *FAST]
    assert main(["pretrain", "--recipe", "wav2vec2-audio-tiny", "--out", str(run), "--max-steps", "2", *data]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "wav2vec2" and config["model"]["num_negatives"] == 10
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["loss"]) for line in lines)
    assert lines[0]["temperature"] == 2.0 and 0 < lines[0]["prob_perplexity"] <= 64  # the method's log_keys
    assert main(["pretrain", "--recipe", "wav2vec2-audio-tiny", "--out", str(run), "--max-steps", "3", *data]) == 0
    state = torch.load(run / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)
    assert state["trainer"]["step"] == 3
    assert float(state["method"]["quantizer.temperature"]) == pytest.approx(2 * 0.99**3)
