"""Convolutional decoders: noise-filled input, conv blocks with the residual rule, projection heads."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2v2.models.layers.blocks import init_bert_params
from d2v2.models.layers.decoders import Decoder1d, Decoder2d
from tests.helpers import assert_close


def place(x, ids_keep, length):
    """Kept rows at ids_keep, zeros elsewhere (the decoder input with noise std 0)."""
    full = torch.zeros(x.shape[0], length, x.shape[2])
    full[torch.arange(x.shape[0])[:, None], ids_keep] = x
    return full


def plain_decoder(decoder, x, conv, residual):
    """Conv ("same") -> LayerNorm over channels without affine -> GELU, + input only when widths
    match and residual, then the head; x channels-last [R, N, C] or [R, H, W, C]."""
    for layer in decoder.blocks:
        pad = layer.kernel_size[0] // 2
        y = conv(x.movedim(-1, 1), layer.weight, layer.bias, padding=pad, groups=decoder.groups).movedim(1, -1)
        y = F.gelu(F.layer_norm(y, (y.shape[-1],)))
        x = y + x if residual and y.shape[-1] == x.shape[-1] else y
    return decoder.proj(x)


def kept_ids(rows, length, kept):
    return torch.stack([torch.randperm(length)[:kept].sort().values for _ in range(rows)])


@pytest.mark.parametrize(
    "input_dim, decoder_dim, groups, residual, projection_layers",
    [
        (32, 16, 4, True, 1),  # audio-base shape: first block 32 -> 16 has no residual, the rest do
        (16, 16, 1, False, 2),  # text shape: groups 1, no residual, Linear(C -> 2C) + GELU + Linear(2C -> D)
    ],
)
def test_decoder1d_matches_plain_math(input_dim, decoder_dim, groups, residual, projection_layers):
    decoder = Decoder1d(input_dim, decoder_dim, kernel_size=5, layers=3, groups=groups, residual=residual,
                        projection_layers=projection_layers, projection_ratio=2.0, mask_noise_std=0.0,
                        impl="torch").eval()  # fmt: skip
    x, ids = torch.randn(3, 4, input_dim), kept_ids(3, 11, 4)  # 11 positions, 4 kept
    out = decoder(x, ids, 11)
    expected = plain_decoder(decoder, place(x, ids, 11), F.conv1d, residual)
    assert out.shape == (3, 11, input_dim)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="decoder1d")
    if projection_layers == 2:
        widths = [(m.in_features, m.out_features) for m in decoder.proj if isinstance(m, nn.Linear)]
        assert widths == [(decoder_dim, 2 * decoder_dim), (2 * decoder_dim, input_dim)]
        assert isinstance(decoder.proj[1], nn.GELU)
    else:
        assert isinstance(decoder.proj, nn.Linear) and decoder.proj.in_features == decoder_dim


def test_decoder2d_matches_plain_math_on_a_non_square_grid():
    decoder = Decoder2d(24, 16, kernel_size=3, layers=2, groups=4, grid=(3, 4), mask_noise_std=0.0,
                        impl="torch").eval()  # fmt: skip
    x, ids = torch.randn(2, 5, 24), kept_ids(2, 12, 5)
    out = decoder(x, ids, 12)
    grid_input = place(x, ids, 12).view(2, 3, 4, 24)  # row-major grid
    expected = plain_decoder(decoder, grid_input, F.conv2d, True).reshape(2, 12, 24)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="decoder2d")
    assert isinstance(decoder.proj, nn.Linear) and (decoder.proj.in_features, decoder.proj.out_features) == (16, 24)
    with pytest.raises(ValueError, match="grid 3x4"):
        decoder(x, ids, 16)


def test_decoder_input_is_kept_outputs_plus_fresh_noise():
    decoder = Decoder1d(64, 64, 3, 1, 1, mask_noise_std=0.01, input_dropout=0.5, impl="torch").eval()
    x, ids = torch.randn(8, 10, 64), kept_ids(8, 50, 10)
    first = decoder.decoder_input(x, ids, 50)
    second = decoder.decoder_input(x, ids, 50)
    rows = torch.arange(8)[:, None]
    assert torch.equal(first[rows, ids], x)  # eval: no input dropout
    masked = torch.ones(8, 50, dtype=torch.bool)
    masked[rows, ids] = False
    noise = first[masked]
    assert abs(noise.std().item() - 0.01) < 1e-3 and abs(noise.mean().item()) < 1e-3
    assert not torch.equal(noise, second[masked])  # fresh draws every call

    decoder.train()  # input dropout hits the encoder outputs only
    dropped = decoder.decoder_input(x, ids, 50)[rows, ids]
    assert set(torch.unique(dropped / x).round(decimals=4).tolist()) <= {0.0, 2.0}


def test_reset_projection_restores_default_init():
    decoder = Decoder1d(64, 64, 3, 1, 1, projection_layers=2)
    decoder.apply(init_bert_params)
    first = decoder.proj[0]
    assert first.weight.std() < 0.03 and torch.count_nonzero(first.bias) == 0
    conv_before = decoder.blocks[0].weight.clone()
    decoder.reset_projection()
    bound = 1 / 64**0.5  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert first.weight.abs().max() <= bound and abs(first.weight.std().item() - bound / 3**0.5) < 0.01
    assert torch.count_nonzero(first.bias) > 0
    assert torch.equal(decoder.blocks[0].weight, conv_before)  # convolutions untouched


def test_decoder_argument_errors():
    with pytest.raises(ValueError, match="odd"):
        Decoder1d(16, 16, kernel_size=4, layers=1, groups=1)
    with pytest.raises(ValueError, match="divisible by groups"):
        Decoder1d(16, 24, kernel_size=3, layers=1, groups=16)
    with pytest.raises(ValueError, match="layers"):
        Decoder2d(16, 16, kernel_size=3, layers=0, groups=1, grid=(2, 2))
    with pytest.raises(ValueError, match="projection_layers"):
        Decoder1d(16, 16, kernel_size=3, layers=1, groups=1, projection_layers=0)
