"""What fine-tuning puts at the time-masked frames of an encoder's features (wav2vec 2.0's fine-tuning
regime, which data2vec and data2vec 2.0 reuse: fairseq ``wav2vec2_asr.py``, ``apply_mask: true``).

Each method says how its own pretraining filled masked frames (``Method.mask_fill``), and fine-tuning
keeps that:

- wav2vec 2.0 and data2vec 1.0: their learned mask vector ``mask_emb`` (fairseq ``Wav2Vec2Model.apply_mask``,
  ``Data2VecAudioModel.apply_mask``: ``x[mask] = mask_emb``), spans of at least 2 per utterance;
- data2vec 2.0: fresh N(0, mask_noise_std^2) noise (``modalities/base.py: apply_mask`` with
  ``encoder_zero_mask`` false, which the reference's fine-tuning sets through ``zero_mask: false``),
  at least 1 span (``compute_mask`` passes ``min_masks=1``).

Channel masks zero whole channels in every method (``index_put(x, mask_channel_indices, 0)``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MaskFill"]


class MaskFill(nn.Module):
    """Fills time-masked frames with a learned vector or with noise, and zeroes masked channels.

    Args:
        dim: the feature width D.
        embedding: the learned vector's initial value [D] (copied: a parameter of its own), or None for noise.
        noise_std: the noise's std where there is no vector (0: zeros).
        min_spans: the fewest time-mask spans an utterance gets (the method's ``compute_mask_indices`` call).
    """

    def __init__(self, dim: int, embedding: torch.Tensor | None = None, noise_std: float = 0.0, min_spans: int = 1):
        super().__init__()
        if embedding is not None and tuple(embedding.shape) != (dim,):
            raise ValueError(f"embedding must have shape [{dim}], got {list(embedding.shape)}")
        self.embedding = None if embedding is None else nn.Parameter(embedding.detach().clone().float())
        self.noise_std, self.min_spans = float(noise_std), int(min_spans)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, N, D]; ``mask`` bool [B, N] (True = masked frame), ``channel_mask`` bool [B, D] (True =
        zeroed channel, at every frame); either may be None."""
        if mask is not None:
            if self.embedding is not None:
                fill = self.embedding.to(x.dtype).expand_as(x)
            else:
                fill = torch.randn_like(x) * self.noise_std
            x = torch.where(mask[..., None], fill, x)
        if channel_mask is not None:
            x = x.masked_fill(channel_mask[:, None, :], 0.0)
        return x
