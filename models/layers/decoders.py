"""data2vec 2.0's convolutional decoders: ``Decoder2d`` (images) and ``Decoder1d`` (audio, text).

A decoder turns the student's outputs at the kept positions back into a prediction at every position:

    x   = input_dropout(x_kept)                                  [R, K, D]
    x   = scatter_tokens(x, ids_keep, N, fill="noise", 0.01)      [R, N, D]  fresh N(0, 0.01^2) noise at
                                                                  masked positions, no positions added
    x   = conv_block(x) for each of ``layers`` blocks              [R, N, C]  "same" grouped conv (1-D over
                                                                  time, 2-D over the patch grid) -> LayerNorm
                                                                  without affine -> GELU, + block input
                                                                  only when residual and the widths match
    out = projection head                                         [R, N, D]

Projection heads: ``Decoder2d`` always ends in one Linear(C -> D). ``Decoder1d`` with
``projection_layers = P`` has P - 1 [Linear + GELU] layers, the first widening by
``projection_ratio``, then a Linear to D (text: Linear(768 -> 1536) + GELU + Linear(1536 -> D)).

Every released configuration (fairseq ``examples/data2vec/config/v2/*``):

    images base   2-D  C 768,  k 3, 6 layers, groups 16, residual, Linear 768 -> 768
    images large  2-D  C 1024, k 5, 3 layers, groups 16, residual, Linear 1024 -> 1024
    images huge   2-D  C 1024, k 5, 3 layers, groups 16, residual (not on the first: 1280 -> 1024)
    audio base    1-D  C 384,  k 7, 4 layers, groups 16, residual (not on the first: 768 -> 384)
    audio large   1-D  C 768,  k 7, 4 layers, groups 16, residual (not on the first: 1024 -> 768)
    text          1-D  C 768,  k 9, 5 layers, groups 1, no residual, 2 projection layers (ratio 2)

Init: the convolutions keep PyTorch's default init (the reference's BERT init touches only Linear and
Embedding); ``reset_projection`` restores PyTorch's default init of the head after the model-wide
BERT init, as the image and audio encoders of the reference do (the text one does not).

Reference: fairseq ``examples/data2vec/models/modalities/modules.py: Decoder1d, Decoder2d`` and
``base.py: ModalitySpecificEncoder.decoder_input``; data2vec 2.0, Baevski et al., ICML 2023.
"""

from __future__ import annotations

import torch
from torch import nn

from d2v2.kernels.conv_block1d import conv_block1d
from d2v2.kernels.conv_block2d import conv_block2d
from d2v2.kernels.scatter_tokens import scatter_tokens

__all__ = ["Decoder1d", "Decoder2d"]


