"""conv_block1d: one block of data2vec 2.0's 1-D convolutional decoder (audio, text), fused.

Contract
    conv_block1d(x, weight, bias, groups, residual=True, impl="auto") -> out
    x      [R, N, C]            channels-last sequence (fp32, bf16 or fp16)
    weight [C_out, C/groups, k] as torch.nn.Conv1d's weight; k odd
    bias   [C_out] or None
    out    [R, N, C_out]        x's dtype

    y   = Conv1d(x, weight, bias, groups=groups, padding=k // 2)      ("same", zeros outside)
    out = GELU(LayerNorm_C_out(y)) + x                                 (residual and C == C_out)
    LayerNorm over the channels without affine parameters, eps 1e-5; GELU is the exact erf form.
    Without the residual (residual=False, or C != C_out as in the first audio block) out has no "+ x".

Gradients flow to x, weight and bias (weight and bias grads in their own dtypes, reduced
deterministically). Weight and bias may have any float dtype; they are cast to x's dtype for the
product, as autocast does, and the accumulation is fp32.

Reference: data2vec 2.0 (Baevski et al., 2022, "Efficient Self-supervised Learning with Contextualized
Target Representations for Vision, Speech and Language"), fairseq ``examples/data2vec/models/modalities/
modules.py: Decoder1d``: Conv1d(k, padding k//2, groups) -> LayerNorm without affine -> GELU, plus the
block input when the channel counts match. Released configs: audio base k7 groups 16 (768 -> 384 without
residual, then 384 -> 384 with), audio large k7 groups 16 (1024 -> 768, then 768 -> 768), text k9
groups 1, 768 -> 768 without residual.

The Triton implementation (kernels, launchers, autograd) lives in ``_conv_block.py`` and is shared with
conv_block2d: the 1-D block runs as the 2-D block on a (1, N) grid with a (1, k) kernel.

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

import torch
import torch.nn.functional as F

from ._conv_block import ConvBlockFunction, check_conv_block_args, norm_gelu_residual_ref
from ._utils import resolve_impl


def conv_block1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int, residual: bool = True
) -> torch.Tensor:
    """PyTorch reference: channels-first Conv1d, LayerNorm over channels, GELU, optional residual."""
    bias = None if bias is None else bias.to(x.dtype)
    y = F.conv1d(x.transpose(1, 2), weight.to(x.dtype), bias, padding=weight.shape[-1] // 2, groups=groups)
    return norm_gelu_residual_ref(y.transpose(1, 2), x, residual)  # [R, N, C_out]


def conv_block1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    residual: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Grouped "same" Conv1d -> LayerNorm (no affine) -> GELU (+ x) on channels-last x [R, N, C].

    See the module docstring for the contract.
    """
    check_conv_block_args(x, weight, bias, groups, residual, spatial_dims=1)
    if resolve_impl(impl, x, weight, bias) == "torch":
        return conv_block1d_ref(x, weight, bias, groups, residual)
    # [C_out, C/groups, k] -> [C_out, C/groups, 1, k]: the 1-D block is the 2-D block on a (1, N) grid.
    return ConvBlockFunction.apply(x, weight.unsqueeze(2), bias, groups, (1, x.shape[1]), residual)
