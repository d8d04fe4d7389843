"""The MAE recipes: the released ViT-B values (ref 4.1), and the tiny one trains and probes from the CLI."""

from __future__ import annotations

import json

import pytest

from d2v2.engine.cli import main
from d2v2.engine.run import resolve_config


def test_base_recipe_carries_the_mae_paper_values():
    cfg = resolve_config("mae-image-base")
    model = cfg.model.build_config()
    assert cfg.method == "mae" and (model.embed_dim, model.depth, model.num_heads, model.patch_size) == (768, 12, 12, 16)
    assert (model.mask_ratio, model.decoder_dim, model.decoder_depth, model.decoder_heads) == (0.75, 512, 8, 16)
    assert model.norm_pix_loss
    optim = cfg.optim
    assert (optim.lr, optim.ref_batch, optim.betas, optim.weight_decay, optim.schedule) == (1.5e-4, 256, (0.9, 0.95), 0.05, "cosine")
    steps_per_epoch = 1_281_167 // 4096  # 312: MAE drops the last partial batch
    assert (optim.warmup_steps, optim.total_steps, optim.clip_grad) == (40 * steps_per_epoch, 800 * steps_per_epoch, 0.0)
    assert cfg.data.batch_size * 64 == 4096 and optim.lr * 4096 / optim.ref_batch == pytest.approx(2.4e-3)


def test_tiny_recipe_matches_the_data2vec2_tiny_data_and_size():
    mae, d2v = resolve_config("mae-image-tiny"), resolve_config("image-tiny")
    assert mae.data == d2v.data
    model, reference = mae.model.build_config(), d2v.model.build_config()
    assert (model.embed_dim, model.num_heads, model.depth, model.patch_size, model.image_size) == (
        reference.embed_dim, reference.num_heads, reference.prenet_depth + reference.depth, reference.patch_size,
        reference.image_size,
    )  # fmt: skip


def test_tiny_recipe_pretrains_and_probes_from_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    fast = ["--set", "data.num_workers=0", "--set", "train.log_every=1", "--set", "data.batch_size=8"]
    assert main(["pretrain", "--recipe", "mae-image-tiny", "--out", str(run), "--max-steps", "2", *fast]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["probe", "--checkpoint", str(run)]) == 0
    result = json.loads((run / "probe" / "step-00000002.json").read_text())
    assert 0 <= result["linear_accuracy"] <= 1 and result["classes"] == 10
