"""The fine-tuning model: heads, layer-wise learning-rate decay, losses, on every method's encoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from d2v2.models import Classifier, PooledHead, SentenceHead, build_method
from d2v2.models.tasks import layer_ids

from ..fixtures import fit, make_source, registered_pairs, tiny_config


def classifier(method: str, modality: str, outputs: int = 3, **kwargs) -> Classifier:
    cfg = tiny_config(method, modality, deterministic=True)
    built = build_method(method, cfg)
    head = SentenceHead(cfg.embed_dim, outputs) if modality == "text" else PooledHead(cfg.embed_dim, outputs, cfg.num_extra_tokens)
    return Classifier(built.encoder, built.modality, head, **kwargs)


@pytest.mark.parametrize("method,modality", registered_pairs())
def test_every_encoder_takes_a_head_and_learns(method, modality):
    cfg = tiny_config(method, modality)
    fixed = {f"encoder.{n}" for n, p in build_method(method, cfg).encoder.named_parameters() if not p.requires_grad}
    model = classifier(method, modality, layer_decay=0.5)
    batch = {"source": make_source(cfg, batch_size=4), "label": torch.tensor([0, 1, 2, 1])}
    out, losses = fit(model, batch, steps=8)
    assert out["logits"].shape == (4, 3)
    assert losses[-1] < losses[0]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and n not in fixed]  # fixed: e.g. sin-cos tables
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []  # data-parallel training needs every trainable parameter used
    assert frozen == (["encoder.mask_emb"] if method == "wav2vec2" else [])


def test_layer_ids_follow_the_encoder_from_input_to_output():
    cfg = tiny_config("data2vec2", "image")  # a prenet block, then the shared blocks
    encoder = build_method("data2vec2", cfg).encoder
    ids, depth = layer_ids(encoder)
    assert depth == cfg.prenet_depth + cfg.depth
    assert ids["embed.cls_token"] == 0 and ids["embed.local_encoder.proj.weight"] == 0 and ids["context_norm.weight"] == 0
    assert ids["prenet.0.norm1.weight"] == 1
    assert ids[f"blocks.{cfg.depth - 1}.norm1.weight"] == depth
    mae = build_method("mae", tiny_config("mae", "image")).encoder
    mae_ids, mae_depth = layer_ids(mae)
    assert mae_ids["norm.weight"] == mae_depth + 1  # after the blocks: the head's rate
    assert mae_ids["blocks.0.norm1.weight"] == 1


def test_param_groups_scale_the_learning_rate_by_layer():
    model = classifier("mae", "image", layer_decay=0.5)
    _, depth = layer_ids(model.encoder)
    scale_of = {}
    for group in model.param_groups(0.05):
        for p in group["params"]:
            scale_of[id(p)] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert scale_of[id(named["head.linear.weight"])] == (1.0, 0.05)
    assert scale_of[id(named["head.linear.bias"])] == (1.0, 0.0)
    assert scale_of[id(named["encoder.embed.cls_token"])] == (0.5 ** (depth + 1), 0.0)
    assert scale_of[id(named["encoder.blocks.0.mlp.fc1.weight"])] == (0.5**depth, 0.05)
    trainable = [p for p in named.values() if p.requires_grad]  # not the fixed sin-cos table
    assert sum(len(g["params"]) for g in model.param_groups(0.05)) == len(trainable)


def test_pooled_head_leaves_out_padding_and_extra_tokens():
    head = PooledHead(8, 2, skip_tokens=1, norm=False, init_std=1.0)
    x = torch.randn(2, 1 + 5, 8)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    changed = x.clone()
    changed[1, 1 + 3 :] = 100.0  # padded positions
    changed[:, 0] = -100.0  # the CLS token
    torch.testing.assert_close(head(x, padding), head(changed, padding))
    expected = head.linear(x[1, 1:4].mean(0))
    torch.testing.assert_close(head(x, padding)[1], expected)


def test_audio_classifier_pools_only_the_frames_of_the_utterance():
    model = classifier("data2vec2", "audio").eval()
    cfg = tiny_config("data2vec2", "audio")
    short = make_source(cfg, batch_size=1)[:, :8000]
    padded = torch.cat([short, torch.randn(1, 4800)], dim=1)
    padding = torch.zeros(1, padded.shape[1], dtype=torch.bool)
    padding[:, 8000:] = True
    alone = model({"source": short})["logits"]
    within = model({"source": padded, "padding_mask": padding})["logits"]
    torch.testing.assert_close(within, alone, atol=1e-4, rtol=1e-4)


def test_losses_soft_targets_and_regression():
    model = classifier("mae", "image", outputs=4, label_smoothing=0.1)
    cfg = tiny_config("mae", "image")
    source, labels = make_source(cfg, batch_size=3), torch.tensor([0, 3, 1])
    logits = model({"source": source})["logits"]
    hard = model.loss(logits, {"label": labels})
    torch.testing.assert_close(hard, F.cross_entropy(logits, labels, label_smoothing=0.1))
    smoothed = torch.full((3, 4), 0.1 / 4).scatter_(1, labels[:, None], 0.9 + 0.1 / 4)
    torch.testing.assert_close(model.loss(logits, {"target": smoothed}), hard)  # the same targets, given soft
    regression = classifier("data2vec2", "text", outputs=1, regression=True)
    tokens = make_source(tiny_config("data2vec2", "text"), batch_size=3)
    target = torch.tensor([0.5, 2.0, 4.5])
    out = regression({"source": tokens, "label": target})
    torch.testing.assert_close(out["loss"], F.mse_loss(out["logits"].squeeze(-1), target))
    assert "accuracy" not in out


def test_a_pooled_head_with_its_norm_replaces_the_vits_final_norm():
    cfg = tiny_config("mae", "image")
    pretrained = build_method("mae", cfg).encoder
    model = classifier("mae", "image")
    assert isinstance(model.encoder.norm, torch.nn.Identity)  # MAE fine-tuning: global pool, fc_norm, no final norm
    model.load_encoder(pretrained.state_dict())  # the pretrained final norm is left out, nothing else
    torch.testing.assert_close(model.encoder.blocks[0].mlp.fc1.weight, pretrained.blocks[0].mlp.fc1.weight)
    assert classifier("data2vec2", "image").replaced == ()  # post-norm blocks: no final norm to replace


@pytest.mark.parametrize("method", ["data2vec2", "data2vec", "wav2vec2"])
def test_freezing_the_feature_encoder_keeps_the_cnn_only(method):
    model = classifier(method, "audio", freeze_feature_encoder=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".conv_layers." in n or n == "encoder.mask_emb" for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if "project" in n)  # the projection still learns
