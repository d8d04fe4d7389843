"""The masked-LM recipes: RoBERTa base's values, and the tiny one trains from the CLI."""

from __future__ import annotations

import json

import pytest
import yaml

from d2v2.engine.cli import main
from d2v2.engine.run import resolve_config


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


def test_base_recipe_carries_roberta_base_values():
    cfg = resolve_config("mlm-text-base")
    model = cfg.model.build_config()
    assert cfg.method == "mlm" and (model.embed_dim, model.depth, model.num_heads) == (768, 12, 12)
    assert (model.mask_ratio, model.mask_token_prob, model.random_token_prob) == (0.15, 0.8, 0.1)
    assert (model.encoder_dropout, model.attention_dropout, model.post_mlp_dropout, model.embed_dropout) == (0.1,) * 4
    optim = cfg.optim
    assert (optim.lr, optim.ref_batch, optim.betas, optim.eps, optim.weight_decay) == (6e-4, 0, (0.9, 0.98), 1e-6, 0.01)
    assert (optim.schedule, optim.power, optim.warmup_steps, optim.total_steps, optim.clip_grad) == (
        "polynomial", 1.0, 24_000, 500_000, 0.0)
    assert cfg.data.block_size == 512 and cfg.data.batch_size * 256 == 8192


def test_tiny_recipe_matches_the_data2vec2_tiny_data_and_size():
    mlm, d2v = resolve_config("mlm-text-tiny"), resolve_config("text-tiny")
    assert mlm.data == d2v.data
    model, reference = mlm.model.build_config(), d2v.model.build_config()
    assert (model.embed_dim, model.num_heads, model.depth) == (
        reference.embed_dim, reference.num_heads, reference.prenet_depth + reference.depth)


def test_tiny_recipe_pretrains_from_the_cli(tmp_path):
    run = tmp_path / "run"
    fast = ["--set", "data.num_workers=0", "--set", "train.log_every=1", "--set", "data.batch_size=4"]
    assert main(["pretrain", "--recipe", "mlm-text-tiny", "--out", str(run), "--max-steps", "2", *fast]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["loss"] > 0 for line in lines)
    config = yaml.safe_load((run / "config.yaml").read_text())
    # the trained BPE has RoBERTa's special tokens: the data gives its <mask> id, no row is added
    assert config["method"] == "mlm" and config["model"]["mask_idx"] == 4
