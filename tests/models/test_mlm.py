"""The masked LM: the loss against its formula in plain PyTorch, the 80/10/10 corruption, gradients,
training, sizes, config."""

import pytest
import torch
import torch.nn.functional as F

from d2v2.models import build_method, count_parameters, method_config
from d2v2.models.mlm import MLM, corrupt_tokens, mlm_config
from tests.helpers import assert_close

NO_DROPOUT = dict(encoder_dropout=0.0, attention_dropout=0.0, post_mlp_dropout=0.0, embed_dropout=0.0)
VOCAB = 50


def tiny_mlm(**overrides) -> MLM:
    return MLM(mlm_config("text", "tiny", impl="torch", vocab_size=VOCAB, max_positions=64, **overrides))


def make_batch(model: MLM, batch_size: int = 3, length: int = 40, seed: int = 0) -> dict:
    source = torch.randint(2, VOCAB, (batch_size, length))
    return {"source": source, "mask": model.modality.make_masks(batch_size, source, torch.Generator().manual_seed(seed))}


def encoder_inputs(model: MLM) -> list:
    """Records the (corrupted) token ids every encoder call receives."""
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


def reference_loss(model: MLM, tokens, source, selected, padding_mask=None) -> torch.Tensor:
    """Cross-entropy of RoBERTa's head at every position, averaged over the selected ones only."""
    x = model.encoder(tokens, padding_mask)
    head = model.lm_head
    hidden = F.layer_norm(F.gelu(x @ head.dense.weight.T + head.dense.bias), (x.shape[-1],), head.layer_norm.weight,
                          head.layer_norm.bias, model.cfg.norm_eps)  # fmt: skip
    logits = hidden @ model.encoder.local_encoder.embed_tokens.weight.T + head.bias  # [B, L, V + 1]
    nll = -logits.log_softmax(dim=-1).gather(-1, source[..., None])[..., 0]
    return nll[selected].mean()


@pytest.mark.parametrize("padded", [False, True])
def test_loss_equals_the_formula_on_the_selected_tokens_only(padded):
    model = tiny_mlm(**NO_DROPOUT).eval()
    batch = make_batch(model)
    padding_mask = None
    if padded:  # the last 10 tokens of row 0 are padding; any selected among them is not predicted
        padding_mask = torch.zeros_like(batch["mask"])
        padding_mask[0, -10:] = True
        batch["source"][padding_mask] = model.cfg.padding_idx
        batch["padding_mask"] = padding_mask
        assert (batch["mask"] & padding_mask).any()
    seen = encoder_inputs(model)
    out = model(batch)
    tokens = seen[0]
    selected = batch["mask"] if padding_mask is None else batch["mask"] & ~padding_mask
    assert torch.equal(tokens[~selected], batch["source"][~selected])  # only selected tokens change
    expected = reference_loss(model, tokens, batch["source"], selected, padding_mask)
    assert_close(out["loss"], expected, atol=1e-5, rtol=1e-5, name="loss")
    assert out["sample_size"] == selected.sum()


def test_corruption_is_80_10_10_and_never_draws_mask_or_padding():
    torch.manual_seed(0)
    num_tokens, mask_id, pad = 30, 29, 1  # 28 ids may be drawn
    tokens = torch.randint(2, 29, (400, 500))
    selected = torch.rand(400, 500) < 0.5
    out = corrupt_tokens(tokens, selected, mask_id, num_tokens, 0.8, 0.1, exclude=(mask_id, pad))
    assert torch.equal(out[~selected], tokens[~selected])
    picked, original = out[selected], tokens[selected]
    masked = (picked == mask_id).float().mean()
    changed = ((picked != mask_id) & (picked != original)).float().mean()
    unchanged = (picked == original).float().mean()
    # a random replacement equals the original with probability 1/28
    assert abs(masked - 0.8) < 0.005 and abs(changed - 0.1 * 27 / 28) < 0.005
    assert abs(unchanged - (0.1 + 0.1 / 28)) < 0.005
    replaced = picked[(picked != mask_id) & (picked != original)]
    assert not (replaced == pad).any() and replaced.min() == 0 and replaced.max() == 28
    counts = torch.bincount(replaced, minlength=num_tokens).float()
    allowed = counts[[i for i in range(num_tokens) if i not in (pad, mask_id)]]
    assert allowed.min() > 0.8 * allowed.mean()  # uniform over the allowed ids


