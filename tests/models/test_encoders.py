"""Local and positional encoders: patch embedding + sin-cos table, wav2vec 2.0 CNN, conv positions,
ALiBi slopes, token embedding, wav2vec 2.0's weight-normalised conv positions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2v2.models.layers.encoders import (
    WAV2VEC2_CONV_LAYERS,
    AudioFeatureEncoder,
    ConvPositionalEncoder,
    PatchEmbed,
    TokenEmbedding,
    WeightNormConvPositions,
    alibi_slopes,
    audio_num_frames,
    frame_padding_mask,
    sincos_pos_embed_2d,
)
from tests.helpers import assert_close


def mae_sincos_table(dim, height, width):
    """MAE's get_2d_sincos_pos_embed layout, in numpy: meshgrid(w, h), first half from grid[0]."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    grid = np.stack(grid, axis=0).reshape(2, 1, height, width)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_sincos_table_matches_mae_layout_on_a_non_square_grid():
    table = sincos_pos_embed_2d(16, (3, 5))  # H != W: a row/column swap would show
    assert table.shape == (15, 16) and table.dtype == torch.float32 and not table.requires_grad
    assert_close(table, torch.from_numpy(mae_sincos_table(16, 3, 5)).float(), atol=1e-6, rtol=0, name="table")
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(18, (2, 2))


def test_patch_embed_is_a_linear_map_of_row_major_patches():
    embed = PatchEmbed(image_size=12, patch_size=4, in_chans=3, embed_dim=10)
    images = torch.randn(2, 3, 12, 12)
    out = embed(images)
    patches = F.unfold(images, kernel_size=4, stride=4)  # [B, 3*4*4, 9], row-major patches
    expected = (embed.proj.weight.view(10, -1) @ patches + embed.proj.bias[:, None]).transpose(1, 2)
    assert embed.grid == (3, 3) and out.shape == (2, 9, 10)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="patches")
    with pytest.raises(ValueError, match="source must be images"):
        embed(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PatchEmbed(image_size=30, patch_size=16, in_chans=3, embed_dim=8)


def test_wav2vec2_frame_counts():
    # Stride 320 and a 400-sample receptive field: 1 s -> 49 frames, 20 s -> 999 (ref 1.7, 1.9).
    assert audio_num_frames(16000) == 49
    assert audio_num_frames(320_000) == 999
    assert audio_num_frames(400) == 1 and audio_num_frames(399) == 0
    lengths = torch.tensor([16000, 320_000, 400])
    assert audio_num_frames(lengths).tolist() == [49, 999, 1]


def test_audio_cnn_layer_norm_mode_and_projection():
    spec = ((6, 10, 5), (6, 3, 2), (8, 2, 2))  # small channels, wav2vec-style kernels
    encoder = AudioFeatureEncoder(embed_dim=12, conv_layers=spec)
    for layer in encoder.conv_layers:
        with torch.no_grad():
            layer.layer_norm.weight.uniform_(0.5, 1.5)
            layer.layer_norm.bias.normal_()
    waves = torch.randn(2, 1000)
    out = encoder(waves)
    x = waves[:, None]
    for layer, (_, _, stride) in zip(encoder.conv_layers, spec):
        assert layer.conv.bias is None
        x = F.conv1d(x, layer.conv.weight, stride=stride)
        x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), layer.layer_norm.weight, layer.layer_norm.bias)
        x = F.gelu(x).transpose(1, 2)
    x = x.transpose(1, 2)
    expected = encoder.project(F.layer_norm(x, (8,), encoder.project_norm.weight, encoder.project_norm.bias))
    assert out.shape == (2, audio_num_frames(1000, spec), 12) == (2, encoder.num_frames(1000), 12)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="features")
    with pytest.raises(ValueError, match="fewer than the CNN's receptive field"):
        encoder(torch.randn(1, 10))
    with pytest.raises(ValueError, match=r"waveforms \[B, T\]"):
        encoder(torch.randn(1, 1, 1000))


def test_wav2vec2_cnn_parameter_count():
    # 7 bias-free convs (5120 + 4 x 786,432 + 2 x 524,288) + 7 affine LayerNorms (7 x 1024)
    # + LayerNorm(512) + Linear(512 -> 768) = 4,206,592 + 395,008.
    encoder = AudioFeatureEncoder(768, WAV2VEC2_CONV_LAYERS)
    assert sum(p.numel() for p in encoder.parameters()) == 4_206_592 + 395_008


def test_frame_padding_mask():
    padding = torch.zeros(2, 16000, dtype=torch.bool)
    padding[1, 8000:] = True  # second utterance: 8000 real samples -> 24 frames
    frames = frame_padding_mask(padding, 49)
    assert frames.shape == (2, 49)
    assert not frames[0].any()
    assert not frames[1, :24].any() and frames[1, 24:].all()


