"""Scaling the gradient that flows back into a part of a model.

wav2vec 2.0 scales the gradient into its CNN (``feature_grad_mult``, fairseq ``GradMultiply``); data2vec
2.0 scales the one into each modality's local encoder (``local_grad_mult``), where 0 runs that encoder
without autograd, so its weights stay as they are.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["grad_multiply", "with_grad_mult"]


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def grad_multiply(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x unchanged, with the gradient flowing back through it multiplied by ``scale``."""
    return x if scale == 1.0 else _GradMultiply.apply(x, scale)


def with_grad_mult(fn: Callable[..., torch.Tensor], scale: float, *args) -> torch.Tensor:
    """``fn(*args)`` with the gradient into it times ``scale``; 0 runs it under ``no_grad`` (fairseq's
    ``ModalitySpecificEncoder.local_features``): no activations kept, no gradient, its weights unchanged."""
    if scale == 0:
        with torch.no_grad():
            return fn(*args)
    return grad_multiply(fn(*args), scale)