def test_mask_id_is_reserved_past_the_tokenizer_ids():
    cfg = mlm_config("text", "tiny", vocab_size=VOCAB)
    assert (cfg.mask_token_id, cfg.num_embeddings) == (VOCAB, VOCAB + 1)
    model = MLM(cfg)
    assert model.encoder.local_encoder.embed_tokens.num_embeddings == VOCAB + 1
    assert model.lm_head.bias.shape == (VOCAB + 1,)
    own = mlm_config("text", "tiny", vocab_size=VOCAB, mask_idx=3)
    assert (own.mask_token_id, own.num_embeddings) == (3, VOCAB)
    with pytest.raises(ValueError, match="MLMConfig.mask_idx must be None or an id"):
        mlm_config("text", "tiny", vocab_size=VOCAB, mask_idx=1)  # the padding id
    with pytest.raises(ValueError, match="MLMConfig.mask_idx must be None or an id"):
        mlm_config("text", "tiny", vocab_size=VOCAB, mask_idx=VOCAB)
    with pytest.raises(ValueError, match="MLMConfig.random_token_prob .* exceeds 1"):
        mlm_config("text", "tiny", mask_token_prob=0.95, random_token_prob=0.1)
    with pytest.raises(ValueError, match="no masked-LM preset for image tiny"):
        mlm_config("image", "tiny")


def test_gradients_reach_only_the_selected_predictions():
    model = tiny_mlm(**NO_DROPOUT).train()
    batch = make_batch(model)
    outputs = []

    def keep_output(module, args, output):
        output.retain_grad()
        outputs.append(output)

    model.encoder.register_forward_hook(keep_output)
    model(batch)["loss"].backward()
    grad = outputs[0].grad.abs().sum(dim=-1)  # [B, L]
    assert (grad[~batch["mask"]] == 0).all() and (grad[batch["mask"]] > 0).all()
    embed = model.encoder.local_encoder.embed_tokens.weight
    assert embed.grad[model.cfg.mask_token_id].abs().sum() > 0  # <mask> is an input here
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.param_groups(0.01)[1]["params"] == []  # fairseq decays every RoBERTa parameter


def test_loss_goes_down_on_a_fixed_batch():
    model = tiny_mlm(**NO_DROPOUT).train()
    batch = make_batch(model, batch_size=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-6)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)  # the same corruption every step: a fixed batch
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses


def test_base_model_has_roberta_base_parameter_counts():
    with torch.device("meta"):
        model = build_method("mlm", method_config("mlm", "text", "base"))
    # data2vec 2.0's text base encoder (124,052,736: HF roberta-base without pooler, token types and
    # 2 position rows) + the reserved <mask> row; the LM head: dense 590,592 + LayerNorm 1,536 + bias
    # 50,266 (its output weight is the token embedding). HF RobertaForMaskedLM: 124,697,433.
    assert count_parameters(model.encoder) == 124_052_736 + 768
    assert count_parameters(model.lm_head) == 642_394
    assert count_parameters(model) == 124_695_898


def test_base_model_runs_one_training_step_on_cpu():
    model = MLM(mlm_config("text", "base", impl="torch")).train()
    source = torch.randint(5, 50265, (1, 512))
    mask = model.modality.make_masks(1, source)
    assert int(mask.sum()) == 77  # 512 - floor(512 * 0.85)
    out = model({"source": source, "mask": mask})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.lm_head.bias.grad is not None
