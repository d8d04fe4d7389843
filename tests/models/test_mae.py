"""MAE: the step against MAE's own formulas in plain PyTorch, gradients, training, sizes, config."""

import pytest
import torch

from d2v2.models import build_method, count_parameters, method_config
from d2v2.models.mae import MAE, MAE_PRESETS, mae_config, patchify
from d2v2.models.layers.masking import mask_to_ids
from tests.helpers import assert_close
from tests.models.fixtures import train_losses


def tiny_mae(**overrides) -> MAE:
    return MAE(mae_config("image", "tiny", **{"impl": "torch", **overrides}))


def make_batch(model: MAE, batch_size: int = 3, seed: int = 0) -> dict:
    source = torch.randn(batch_size, 3, model.cfg.image_size, model.cfg.image_size)
    return {"source": source, "mask": model.modality.make_masks(batch_size, source, torch.Generator().manual_seed(seed))}


def reference_mae_loss(model: MAE, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``models_mae.py`` step by step (forward_encoder, forward_decoder, forward_loss), with MAE's
    shuffled ids and ids_restore, on the model's weights."""
    enc, dec, cfg = model.encoder, model.decoder, model.cfg
    batch, num_patches = mask.shape
    x = enc.embed.local_encoder.proj(source).flatten(2).transpose(1, 2)  # [B, N, D]
    x = x + enc.embed.pos_embed[None]
    # MAE's random_masking: kept ids first (here in a shuffled order), then the masked ones.
    noise = torch.rand(batch, num_patches) + 2.0 * mask.float()  # kept patches sort first
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    num_keep = int((~mask[0]).sum())
    ids_keep = ids_shuffle[:, :num_keep]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([enc.embed.cls_token.expand(batch, -1, -1), x], dim=1)  # CLS + its zero position
    for block in enc.blocks:
        x = block(x)[0]
    x = enc.norm(x)
    x = dec.decoder_embed(x)
    mask_tokens = dec.mask_token.expand(batch, num_patches + 1 - x.shape[1], -1)
    y = torch.cat([x[:, 1:], mask_tokens], dim=1)
    y = torch.gather(y, 1, ids_restore[..., None].expand(-1, -1, y.shape[-1]))  # unshuffle
    x = torch.cat([x[:, :1], y], dim=1)
    x = x + torch.cat([torch.zeros(1, dec.pos_embed.shape[1]), dec.pos_embed])[None]  # zero CLS row
    for block in dec.blocks:
        x = block(x)[0]
    pred = dec.pred(dec.norm(x))[:, 1:]
    # forward_loss with norm_pix_loss
    p, h = cfg.patch_size, cfg.image_size // cfg.patch_size
    target = source.reshape(batch, 3, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(batch, h * h, p * p * 3)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target).square().mean(dim=-1)  # [B, N], mean loss per patch
    return (loss * mask).sum() / mask.sum()


def test_loss_equals_mae_reference_recomputation():
    model = tiny_mae().eval()
    batch = make_batch(model)
    out = model(batch)
    expected = reference_mae_loss(model, batch["source"], batch["mask"])
    assert_close(out["loss"], expected, atol=1e-5, rtol=1e-5, name="loss")
    assert out["sample_size"] == 3 * 48  # 64 patches, 16 kept
    # the same step with the loader's ids_keep
    assert torch.equal(model(dict(batch, ids_keep=mask_to_ids(batch["mask"])))["loss"], out["loss"])


def test_raw_pixel_loss_and_patchify_order():
    model = tiny_mae(norm_pix_loss=False)
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    patches = patchify(images, 4)  # [2, 64, 48]: patch (1, 2) holds rows 4-7, columns 8-11, values (p, q, c)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(patches[1, 1 * 8 + 2].view(4, 4, 3), images[1, :, 4:8, 8:12].permute(1, 2, 0))
    assert torch.equal(model.pixel_targets(images), patches)


def test_only_kept_patches_reach_the_encoder_and_every_parameter_learns():
    model = tiny_mae().train()
    batch = make_batch(model, batch_size=2)
    source = batch["source"].requires_grad_(True)
    model(batch)["loss"].backward()
    grad = patchify(source.grad, model.cfg.patch_size).abs().sum(dim=-1)  # [B, N]
    assert (grad[batch["mask"]] == 0).all(), "masked pixels feed only the (no-grad) targets"
    assert (grad[~batch["mask"]] > 0).all()
    for name, param in model.named_parameters():
        if name.endswith("pos_embed"):
            assert not param.requires_grad and param.grad is None, name  # fixed sin-cos tables
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_weight_decay_groups_and_init_follow_mae():
    model = tiny_mae()
    decay, no_decay = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"encoder.embed.cls_token", "decoder.mask_token", "decoder.pred.weight"} <= decayed  # as add_weight_decay
    assert all(n.endswith(".bias") or ".norm" in n or n.endswith("norm.weight") for n in skipped)
    assert not any(n.endswith("pos_embed") for n in decayed | skipped)
    qkv = model.encoder.blocks[0].attn.qkv
    bound = (6 / (qkv.in_features + qkv.out_features)) ** 0.5  # xavier-uniform on the fused qkv
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound and (qkv.bias == 0).all()
    assert (model.decoder.norm.weight == 1).all() and (model.decoder.norm.bias == 0).all()
    assert model.encoder.embed.cls_token.abs().max() < 0.2 and model.decoder.mask_token.abs().max() < 0.2


