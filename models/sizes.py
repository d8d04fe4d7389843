"""The encoder size table: width, heads and depth of every model size, for every modality, in one place.

data2vec 2.0 splits the transformer into a modality "prenet" (blocks before the shared stack, not used
for targets) and the shared ``depth`` blocks whose FFN outputs make the targets; a method without that
split (MAE, data2vec 1.0, wav2vec 2.0, MLM baselines) uses ``prenet_depth + depth`` plain blocks, so
every method compares at equal size. The MLP is 4 x D everywhere.

Released sizes (fairseq ``examples/data2vec/config/v2/*_task.yaml``): images base 768/12/2+10, large 1024/16/0+24,
huge 1280/16/0+32 (patch 14); audio base 768/12/0+12, large 1024/16/8+16; text base 768/12/0+12,
large 1024/16/0+24. ``tiny`` (and ``small`` for images, ViT-S) are ours, for CPU runs and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["EncoderSize", "ENCODER_SIZES", "encoder_size", "count_parameters"]


@dataclass(frozen=True, slots=True)
class EncoderSize:
    """Transformer dimensions of one model size."""

    embed_dim: int
    """Model width D."""
    num_heads: int
    """Attention heads (D / heads = 64 for every released size)."""
    prenet_depth: int
    """Modality-specific blocks before the shared stack (not used for the targets)."""
    depth: int
    """Shared blocks; the teacher's top-k of these make the targets."""

    @property
    def total_depth(self) -> int:
        """All blocks: what a method without a prenet uses."""
        return self.prenet_depth + self.depth


ENCODER_SIZES: dict[str, dict[str, EncoderSize]] = {
    "image": {
        "tiny": EncoderSize(embed_dim=64, num_heads=4, prenet_depth=1, depth=2),
        "small": EncoderSize(embed_dim=384, num_heads=6, prenet_depth=2, depth=10),
        "base": EncoderSize(embed_dim=768, num_heads=12, prenet_depth=2, depth=10),
        "large": EncoderSize(embed_dim=1024, num_heads=16, prenet_depth=0, depth=24),
        "huge": EncoderSize(embed_dim=1280, num_heads=16, prenet_depth=0, depth=32),
    },
    "audio": {
        "tiny": EncoderSize(embed_dim=64, num_heads=4, prenet_depth=1, depth=2),
        "base": EncoderSize(embed_dim=768, num_heads=12, prenet_depth=0, depth=12),
        "large": EncoderSize(embed_dim=1024, num_heads=16, prenet_depth=8, depth=16),
    },
    "text": {
        "tiny": EncoderSize(embed_dim=64, num_heads=4, prenet_depth=0, depth=2),
        "base": EncoderSize(embed_dim=768, num_heads=12, prenet_depth=0, depth=12),
        "large": EncoderSize(embed_dim=1024, num_heads=16, prenet_depth=0, depth=24),
    },
}


def encoder_size(modality: str, size: str) -> EncoderSize:
    """The size table's entry for (modality, size); ValueError listing the valid names otherwise."""
    if modality not in ENCODER_SIZES:
        raise ValueError(f"modality must be one of {sorted(ENCODER_SIZES)}, got {modality!r}")
    sizes = ENCODER_SIZES[modality]
    if size not in sizes:
        raise ValueError(f"size for {modality} must be one of {list(sizes)}, got {size!r}")
    return sizes[size]


def count_parameters(module: nn.Module, trainable: bool | None = None) -> int:
    """Number of parameter elements: all (None), only trainable (True) or only frozen (False) ones."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