def test_conv_positional_encoder_is_five_conv_ln_gelu_layers_without_residual():
    encoder = ConvPositionalEncoder(dim=32, width=95, depth=5, groups=16, impl="torch")
    assert encoder.kernel_size == 19 and len(encoder.convs) == 5
    x = torch.randn(2, 23, 32)
    out = encoder(x)
    h = x.transpose(1, 2)  # [R, D, N]
    for conv in encoder.convs:
        h = F.conv1d(h, conv.weight, conv.bias, padding=9, groups=16)
        h = F.gelu(F.layer_norm(h.transpose(1, 2), (32,))).transpose(1, 2)
    assert_close(out, h.transpose(1, 2), atol=1e-5, rtol=1e-5, name="positions")
    with pytest.raises(ValueError, match="must be odd"):
        ConvPositionalEncoder(dim=32, width=100, depth=5)
    with pytest.raises(ValueError, match="divisible"):
        ConvPositionalEncoder(dim=40, groups=16)


def test_alibi_slopes_geometric_and_interleaved():
    assert torch.equal(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    assert torch.equal(alibi_slopes(4), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    # 12 heads (audio base): the 8-head slopes, then every other slope of 16 heads, 2^(-i/2) for odd i.
    expected = [2.0**-i for i in range(1, 9)] + [2.0 ** (-i / 2) for i in (1, 3, 5, 7)]
    assert_close(alibi_slopes(12), torch.tensor(expected), atol=1e-7, rtol=1e-6, name="12 heads")
    assert alibi_slopes(16).shape == (16,)


def test_token_embedding_positions_norm_dropout():
    embed = TokenEmbedding(vocab_size=50, embed_dim=8, max_positions=16, padding_idx=1, dropout=0.0)
    tokens = torch.randint(2, 50, (2, 6))
    out = embed(tokens)
    expected = F.layer_norm(embed.embed_tokens.weight[tokens] + embed.embed_positions.weight[:6], (8,),
                            embed.layer_norm.weight, embed.layer_norm.bias)  # fmt: skip
    assert_close(out, expected, atol=1e-6, rtol=1e-6, name="embedding")

    # Padding-aware positions: a left-padded row numbers its real tokens from 0; pads get no position.
    padding = torch.tensor([[False] * 6, [True, True] + [False] * 4])
    tokens[1, :2] = 1
    padded = embed(tokens, padding)
    pos = embed.embed_positions.weight
    row = embed.embed_tokens.weight[tokens[1]] + torch.cat([torch.zeros(2, 8), pos[:4]])
    assert_close(padded[1], F.layer_norm(row, (8,), embed.layer_norm.weight, embed.layer_norm.bias),
                 atol=1e-6, rtol=1e-6, name="padded row")  # fmt: skip
    assert_close(padded[0], out[0], atol=1e-6, rtol=1e-6, name="unpadded row")

    with pytest.raises(ValueError, match="max_positions"):
        embed(torch.randint(0, 50, (1, 17)))
    with pytest.raises(ValueError, match="token ids"):
        embed(torch.randn(1, 4))


# -- wav2vec 2.0 -------------------------------------------------------------------------------------


def test_weight_norm_conv_positions_equal_a_plain_conv_with_the_effective_weight():
    for kernel in (8, 7):  # even: the extra frame is removed; odd: nothing to remove
        module = WeightNormConvPositions(dim=32, kernel=kernel, groups=4)
        x = torch.randn(2, 11, 32)
        conv = module.conv
        g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
        assert g.shape == (1, 1, kernel)  # one norm scale per kernel tap (weight_norm dim=2)
        weight = g * v / v.norm(dim=(0, 1), keepdim=True)
        y = F.conv1d(x.transpose(1, 2), weight, conv.bias, padding=kernel // 2, groups=4)[..., :11]
        assert_close(module(x), F.gelu(y).transpose(1, 2), atol=1e-5, rtol=1e-5, name=f"kernel {kernel}")
    module = WeightNormConvPositions(dim=768, kernel=128, groups=16)
    std = module.conv.weight.std().item()
    assert abs(std - math.sqrt(4 / (128 * 768))) < 0.05 * std and module.conv.bias.abs().sum() == 0


def test_audio_cnn_default_mode_is_one_fp32_group_norm_on_the_first_layer():
    layers = ((8, 10, 5), (8, 3, 2))
    cnn = AudioFeatureEncoder(16, layers, mode="default")
    x = torch.randn(2, 400)
    first, second = cnn.conv_layers
    h = F.gelu(F.group_norm(first.conv(x[:, None]), 8, first.group_norm.weight, first.group_norm.bias))
    expected = F.gelu(second.conv(h)).transpose(1, 2)
    assert_close(cnn.features(x), expected, atol=1e-5, rtol=1e-5)
    assert_close(cnn(x), cnn.project(cnn.project_norm(expected)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        AudioFeatureEncoder(16, layers, mode="group_norm")
