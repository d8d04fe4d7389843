"""MAE (He et al., 2022), the image baseline: the method (``model``), its config and presets (``config``)."""

from .config import MAE_PRESETS, MAEConfig, mae_config
from .model import MAE, MAEDecoder, MAEEncoder, grid_random_mask, init_mae_params, patchify, standard_architecture

__all__ = [
    "grid_random_mask", "init_mae_params", "MAE", "mae_config", "MAE_PRESETS", "MAEConfig", "MAEDecoder",
    "MAEEncoder", "patchify", "standard_architecture",
]  # fmt: skip