class _ConvDecoder(nn.Module):
    """The parts both decoders share: input dropout, noise fill, conv blocks, head."""

    def __init__(
        self,
        conv: type[nn.Conv1d] | type[nn.Conv2d],
        input_dim: int,
        decoder_dim: int,
        kernel_size: int,
        layers: int,
        groups: int,
        residual: bool,
        projection_layers: int,
        projection_ratio: float,
        input_dropout: float,
        mask_noise_std: float,
        impl: str,
    ):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"decoder kernel_size must be odd (\"same\" padding), got {kernel_size}")
        if layers < 1:
            raise ValueError(f"decoder layers must be >= 1, got {layers}")
        for name, channels in (("input_dim", input_dim), ("decoder_dim", decoder_dim)):
            if channels % groups != 0:
                raise ValueError(f"decoder {name} ({channels}) must be divisible by groups ({groups})")
        if projection_layers < 1:
            raise ValueError(f"projection_layers must be >= 1, got {projection_layers}")
        self.groups = groups
        self.residual = residual
        self.mask_noise_std = mask_noise_std
        self.impl = impl
        self.input_dropout = nn.Dropout(input_dropout)
        widths = [input_dim] + [decoder_dim] * layers
        self.blocks = nn.ModuleList(
            conv(widths[i], decoder_dim, kernel_size, padding=kernel_size // 2, groups=groups) for i in range(layers)
        )
        head: list[nn.Module] = []
        width = decoder_dim
        for i in range(projection_layers - 1):
            wider = int(width * projection_ratio) if i == 0 else width
            head += [nn.Linear(width, wider), nn.GELU()]
            width = wider
        head.append(nn.Linear(width, input_dim))
        self.proj = head[0] if len(head) == 1 else nn.Sequential(*head)

    def decoder_input(self, x: torch.Tensor, ids_keep: torch.Tensor, length: int, check_ids: bool = True) -> torch.Tensor:
        """[R, K, D] kept outputs -> [R, N, D]: dropout, then the kept rows at ids_keep and noise elsewhere.
        ``check_ids=False``: the caller has validated ids_keep (no range check, no host sync).

        Under autocast the input is cast to the autocast dtype first: the fused conv blocks are not
        autocast ops, and the encoder's final LayerNorm hands over fp32.
        """
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        return scatter_tokens(
            self.input_dropout(x), ids_keep, length, fill="noise", noise_std=self.mask_noise_std, impl=self.impl,
            check_ids=check_ids,
        )

    def reset_projection(self) -> None:
        """PyTorch's default init for every Linear of the head (the reference's DecoderBase.reset_parameters)."""
        for module in self.proj.modules() if isinstance(self.proj, nn.Sequential) else (self.proj,):
            if isinstance(module, nn.Linear):
                module.reset_parameters()


class Decoder1d(_ConvDecoder):
    """1-D convolutional decoder over time (audio, text).

    Args:
        input_dim: encoder width D (the decoder's input and output width).
        decoder_dim: conv width C.
        kernel_size: odd conv kernel (7 audio, 9 text).
        layers: number of conv blocks.
        groups: conv groups (16 audio, 1 text).
        residual: add each block's input when the widths match.
        projection_layers: P, the head's Linear count (1 audio, 2 text).
        projection_ratio: widening of the head's first Linear when P > 1 (2.0 text).
        input_dropout: dropout on the encoder outputs before the noise fill (0.1 audio, text).
        mask_noise_std: std of the noise at masked positions (0.01).
        impl: kernel implementation for scatter_tokens and conv_block1d.
    """

    def __init__(
        self,
        input_dim: int,
        decoder_dim: int,
        kernel_size: int,
        layers: int,
        groups: int,
        residual: bool = True,
        projection_layers: int = 1,
        projection_ratio: float = 2.0,
        input_dropout: float = 0.0,
        mask_noise_std: float = 0.01,
        impl: str = "auto",
    ):
        super().__init__(
            nn.Conv1d, input_dim, decoder_dim, kernel_size, layers, groups, residual,
            projection_layers, projection_ratio, input_dropout, mask_noise_std, impl,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor, length: int, check_ids: bool = True) -> torch.Tensor:
        """x [R, K, D] student outputs at the kept positions ids_keep [R, K] -> prediction [R, length, D]."""
        x = self.decoder_input(x, ids_keep, length, check_ids)  # [R, N, D]
        for conv in self.blocks:
            x = conv_block1d(x, conv.weight, conv.bias, self.groups, residual=self.residual, impl=self.impl)
        return self.proj(x)


class Decoder2d(_ConvDecoder):
    """2-D convolutional decoder over the patch grid (images). Args as ``Decoder1d`` plus ``grid``
    (H, W), the patch grid; the head is always one Linear(decoder_dim -> input_dim)."""

    def __init__(
        self,
        input_dim: int,
        decoder_dim: int,
        kernel_size: int,
        layers: int,
        groups: int,
        grid: tuple[int, int],
        residual: bool = True,
        input_dropout: float = 0.0,
        mask_noise_std: float = 0.01,
        impl: str = "auto",
    ):
        super().__init__(
            nn.Conv2d, input_dim, decoder_dim, kernel_size, layers, groups, residual,
            1, 1.0, input_dropout, mask_noise_std, impl,
        )  # fmt: skip
        self.grid = (int(grid[0]), int(grid[1]))

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor, length: int, check_ids: bool = True) -> torch.Tensor:
        """x [R, K, D] student outputs at the kept patches ids_keep [R, K] -> prediction [R, H*W, D]."""
        if length != self.grid[0] * self.grid[1]:
            raise ValueError(f"length ({length}) must equal the decoder grid {self.grid[0]}x{self.grid[1]}")
        x = self.decoder_input(x, ids_keep, length, check_ids)  # [R, H*W, D], row-major grid
        for conv in self.blocks:
            x = conv_block2d(x, conv.weight, conv.bias, self.groups, self.grid, residual=self.residual, impl=self.impl)
        return self.proj(x)
