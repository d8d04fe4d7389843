"""Local encoders and positional encoders of the three modalities, as data2vec 2.0 builds them.

- Images: ``PatchEmbed`` (a stride-p convolution, p = 16 or 14) and the fixed, non-trainable 2-D
  sin-cos table ``sincos_pos_embed_2d`` (added before masking; the CLS token gets no position).
- Audio: ``AudioFeatureEncoder``, the wav2vec 2.0 CNN in "layer_norm" mode (7 convolutions, 512
  channels, total stride 320 = 20 ms at 16 kHz; wav2vec 2.0 base's "default" mode on request)
  followed by LayerNorm(512) -> Linear(512 -> D); ``ConvPositionalEncoder``, the 5-layer grouped conv
  positional encoder; ``alibi_slopes``, the geometric ALiBi head slopes that a learned per-head
  scale multiplies; ``WeightNormConvPositions``, wav2vec 2.0's single weight-normalised conv.
- Text: ``TokenEmbedding``, token embedding + learned absolute positions + LayerNorm + dropout.

References: data2vec 2.0 (Baevski et al., ICML 2023, arXiv:2212.07525), fairseq
``examples/data2vec/models/modalities/{images,audio,text,base}.py``; wav2vec 2.0 (Baevski et al.,
NeurIPS 2020) ``fairseq/models/wav2vec/wav2vec2.py: ConvFeatureExtractionModel``; MAE (He et al.,
CVPR 2022) for the sin-cos table layout; ALiBi (Press et al., ICLR 2022) for the slopes.
fairseq ``examples/data2vec/models/modalities/{images,audio,text}.py`` build the same parts.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from d2v2.kernels.conv_block1d import conv_block1d

from .grad import with_grad_mult

__all__ = [
    "WAV2VEC2_CONV_LAYERS",
    "sincos_pos_embed_2d",
    "PatchEmbed",
    "AudioFeatureEncoder",
    "audio_num_frames",
    "frame_padding_mask",
    "ConvPositionalEncoder",
    "WeightNormConvPositions",
    "alibi_slopes",
    "TokenEmbedding",
]

# (channels, kernel, stride) of each layer of the wav2vec 2.0 feature encoder: total stride 320,
# receptive field 400 samples (25 ms at 16 kHz).
WAV2VEC2_CONV_LAYERS: tuple[tuple[int, int, int], ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [H * W, dim] (fp32), rows in row-major grid order.

    The layout is MAE's (and so the one timm/fairseq checkpoints hold): the first dim/2 channels encode
    the column index, the last dim/2 the row index; each half is [sin(p * w_i), cos(p * w_i)] with
    w_i = 10000^(-i / (dim/4)), i < dim/4. Computed in float64, returned in float32.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be a multiple of 4 for a 2-D sin-cos table, got {dim}")
    height, width = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)  # [H*W] row index i
    cols = torch.arange(width, dtype=torch.float64).repeat(height)  # [H*W] column index j

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None] * omega[None, :]  # [H*W, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [H*W, dim/2]

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> D: a Conv2d with kernel = stride = patch_size (timm's PatchEmbed).

    Args:
        image_size: input side in pixels (square images; must be a multiple of patch_size).
        patch_size: patch side (16, or 14 for the huge preset).
        in_chans: input channels.
        embed_dim: output width D.

    The weight is initialised xavier-uniform on its flattened [D, in_chans * p * p] view, as the reference.
    """

    def __init__(self, image_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.proj.weight.view(embed_dim, -1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"source must be images [B, C, {self.image_size}, {self.image_size}], got shape {list(images.shape)}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]


# ---------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------


def audio_num_frames(num_samples, conv_layers: Sequence[Sequence[int]] = WAV2VEC2_CONV_LAYERS):
    """Frames the CNN makes from ``num_samples`` samples (an int, or an integer tensor of lengths).

    Each layer maps L -> floor((L - kernel) / stride) + 1 (no padding). With the wav2vec 2.0 spec,
    16,000 samples (1 s) give 49 frames and 320,000 (20 s) give 999. A result below 1 means the input
    is shorter than the receptive field (400 samples for wav2vec 2.0).
    """
    frames = num_samples
    for _, kernel, stride in conv_layers:
        frames = (frames - kernel) // stride + 1
    return frames


def frame_padding_mask(
    padding_mask: torch.Tensor, num_frames: int, conv_layers: Sequence[Sequence[int]] = WAV2VEC2_CONV_LAYERS
) -> torch.Tensor:
    """Sample-level padding [B, T] (True = padding) -> frame-level padding [B, num_frames].

    As the reference: a frame is padding when its index is at least the CNN output length of the
    utterance's unpadded sample count.
    """
    valid_frames = audio_num_frames((~padding_mask).sum(dim=1), conv_layers)  # [B]
    return torch.arange(num_frames, device=padding_mask.device)[None, :] >= valid_frames[:, None]


class _ConvLayer(nn.Module):
    """One CNN layer: Conv1d without bias -> optional norm (in fp32) -> GELU.

    ``norm`` is "layer" (LayerNorm over channels, affine: every layer in "layer_norm" mode), "group"
    (GroupNorm with one group per channel, affine, i.e. each channel normalised over time: the first
    layer in "default" mode) or None.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, norm: str | None = "layer"):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=False)
        nn.init.kaiming_normal_(self.conv.weight)
        self.layer_norm = nn.LayerNorm(out_channels) if norm == "layer" else None
        self.group_norm = nn.GroupNorm(out_channels, out_channels) if norm == "group" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # [B, C, T']
        # fp32 norms as the reference's Fp32LayerNorm / Fp32GroupNorm: the statistics of raw audio
        # features overflow fp16 and lose precision in bf16.
        if self.layer_norm is not None:
            ln = self.layer_norm
            x = x.transpose(1, 2)  # [B, T', C]
            x = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).type_as(x)
            x = x.transpose(1, 2)  # [B, C, T']
        if self.group_norm is not None:
            gn = self.group_norm
            x = F.group_norm(x.float(), gn.num_groups, gn.weight.float(), gn.bias.float(), gn.eps).type_as(x)
        return F.gelu(x)


class AudioFeatureEncoder(nn.Module):
    """The wav2vec 2.0 CNN and the projection LayerNorm(C) -> Linear(C -> D).

    Args:
        embed_dim: output width D.
        conv_layers: (channels, kernel, stride) per layer; default the wav2vec 2.0 spec.
        mode: "layer_norm" (an fp32 LayerNorm in every layer: data2vec 2.0) or "default" (one fp32
            GroupNorm with a group per channel on the first layer only: wav2vec 2.0 base).

    The convolutions are kaiming-normal initialised (as the reference); the projection Linear is
    reset to PyTorch's default init after the model-wide BERT init (``reset_projection``).
    """

    def __init__(
        self,
        embed_dim: int,
        conv_layers: Sequence[Sequence[int]] = WAV2VEC2_CONV_LAYERS,
        mode: Literal["layer_norm", "default"] = "layer_norm",
    ):
        super().__init__()
        if mode not in ("layer_norm", "default"):
            raise ValueError(f"mode must be 'layer_norm' or 'default', got {mode!r}")
        self.mode = mode
        self.conv_spec = tuple(tuple(int(v) for v in layer) for layer in conv_layers)
        channels = [1] + [layer[0] for layer in self.conv_spec]
        depth = len(self.conv_spec)
        norms = ["layer"] * depth if mode == "layer_norm" else ["group"] + [None] * (depth - 1)
        self.conv_layers = nn.ModuleList(
            _ConvLayer(channels[i], out, kernel, stride, norms[i])
            for i, (out, kernel, stride) in enumerate(self.conv_spec)
        )
        self.project_norm = nn.LayerNorm(channels[-1])
        self.project = nn.Linear(channels[-1], embed_dim)

    def num_frames(self, num_samples):
        """Frames from ``num_samples`` samples (int or integer tensor); see ``audio_num_frames``."""
        return audio_num_frames(num_samples, self.conv_spec)

    def forward(self, waveforms: torch.Tensor, grad_mult: float = 1.0) -> torch.Tensor:
        """waveforms [B, T] -> projected features [B, N, D]; the gradient into the CNN (not the projection)
        times ``grad_mult`` (``with_grad_mult``: 0 = none)."""
        return self.project(self.project_norm(with_grad_mult(self.features, grad_mult, waveforms)))

    def features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """waveforms [B, T] -> the CNN's output [B, N, C], before the projection's LayerNorm."""
        if waveforms.dim() != 2:
            raise ValueError(f"source must be waveforms [B, T], got shape {list(waveforms.shape)}")
        if self.num_frames(waveforms.shape[1]) < 1:
            raise ValueError(
                f"source has {waveforms.shape[1]} samples, fewer than the CNN's receptive field; "
                "use longer crops"
            )
        x = waveforms[:, None, :]  # [B, 1, T]
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)  # [B, C, N] -> [B, N, C]

    def reset_projection(self) -> None:
        """PyTorch default init for the projection Linear (the reference's AudioEncoder.reset_parameters)."""
        self.project.reset_parameters()


class ConvPositionalEncoder(nn.Module):
    """data2vec 2.0's relative positional encoder for audio: ``depth`` x [Conv1d(D -> D, k, groups,
    "same") -> LayerNorm (no affine) -> GELU], no residual inside the stack; the caller adds the
    output to its input. k = max(3, width // depth) (19 for width 95 and depth 5).

    Args:
        dim: width D (a multiple of groups).
        width: total receptive width the reference configures (``conv_pos_width``, 95).
        depth: number of layers (``conv_pos_depth``, 5).
        groups: convolution groups (16).
        impl: kernel implementation for ``conv_block1d``.
    """

    def __init__(self, dim: int, width: int = 95, depth: int = 5, groups: int = 16, impl: str = "auto"):
        super().__init__()
        kernel = max(3, width // depth)
        if kernel % 2 == 0:
            raise ValueError(
                f"the positional conv kernel max(3, width // depth) = {kernel} must be odd; change conv_pos_width"
            )
        if dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by the positional conv groups ({groups})")
        self.kernel_size = kernel
        self.groups = groups
        self.impl = impl
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, N, D] channels-last -> positional features [R, N, D]."""
        for conv in self.convs:
            x = conv_block1d(x, conv.weight, conv.bias, self.groups, residual=False, impl=self.impl)
        return x


class WeightNormConvPositions(nn.Module):
    """wav2vec 2.0's relative positional embedding: ONE grouped Conv1d(D -> D, kernel k, ``groups``,
    padding k // 2) under weight normalisation over the kernel axis (one norm scale per kernel tap,
    ``dim=2``), the extra frame an even kernel makes removed, then GELU. The caller adds the output
    to its input. The weight starts N(0, sqrt(4 / (k * D))) with a zero bias, as the reference's
    ``make_conv_pos`` (fairseq ``wav2vec2.py``).

    Args:
        dim: width D (a multiple of groups).
        kernel: the kernel k (128 in wav2vec 2.0 base and large).
        groups: convolution groups (16).
    """

    def __init__(self, dim: int, kernel: int = 128, groups: int = 16):
        super().__init__()
        if dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by the positional conv groups ({groups})")
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel * dim)))
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 - kernel % 2  # padding k // 2 on both sides makes N + 1 frames for an even k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, N, D] channels-last -> positional features [R, N, D]."""
        length = x.shape[1]
        y = self.conv(x.transpose(1, 2))[..., :length]  # [R, D, N + trim] -> [R, D, N]
        return F.gelu(y).transpose(1, 2)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes [H] (fp32): the geometric sequence 2^(-8 i / H), i = 1..H, for a power-of-two H;
    otherwise the slopes of the largest power of two below H followed by every other slope of twice
    that power (Press et al.'s interleaving), as the reference's ``get_alibi``."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def slopes(n: int) -> list[float]:
        if math.log2(n).is_integer():
            start = 2.0 ** (-8.0 / n)
            return [start ** (i + 1) for i in range(n)]
        closest = 2 ** math.floor(math.log2(n))
        return slopes(closest) + slopes(2 * closest)[0::2][: n - closest]

    return torch.tensor(slopes(num_heads), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------


class TokenEmbedding(nn.Module):
    """Token embedding + learned absolute positions -> LayerNorm -> dropout (no embedding scale).

    Args:
        vocab_size: number of token ids.
        embed_dim: width D.
        max_positions: longest sequence (512).
        padding_idx: id of the padding token (its embedding row stays zero; fairseq's pad is 1).
        norm_eps: LayerNorm epsilon.
        dropout: embedding dropout (0.1 in the text presets).

    Positions are padding-aware as fairseq's: a token's position counts the non-padding tokens before
    it, and padding tokens get no positional embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        max_positions: int = 512,
        padding_idx: int | None = 1,
        norm_eps: float = 1e-5,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.max_positions = max_positions
        self.embed_tokens = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.embed_positions = nn.Embedding(max_positions, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"source must be token ids [B, L] int32/int64, got {str(tokens.dtype).replace('torch.', '')} "
                f"of shape {list(tokens.shape)}"
            )
        length = tokens.shape[1]
        if length > self.max_positions:
            raise ValueError(f"source has {length} tokens, more than max_positions={self.max_positions}")
        if padding_mask is None:
            positions = self.embed_positions.weight[:length][None]  # [1, L, D]
        else:
            keep = ~padding_mask
            index = (keep.cumsum(dim=1) - 1).clamp_min(0)  # [B, L]
            positions = self.embed_positions(index) * keep[..., None]  # [B, L, D]
        x = self.embed_tokens(tokens) + positions
        return self.dropout(self.layer_norm(x))
