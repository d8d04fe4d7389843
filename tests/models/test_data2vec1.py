"""data2vec 1.0 (``models/data2vec1/``): student input, targets, loss, teacher, EMA, sizes, masks, config."""

import math

import pytest
import torch
import torch.nn.functional as F

from d2v2.models.layers.blocks import PreNormBlock, forward_blocks
from d2v2.models.data2vec1 import Data2Vec1, data2vec1_config
from d2v2.models.data2vec2 import data2vec2_config
from d2v2.models.layers.masking import beit_block_mask, mlm_span_mask
from d2v2.models.sizes import count_parameters
from d2v2.models.layers.teacher import ema_decay_schedule
from tests.helpers import assert_close
from tests.models.fixtures import make_batch, student_parameters, train_losses
from tests.models.fixtures import tiny_config as fixture_config

MODALITIES = ("image", "audio", "text")
NO_DROPOUT = dict(encoder_dropout=0.0, attention_dropout=0.0, post_mlp_dropout=0.0, input_dropout=0.0,
                  embed_dropout=0.0, layerdrop=0.0, drop_path_rate=0.0)  # fmt: skip
def tiny_config(modality, **overrides):
    return fixture_config("data2vec", modality, **overrides)


# -- the student -----------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_student_sees_every_position_with_the_mask_embedding_exactly_at_masked_ones(modality, monkeypatch):
    model = Data2Vec1(tiny_config(modality, **NO_DROPOUT)).eval()
    batch = make_batch(model)
    mask = batch["mask"]
    assert mask.shape[0] == 2 and mask.any() and (~mask).any()  # one mask per sample
    seen = {}
    local_features, contextualize = model.encoder.local_features, model.encoder.contextualize

    def record_local_features(source, padding_mask=None):
        seen["source"] = source
        return local_features(source, padding_mask)

    def record_contextualize(feats, padding_mask=None):
        seen["feats"] = feats
        return contextualize(feats, padding_mask)

    monkeypatch.setattr(model.encoder, "local_features", record_local_features)
    monkeypatch.setattr(model.encoder, "contextualize", record_contextualize)
    handle = model.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("tokens", args[0]))
    model(batch)
    handle.remove()
    extra = model.cfg.num_extra_tokens
    assert seen["tokens"].shape[1] == extra + mask.shape[1]  # every position reaches the blocks
    if modality == "text":
        ids = seen["source"]
        assert (ids[mask] == model.cfg.mask_token).all() and model.cfg.mask_token == model.cfg.vocab_size
        assert torch.equal(ids[~mask], batch["source"][~mask])
        assert model.encoder.embed.local_encoder.embed_tokens.num_embeddings == model.cfg.vocab_size + 1
    else:
        feats = seen["feats"]
        clean, _ = local_features(batch["source"])
        assert_close(feats[mask], model.mask_emb.expand(int(mask.sum()), -1), atol=0, rtol=0, name="masked")
        assert_close(feats[~mask], clean[~mask], atol=0, rtol=0, name="unmasked")


