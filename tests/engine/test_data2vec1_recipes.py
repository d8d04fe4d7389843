"""The data2vec 1.0 recipes (d2v1-*): the released values of reference/data2vec2.md section 2, tiny ones
at data2vec 2.0's tiny sizes, and ``d2v2 pretrain`` end to end on each tiny one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from d2v2.engine.cli import main
from d2v2.engine.config import recipe_names
from d2v2.engine.run import resolve_config

FAST = ["--set", "data.num_workers=0", "--set", "train.log_every=1"]

# recipe: (peak lr, ref batch, betas, eps, weight decay, schedule, warm-up, total updates, clip)
OPTIM = {
    "d2v1-image-base": (5e-4, 2048, (0.9, 0.999), 1e-8, 0.05, "cosine", 12_510, 375_300, 3.0),
    "d2v1-audio-base": (5e-4, 0, (0.9, 0.98), 1e-6, 0.01, "tri_stage", 0, 400_000, 0.0),
    "d2v1-text-base": (2e-4, 0, (0.9, 0.98), 1e-6, 0.01, "cosine", 10_000, 1_000_000, 5.0),
}
# recipe: (top-k, per-layer norm, final norm, block outputs, loss beta, loss scale, head layers,
#          EMA start, EMA end, anneal steps, drop path, layerdrop)
MODEL = {
    "d2v1-image-base": (6, None, "layer", True, 2.0, None, 1, 0.999, 0.9998, 375_300, 0.25, 0.0),
    "d2v1-audio-base": (8, "instance", None, False, 0.0, None, 1, 0.999, 0.9999, 30_000, 0.0, 0.05),
    "d2v1-text-base": (10, "layer", None, False, 4.0, 1.0, 2, 0.999, 0.9999, 300_000, 0.0, 0.0),
}


def test_every_d2v1_recipe_is_shipped():
    assert {n for n in recipe_names() if n.startswith("d2v1-")} == set(OPTIM) | {
        "d2v1-image-tiny", "d2v1-audio-tiny", "d2v1-text-tiny"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OPTIM))
def test_released_recipes_match_the_reference(name):
    cfg = resolve_config(name)
    assert cfg.method == "data2vec" and cfg.model.size == "base"
    o = cfg.optim
    assert (o.lr, o.ref_batch, o.betas, o.eps, o.weight_decay, o.schedule, o.warmup_steps, o.total_steps,
            o.clip_grad) == OPTIM[name]  # fmt: skip
    m = cfg.model.build_config()
    assert (m.average_top_k_layers, m.target_layer_norm, m.target_final_norm, m.end_of_block_targets, m.loss_beta,
            m.loss_scale, m.head_layers, m.ema_decay, m.ema_end_decay, m.ema_anneal_end_step, m.drop_path_rate,
            m.layerdrop) == MODEL[name]  # fmt: skip
    if name == "d2v1-audio-base":  # tri-stage 3/90/7 %, 3.8 M samples per GPU, p 0.65 spans of 10
        assert (o.phase_ratio, o.init_lr_scale, o.final_lr_scale) == ((0.03, 0.9, 0.07), 0.01, 0.05)
        assert cfg.data.max_tokens == 3_800_000 and (m.mask_prob, m.mask_length, m.alibi) == (0.65, 10, False)
    elif name == "d2v1-text-base":  # 16 x 512 tokens per GPU, p 0.35 spans of 4
        assert (cfg.data.batch_size, cfg.data.block_size, m.mask_prob, m.mask_length) == (16, 512, 0.35, 4)
    else:  # 128 images per GPU, 75 of 196 patches in BEiT blocks, layer-scale 1e-4
        assert (cfg.data.batch_size, m.num_mask_patches, m.min_mask_patches, m.layer_scale_init) == (128, 75, 16, 1e-4)


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_tiny_recipes_match_data2vec2_tiny(modality):
    d2v1, d2v2 = resolve_config(f"d2v1-{modality}-tiny"), resolve_config(f"{modality}-tiny")
    one, two = d2v1.model.build_config(), d2v2.model.build_config()
    assert (one.embed_dim, one.num_heads, one.depth) == (two.embed_dim, two.num_heads, two.prenet_depth + two.depth)
    assert d2v1.data == d2v2.data and d2v1.optim.total_steps <= 300 and d2v1.train.max_steps == 0


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    # The same per-session cache as test_cli: the synthetic speech and token caches are built once.
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("d2v1-image-tiny", ["--set", "data.batch_size=8"]),
        ("d2v1-audio-tiny", ["--set", "data.embedded_utterances=12", "--set", "data.max_tokens=160000"]),
        ("d2v1-text-tiny", ["--set", "data.batch_size=4"]),
    ],
)
def test_pretrain_runs_each_tiny_recipe(tmp_path, cache, recipe, extra):
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", recipe, "--out", str(run), "--max-steps", "2", *FAST, *extra]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "data2vec" and config["model"]["modality"] == recipe.split("-")[1]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite([line["loss"] for line in lines]))
