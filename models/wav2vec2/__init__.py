"""wav2vec 2.0 (Baevski et al., 2020), the speech baseline: the method (``model``), its config and presets
(``config``)."""

from .config import WAV2VEC2_PRESETS, Wav2Vec2Config, wav2vec2_config
from .model import Wav2Vec2, Wav2Vec2Encoder, contrastive_logits, grad_multiply, sample_negatives, standard_architecture

__all__ = [
    "contrastive_logits", "grad_multiply", "sample_negatives", "standard_architecture", "Wav2Vec2",
    "wav2vec2_config", "WAV2VEC2_PRESETS", "Wav2Vec2Config", "Wav2Vec2Encoder",
]  # fmt: skip
