"""The RoBERTa-style masked language model, the text baseline: the method (``model``), its config and
presets (``config``)."""

from .config import MLM_PRESETS, MLMConfig, mlm_config
from .model import MLM, LMHead, MLMEncoder, corrupt_tokens, standard_architecture

__all__ = [
    "corrupt_tokens", "LMHead", "MLM", "mlm_config", "MLM_PRESETS", "MLMConfig", "MLMEncoder",
    "standard_architecture",
]  # fmt: skip
