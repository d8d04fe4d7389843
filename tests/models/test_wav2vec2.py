"""wav2vec 2.0: the InfoNCE logits and the whole loss against plain PyTorch, the distractors, the CNN
gradient scale, the temperature anneal, learning on a fixed batch, and the base model's size and step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from d2v2.models import build_method, count_parameters, method_config
from d2v2.models.layers.masking import mask_to_ids
from d2v2.models.wav2vec2 import Wav2Vec2, Wav2Vec2Config, contrastive_logits, sample_negatives, wav2vec2_config
from tests.helpers import assert_close


def tiny(**overrides) -> Wav2Vec2:
    return Wav2Vec2(wav2vec2_config("audio", "tiny", **overrides))


def make_batch(model: Wav2Vec2, batch_size: int = 2, samples: int = 16_000, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(batch_size, samples, generator=generator)
    mask = model.modality.make_masks(batch_size, source, generator)
    return {"source": source, "mask": mask, "ids_keep": mask_to_ids(mask)}


def reference_logits(pred, targets, negatives, kappa):
    """fairseq's compute_preds, one masked frame at a time: cosine to [positive, distractors] / kappa,
    distractors equal in value to the positive at -inf."""
    batch_size, num_masked, num_negatives = negatives.shape
    out = torch.empty(batch_size, num_masked, 1 + num_negatives)
    for b in range(batch_size):
        for m in range(num_masked):
            distractors = targets[b, negatives[b, m]]  # [K, F], frames of utterance b only
            candidates = torch.cat([targets[b, m][None], distractors])
            logits = torch.cosine_similarity(pred[b, m][None].float(), candidates.float(), dim=-1) / kappa
            logits[1:][(distractors == targets[b, m]).all(dim=-1)] = float("-inf")
            out[b, m] = logits
    return out


def test_distractors_are_other_masked_frames_of_the_same_utterance_uniformly():
    batch_size, num_masked, num_negatives = 3, 7, 4000
    negatives = sample_negatives(batch_size, num_masked, num_negatives, torch.device("cpu"))
    assert negatives.shape == (batch_size, num_masked, num_negatives) and negatives.dtype == torch.long
    assert negatives.min() >= 0 and negatives.max() < num_masked  # indices into the same utterance's frames
    own = torch.arange(num_masked)[None, :, None]
    assert not (negatives == own).any()  # never the positive's own frame
    # Uniform over the other M - 1 frames: each gets ~1/6 of the draws of every (utterance, frame).
    counts = F.one_hot(negatives, num_masked).sum(dim=2).float() / num_negatives  # [B, M, M]
    off_diagonal = counts[:, ~torch.eye(num_masked, dtype=torch.bool)]
    assert_close(off_diagonal, torch.full_like(off_diagonal, 1 / (num_masked - 1)), atol=0.03, rtol=0, name="freq")


def test_contrastive_logits_equal_plain_pytorch_with_identical_distractors_at_minus_inf():
    batch_size, num_masked, num_negatives, width, groups = 2, 9, 6, 8, 2
    codes = torch.randint(0, 2, (batch_size, num_masked, groups))  # 4 code pairs: many identical targets
    table = torch.randn(2, 2, width)
    targets = table[codes[..., 0], codes[..., 1]]  # [B, M, F]: the same codes give the same target
    pred = torch.randn(batch_size, num_masked, width)
    negatives = sample_negatives(batch_size, num_masked, num_negatives, torch.device("cpu"))
    logits = contrastive_logits(pred, targets, codes, negatives, logit_temp=0.1)
    expected = reference_logits(pred, targets, negatives, 0.1)
    assert logits.shape == (batch_size, num_masked, 1 + num_negatives)
    assert torch.isinf(expected).any() and torch.isfinite(expected[..., 0]).all()  # the case is exercised
    assert torch.equal(torch.isinf(logits), torch.isinf(expected))
    assert_close(logits.masked_fill(torch.isinf(logits), 0), expected.masked_fill(torch.isinf(expected), 0),
                 atol=1e-5, rtol=1e-5, name="logits")  # fmt: skip
    # The positive sits at index 0: the logit of each prediction to its own target.
    assert_close(logits[..., 0], F.cosine_similarity(pred, targets, dim=-1) / 0.1, atol=1e-5, rtol=1e-5)


def test_loss_equals_the_reference_formula_recomputed_in_plain_pytorch():
    model = tiny().eval()  # no dropout, LayerDrop or Gumbel noise: the only draw is the distractors'
    batch = make_batch(model)
    torch.manual_seed(3)
    out = model(batch)

    # The reference's step with fairseq's boolean indexing, from the model's own submodules.
    cfg, enc = model.cfg, model.encoder
    source, mask = batch["source"], batch["mask"]
    with torch.no_grad():
        feats = enc.local_encoder.features(source)
        penalty = feats.float().pow(2).mean()
        normed = enc.local_encoder.project_norm(feats)
        x = enc.local_encoder.project(normed)
        x[mask] = enc.mask_emb
        x = x + enc.pos_conv(x)
        x = enc.norm(x)
        for block in enc.blocks:
            x, _ = block(x)
        num_masked = int(mask[0].sum())
        y = normed[mask].view(2, num_masked, -1)
        logits_q = model.quantizer.weight_proj(y).view(2 * num_masked, cfg.latent_groups, cfg.latent_vars)
        codes = logits_q.argmax(dim=-1)  # [B*M, G]
        quantised = torch.cat([model.quantizer.codebook[g, codes[:, g]] for g in range(cfg.latent_groups)], dim=-1)
        targets = model.project_q(quantised).view(2, num_masked, -1)
        pred = model.final_proj(x[mask].view(2, num_masked, -1))
        torch.manual_seed(3)
        negatives = sample_negatives(2, num_masked, cfg.num_negatives, torch.device("cpu"))
        logits = reference_logits(pred, targets, negatives, cfg.logit_temp).flatten(0, 1)
        contrastive = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long), reduction="sum")
        avg_probs = logits_q.softmax(dim=-1).mean(dim=0)  # [G, V]
        prob_perplexity = torch.exp(-(avg_probs * torch.log(avg_probs + 1e-7)).sum(dim=-1)).sum()
        total = cfg.latent_groups * cfg.latent_vars
        diversity = (total - prob_perplexity) / total
        sample_size = 2 * num_masked
        # fairseq: sum of CE + weight * extra loss * sample_size, then divided by sample_size.
        expected = (contrastive + sample_size * (0.1 * diversity + 10 * penalty)) / sample_size

    assert out["sample_size"] == sample_size
    assert_close(out["loss"], expected, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(out["loss_contrastive"], contrastive / sample_size, atol=1e-5, rtol=1e-5)
    assert_close(out["prob_perplexity"], prob_perplexity, atol=1e-4, rtol=1e-5)
    assert_close(out["loss_features"], penalty, atol=1e-7, rtol=1e-5)


def test_feature_grad_mult_scales_only_the_cnn_gradient():
    grads = {}
    for mult in (0.1, 1.0):
        torch.manual_seed(0)
        model = tiny(feature_grad_mult=mult).eval()
        batch = make_batch(model)
        torch.manual_seed(1)
        model(batch)["loss"].backward()
        grads[mult] = {name: p.grad.clone() for name, p in model.named_parameters()}
    cnn = [name for name in grads[1.0] if name.startswith("encoder.local_encoder.conv_layers.")]
    assert len(cnn) == 9  # 7 convolutions + the first layer's GroupNorm weight and bias
    for name, grad in grads[1.0].items():
        scale = 0.1 if name in cnn else 1.0
        assert_close(grads[0.1][name], scale * grad, atol=1e-7, rtol=1e-4, name=name)
    assert grads[1.0][cnn[0]].abs().sum() > 0


def test_cnn_default_mode_has_group_norm_on_the_first_layer_only():
    layers = tiny().encoder.local_encoder.conv_layers
    assert layers[0].group_norm is not None and layers[0].group_norm.num_groups == 64
    assert all(layer.group_norm is None and layer.layer_norm is None for layer in layers[1:])
    assert all(layer.layer_norm is None for layer in layers)


def test_temperature_anneals_from_2_to_half_and_resumes_from_the_checkpoint():
    model = Wav2Vec2(wav2vec2_config("audio", "tiny", temp_decay=0.999995))
    assert float(model.quantizer.temperature) == 2.0
    for step, expected in ((1, 2 * 0.999995), (100_000, 2 * 0.999995**100_000), (300_000, 0.5)):
        model.after_step(step)
        assert math.isclose(float(model.quantizer.temperature), expected, rel_tol=1e-6)
    assert math.isclose(2 * 0.999995**100_000, 2 * math.exp(-0.5), rel_tol=1e-4)
    model.after_step(1000)
    fresh = Wav2Vec2(wav2vec2_config("audio", "tiny", temp_decay=0.999995))
    fresh.load_state_dict(model.state_dict())
    assert float(fresh.quantizer.temperature) == float(model.quantizer.temperature) < 2.0
    out = model.train()(make_batch(model))
    assert math.isclose(float(out["temperature"]), model.quantizer.temperature_at(1000), rel_tol=1e-6)


def test_tiny_loss_falls_on_a_fixed_batch():
    model = tiny()
    batch = make_batch(model, batch_size=2, samples=16_000)
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=2e-3)
    losses = []
    for step in range(1, 13):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        model.after_step(step)
        losses.append(float(out["loss_contrastive"]))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_every_parameter_gets_a_gradient_without_layerdrop():
    model = tiny(layerdrop=0.0)
    model(make_batch(model))["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert model.skips_parameters is False and tiny().skips_parameters is True


def test_masks_are_wav2vec_spans_one_per_utterance():
    model = tiny()
    source = torch.zeros(3, 32_000)  # 99 frames
    mask = model.modality.make_masks(3, source, torch.Generator().manual_seed(0))
    assert mask.shape == (3, 99) and model.modality.clones == 1
    counts = mask.sum(dim=1)
    assert (counts == counts[0]).all() and 20 <= int(counts[0]) <= 70  # p 0.65, spans of 10: ~49 %


def test_bad_batches_and_configs_are_one_line_errors():
    model = tiny()
    batch = make_batch(model)
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be bool \[B, N\]"):
        model({**batch, "mask": batch["mask"].repeat(2, 1)})
    few = torch.zeros_like(batch["mask"])
    few[:, :1] = True
    with pytest.raises(ValueError, match="at least 2 masked frames"):
        model({"source": batch["source"], "mask": few})
    with pytest.raises(ValueError, match="Wav2Vec2Config.modality must be 'audio'"):
        Wav2Vec2Config(modality="image")
    for overrides, field in (({"latent_dim": 33}, "latent_dim"),
                             ({"conv_pos_groups": 5}, "conv_pos_groups"), ({"mask_prob": 0.0}, "mask_prob"),
                             ({"min_temp": 3.0}, "min_temp"),
                             ({"conv_feature_layers": [[64, 10]]}, "conv_feature_layers")):  # fmt: skip
        with pytest.raises(ValueError, match=f"Wav2Vec2Config.{field} "):
            wav2vec2_config("audio", "tiny", **overrides)
    with pytest.raises(ValueError, match="no wav2vec 2.0 preset for audio large"):
        wav2vec2_config("audio", "large")


def test_base_preset_is_the_released_model():
    cfg = method_config("wav2vec2", "audio", "base")
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.mlp_ratio) == (768, 12, 12, 4.0)
    assert (cfg.latent_groups, cfg.latent_vars, cfg.latent_dim, cfg.final_dim) == (2, 320, 256, 256)
    assert (cfg.max_temp, cfg.min_temp, cfg.temp_decay) == (2.0, 0.5, 0.999995)
    assert (cfg.num_negatives, cfg.logit_temp) == (100, 0.1)
    assert (cfg.feature_grad_mult, cfg.feature_penalty, cfg.diversity_weight) == (0.1, 10.0, 0.1)
    assert (cfg.mask_prob, cfg.mask_length, cfg.layerdrop) == (0.65, 10, 0.05)
    assert (cfg.dropout_input, cfg.dropout_features) == (0.1, 0.1)
    assert cfg.extractor_mode == "default" and (cfg.conv_pos_kernel, cfg.conv_pos_groups) == (128, 16)


def test_base_model_has_the_published_parameter_count():
    with torch.device("meta"):  # shapes only: instant, no memory
        model = build_method("wav2vec2", method_config("wav2vec2", "audio", "base"))
    cnn = 512 * 10 + 2 * 512 + 4 * 512 * 512 * 3 + 2 * 512 * 512 * 2  # convs without bias, one GroupNorm
    block = 4 * 768 * 768 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    encoder = (cnn + 2 * 512 + 512 * 768 + 768 + 768  # project_norm, project, mask_emb
               + 768 * 48 * 128 + 128 + 768 + 2 * 768 + 12 * block)  # pos conv (v, g, bias), norm, blocks  # fmt: skip
    heads = 512 * 640 + 640 + 640 * 128 + 256 * 256 + 256 + 768 * 256 + 256  # quantiser, project_q, final_proj
    assert count_parameters(model.encoder) == encoder
    assert count_parameters(model) == encoder + heads == 95_044_608  # wav2vec 2.0 base: 95.0 M


def test_base_model_runs_one_training_step_on_cpu():
    model = build_method("wav2vec2", method_config("wav2vec2", "audio", "base", layerdrop=0.0))
    batch = make_batch(model, batch_size=1, samples=32_000)  # 2 s of audio, 99 frames
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["sample_size"] == int(batch["mask"].sum())
    assert all(p.grad is not None for p in model.parameters())
    assert 0 < float(out["code_perplexity"]) <= 640 and float(out["temperature"]) == 2.0


def test_padded_frames_change_nothing_after_the_cnn():
    encoder = tiny().encoder.eval()
    x = torch.randn(1, 30, 64)
    padded = torch.cat([x, 100 * torch.randn(1, 9, 64)], dim=1)  # garbage in 9 padded frames
    padding = torch.arange(39)[None] >= 30
    # Zeroed before the positional conv (as its own zero padding) and masked as keys in attention.
    assert_close(encoder.contextualize(padded, padding)[:, :30], encoder.contextualize(x), atol=1e-5, rtol=1e-5)
    features = encoder(torch.randn(2, 16_000), torch.arange(16_000)[None].repeat(2, 1) >= 12_000)
    assert features.shape == (2, 49, 64) and torch.isfinite(features).all()
