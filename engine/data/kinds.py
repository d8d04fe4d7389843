"""What the engine knows of each modality's data, one entry per modality: how its data set is built,
which model fields the data decides, and the shape of one batch (for synthetic batches and benches).

``run``, ``probe``, ``bench train``, ``bench data`` and ``bench shapes`` look a modality up here
instead of branching on its name; adding a modality's data is one ``DataKind`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import audio, embedded, images, text

__all__ = ["DataKind", "DATA_KINDS", "data_kind"]

# The special ids of the BPE the engine trains (RoBERTa's layout): what synthetic text batches use.
BPE_PAD_ID, BPE_MASK_ID = 1, 4


@dataclass(frozen=True, slots=True)
class DataKind:
    """One modality's data."""

    build: Callable[..., torch.utils.data.Dataset]
    """``build(data_cfg, train)``: the data set of a ``DataConfig`` (the embedded default when its
    ``path`` is None), with the training or the evaluation transforms."""
    model_fields: Callable[..., dict]
    """``model_fields(data_cfg)``: the model config fields this data decides, from the data config
    alone (a built data set's ``model_fields()`` gives the same, with its own tokenizer's ids)."""
    batch_size: Callable[..., int]
    """``batch_size(data_cfg)``: samples in one per-process batch of the longest items."""
    source: Callable[..., torch.Tensor]
    """``source(data_cfg, size, generator, device)``: a synthetic collated source of ``size`` longest
    items (``device="meta"``: shapes only)."""
    unit: str
    """What a data rate counts (images, seconds of audio, token blocks)."""
    amount: Callable[..., float]
    """``amount(source)``: a collated source's size in ``unit``."""
    per_batch: Callable[..., float]
    """``per_batch(data_cfg)``: one per-process batch's size in ``unit``, at most."""


def _image_dataset(cfg, train: bool = True):
    transform = images.PretrainTransform(cfg.crop_size, cfg.crop_scale) if train else images.EvalTransform(cfg.crop_size)
    if cfg.path is None:
        pixels, labels = embedded.digits(size=max(32, cfg.crop_size))
        return images.TensorImageDataset(pixels, labels, transform, [str(d) for d in range(10)])
    return images.ImageFolderDataset(cfg.path, transform)


def _audio_dataset(cfg, train: bool = True):
    manifest = cfg.path if cfg.path is not None else embedded.synthetic_speech(cfg.embedded_utterances)
    return audio.AudioManifestDataset(manifest, min_samples=cfg.min_samples)


def _text_dataset(cfg, train: bool = True):
    files = [embedded.pydoc_text_file()] if cfg.path is None else text.list_text_files(cfg.path)
    folder = text.build_token_cache(files, embedded.cache_dir() / "tokens", cfg.vocab_size, cfg.tokenizer)
    return text.TokenBlockDataset(folder, cfg.block_size)


def _random(shape, generator, device, high: int | None = None) -> torch.Tensor:
    if device == "meta":
        return torch.empty(shape, dtype=torch.long if high else torch.float32, device="meta")
    if high:  # ids past the special tokens
        return torch.randint(5, high, shape, generator=generator)
    return torch.randn(shape, generator=generator)


DATA_KINDS: dict[str, DataKind] = {
    "image": DataKind(
        build=_image_dataset,
        model_fields=lambda cfg: images.model_fields(cfg.crop_size),
        batch_size=lambda cfg: cfg.batch_size,
        source=lambda cfg, size, generator=None, device="cpu": _random(
            (size, 3, cfg.crop_size, cfg.crop_size), generator, device),
        unit="images", amount=lambda source: float(source.shape[0]), per_batch=lambda cfg: cfg.batch_size,
    ),
    "audio": DataKind(
        build=_audio_dataset,
        model_fields=lambda cfg: {},
        batch_size=lambda cfg: max(1, cfg.max_tokens // cfg.max_samples),  # the loader's batch of longest clips
        source=lambda cfg, size, generator=None, device="cpu": _random((size, cfg.max_samples), generator, device),
        unit="audio s", amount=lambda source: source.numel() / audio.SAMPLE_RATE,
        per_batch=lambda cfg: cfg.max_tokens / audio.SAMPLE_RATE,
    ),
    "text": DataKind(
        build=_text_dataset,
        model_fields=lambda cfg: text.model_fields(cfg.vocab_size, BPE_PAD_ID, BPE_MASK_ID, cfg.block_size),
        batch_size=lambda cfg: cfg.batch_size,
        source=lambda cfg, size, generator=None, device="cpu": _random(
            (size, cfg.block_size), generator, device, high=cfg.vocab_size),
        unit="blocks", amount=lambda source: float(source.shape[0]), per_batch=lambda cfg: cfg.batch_size,
    ),
}  # fmt: skip


def data_kind(modality: str) -> DataKind:
    """The entry of ``modality``; ValueError naming the known ones otherwise."""
    if modality not in DATA_KINDS:
        raise ValueError(f"modality must be one of {', '.join(map(repr, DATA_KINDS))}, got {modality!r}")
    return DATA_KINDS[modality]
