"""data2vec 1.0 (Baevski et al., 2022): the method (``model``), its config and presets (``config``)."""

from .config import DATA2VEC1_PRESETS, Data2Vec1Config, data2vec1_config
from .model import Data2Vec1, Data2Vec1Encoder, masker_for, standard_architecture

__all__ = [
    "Data2Vec1", "data2vec1_config", "DATA2VEC1_PRESETS", "Data2Vec1Config", "Data2Vec1Encoder", "masker_for",
    "standard_architecture",
]  # fmt: skip
