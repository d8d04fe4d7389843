"""conv_block2d: one block of data2vec 2.0's 2-D convolutional decoder (images), fused.

Contract
    conv_block2d(x, weight, bias, groups, grid, residual=True, impl="auto") -> out
    x      [R, H*W, C]              channels-last tokens of an (H, W) grid, row-major (p = h*W + w)
    weight [C_out, C/groups, k, k]  as torch.nn.Conv2d's weight; odd k (odd kh != kw also works)
    bias   [C_out] or None
    grid   (H, W) with H*W == x.shape[1]
    out    [R, H*W, C_out]          x's dtype

    y   = Conv2d(x as [R, C, H, W], weight, bias, groups=groups, padding=k // 2)   ("same", zeros)
    out = GELU(LayerNorm_C_out(y)) + x                                 (residual and C == C_out)
    LayerNorm over the channels without affine parameters, eps 1e-5; GELU is the exact erf form.
    Without the residual (residual=False, or C != C_out as in the first huge-model block) no "+ x".

Gradients flow to x, weight and bias (weight and bias grads in their own dtypes, reduced
deterministically). Weight and bias may have any float dtype; they are cast to x's dtype for the
product, as autocast does, and the accumulation is fp32.

Reference: data2vec 2.0 (Baevski et al., 2022), fairseq ``examples/data2vec/models/modalities/modules.py:
Decoder2d``: the tokens are reshaped to [B, C, H, W], then Conv2d(k, padding k//2, groups) -> LayerNorm
over channels without affine -> GELU, plus the block input when the channel counts match. Released
configs: images base k3 groups 16 C=768 on 14x14; large k5 groups 16 C=1024 on 14x14; huge k5 groups 16
1280 -> 1024 (no residual) then 1024 -> 1024, on 16x16 for patch 14.

The Triton implementation (kernels, launchers, autograd) lives in ``_conv_block.py`` and is shared with
conv_block1d.

Limits
- Odd kernel sizes only (even kernels need fairseq's SamePad trim, which no released config uses).
- Every channel count works; the tensor-core tiles are at least 16 wide, so per-group channel counts
  below 16 (and the tails of counts that are not a multiple of the tile) are padded with masked zeros:
  correct, but tiny groups waste most of each tile.
- C_out is at most 65536 (one row of the LayerNorm must fit a program).
- fp32 inputs use TF32 in the conv product when torch.backends.cudnn.allow_tf32 is True (PyTorch's
  own default for convolutions); set it False for exact fp32.
- x's dtype sets the compute dtype: under autocast, pass x already in bf16 to get the bf16 tensor-core
  path (an fp32 x runs in TF32 even inside an autocast region).
- Verified by the interpreted tests on CPU and compiled for sm_90 (H100) with triton 3.9; not yet run or
  timed on a GPU, and the autotune candidates are unmeasured guesses (see ``_conv_block.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._conv_block import ConvBlockFunction, check_conv_block_args, check_grid, norm_gelu_residual_ref
from ._utils import resolve_impl


def conv_block2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    grid: Sequence[int],
    residual: bool = True,
) -> torch.Tensor:
    """PyTorch reference: channels-first Conv2d, LayerNorm over channels, GELU, optional residual."""
    rows, _, channels = x.shape
    height, width = grid
    images = x.transpose(1, 2).reshape(rows, channels, height, width)
    bias = None if bias is None else bias.to(x.dtype)
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    y = F.conv2d(images, weight.to(x.dtype), bias, padding=padding, groups=groups)  # [R, C_out, H, W]
    return norm_gelu_residual_ref(y.flatten(2).transpose(1, 2), x, residual)  # [R, H*W, C_out]


def conv_block2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    grid: Sequence[int],
    residual: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Grouped "same" Conv2d -> LayerNorm (no affine) -> GELU (+ x) on channels-last x [R, H*W, C].

    See the module docstring for the contract.
    """
    check_conv_block_args(x, weight, bias, groups, residual, spatial_dims=2)
    grid = check_grid(grid, x.shape[1])
    if resolve_impl(impl, x, weight, bias) == "torch":
        return conv_block2d_ref(x, weight, bias, groups, grid, residual)
    return ConvBlockFunction.apply(x, weight, bias, groups, grid, residual)
