"""data2vec 2.0 (Baevski et al., 2023): the method (``model``), its encoder (``encoder``), its config and
presets (``config``)."""

from .config import DATA2VEC2_PRESETS, Data2Vec2Config, data2vec2_config
from .encoder import Data2Vec2Encoder
from .model import Data2Vec2, standard_architecture

__all__ = [
    "Data2Vec2", "data2vec2_config", "DATA2VEC2_PRESETS", "Data2Vec2Config", "Data2Vec2Encoder",
    "standard_architecture",
]  # fmt: skip
