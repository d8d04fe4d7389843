"""From a DataConfig to a data set and a resumable, masking DataLoader."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from ..training.signals import ignore_in_worker
from . import audio, images, text
from .kinds import data_kind
from .loader import DataPosition, EpochBatchSampler, Masker, MaskingCollater, SkipCorrupt


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the samples come from and how they are batched."""

    path: str | None = None
    """ImageFolder tree or flat folder (images), manifest TSV or its folder (audio), text file or
    folder (text). None = the recipe's embedded default data (digits, synthetic speech, pydoc prose)."""
    batch_size: int = 16
    """Samples per micro-batch (images, text); audio batches by ``max_tokens`` instead."""
    crop_size: int = 224
    """Images: RandomResizedCrop output size (the model's image size)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    max_tokens: int = 1_000_000
    """Audio: the most samples a micro-batch holds (count x longest clip)."""
    min_samples: int = 32_000
    """Audio: utterances shorter than this are left out (2 s at 16 kHz)."""
    max_samples: int = 320_000
    """Audio: clips are cropped to at most this many samples (20 s)."""
    block_size: int = 512
    """Text: tokens per sample."""
    vocab_size: int = 50_265
    """Text: BPE vocabulary size when a tokenizer is trained on the data."""
    tokenizer: str | None = None
    """Text: a tokenizer.json to use instead of training one."""
    num_workers: int = 2
    embedded_utterances: int = 240
    """Audio: how many utterances the embedded synthetic speech set has."""

    def __post_init__(self):
        for name in ("batch_size", "crop_size", "block_size", "max_tokens", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


def build_dataset(modality: str, cfg: DataConfig, train: bool = True):
    """The data set of ``cfg`` for ``modality`` (the embedded default when ``cfg.path`` is None)."""
    return data_kind(modality).build(cfg, train)


def fingerprint(dataset, path: str) -> dict | None:
    """What identifies the data of ``path`` wherever it lies: the sample count and a digest of the files
    (names relative to the data's folder) and their labels or lengths; the token count and tokenizer of
    text. None for embedded data, which does not move. A continued run accepts moved data by it."""
    if isinstance(dataset, images.ImageFolderDataset):
        items = [os.path.relpath(p, path) for p in dataset.paths] + list(dataset.labels) + list(dataset.classes)
    elif isinstance(dataset, audio.AudioManifestDataset):
        items = list(dataset.paths) + dataset.sizes.tolist()
    elif isinstance(dataset, text.TokenBlockDataset):
        tokenizer = hashlib.sha1((dataset.folder / "tokenizer.json").read_bytes()).hexdigest()
        items = [dataset.meta["num_tokens"], dataset.vocab_size, tokenizer]
    else:
        return None
    return {"samples": len(dataset), "digest": hashlib.sha1(json.dumps(items).encode()).hexdigest()}


def batches_by_size(dataset) -> bool:
    """True for data sets of variable-length samples (audio), batched by total samples instead of a count."""
    return getattr(dataset, "sizes", None) is not None


def build_loader(
    dataset,
    cfg: DataConfig,
    seed: int,
    masker: Masker | None,
    start: DataPosition,
    rank: int = 0,
    world_size: int = 1,
) -> torch.utils.data.DataLoader:
    """An endless DataLoader from data position ``start``; ``masker`` (the method's modality, or None)
    makes each batch's masks in the loader workers.

    With ``world_size`` > 1 it yields rank ``rank``'s share of the global batches (``EpochBatchSampler``).
    """
    shard = {"start": start, "rank": rank, "world_size": world_size}
    if batches_by_size(dataset):
        sampler = EpochBatchSampler(
            len(dataset), seed, sizes=dataset.sizes, max_tokens=cfg.max_tokens, max_samples=cfg.max_samples, **shard
        )
    else:
        sampler = EpochBatchSampler(len(dataset), seed, batch_size=cfg.batch_size, **shard)
    collate = MaskingCollater(seed, masker, crop_audio_to=cfg.max_samples if batches_by_size(dataset) else None)
    return torch.utils.data.DataLoader(
        SkipCorrupt(dataset),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        worker_init_fn=ignore_in_worker,
        # The loader's own generator, so creating it never advances the global torch RNG
        # (whose state the checkpoint restores for the model's dropout and decoder noise).
        generator=torch.Generator().manual_seed(seed),
    )