def test_mask_embedding_inits_follow_the_reference():
    audio, image = Data2Vec1(tiny_config("audio")), Data2Vec1(tiny_config("image"))
    assert 0 <= audio.mask_emb.min() and audio.mask_emb.max() < 1 and audio.mask_emb.mean() > 0.3  # U(0, 1)
    assert image.mask_emb.abs().max() < 0.1 and image.encoder.embed.cls_token.abs().max() < 0.1  # trunc-normal 0.02
    assert Data2Vec1(tiny_config("text")).mask_emb is None  # text uses the <mask> token
    assert audio.encoder.embed.alibi_scale is None and audio.encoder.embed.alibi_slopes is None  # conv positions only
    first, last = image.encoder.blocks[0], image.encoder.blocks[-1]  # BEiT's 1/sqrt(2 * layer) rescaling
    assert last.mlp.fc2.weight.std() < first.mlp.fc2.weight.std()
    assert torch.equal(first.gamma_1, torch.full_like(first.gamma_1, 1e-4))


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_student_parameter_gets_a_gradient_and_the_teacher_none(modality):
    model = Data2Vec1(tiny_config(modality, **NO_DROPOUT)).train()
    model(make_batch(model))["loss"].backward()
    missing = [n for n, p in student_parameters(model).items() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    trained = {id(p) for g in model.param_groups(0.01) for p in g["params"]}
    assert not trained & {id(p) for p in model.teacher.parameters()}


@pytest.mark.parametrize(
    "modality, owned, copied",
    [("audio", {"pos_conv", "input_norm", "blocks"}, "pos_conv"),
     ("text", {"local_encoder", "blocks"}, "local_encoder"),
     ("image", {"cls_token", "pos_embed", "blocks", "norm"}, "cls_token")],
)  # fmt: skip
def test_teacher_owns_what_the_reference_tracks(modality, owned, copied):
    model = Data2Vec1(tiny_config(modality))
    names = {n.removeprefix("embed.").split(".")[0] for n, _ in model.teacher.named_parameters()}
    assert names == owned
    assert copied in model.cfg.teacher_copies


# -- targets and loss --------------------------------------------------------------------------------


def plain_teacher_layers(model, source):
    """The teacher's top-k layers recomputed step by step in plain PyTorch (blocks called one by one)."""
    cfg, teacher, student = model.cfg, model.teacher, model.encoder
    if cfg.modality == "audio":  # the student's CNN features + the teacher's conv positions and LayerNorm
        feats = student.embed.local_encoder(source)
        x = F.layer_norm(feats + teacher.embed.pos_conv(feats), (cfg.embed_dim,), teacher.input_norm.weight,
                         teacher.input_norm.bias, cfg.norm_eps)  # fmt: skip
    elif cfg.modality == "text":  # the teacher's own (copied) embeddings of the original tokens
        emb = teacher.embed.local_encoder
        x = emb.embed_tokens(source) + emb.embed_positions.weight[: source.shape[1]]
        x = F.layer_norm(x, (cfg.embed_dim,), emb.layer_norm.weight, emb.layer_norm.bias, cfg.norm_eps)
    else:  # the student's patch embeddings + fixed positions, CLS first
        x = student.embed.local_encoder(source) + teacher.embed.pos_embed
        x = torch.cat([teacher.embed.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    outs = []
    for block in teacher.blocks:
        x, ffn = block(x)
        outs.append(x if cfg.end_of_block_targets else ffn)
    return [o[:, cfg.num_extra_tokens :] for o in outs[-cfg.average_top_k_layers :]]


@pytest.mark.parametrize("modality", MODALITIES)
def test_targets_and_loss_equal_plain_pytorch_recomputation(modality):
    model = Data2Vec1(tiny_config(modality, **NO_DROPOUT)).eval()
    with torch.no_grad():  # make the teacher differ from the student
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(model)
    preds = []
    model.head.register_forward_hook(lambda module, args, out: preds.append(out))
    out = model(batch)
    with torch.no_grad():
        layers = [layer.float() for layer in plain_teacher_layers(model, batch["source"])]
        if modality == "audio":  # instance norm over time per layer, then the average
            target = sum(F.instance_norm(y.transpose(1, 2)).transpose(1, 2) for y in layers) / len(layers)
        elif modality == "text":  # layer norm per layer, then the average
            target = sum(F.layer_norm(y, y.shape[-1:]) for y in layers) / len(layers)
        else:  # average of block outputs, then a final layer norm
            target = F.layer_norm(sum(layers) / len(layers), layers[0].shape[-1:])
    feats = None if model.teacher.embed.local_encoder is not None else model.encoder.local_features(batch["source"])[0]
    assert_close(model.teacher_targets(batch["source"], feats), target, atol=1e-5, rtol=1e-5, name="targets")
    mask, pred, dim = batch["mask"], preds[0], model.cfg.embed_dim
    diff = (pred[mask] - target[mask]).float()
    if modality == "audio":  # L2 x 1/sqrt(D)
        per_token = diff.square().sum(-1) / math.sqrt(dim)
    elif modality == "text":  # smooth-L1 beta 4 x 1
        per_token = F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none", beta=4.0).sum(-1)
    else:  # smooth-L1 beta 2 x 1/sqrt(D)
        per_token = F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none", beta=2.0).sum(-1) / math.sqrt(dim)
    assert_close(out["loss"], per_token.mean(), atol=1e-5, rtol=1e-5, name="loss")
    assert int(out["sample_size"]) == int(mask.sum())
    assert_close(out["target_var"], target[mask].std(dim=0).mean(), atol=1e-3, rtol=1e-3, name="target_var")


def test_text_head_is_the_two_layer_regression_head():
    head = Data2Vec1(tiny_config("text")).head
    assert [type(m).__name__ for m in head] == ["Linear", "GELU", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (64, 128, 64)


# -- EMA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_after_step_averages_and_copies_as_the_reference(modality):
    model = Data2Vec1(tiny_config(modality))
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    student = dict(model.encoder.named_parameters())
    model.after_step(7)
    decay = ema_decay_schedule(7, model.cfg.ema_decay, model.cfg.ema_end_decay, model.cfg.ema_anneal_end_step)
    assert model.ema_decay(7) == decay and model(make_batch(model))["ema_decay"] == decay
    for name, p in model.teacher.named_parameters():
        copied = name.removeprefix("embed.").startswith(model.cfg.teacher_copies) or not student[name].requires_grad
        expected = student[name] if copied else decay * before[name] + (1 - decay) * student[name]
        assert_close(p, expected, atol=1e-6, rtol=1e-6, name=name)
    snapshot = [p.clone() for p in model.teacher.parameters()]
    model.after_step(7)  # once per step
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.teacher.parameters()))


@pytest.mark.parametrize("modality, start, end, steps", [("audio", 0.999, 0.9999, 30_000),
                                                         ("text", 0.999, 0.9999, 300_000),
                                                         ("image", 0.999, 0.9998, 375_300)])  # fmt: skip
def test_released_ema_schedules(modality, start, end, steps):
    with torch.device("meta"):
        model = Data2Vec1(data2vec1_config(modality, "base"))
    assert model.ema_decay(0) == start and model.ema_decay(steps) == end == model.ema_decay(10 * steps)
    assert model.ema_decay(steps // 2) == pytest.approx((start + end) / 2)


# -- training, sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_tiny_loss_falls_on_a_fixed_batch(modality):
    model = Data2Vec1(tiny_config(modality, **NO_DROPOUT)).train()
    batch = make_batch(model)
    losses = train_losses(model, batch, steps=20, lr=2e-3, weight_decay=0.01)
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize(
    "modality, trainable, fixed",
    [
        # timm vit_base_patch16_224 without head and learned positions (85,647,360, as data2vec 2.0's
        # image encoder) + 12 x 2 x 768 layer-scales; BEiT's relative position bias is not built.
        ("image", 85_665_792, 196 * 768),
        # data2vec 2.0's audio base encoder without its 12 ALiBi scales (CNN + projection, 5-layer conv
        # positions, LayerNorm, 12 post-norm blocks).
        ("audio", 93_163_520, 0),
        # RoBERTa base without pooler and token types: 50,264 BPE rows + the appended <mask> = 50,265.
        ("text", 124_052_736, 0),
    ],
)
def test_base_models_have_the_released_parameter_counts(modality, trainable, fixed):
    with torch.device("meta"):
        model = Data2Vec1(data2vec1_config(modality, "base"))
    assert count_parameters(model.encoder, trainable=True) == trainable
    assert count_parameters(model.encoder, trainable=False) == fixed
    head = {"image": 768 * 769, "audio": 768 * 769, "text": 768 * 1537 + 1536 * 769}[modality]
    assert count_parameters(model.head) == head


@pytest.mark.parametrize("modality", MODALITIES)
def test_base_model_runs_one_training_step_on_cpu(modality):
    # The released base architecture at released input sizes (224 px, 2 s of audio, 512 tokens), batch 1.
    model = Data2Vec1(data2vec1_config(modality, "base", layerdrop=0.0, impl="torch")).train()
    source = {"image": torch.randn(1, 3, 224, 224), "audio": torch.randn(1, 32_000),
              "text": torch.randint(5, 50264, (1, 512))}[modality]  # fmt: skip
    mask = model.modality.make_masks(1, source)
    assert mask.shape[1] == {"image": 196, "audio": 99, "text": 512}[modality]
    out = model({"source": source, "mask": mask})
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for n, p in student_parameters(model).items() if "blocks" in n or "head" in n)


@pytest.mark.parametrize("modality", MODALITIES)
def test_tiny_sizes_equal_data2vec2_tiny(modality):
    d2v1, d2v2 = data2vec1_config(modality, "tiny"), data2vec2_config(modality, "tiny")
    total_depth = d2v2.prenet_depth + d2v2.depth
    assert (d2v1.embed_dim, d2v1.num_heads, d2v1.depth) == (d2v2.embed_dim, d2v2.num_heads, total_depth)


# -- masks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality, masked", [("image", 75), ("audio", None), ("text", None)])
def test_released_masks(modality, masked):
    cfg = data2vec1_config(modality, "base")
    with torch.device("meta"):
        modality_obj = Data2Vec1(cfg).modality
    source = {"image": torch.zeros(64, 3, 1, 1), "audio": torch.zeros(64, 320_000),
              "text": torch.zeros(64, 512, dtype=torch.long)}[modality]  # fmt: skip
    mask = modality_obj.make_masks(64, source, generator=torch.Generator().manual_seed(0))
    counts = mask.sum(dim=1)
    assert mask.shape[0] == 64 and (counts == counts[0]).all()  # one mask per sample, equal counts
    if masked is not None:
        assert int(counts[0]) == masked
    else:  # audio: ~49 % of 999 frames (p 0.65, span 10); text: ~30 % of 512 (p 0.35, span 4)
        fraction = {"audio": (0.40, 0.52), "text": (0.22, 0.32)}[modality]
        assert fraction[0] < counts[0] / mask.shape[1] < fraction[1]


def test_beit_block_mask_makes_blocks_of_the_configured_size():
    mask = beit_block_mask(32, (14, 14), num_masked=75, min_block=16, generator=torch.Generator().manual_seed(1))
    assert (mask.sum(dim=1) == 75).all()
    grid = mask.view(32, 14, 14).float()
    # Blocky: a masked patch's 4-neighbours are mostly masked too (i.i.d. masks would give ~38 %).
    neighbours = F.conv2d(grid[:, None], torch.tensor([[[[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]]]), padding=1)[:, 0]
    assert (neighbours[grid.bool()] / 4).mean() > 0.6
    with pytest.raises(ValueError, match="num_masked"):
        beit_block_mask(1, 4, num_masked=16)


def test_mlm_span_mask_masks_spans_with_equal_counts():
    mask = mlm_span_mask(16, 128, mask_prob=0.35, span=4, generator=torch.Generator().manual_seed(0))
    counts = mask.sum(dim=1)
    assert (counts == counts[0]).all() and 0 < counts[0] < 128
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum() + mask[:, 0].sum()  # number of masked runs
    assert mask.sum() / runs > 3  # spans, not single tokens
    with pytest.raises(ValueError, match="mask_prob"):
        mlm_span_mask(1, 8, mask_prob=1.5)


# -- blocks, config ----------------------------------------------------------------------------------


def test_layer_scale_blocks_and_block_output_collection():
    block = PreNormBlock(16, 2, layer_scale_init=0.5, impl="torch").eval()
    plain = PreNormBlock(16, 2, impl="torch").eval()
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("gamma")})
    x = torch.randn(2, 5, 16)
    y, ffn = block(x)
    h = x + 0.5 * block.attn(block.norm1(x))
    assert_close(y, h + 0.5 * block.mlp(block.norm2(h)), atol=1e-6, rtol=1e-6, name="layer-scaled")
    assert plain.gamma_1 is None
    out, collected = forward_blocks([block, plain], x, collect_from=0, collect="block")
    assert torch.equal(collected[0], y) and torch.equal(collected[1], out)


@pytest.mark.parametrize(
    "modality, overrides, field",
    [("image", dict(masking="mlm_span"), "masking"), ("audio", dict(mask_fill="token"), "mask_fill"),
     ("text", dict(mask_fill="uniform"), "mask_fill"), ("text", dict(mask_idx=64), "mask_idx"),
     ("audio", dict(mask_prob=1.0), "mask_prob"), ("image", dict(num_mask_patches=64), "num_mask_patches"),
     ("audio", dict(layer_scale_init=0.1), "layer_scale_init"), ("text", dict(head_layers=3), "head_layers"),
     ("audio", dict(average_top_k_layers=4), "average_top_k_layers")],
)  # fmt: skip
def test_config_rejects_bad_values_naming_the_field(modality, overrides, field):
    with pytest.raises(ValueError, match=f"Data2Vec1Config.{field} "):
        tiny_config(modality, **overrides)


def test_config_knows_its_presets_and_fields():
    with pytest.raises(ValueError, match="no data2vec 1.0 preset"):
        data2vec1_config("image", "huge")
    with pytest.raises(ValueError, match="unknown Data2Vec1Config fields"):
        data2vec1_config("image", "tiny", clone_batch=2)
    assert tiny_config("text", mask_idx=3).num_embeddings == 64
