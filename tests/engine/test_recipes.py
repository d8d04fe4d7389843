"""Every shipped recipe resolves, and the released ones carry the reference's values (data2vec2.md 1.11)."""

from __future__ import annotations

import pytest

from d2v2.engine.config import recipe_names
from d2v2.engine.run import resolve_config

# recipe: (K clones, mask ratio, top-k, per-layer norm, final norm, EMA start, EMA end, anneal steps,
#          peak lr, warm-up, total updates, clip, betas, weight decay, per-GPU batch)
RELEASED = {
    "image-base": (16, 0.8, 10, "instance", "layer", 0.9998, 0.99999, 100_000, 1e-3, 50_040, 375_300, 4.0, (0.9, 0.95), 0.05, 16),
    "image-large": (16, 0.75, 18, "instance", "layer", 0.9998, 0.99999, 150_000, 4e-4, 50_040, 375_300, 4.0, (0.9, 0.95), 0.05, 8),
    "image-huge": (16, 0.75, 24, "instance", "layer", 0.9998, 1.0, 300_000, 4e-4, 50_040, 500_000, 4.0, (0.9, 0.95), 0.05, 8),
    "audio-base": (8, 0.5, 8, "instance", None, 0.999, 0.99999, 75_000, 7.5e-4, 8_000, 400_000, 0.0, (0.9, 0.98), 0.01, None),
    "audio-large": (12, 0.55, 16, "instance", None, 0.9997, 1.0, 300_000, 4e-4, 10_000, 600_000, 1.0, (0.9, 0.98), 0.01, None),
    "text-base": (8, 0.48, 12, "instance", None, 0.9999, 0.99999, 100_000, 2e-4, 4_000, 1_000_000, 1.0, (0.9, 0.98), 0.01, 4),
    "text-large": (8, 0.5, 24, "layer", "instance", 0.9999, 0.99999, 100_000, 1e-4, 4_000, 600_000, 1.0, (0.9, 0.98), 0.01, 2),
}


def test_every_recipe_is_shipped():
    data2vec2 = {name for name in recipe_names() if resolve_config(name).method == "data2vec2"}
    assert set(RELEASED) | {"image-tiny", "audio-tiny", "text-tiny"} == data2vec2


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_recipes_match_the_reference(name):
    cfg = resolve_config(name)
    model = cfg.model.build_config()
    k, ratio, top_k, per_layer, final, tau0, tau_e, tau_n, lr, warmup, total, clip, betas, wd, batch = RELEASED[name]
    assert (model.clone_batch, model.mask_ratio, model.average_top_k_layers) == (k, ratio, top_k)
    assert (model.target_layer_norm, model.target_final_norm) == (per_layer, final)
    assert (model.ema_decay, model.ema_end_decay, model.ema_anneal_end_step) == (tau0, tau_e, tau_n)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.total_steps, cfg.optim.clip_grad) == (lr, warmup, total, clip)
    assert (cfg.optim.betas, cfg.optim.weight_decay) == (betas, wd)
    if batch is not None:
        assert cfg.data.batch_size == batch
    if name.startswith("audio"):
        assert cfg.data.max_tokens == {"audio-base": 1_000_000, "audio-large": 320_000}[name]


@pytest.mark.parametrize("name", ["image-tiny", "audio-tiny", "text-tiny"])
def test_tiny_recipes_resolve_for_cpu(name):
    cfg = resolve_config(name)
    assert cfg.model.size == "tiny" and cfg.optim.total_steps <= 1000
    cfg.model.build_config()


def test_overrides_reach_every_section():
    cfg = resolve_config("image-tiny", ["optim.lr=5e-4", "model.clone_batch=2", "train.accum_steps=2", "data.batch_size=4"])
    assert cfg.optim.lr == 5e-4 and cfg.model.build_config().clone_batch == 2
    assert cfg.train.accum_steps == 2 and cfg.data.batch_size == 4
    with pytest.raises(ValueError, match="unknown config key model.clone_batches"):
        resolve_config("image-tiny", ["model.clone_batches=2"])
    with pytest.raises(ValueError, match="model.clone_batch must be an integer"):
        resolve_config("image-tiny", ["model.clone_batch=two"])
