"""Labelled splits for fine-tuning, and their resumable loaders.

A task's data is two data sets of ``(index, sample seed) -> {"source", "label"}`` items, train and
valid, with the class names (None for a regression target). Training batches come from the
pretraining loader's ``EpochBatchSampler`` (every random choice a pure function of the run seed and
the data position, so resume is exact) through ``LabelledCollater``: images stacked, audio and text
padded to the batch's longest sample with a ``padding_mask`` (True = padding), and for images mixup /
cutmix with label smoothing (timm's ``Mixup``, batch mode, as the reference's ImageNet fine-tuning
uses it), or through the task's own collater (speech recognition's ``speech.TranscriptCollater``).
Batches hold ``batch_size`` samples, or, where the task gives each item's size, up to
``max_batch_samples`` samples (speech recognition). Validation batches run in order, unaugmented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import audio, images
from ..data.augment import parse_rand_augment
from ..data.base import CorruptSample, derive_seed
from ..data.loader import DataPosition, EpochBatchSampler, SkipCorrupt
from ..training.signals import ignore_in_worker


@dataclass(kw_only=True, slots=True)
class FinetuneDataConfig:
    """Where the labelled samples come from, how they are batched and augmented."""

    path: str | None = None
    """The task's labelled data (an ImageFolder with train/ and val/; an audio manifest with its .lbl, or
    class folders; a GLUE task folder, or a CSV / JSONL of text[,text_pair],label). None = the embedded
    set: the digits, the spoken keywords, the pydoc topics."""
    valid_fraction: float = 0.2
    """Where the data has no validation split: this fraction of it, drawn once with ``split_seed``."""
    split_seed: int = 0
    batch_size: int = 32
    """Samples per micro-batch."""
    num_workers: int = 2
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Images: RandomResizedCrop's area range (0.08-1, the reference's ImageNet fine-tuning)."""
    hflip: float = 0.5
    """Images: probability of a horizontal flip."""
    rand_augment: str = ""
    """Images: RandAugment on each training crop, timm's spec ``rand-m<magnitude>[-n<ops>][-mstd<std>][-inc<0|1>]
    [-p<prob>]`` (``rand-m9-mstd0.5-inc1`` in the reference's ImageNet fine-tuning; "" = off; ``augment``)."""
    random_erasing: float = 0.0
    """Images: probability of erasing one rectangle of each normalised training crop with noise (timm's
    ``re_prob``, mode pixel, one box; 0.25 in the reference; 0 = off)."""
    mixup: float = 0.0
    """Images: mixup's Beta(alpha, alpha) (0.8 in the reference's ImageNet fine-tuning; 0 = off)."""
    cutmix: float = 0.0
    """Images: cutmix's Beta(alpha, alpha) (1.0 in the reference; 0 = off)."""
    mix_prob: float = 1.0
    """Images: probability that a batch is mixed at all (the reference's ``mixup_prob``)."""
    switch_prob: float = 0.5
    """Images: with both on, probability of cutmix instead of mixup for a batch."""
    max_samples: int = 16_000 * 20
    """Audio: clips longer than this many samples are cropped (at random in training, from the start
    in validation)."""
    max_tokens: int = 512
    """Text: sequences (``<s>`` and ``</s>`` included) are cut to this many tokens."""
    max_batch_samples: int = 0
    """Speech recognition: the most audio samples a micro-batch holds (count x longest utterance, fairseq's
    ``max_tokens``), utterances of similar length batched together; 0 = ``batch_size`` utterances."""
    valid_split: str = "valid"
    """Speech recognition: the manifest beside ``train.tsv`` that is the validation split (``<name>.tsv``
    with its labels; the released configs validate on ``dev_other``); where there is none,
    ``valid_fraction`` of the training utterances are held out."""

    def __post_init__(self):
        if not 0 < self.valid_fraction < 1:
            raise ValueError(f"data.valid_fraction must lie in (0, 1), got {self.valid_fraction}")
        for name in ("batch_size", "max_samples", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_samples < 0:
            raise ValueError(f"data.max_batch_samples must be >= 0 (0 = batch_size utterances), got {self.max_batch_samples}")
        if not self.valid_split or "/" in self.valid_split:
            raise ValueError(f"data.valid_split must be a manifest name beside train.tsv (e.g. dev_other), got {self.valid_split!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {list(self.crop_scale)}")
        if self.rand_augment:
            parse_rand_augment(self.rand_augment, "data.rand_augment")
        for name in ("hflip", "random_erasing", "mix_prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"data.{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0 (0 = off), got {getattr(self, name)}")


@dataclass
class LabelledSplits:
    """A task's train and valid data sets, its classes (None: regression) and what the data is."""

    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset
    classes: list[str] | None
    description: str
    pad_id: int | None = None
    """The padding value of the sources (text: the tokenizer's <pad>; audio: 0.0; images: None)."""
    extra: dict = field(default_factory=dict)
    """What the metrics need to know (``glue_task``)."""
    train_sizes: list[int] | None = None
    """Audio samples of each training item, where batches are made by total samples (speech recognition)."""
    valid_sizes: list[int] | None = None
    """The same for the validation items."""

    @property
    def num_outputs(self) -> int:
        return 1 if self.classes is None else len(self.classes)


def split_indices(num: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) indices of ``num`` samples: a fixed-seed permutation, ``valid_fraction`` held out."""
    order = np.random.default_rng(seed).permutation(num)
    n_valid = min(num - 1, max(1, int(round(num * valid_fraction))))
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


# -- data sets ---------------------------------------------------------------------------------------


class Subset(torch.utils.data.Dataset):
    """The samples ``indices`` of a ``(index, seed)`` data set."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        return self.dataset[(self.indices[index], seed)]


class Normalized:
    """Images already at the model's size, only normalised (the embedded digits' validation)."""

    def __init__(self):
        self.mean = torch.tensor(images.IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(images.IMAGENET_STD).view(3, 1, 1)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (img - self.mean) / self.std


class LabelledClips(torch.utils.data.Dataset):
    """Audio files with a label each: normalised waveforms, cropped to ``max_samples`` (at random
    when ``train``, else from the start). Unreadable files raise ``CorruptSample`` (skipped, counted)."""

    def __init__(self, paths: list[str], labels, max_samples: int, train: bool):
        self.paths, self.labels, self.max_samples, self.train = paths, list(labels), max_samples, train

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        wave = audio.normalize_waveform(audio.read_waveform(self.paths[index]))
        start = 0
        if wave.shape[0] > self.max_samples and self.train:
            start = int(np.random.default_rng(seed).integers(0, wave.shape[0] - self.max_samples + 1))
        return {"source": torch.from_numpy(np.ascontiguousarray(wave[start : start + self.max_samples])),
                "label": self.labels[index]}  # fmt: skip


class LabelledTokens(torch.utils.data.Dataset):
    """Token id sequences (already wrapped in ``<s>`` ... ``</s>``) with a label each (int or float)."""

    def __init__(self, sequences: list[list[int]], labels):
        self.sequences, self.labels = sequences, list(labels)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, _ = item
        return {"source": torch.tensor(self.sequences[index], dtype=torch.long), "label": self.labels[index]}


# -- batches -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mixing:
    """Mixup / cutmix settings (``FinetuneDataConfig``) with the label smoothing of the soft targets."""

    mixup: float
    cutmix: float
    prob: float
    switch_prob: float
    smoothing: float
    num_classes: int

    @property
    def active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0


def mix_batch(source: torch.Tensor, labels: torch.Tensor, mixing: Mixing, rng: np.random.Generator):
    """timm's ``Mixup`` in batch mode: each sample mixed with the batch reversed, by mixup (a convex
    blend) or cutmix (a box pasted, ``lam`` corrected to its area), targets blended alike from
    label-smoothed one-hot vectors. Returns (source, target [B, C])."""
    off = mixing.smoothing / mixing.num_classes
    one_hot = torch.full((labels.shape[0], mixing.num_classes), off).scatter_(1, labels[:, None], 1.0 - mixing.smoothing + off)
    lam = 1.0
    if rng.random() < mixing.prob:
        use_cutmix = mixing.cutmix > 0 and (mixing.mixup <= 0 or rng.random() < mixing.switch_prob)
        lam = float(rng.beta(mixing.cutmix, mixing.cutmix) if use_cutmix else rng.beta(mixing.mixup, mixing.mixup))
        flipped = source.flip(0)
        if use_cutmix:
            height, width = source.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(height * cut), int(width * cut)
            cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
            top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
            left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
            source = source.clone()
            source[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        else:
            source = source * lam + flipped * (1.0 - lam)
    return source, one_hot * lam + one_hot.flip(0) * (1.0 - lam)


def pad_batch(sources: list[torch.Tensor], pad_value) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequences of different lengths -> ([B, longest], padding mask [B, longest] or None when all are equal)."""
    longest = max(s.shape[0] for s in sources)
    if all(s.shape[0] == longest for s in sources):
        return torch.stack(sources), None
    out = torch.full((len(sources), longest), pad_value, dtype=sources[0].dtype)
    padding = torch.ones(len(sources), longest, dtype=torch.bool)
    for i, s in enumerate(sources):
        out[i, : s.shape[0]] = s
        padding[i, : s.shape[0]] = False
    return out, padding


def readable(items: list[dict]) -> tuple[list[dict], dict]:
    """A batch's readable items, and its start: {"skipped": the unreadable files, "epoch", "batch"}."""
    out = {"skipped": [it["corrupt"] for it in items if "corrupt" in it], "epoch": items[0].get("epoch", 0),
           "batch": items[0].get("batch", 0)}  # fmt: skip
    return [it for it in items if "corrupt" not in it], out


class LabelledCollater:
    """A batch of labelled items -> {"source", "padding_mask"?, "label" or "target", "skipped", "epoch", "batch"}.

    Images are stacked (and mixed when ``mixing`` is active), audio and text padded with ``pad_value``.
    Labels are int64 class indices, or float32 for regression.
    """

    def __init__(self, seed: int, pad_value=None, mixing: Mixing | None = None):
        self.seed, self.pad_value, self.mixing = seed, pad_value, mixing

    def __call__(self, items: list[dict]) -> dict:
        good, out = readable(items)
        if not good:
            return out
        epoch, batch = out["epoch"], out["batch"]
        sources = [it["source"] for it in good]
        if self.pad_value is None:
            out["source"] = torch.stack(sources)
        else:
            out["source"], padding = pad_batch(sources, self.pad_value)
            if padding is not None:
                out["padding_mask"] = padding
        labels = [it["label"] for it in good]
        out["label"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
        if self.mixing is not None and self.mixing.active:
            rng = np.random.default_rng(derive_seed(self.seed, "mix", epoch, batch))
            out["source"], out["target"] = mix_batch(out["source"], out.pop("label"), self.mixing, rng)
        return out


def train_loader(splits: LabelledSplits, cfg: FinetuneDataConfig, seed: int, collate, start: DataPosition,
                 rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:  # fmt: skip
    """The endless, resumable training loader from data position ``start`` (this rank's share): batches of
    ``data.batch_size`` samples, or by total samples (``data.max_batch_samples``) where the task gives sizes."""
    shard = {"start": start, "rank": rank, "world_size": world_size}
    if splits.train_sizes is not None and cfg.max_batch_samples > 0:
        sampler = EpochBatchSampler(len(splits.train), seed, sizes=splits.train_sizes, max_tokens=cfg.max_batch_samples, **shard)
    else:
        sampler = EpochBatchSampler(len(splits.train), seed, batch_size=cfg.batch_size, **shard)
    return torch.utils.data.DataLoader(
        SkipCorrupt(splits.train), batch_sampler=sampler, collate_fn=collate,
        num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_in_worker,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def valid_batches(dataset, batch_size: int, collate, sizes: list[int] | None = None, max_batch_samples: int = 0):
    """The validation set in order, in batches of ``batch_size`` items, or of at most ``max_batch_samples``
    samples (count x longest) where ``sizes`` are given (no augmentation, no skipping: a bad file is an error)."""
    items: list[dict] = []
    longest = 0
    for index in range(len(dataset)):
        size = sizes[index] if sizes is not None and max_batch_samples > 0 else 0
        full = (len(items) + 1) * max(longest, size) > max_batch_samples if size else len(items) == batch_size
        if items and full:
            yield collate(items)
            items, longest = [], 0
        try:
            items.append(dataset[(index, 0)])
        except CorruptSample as e:
            raise ValueError(f"validation sample {e.path} cannot be read ({e}); fix or remove it") from e
        longest = max(longest, size)
    if items:
        yield collate(items)
