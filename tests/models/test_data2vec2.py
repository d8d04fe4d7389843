"""data2vec 2.0: student on kept tokens, EMA teacher, targets, loss, kernels vs PyTorch, training, sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from d2v2.models.data2vec2 import DATA2VEC2_PRESETS, Data2Vec2, Data2Vec2Config, data2vec2_config
from d2v2.models.layers.masking import mask_to_ids
from d2v2.models.modalities import modality_for
from d2v2.models.sizes import count_parameters
from d2v2.models.layers.teacher import ema_decay_schedule
from tests.helpers import assert_close
from tests.models.fixtures import student_parameters, train_losses
from tests.models.fixtures import tiny_config as fixture_config

MODALITIES = ("image", "audio", "text")
NO_DROPOUT = dict(encoder_dropout=0.0, attention_dropout=0.0, post_mlp_dropout=0.0, prenet_dropout=0.0,
                  layerdrop=0.0, prenet_layerdrop=0.0, decoder_input_dropout=0.0, embed_dropout=0.0)  # fmt: skip
AUDIO_SAMPLES = 6400  # 19 frames with the tiny CNN (wav2vec 2.0 strides)
TEXT_TOKENS = 24


def tiny_config(modality, **overrides):
    return fixture_config("data2vec2", modality, **overrides)


def make_source(cfg, batch_size=2):
    if cfg.modality == "image":
        return torch.randn(batch_size, 3, cfg.image_size, cfg.image_size)
    if cfg.modality == "audio":
        return torch.randn(batch_size, AUDIO_SAMPLES)
    return torch.randint(2, cfg.vocab_size, (batch_size, TEXT_TOKENS))


def make_batch(model, batch_size=2, generator=None):
    source = make_source(model.cfg, batch_size)
    return {"source": source, "mask": model.modality.make_masks(batch_size, source, generator=generator)}


# -- the student -----------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_student_tokens_are_the_kept_tokens_at_their_positions(modality):
    model = Data2Vec2(tiny_config(modality, prenet_depth=0, **NO_DROPOUT)).eval()
    batch = make_batch(model)
    clones = model.cfg.clone_batch
    feats, _ = model.encoder.local_features(batch["source"])
    mask = batch["mask"]
    ids = mask_to_ids(mask)
    rows, kept = ids.shape
    sample = torch.arange(rows)[:, None] // clones
    x, context = model.encoder.contextualize(feats, None, mask, ids, clones)

    if modality == "image":  # sin-cos position of the original patch, CLS first without position
        tokens = feats[sample, ids] + model.encoder.embed.pos_embed[ids]
        tokens = torch.cat([model.encoder.embed.cls_token.expand(rows, 1, -1), tokens], dim=1)
    elif modality == "audio":  # conv positions over the clone's full sequence with masked frames zeroed
        zeroed = feats.repeat_interleave(clones, dim=0).masked_fill(mask[..., None], 0.0)
        pos = model.encoder.embed.pos_conv(zeroed)
        tokens = feats[sample, ids] + pos[torch.arange(rows)[:, None], ids]
        assert torch.equal(context["positions"], ids)  # ALiBi measures original distances
        assert context["alibi_slopes"] is not None
    else:
        tokens = feats[sample, ids]
    assert x.shape == (rows, model.cfg.num_extra_tokens + kept, model.cfg.embed_dim)
    assert_close(x, model.encoder.context_norm(tokens), atol=1e-5, rtol=1e-5, name="student tokens")


@pytest.mark.parametrize("modality", ("image", "text"))
def test_student_output_ignores_tokens_masked_in_every_clone(modality):
    # What the student cannot see cannot change its prediction (decoder noise off); the teacher does see it.
    model = Data2Vec2(tiny_config(modality, mask_ratio=0.8, mask_noise_std=0.0, **NO_DROPOUT)).eval()
    batch = make_batch(model, batch_size=1, generator=torch.Generator().manual_seed(0))
    hidden = batch["mask"].all(dim=0)  # positions no clone of the sample keeps
    assert hidden.any()
    changed = dict(batch, source=batch["source"].clone())
    if modality == "image":
        side, patch = model.cfg.grid[1], model.cfg.patch_size
        for index in hidden.nonzero().flatten().tolist():
            r, c = divmod(index, side)
            changed["source"][:, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] += 3.0
    else:
        changed["source"][:, hidden] = (changed["source"][:, hidden] + 7) % model.cfg.vocab_size

    predictions = []
    model.decoder.register_forward_hook(lambda module, args, output: predictions.append(output))
    first, second = model(batch), model(changed)
    assert torch.equal(predictions[0], predictions[1])
    assert not torch.equal(first["target_var"], second["target_var"])


# -- the teacher -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "modality, owned",
    [
        ("image", {"local_encoder", "pos_embed", "cls_token", "context_norm", "prenet", "blocks"}),
        ("audio", {"pos_conv", "alibi_scale", "context_norm", "prenet", "blocks"}),
        ("text", {"blocks"}),
    ],
)
def test_teacher_owns_what_the_reference_copies(modality, owned):
    model = Data2Vec2(tiny_config(modality))
    assert {name.removeprefix("embed.").split(".")[0] for name, _ in model.teacher.named_parameters()} == owned
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert not model.teacher.training and model.encoder.training


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_student_parameter_gets_a_gradient_and_the_teacher_none(modality):
    model = Data2Vec2(tiny_config(modality, layerdrop=0.0, prenet_layerdrop=0.0)).train()
    teacher_before = {n: p.clone() for n, p in model.teacher.state_dict().items()}
    out = model(make_batch(model))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in student_parameters(model).items() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(p.grad is None for p in model.teacher.parameters())
    for name, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name  # forward/backward never touch the teacher



@pytest.mark.parametrize("modality", MODALITIES)
def test_local_grad_mult_scales_the_local_encoders_gradient_and_zero_stops_it(modality):
    grads = {}
    for mult in (1.0, 0.5, 0.0):
        torch.manual_seed(0)
        model = Data2Vec2(tiny_config(modality, local_grad_mult=mult)).train()
        torch.manual_seed(1)
        batch = make_batch(model)
        torch.manual_seed(2)  # the same dropout masks in every run
        model(batch)["loss"].backward()
        grads[mult] = {n: p.grad for n, p in model.encoder.embed.local_encoder.named_parameters()}
    projection = {n for n in grads[1.0] if n.startswith(("project.", "project_norm."))}  # audio: after the CNN
    for name, grad in grads[1.0].items():
        if name in projection:  # learns at any local_grad_mult, as the reference's project_features
            assert_close(grads[0.5][name], grad, atol=1e-6, rtol=1e-5)
            assert grads[0.0][name] is not None
        else:
            assert_close(grads[0.5][name], 0.5 * grad, atol=1e-6, rtol=1e-5)
            assert grads[0.0][name] is None, name

def test_after_step_is_exactly_the_ema_rule():
    model = Data2Vec2(tiny_config("image", ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10))
    with torch.no_grad():  # make student and teacher differ everywhere, the fixed positions included
        for p in student_parameters(model).values():
            p.add_(torch.randn_like(p))
    teacher = {n: p.clone() for n, p in model.teacher.named_parameters()}
    student = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}

    model.after_step(4)
    decay = ema_decay_schedule(4, 0.9, 0.99, 10)
    assert decay == pytest.approx(0.936) and model.ema_decay(4) == decay
    for name, p in model.teacher.named_parameters():
        if name == "embed.pos_embed":  # not trained: copied
            expected = student[name]
        else:
            expected = decay * teacher[name] + (1 - decay) * student[name]
        assert_close(p, expected, atol=1e-6, rtol=1e-6, name=name)

    snapshot = {n: p.clone() for n, p in model.teacher.named_parameters()}
    model.after_step(4)  # the same update again: ignored
    assert all(torch.equal(p, snapshot[n]) for n, p in model.teacher.named_parameters())
    assert model(make_batch(model))["ema_decay"] == decay


def test_ema_frozen_at_decay_one():
    model = Data2Vec2(tiny_config("audio", ema_decay=0.99, ema_end_decay=1.0, ema_anneal_end_step=5))
    with torch.no_grad():
        for p in student_parameters(model).values():
            p.add_(1.0)
    model.after_step(4)
    moved = {n: p.clone() for n, p in model.teacher.named_parameters()}
    model.after_step(5)  # decay reached 1.0: no update at all
    model.after_step(6)
    assert all(torch.equal(p, moved[n]) for n, p in model.teacher.named_parameters())


def test_ema_decay_schedule_is_linear_then_constant():
    assert ema_decay_schedule(0, 0.999, 0.9999, 1000) == 0.999
    assert ema_decay_schedule(500, 0.999, 0.9999, 1000) == pytest.approx(0.99945)
    assert ema_decay_schedule(1000, 0.999, 0.9999, 1000) == 0.9999
    assert ema_decay_schedule(10**6, 0.999, 0.9999, 1000) == 0.9999
    assert ema_decay_schedule(0, 0.999, 0.9999, 0) == 0.9999


def test_state_dict_holds_student_and_teacher():
    model = Data2Vec2(tiny_config("text"))
    with torch.no_grad():
        for p in student_parameters(model).values():
            p.add_(1.0)
    model.after_step(7)
    restored = Data2Vec2(tiny_config("text"))
    restored.load_state_dict(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert any(name.startswith("teacher.") for name in model.state_dict())


def test_init_follows_the_reference_scheme():
    for modality in MODALITIES:
        model = Data2Vec2(tiny_config(modality, embed_dim=256, num_heads=4, decoder_dim=256))
        qkv = model.encoder.blocks[0].attn.qkv
        assert abs(qkv.weight.std().item() - 0.02) < 2e-3 and torch.count_nonzero(qkv.bias) == 0
        head = model.decoder.proj[0] if modality == "text" else model.decoder.proj
        if modality == "text":  # the text decoder head keeps the BERT init
            assert abs(head.weight.std().item() - 0.02) < 2e-3
        else:  # image and audio decoder heads are reset to PyTorch's default: U(+-1/sqrt(fan_in))
            assert head.weight.std().item() > 0.03 and head.weight.abs().max() <= 1 / head.in_features**0.5
    image = Data2Vec2(tiny_config("image", embed_dim=256, num_heads=4, decoder_dim=256))
    assert abs(image.encoder.embed.cls_token.std().item() - 1.0) < 0.25  # N(0, 1)
    audio = Data2Vec2(tiny_config("audio", embed_dim=256, num_heads=4, decoder_dim=256))
    assert audio.encoder.embed.local_encoder.project.weight.std().item() > 0.03  # reset, as the reference
    assert torch.equal(audio.encoder.embed.alibi_scale, torch.ones(4))


# -- targets and loss ------------------------------------------------------------------------------


def plain_norm(x, kind):
    """Parameter-free norms in plain PyTorch: "instance" over positions, "layer" over channels."""
    if kind == "instance":
        return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:])
    return x


@pytest.mark.parametrize(
    "modality, per_layer, final",
    [
        ("image", "instance", "layer"),  # images
        ("image", "layer", "instance"),  # text large's order
        ("image", None, None),
        ("audio", "instance", None),  # audio, text base
        ("text", "instance", None),
    ],
)
def test_targets_equal_plain_pytorch_recomputation(modality, per_layer, final):
    model = Data2Vec2(tiny_config(modality, target_layer_norm=per_layer, target_final_norm=final)).eval()
    batch = make_batch(model)
    feats, _ = model.encoder.local_features(batch["source"])
    target = model.teacher_targets(batch["source"], feats)

    # The teacher's blocks, run by hand; the targets are their FFN outputs (CLS dropped).
    teacher = model.teacher
    if modality == "image":
        x = teacher.embed.local_encoder(batch["source"]) + teacher.embed.pos_embed
        x = torch.cat([teacher.embed.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        x = teacher.context_norm(x)
    elif modality == "audio":
        x = teacher.context_norm(feats + teacher.embed.pos_conv(feats))  # the student's CNN features
    else:
        x = feats  # the student's embedding output, no prenet
    slopes = teacher.alibi()
    for block in teacher.prenet or []:
        x, _ = block(x, None, slopes)
    ffn_outs = []
    for block in teacher.blocks:
        x, t = block(x, None, slopes)
        ffn_outs.append(t[:, model.cfg.num_extra_tokens :])
    top = ffn_outs[-model.cfg.average_top_k_layers :]
    expected = plain_norm(sum(plain_norm(t, per_layer) for t in top) / len(top), final)
    assert target.dtype == torch.float32
    assert_close(target, expected, atol=1e-5, rtol=1e-4, name="targets")


@pytest.mark.parametrize("modality, beta", [("image", 0.0), ("text", 4.0)])
def test_loss_and_logged_values_equal_the_reference_formula(modality, beta):
    model = Data2Vec2(tiny_config(modality, loss_beta=beta, **NO_DROPOUT)).train()
    batch = make_batch(model)
    captured = {}
    model.decoder.register_forward_hook(lambda m, args, output: captured.update(pred=output))
    model.encoder.blocks[-1].register_forward_hook(lambda m, args, output: captured.update(x=output[0]))
    targets = []
    original = model.teacher_targets
    model.teacher_targets = lambda *args: targets.append(original(*args)) or targets[-1]
    out = model(batch)

    clones, mask, dim = model.cfg.clone_batch, batch["mask"], model.cfg.embed_dim
    scale = 1.0 if model.cfg.loss_scale == 1.0 else 1 / math.sqrt(dim)
    repeated = targets[0].repeat_interleave(clones, dim=0)  # the reference repeats; we index
    pred, y = captured["pred"][mask].float(), repeated[mask]
    per_element = (pred - y).square() if beta == 0 else F.smooth_l1_loss(pred, y, reduction="none", beta=beta)
    expected = per_element.sum() * scale / mask.sum()
    if modality == "image":  # 0.01 x CLS error, summed over the B*K rows
        cls_target = targets[0].mean(dim=1).repeat_interleave(clones, dim=0)
        cls_loss = 0.01 * (captured["x"][:, 0] - cls_target).square().sum() * scale
        assert_close(out["loss_cls"], cls_loss, atol=1e-6, rtol=1e-5, name="cls loss")
        expected = expected + cls_loss
    assert_close(out["loss"], expected, atol=1e-6, rtol=1e-5, name="loss")

    def compute_var(z):  # the reference's compute_var on masked tokens
        return torch.sqrt(z.var(dim=0) + 1e-6).mean()

    assert_close(out["target_var"], compute_var(y), atol=1e-6, rtol=1e-5, name="target_var")
    assert_close(out["pred_var"], compute_var(pred), atol=1e-6, rtol=1e-5, name="pred_var")
    assert out["sample_size"] == int(mask.sum())


def test_ids_keep_from_the_batch_is_used_and_bad_masks_are_rejected():
    model = Data2Vec2(tiny_config("text", mask_noise_std=0.0, **NO_DROPOUT)).eval()
    batch = make_batch(model)
    with_ids = dict(batch, ids_keep=mask_to_ids(batch["mask"]).int())
    assert torch.equal(model(batch)["loss"], model(with_ids)["loss"])
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be bool \[B\*K, N\]"):
        model(dict(batch, mask=batch["mask"][:-1]))
    with pytest.raises(ValueError, match=r"batch\['mask'\]"):
        model(dict(batch, mask=batch["mask"].float()))
    with pytest.raises(ValueError, match=r"batch\['ids_keep'\]"):
        model(dict(batch, ids_keep=mask_to_ids(batch["mask"])[:1]))
    with pytest.raises(ValueError, match="mask rows must all keep the same number"):
        uneven = batch["mask"].clone()
        uneven[0, (~uneven[0]).nonzero()[0]] = True
        model(dict(batch, mask=uneven))


def test_audio_padding_reaches_attention_as_frame_padding():
    model = Data2Vec2(tiny_config("audio", **NO_DROPOUT)).eval()
    batch = make_batch(model)
    padding = torch.zeros(2, AUDIO_SAMPLES, dtype=torch.bool)
    padding[1, AUDIO_SAMPLES // 2 :] = True
    feats, frames = model.encoder.local_features(batch["source"], padding)
    assert frames.shape == (2, feats.shape[1]) and frames[1].any() and not frames[0].any()
    out = model(dict(batch, padding_mask=padding))
    assert torch.isfinite(out["loss"])
    # Each clone's attention mask is the frame padding at its kept frames.
    ids = mask_to_ids(batch["mask"])
    _, context = model.encoder.contextualize(feats, frames, batch["mask"], ids, model.cfg.clone_batch)
    assert torch.equal(context["key_padding_mask"], frames.repeat_interleave(model.cfg.clone_batch, 0).gather(1, ids))


@pytest.mark.parametrize("modality", MODALITIES)
def test_bf16_autocast_step_matches_fp32(modality):
    # Mixed precision end to end (CPU autocast here, CUDA in training): the decoder's fused conv blocks
    # get the autocast dtype, targets and loss stay fp32, and the loss is the fp32 loss to bf16 accuracy.
    model = Data2Vec2(tiny_config(modality, mask_noise_std=0.0, **NO_DROPOUT)).train()
    batch = make_batch(model)
    reference = model(batch)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32
    assert_close(out["loss"], reference, atol=0, rtol=3e-2, name="bf16 loss")


# -- the Triton path -------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ("image", "audio"))
def test_triton_path_matches_torch_path_on_a_micro_model(modality):
    # Every kernel of the step (gather, attention with ALiBi for audio, scatter, conv blocks, targets,
    # loss, EMA) interpreted on CPU against the PyTorch path. Decoder noise off: the two paths draw it
    # from different streams by design.
    values = dict(NO_DROPOUT, embed_dim=32, num_heads=2, prenet_depth=0, depth=1, average_top_k_layers=1,
                  clone_batch=2, decoder_dim=32, decoder_layers=1, decoder_groups=2, mask_noise_std=0.0)  # fmt: skip
    if modality == "image":
        values.update(image_size=16, patch_size=4)
    else:
        values.update(conv_feature_layers=((8, 10, 5), (8, 3, 2), (8, 3, 2)), conv_pos_width=9, conv_pos_depth=3,
                      conv_pos_groups=2)  # fmt: skip
    torch_model = Data2Vec2(tiny_config(modality, **values)).train()
    triton_model = Data2Vec2(tiny_config(modality, **dict(values, impl="triton"))).train()
    triton_model.load_state_dict(torch_model.state_dict())
    batch_size = 2
    if modality == "image":
        batch = make_batch(torch_model, batch_size)
    else:
        source = torch.randn(batch_size, 400)
        batch = {"source": source, "mask": torch_model.modality.make_masks(batch_size, source)}

    outs = []
    for model in (torch_model, triton_model):
        out = model(batch)
        out["loss"].backward()
        with torch.no_grad():
            for p in student_parameters(model).values():
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
        model.after_step(1)
        outs.append(out)
    assert_close(outs[1]["loss"], outs[0]["loss"], atol=1e-5, rtol=1e-4, name="loss")
    triton_params = student_parameters(triton_model)
    for name, p in student_parameters(torch_model).items():
        if p.grad is not None:
            assert_close(triton_params[name].grad, p.grad, atol=1e-5, rtol=1e-3, name=f"grad {name}")
    triton_teacher = dict(triton_model.teacher.named_parameters())
    for name, p in torch_model.teacher.named_parameters():
        assert_close(triton_teacher[name], p, atol=1e-6, rtol=1e-5, name=f"teacher {name}")


# -- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_loss_goes_down_on_a_fixed_batch(modality):
    model = Data2Vec2(tiny_config(modality, **NO_DROPOUT)).train()
    batch = make_batch(model, generator=torch.Generator().manual_seed(0))
    losses = train_losses(model, batch, steps=20, lr=2e-3, weight_decay=0.01)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.75 * first, losses


# -- sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "modality, size, trainable, fixed",
    [
        # timm vit_base_patch16_224: 86,567,656 = 85,798,656 backbone + 769,000 head. Ours has no head,
        # a prenet LayerNorm instead of the final norm (same size) and no CLS row in the fixed
        # sin-cos table: 85,798,656 - 197 * 768 = 85,647,360 trainable + 196 * 768 fixed.
        ("image", "base", 85_647_360, 196 * 768),
        # timm vit_large_patch16_224: 304,326,632 - 1,025,000 head - 197 * 1024 pos.
        ("image", "large", 303_099_904, 196 * 1024),
        # timm vit_huge_patch14_224: 632,045,800 - 1,281,000 head - 257 * 1280 pos.
        ("image", "huge", 630_435_840, 256 * 1280),
        # wav2vec 2.0 CNN + projection 4,601,600; 5 grouped convs k19 5 x 701,184; prenet LN 1,536;
        # ALiBi scales 12; 12 blocks x 7,087,872 (data2vec-audio-base: ~93.2 M).
        ("audio", "base", 93_163_532, 0),
        ("audio", "large", 313_275_408, 0),
        # HF roberta-base 124,645,632 - pooler 590,592 - token types 768 - 2 fairseq position rows;
        # roberta-large 355,359,744 - 1,049,600 - 1,024 - 2,048.
        ("text", "base", 124_052_736, 0),
        ("text", "large", 354_307_072, 0),
    ],
)
def test_encoder_parameter_counts_match_the_released_models(modality, size, trainable, fixed):
    with torch.device("meta"):  # shapes only: instant, no memory
        model = Data2Vec2(data2vec2_config(modality, size))
    assert count_parameters(model.encoder, trainable=True) == trainable
    assert count_parameters(model.encoder, trainable=False) == fixed


@pytest.mark.parametrize("modality", MODALITIES)
def test_base_model_runs_one_training_step_on_cpu(modality):
    # The released base architecture at the released input sizes (224 x 224 images, 2 s of audio,
    # 512 tokens) and the smallest batch: 1 sample, 2 clones (a few seconds each on a CPU).
    overrides = dict(clone_batch=2, layerdrop=0.0, prenet_layerdrop=0.0, impl="torch")  # every block runs
    model = Data2Vec2(data2vec2_config(modality, "base", **overrides)).train()
    if modality == "image":
        source = torch.randn(1, 3, 224, 224)
    elif modality == "audio":
        source = torch.randn(1, 32_000)
    else:
        source = torch.randint(5, 50265, (1, 512))
    out = model({"source": source, "mask": model.modality.make_masks(1, source)})
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for n, p in student_parameters(model).items() if "blocks" in n or "decoder" in n)


# -- masks, config, helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "modality, size, length, kept",
    [("image", "base", None, 39), ("image", "large", None, 49), ("image", "huge", None, 64),
     ("audio", "base", 999, 500), ("text", "base", 512, 266), ("text", "large", 512, 256)],
)  # fmt: skip
def test_recipe_masks_keep_the_reference_counts(modality, size, length, kept):
    cfg = data2vec2_config(modality, size)
    sources = {"image": torch.zeros(2, 3, 1, 1), "audio": torch.zeros(2, 320_000),  # 999 frames
               "text": torch.zeros(2, length or 0, dtype=torch.long)}  # fmt: skip
    modality_obj = modality_for(cfg)
    mask = modality_obj.make_masks(2, sources[modality], generator=torch.Generator().manual_seed(0))
    num_tokens = length or cfg.grid[0] * cfg.grid[1]
    assert mask.shape == (2 * cfg.clone_batch, num_tokens) and mask.dtype == torch.bool
    assert ((~mask).sum(dim=1) == kept).all()


def test_modality_positions_and_masking_errors():
    audio = Data2Vec2(tiny_config("audio"))
    assert audio.modality.num_frames(16000) == 49 and audio.modality.num_frames(AUDIO_SAMPLES) == 19
    assert audio.modality.num_positions(torch.zeros(2, AUDIO_SAMPLES)) == 19
    feats = torch.randn(1, 19, audio.cfg.embed_dim)
    with pytest.raises(ValueError, match="mask is required with ids_keep"):
        audio.encoder.contextualize(feats, ids_keep=torch.arange(5)[None])
    image = Data2Vec2(tiny_config("image"))
    assert image.modality.num_positions(torch.zeros(2, 3, 32, 32)) == image.cfg.grid[0] * image.cfg.grid[1]
    bad = make_batch(image)
    bad["ids_keep"] = mask_to_ids(bad["mask"]) + 1000
    with pytest.raises(ValueError, match="ids_keep.*values must lie in"):
        image(bad)


# The released YAMLs as reference/data2vec2.md section 1.11 tabulates them, field by field.
_IMAGE_COMMON = dict(norm_eps=1e-6, encoder_dropout=0.0, layerdrop=0.0, prenet_dropout=0.0, clone_batch=16,
                     mask_length=3, target_layer_norm="instance", target_final_norm="layer", loss_scale=None,
                     cls_loss=0.01, decoder_groups=16, decoder_residual=True, projection_layers=1,
                     decoder_input_dropout=0.0, ema_decay=0.9998)  # fmt: skip
_AUDIO_COMMON = dict(norm_eps=1e-5, encoder_dropout=0.1, attention_dropout=0.1, post_mlp_dropout=0.1,
                     activation_dropout=0.0, prenet_dropout=0.1, mask_length=5, target_layer_norm="instance",
                     target_final_norm=None, loss_scale=None, cls_loss=0.0, decoder_kernel=7, decoder_layers=4,
                     decoder_groups=16, decoder_residual=True, projection_layers=1,
                     decoder_input_dropout=0.1)  # fmt: skip
_TEXT_COMMON = dict(norm_eps=1e-5, encoder_dropout=0.1, attention_dropout=0.1, post_mlp_dropout=0.1,
                    activation_dropout=0.0, layerdrop=0.0, clone_batch=8, loss_scale=1.0, cls_loss=0.0,
                    decoder_dim=768, decoder_kernel=9, decoder_layers=5, decoder_groups=1, decoder_residual=False,
                    projection_layers=2, projection_ratio=2.0, decoder_input_dropout=0.1, ema_decay=0.9999,
                    ema_end_decay=0.99999, ema_anneal_end_step=100_000)  # fmt: skip
REFERENCE_RECIPES = {
    ("image", "base"): dict(_IMAGE_COMMON, patch_size=16, mask_ratio=0.8, mask_prob_adjust=0.07,
                            average_top_k_layers=10, decoder_dim=768, decoder_kernel=3, decoder_layers=6,
                            ema_end_decay=0.99999, ema_anneal_end_step=100_000),
    ("image", "large"): dict(_IMAGE_COMMON, patch_size=16, mask_ratio=0.75, mask_prob_adjust=0.1,
                             average_top_k_layers=18, decoder_dim=1024, decoder_kernel=5, decoder_layers=3,
                             ema_end_decay=0.99999, ema_anneal_end_step=150_000),
    ("image", "huge"): dict(_IMAGE_COMMON, patch_size=14, mask_ratio=0.75, mask_prob_adjust=0.1,
                            average_top_k_layers=24, decoder_dim=1024, decoder_kernel=5, decoder_layers=3,
                            ema_end_decay=1.0, ema_anneal_end_step=300_000),
    ("audio", "base"): dict(_AUDIO_COMMON, layerdrop=0.05, prenet_layerdrop=0.05, clone_batch=8, mask_ratio=0.5,
                            mask_prob_adjust=0.05, average_top_k_layers=8, decoder_dim=384, ema_decay=0.999,
                            ema_end_decay=0.99999, ema_anneal_end_step=75_000, min_target_var=0.1,
                            min_pred_var=0.01),
    ("audio", "large"): dict(_AUDIO_COMMON, layerdrop=0.0, prenet_layerdrop=0.0, clone_batch=12, mask_ratio=0.55,
                             mask_prob_adjust=0.1, average_top_k_layers=16, decoder_dim=768, ema_decay=0.9997,
                             ema_end_decay=1.0, ema_anneal_end_step=300_000),
    ("text", "base"): dict(_TEXT_COMMON, mask_ratio=0.48, average_top_k_layers=12, target_layer_norm="instance",
                           target_final_norm=None),
    ("text", "large"): dict(_TEXT_COMMON, mask_ratio=0.5, average_top_k_layers=24, target_layer_norm="layer",
                            target_final_norm="instance"),
}  # fmt: skip


@pytest.mark.parametrize("modality, size", list(REFERENCE_RECIPES))
def test_recipes_carry_the_reference_values(modality, size):
    cfg = data2vec2_config(modality, size)
    expected = REFERENCE_RECIPES[(modality, size)]
    got = {name: getattr(cfg, name) for name in expected}
    assert got == expected


def test_every_recipe_builds_a_valid_config():
    for modality, size in DATA2VEC2_PRESETS:
        cfg = data2vec2_config(modality, size)
        assert cfg.modality == modality


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(modality="video"), "modality"),
        (dict(embed_dim=100, num_heads=12), "embed_dim"),
        (dict(average_top_k_layers=20), "average_top_k_layers"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(encoder_dropout=1.5), "encoder_dropout"),
        (dict(ema_end_decay=1.1), "ema_end_decay"),
        (dict(decoder_kernel=4), "decoder_kernel"),
        (dict(decoder_groups=7), "decoder_groups"),
        (dict(target_final_norm="batch"), "target_final_norm"),
        (dict(impl="cuda"), "impl"),
        (dict(image_size=100), "image_size"),
        (dict(projection_layers=2), "projection_layers"),
        (dict(loss_scale=0.0), "loss_scale"),
        (dict(clone_batch=0), "clone_batch"),
        (dict(depth=True), "depth"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    values = dict(modality="image", embed_dim=64, num_heads=4, depth=2, average_top_k_layers=2, decoder_dim=64)
    values.update(overrides)
    with pytest.raises(ValueError, match=rf"Data2Vec2Config\.{field} "):
        Data2Vec2Config(**values)


@pytest.mark.parametrize(
    "modality, overrides, field",
    [
        ("audio", dict(cls_loss=0.01), "cls_loss"),
        ("audio", dict(conv_pos_width=100), "conv_pos_width"),
        ("audio", dict(conv_pos_groups=5), "conv_pos_groups"),
        ("audio", dict(conv_feature_layers=[[512, 10]]), "conv_feature_layers"),
        ("text", dict(padding_idx=64), "padding_idx"),
    ],
)
def test_config_rejects_bad_modality_values(modality, overrides, field):
    with pytest.raises(ValueError, match=rf"Data2Vec2Config\.{field} "):
        tiny_config(modality, **overrides)


def test_config_accepts_yaml_lists_and_is_strict():
    cfg = tiny_config("audio", conv_feature_layers=[[8, 10, 5], [8, 3, 2]])
    assert cfg.conv_feature_layers == ((8, 10, 5), (8, 3, 2))
    with pytest.raises(TypeError):
        Data2Vec2Config("image")  # keyword-only
    with pytest.raises(AttributeError):
        cfg.not_a_field = 1  # slotted
    with pytest.raises(ValueError, match="unknown Data2Vec2Config fields"):
        data2vec2_config("image", "tiny", embed_dimension=8)
    with pytest.raises(ValueError, match="size for text"):
        data2vec2_config("text", "huge")


def test_weight_decay_groups_follow_the_reference_tags():
    model = Data2Vec2(tiny_config("audio"))
    skip = model.no_weight_decay()
    assert "encoder.embed.alibi_scale" in skip and "encoder.blocks.0.norm1.weight" in skip
    assert "encoder.blocks.0.attn.qkv.bias" in skip and "decoder.blocks.0.bias" in skip
    assert "encoder.blocks.0.attn.qkv.weight" not in skip and "decoder.proj.weight" not in skip
    assert not any(name.startswith("teacher.") for name in skip)
    image = Data2Vec2(tiny_config("image"))
    assert "encoder.embed.cls_token" not in image.no_weight_decay()  # [1, 1, D]: decayed, as the reference
    decay, no_decay = image.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for group in (decay, no_decay) for p in group["params"]]
    trainable = [id(p) for p in student_parameters(image).values() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)


@pytest.mark.parametrize("modality", MODALITIES)
def test_forward_features_is_the_unmasked_student_encoder(modality):
    model = Data2Vec2(tiny_config(modality)).eval()
    batch = make_batch(model)
    features = model.forward_features(batch["source"])
    num_tokens = batch["mask"].shape[1]
    assert features.shape == (2, model.cfg.num_extra_tokens + num_tokens, model.cfg.embed_dim)


def test_variance_collapse_check():
    model = Data2Vec2(tiny_config("audio"))

    def health(m, step, target_var, pred_var):
        return m.health(step, {"target_var": target_var, "pred_var": pred_var})

    assert health(model, 5000, 0.0, 0.0) is None  # not checked during the first 5,000 updates
    assert "target variance" in health(model, 5001, 0.05, 1.0)
    assert "prediction variance" in health(model, 5001, 1.0, 0.001)
    assert health(model, 5001, 1.0, 1.0) is None
    image = Data2Vec2(tiny_config("image"))  # the image recipes disable the check
    assert health(image, 10**6, 0.0, 0.0) is None
