"""Transformer blocks: attention, post-norm (data2vec 2.0) and pre-norm (MAE) blocks, LayerDrop, init."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2v2.models.layers.blocks import (
    Attention,
    DropPath,
    PostNormBlock,
    PreNormBlock,
    forward_blocks,
    init_bert_params,
)
from tests.helpers import assert_close


def plain_attention(module: Attention, x, positions=None, slopes=None, key_padding_mask=None):
    """Multi-head attention written out: softmax(q k^T / sqrt(Dh) - slope |pi - pj|, padding -inf) v."""
    batch, length, dim = x.shape
    heads, head_dim = module.num_heads, dim // module.num_heads
    q, k, v = F.linear(x, module.qkv.weight, module.qkv.bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # [B, H, L, L]
    if slopes is not None:
        pos = torch.arange(length)[None].expand(batch, -1) if positions is None else positions
        dist = (pos[:, :, None] - pos[:, None, :]).abs().float()  # [B, L, L]
        scores = scores - slopes[None, :, None, None] * dist[:, None]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, dim)
    return F.linear(out, module.proj.weight, module.proj.bias)


def make_block(kind, dim=32, heads=4):
    block = kind(dim, heads, mlp_ratio=2.0, norm_eps=1e-6)
    with torch.no_grad():  # non-trivial norm affines, so a swapped norm would show
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    return block.eval()


def test_attention_matches_plain_math_with_alibi_positions_and_padding():
    torch.manual_seed(1)
    attn = Attention(24, 3, impl="torch").eval()  # head dim 8, 3 heads (not a power of two)
    x = torch.randn(2, 7, 24)  # odd length
    positions = torch.tensor([[0, 2, 3, 9, 10, 11, 20], [1, 4, 5, 6, 7, 30, 31]])  # kept tokens' originals
    slopes = torch.tensor([0.5, 0.25, 0.125])
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    out = attn(x, positions, slopes, padding)
    expected = plain_attention(attn, x, positions, slopes, padding)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="attention")


def test_attention_dropout_only_in_training():
    attn = Attention(16, 2, attention_dropout=0.5, impl="torch")
    x = torch.randn(1, 5, 16)
    attn.eval()
    assert_close(attn(x), plain_attention(attn, x), atol=1e-5, rtol=1e-5, name="eval")
    attn.train()
    assert not torch.allclose(attn(x), plain_attention(attn, x), atol=1e-3)


def test_post_norm_block_returns_ffn_output_before_residual_and_norm():
    block = make_block(PostNormBlock)
    x = torch.randn(2, 5, 32)
    out, ffn_out = block(x)
    h = x + plain_attention(block.attn, x)
    r = F.layer_norm(h, (32,), block.norm1.weight, block.norm1.bias, 1e-6)
    t = block.mlp.fc2(F.gelu(block.mlp.fc1(r)))
    assert_close(ffn_out, t, atol=1e-5, rtol=1e-5, name="ffn_out (the target)")
    expected = F.layer_norm(r + t, (32,), block.norm2.weight, block.norm2.bias, 1e-6)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="block output")


def test_pre_norm_block_keeps_both_residuals():
    # The reference's pre-norm branch loses the FFN's input residual (quirk 1.14.1); ours must not.
    block = make_block(PreNormBlock)
    x = torch.randn(2, 5, 32)
    out, ffn_out = block(x)
    h = x + plain_attention(block.attn, block.norm1(x))
    t = block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(h))))
    assert_close(ffn_out, t, atol=1e-5, rtol=1e-5, name="ffn_out")
    assert_close(out, h + t, atol=1e-5, rtol=1e-5, name="block output")


def test_block_dropouts_are_wired_and_off_in_eval():
    block = PostNormBlock(16, 2, encoder_dropout=0.3, attention_dropout=0.3, activation_dropout=0.3,
                          post_mlp_dropout=0.3, drop_path=0.3)  # fmt: skip
    assert block.attn.proj_drop.p == 0.3 and block.attn.attention_dropout == 0.3
    assert block.mlp.drop1.p == 0.3 and block.mlp.drop2.p == 0.3 and block.post_mlp_drop.p == 0.3
    x = torch.randn(3, 4, 16)
    block.eval()
    first, second = block(x)[0], block(x)[0]
    assert torch.equal(first, second)
    block.train()
    assert not torch.equal(block(x)[0], first)


def test_drop_path_zeroes_whole_rows_and_rescales():
    drop = DropPath(0.5).train()
    x = torch.ones(4000, 3)
    y = drop(x)
    row_values = set(y[:, 0].tolist())
    assert row_values <= {0.0, 2.0} and (y == y[:, :1]).all()
    assert abs(y.mean().item() - 1.0) < 0.1
    assert torch.equal(drop.eval()(x), x)


def test_forward_blocks_collects_top_ffn_outputs_and_applies_layerdrop():
    blocks = nn.ModuleList(make_block(PostNormBlock, dim=16, heads=2) for _ in range(4))
    x = torch.randn(2, 3, 16)
    out, collected = forward_blocks(blocks, x, collect_from=2)
    h = x
    ffn = []
    for block in blocks:
        h, t = block(h)
        ffn.append(t)
    assert_close(out, h, atol=0, rtol=0, name="output")
    assert len(collected) == 2
    for got, want in zip(collected, ffn[2:]):
        assert_close(got, want, atol=0, rtol=0, name="collected")
    assert forward_blocks(blocks, x)[1] == []

    blocks.train()  # layerdrop 1.0 skips every block in training, none in eval
    out, collected = forward_blocks(blocks, x, layerdrop=1.0, collect_from=0)
    assert torch.equal(out, x) and collected == []
    blocks.eval()
    assert len(forward_blocks(blocks, x, layerdrop=1.0, collect_from=0)[1]) == 4


def test_init_bert_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Embedding(1000, 64, padding_idx=1), nn.LayerNorm(8))
    with torch.no_grad():
        model[2].weight.fill_(3.0)
    model.apply(init_bert_params)
    linear, embedding, norm = model
    assert abs(linear.weight.std().item() - 0.02) < 1e-3 and abs(linear.weight.mean().item()) < 1e-3
    assert torch.count_nonzero(linear.bias) == 0
    assert abs(embedding.weight.std().item() - 0.02) < 1e-3
    assert torch.count_nonzero(embedding.weight[1]) == 0
    assert torch.all(norm.weight == 3.0)  # other modules keep their init


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(30, 4)
