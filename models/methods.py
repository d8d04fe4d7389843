"""The methods by name: how the engine, probe and benches build a method without importing its class.

``method_config(name, modality, size, **overrides)`` gives a method's released preset as its config
dataclass; ``build_method(name, config)`` the ``Method`` module. Each method's config dataclass and
presets live beside it (``<method>_config.py``); registering a method is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import data2vec1, data2vec2, mae, mlm, wav2vec2
from .data2vec1.config import Data2Vec1Config, data2vec1_config
from .data2vec2.config import Data2Vec2Config, data2vec2_config
from .mae.config import MAEConfig, mae_config
from .method import Method
from .mlm.config import MLMConfig, mlm_config
from .wav2vec2.config import Wav2Vec2Config, wav2vec2_config

__all__ = ["MethodEntry", "METHODS", "DEFAULT_METHOD", "method_entry", "method_config", "build_method"]

DEFAULT_METHOD = "data2vec2"
"""The method a recipe or checkpoint config that names none is trained with."""


@dataclass(frozen=True, slots=True)
class MethodEntry:
    """One registered method."""

    model: Callable[..., Method]
    """The Method class, built from its config."""
    config: type
    """The config dataclass (every field documented)."""
    preset: Callable[..., object]
    """``preset(modality, size, **overrides) -> config``: the released values."""
    description: str
    """One line for listings."""
    export: Callable[..., tuple[str | None, str]]
    """``export(config) -> (target, why)``: the standard class (a name of the engine's export targets)
    the encoder is with that config, or None and why not (d2v2's own format then)."""


METHODS: dict[str, MethodEntry] = {
    "data2vec2": MethodEntry(data2vec2.Data2Vec2, Data2Vec2Config, data2vec2_config,
                             "data2vec 2.0 (Baevski et al., 2022)", data2vec2.standard_architecture),
    "data2vec": MethodEntry(data2vec1.Data2Vec1, Data2Vec1Config, data2vec1_config,
                            "data2vec 1.0 (Baevski et al., 2022)", data2vec1.standard_architecture),
    "mae": MethodEntry(mae.MAE, MAEConfig, mae_config, "MAE, masked autoencoder for images (He et al., 2022)",
                       mae.standard_architecture),
    "mlm": MethodEntry(mlm.MLM, MLMConfig, mlm_config, "RoBERTa-style masked language model (Liu et al., 2019)",
                       mlm.standard_architecture),
    "wav2vec2": MethodEntry(wav2vec2.Wav2Vec2, Wav2Vec2Config, wav2vec2_config,
                            "wav2vec 2.0, speech (Baevski et al., 2020)", wav2vec2.standard_architecture),
}  # fmt: skip


def method_entry(name: str) -> MethodEntry:
    """The registry entry of ``name``; ValueError listing the known methods otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_config(name: str, modality: str, size: str, **overrides):
    """The released preset of method ``name`` for (modality, size), with ``overrides`` applied."""
    return method_entry(name).preset(modality, size, **overrides)


def build_method(name: str, config) -> Method:
    """The method module of ``name`` built from its config."""
    return method_entry(name).model(config)