def test_probe_features_are_the_unmasked_encoder_without_cls():
    model = tiny_mae().eval()
    images = torch.randn(2, 3, 32, 32)
    full = model.forward_features(images)
    assert full.shape == (2, 65, 64)
    assert torch.equal(model.probe_features(images), full[:, 1:])


def test_loss_goes_down_on_a_fixed_batch():
    model = tiny_mae().train()
    batch = make_batch(model, batch_size=4)
    losses = train_losses(model, batch, steps=15, lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95))
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses


def test_base_model_has_the_published_parameter_counts():
    with torch.device("meta"):  # shapes only
        model = build_method("mae", method_config("mae", "image", "base"))
    # timm vit_base_patch16_224's backbone is 85,798,656 with a 197-row position table; ours has no
    # (zero) CLS row: 85,647,360 trainable + 196 * 768 fixed.
    assert count_parameters(model.encoder, trainable=True) == 85_647_360
    assert count_parameters(model.encoder, trainable=False) == 196 * 768
    # MAE's decoder: embed 393,728 + mask token 512 + 8 blocks x 3,152,384 + norm 1,024 + pred 393,984.
    assert count_parameters(model.decoder, trainable=True) == 26_008_320
    assert count_parameters(model.decoder, trainable=False) == 196 * 512


def test_base_model_runs_one_training_step_on_cpu():
    model = MAE(mae_config("image", "base", impl="torch")).train()
    source = torch.randn(1, 3, 224, 224)
    mask = model.modality.make_masks(1, source)
    assert mask.shape == (1, 196) and int((~mask).sum()) == 49
    out = model({"source": source, "mask": mask})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.decoder.mask_token.grad is not None


def test_config_checks_and_presets():
    assert set(MAE_PRESETS) == {("image", "base"), ("image", "tiny")}
    tiny = mae_config("image", "tiny")
    assert (tiny.embed_dim, tiny.num_heads, tiny.depth, tiny.patch_size, tiny.image_size) == (64, 4, 3, 4, 32)
    with pytest.raises(ValueError, match="no MAE preset for text base"):
        mae_config("text", "base")
    with pytest.raises(ValueError, match="MAEConfig.mask_ratio must lie in"):
        mae_config("image", "tiny", mask_ratio=1.0)
    with pytest.raises(ValueError, match="MAEConfig.decoder_dim .* divisible by decoder_heads"):
        mae_config("image", "tiny", decoder_heads=3)
    with pytest.raises(ValueError, match="MAEConfig.image_size .* multiple of patch_size"):
        mae_config("image", "tiny", image_size=30)
    with pytest.raises(ValueError, match="unknown MAEConfig fields"):
        mae_config("image", "tiny", clone_batch=2)
    model = tiny_mae()
    batch = make_batch(model)
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be bool"):
        model(dict(batch, mask=batch["mask"][:-1]))


def test_triton_kernels_match_the_torch_path():
    micro = dict(image_size=16, embed_dim=32, num_heads=2, depth=1, decoder_dim=32, decoder_heads=2, decoder_depth=1)
    torch_model = tiny_mae(**micro).eval()
    triton_model = tiny_mae(**micro, impl="triton").eval()
    triton_model.load_state_dict(torch_model.state_dict())
    batch = make_batch(torch_model, batch_size=2)
    expected, actual = torch_model(batch)["loss"], triton_model(batch)["loss"]
    assert_close(actual, expected, atol=1e-5, rtol=1e-4, name="loss")
    expected.backward()
    actual.backward()
    for (name, p), q in zip(torch_model.named_parameters(), triton_model.parameters()):
        if p.grad is not None:
            assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3, name=name)
