"""Labelled sets for the probe, one per modality, each with a held-out split made by the probe.

- images: the embedded digits (10 classes), or an ImageFolder tree (one folder per class);
- speech: the embedded spoken keywords with three tasks, which of the 10 words is spoken (content),
  by which of the 6 voices and at which of the 3 rates (speaker and prosody); or a folder of audio
  files with one subfolder per class;
- text: which pydoc topic a block of tokens comes from (the 16 longest topics, 64-token blocks,
  tokenized with the run's own tokenizer); or a folder of text files with one subfolder per class.

Every set is one batchable tensor of sources (audio clips cropped to a common length from their
start, text in equal blocks) and one or more label vectors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import from_dict
from .data import audio, embedded, images, text
from .data.base import CorruptSample
from .data.build import DataConfig, build_dataset

MAX_CLIP_SECONDS = 4.0
MIN_CLIP_SECONDS = 0.25  # shorter clips would crop every other clip to less than the feature encoder sees well
TEXT_BLOCK = 64
TEXT_TOPICS = 16
BLOCKS_PER_DOCUMENT = 24


@dataclass
class LabelledSet:
    """Sources [M, ...] and, per task, labels [M] with their class names."""

    sources: torch.Tensor
    tasks: dict[str, torch.Tensor]
    classes: dict[str, list[str]]
    description: str
    extra: dict = field(default_factory=dict)


def labelled_set(modality: str, model_cfg, run_config: dict, data: str | None, run_dir: Path | None = None) -> LabelledSet:
    """The probe's labelled set for a checkpoint of ``modality`` (of the run in ``run_dir``, if known)."""
    if modality not in LABELLED_SETS:
        raise ValueError(f"no probe set for modality {modality!r}; known: {', '.join(LABELLED_SETS)}")
    if modality == "text":
        return text_set(model_cfg, run_config, data, run_dir)
    return LABELLED_SETS[modality](model_cfg, run_config, data)


def _class_folders(data: str, what: str) -> list[Path]:
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"probe data {data} is not a folder; give a folder with one subfolder of {what} per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if len(folders) < 2:
        raise ValueError(f"the probe needs labelled {what}: {data} must hold one subfolder per class (found {len(folders)})")
    return folders


# -- images ------------------------------------------------------------------------------------------


def image_set(model_cfg, run_config: dict, data: str | None) -> LabelledSet:
    size = model_cfg.image_size
    mean, std = torch.tensor(images.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(images.IMAGENET_STD).view(1, 3, 1, 1)
    if data is None:
        pixels, labels = embedded.digits(size=size)
        return LabelledSet((pixels - mean) / std, {"digit": labels}, {"digit": [str(d) for d in range(10)]}, "embedded digits")
    paths, labels, classes = images.list_images(data)
    if len(classes) < 2:
        raise ValueError(f"the probe needs labelled images: {data} must hold one folder per class (found {len(classes)})")
    transform = images.EvalTransform(size)
    pixels = []
    for p in paths:
        try:
            pixels.append(transform(images.load_rgb(p)))
        except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
            raise ValueError(f"--data: {p} cannot be read as an image ({type(e).__name__}: {e}); fix or remove it") from e
    pixels = torch.stack(pixels)
    return LabelledSet(pixels, {"class": torch.tensor(labels)}, {"class": list(classes)}, str(data))


# -- speech ------------------------------------------------------------------------------------------


def _clips(paths: list[str], labels: list[int] | None = None, log=print) -> tuple[torch.Tensor, list[int] | None]:
    """Normalised waveforms cropped from their start to the shortest one (at most MAX_CLIP_SECONDS).

    Unreadable files and clips shorter than MIN_CLIP_SECONDS (too short to crop the others to) are
    skipped, counted and named; returns the clips and the labels of those kept.
    """
    waves, kept, skipped = [], [], []
    for i, path in enumerate(paths):
        try:
            wave = audio.read_waveform(path)
        except CorruptSample as e:
            skipped.append(f"{path} (unreadable: {str(e.__cause__ or e).splitlines()[0]})")
            continue
        if wave.shape[0] < MIN_CLIP_SECONDS * audio.SAMPLE_RATE:
            skipped.append(f"{path} ({wave.shape[0]} samples, under {MIN_CLIP_SECONDS:g} s)")
            continue
        waves.append(audio.normalize_waveform(wave))
        kept.append(i)
    if skipped:
        log(f"probe: skipped {len(skipped)} of {len(paths)} audio files: {'; '.join(skipped[:3])}" + (" ..." if len(skipped) > 3 else ""))
    if not waves:
        raise ValueError(f"none of the {len(paths)} audio files could be used by the probe (see above); give readable 16 kHz clips of {MIN_CLIP_SECONDS:g} s or more")
    length = min(min(w.shape[0] for w in waves), int(MAX_CLIP_SECONDS * audio.SAMPLE_RATE))
    return torch.from_numpy(np.stack([w[:length] for w in waves])), None if labels is None else [labels[i] for i in kept]


def audio_set(model_cfg, run_config: dict, data: str | None) -> LabelledSet:
    if data is None:  # which word is spoken (the main task), and by which voice at which rate
        manifest = audio.read_manifest(embedded.spoken_keywords())
        paths = [os.path.join(manifest.root, p) for p in manifest.paths]
        tasks = {task: torch.tensor(labels) for task, labels in embedded.spoken_keyword_labels().items()}
        classes = {"keyword": list(embedded.KEYWORDS), "voice": list(embedded.SPEECH_VOICES),
                   "rate": [str(r) for r in embedded.SPEECH_RATES]}  # fmt: skip
        return LabelledSet(_clips(paths)[0], tasks, classes, "embedded spoken keywords")
    folders = _class_folders(data, "audio files")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        found = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in audio.AUDIO_EXTENSIONS)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise ValueError(f"no audio files ({', '.join(audio.AUDIO_EXTENSIONS)}) under {data}")
    clips, labels = _clips(paths, labels)
    return LabelledSet(clips, {"class": torch.tensor(labels)}, {"class": [f.name for f in folders]}, str(data))


# -- text --------------------------------------------------------------------------------------------


TOKENIZER_FILE = "tokenizer.json"
"""A text run keeps its tokenizer in its folder: its probe and export need neither its data nor the cwd."""


def run_tokenizer(run_config: dict, run_dir: Path | None = None):
    """The tokenizer the run trained with: ``run_dir``'s own copy, else its token cache's (found, or
    rebuilt, from its data config; a run from before the copy was kept)."""
    if run_dir is not None and (Path(run_dir) / TOKENIZER_FILE).is_file():
        return text.load_tokenizer(Path(run_dir) / TOKENIZER_FILE)
    dataset = build_dataset("text", from_dict(DataConfig, dict(run_config.get("data", {})), "data"))
    return text.load_tokenizer(dataset.folder / TOKENIZER_FILE)


def _blocks(ids: list[int], count: int) -> list[list[int]]:
    """Up to ``count`` non-overlapping TEXT_BLOCK-token blocks spread evenly over ``ids``."""
    available = len(ids) // TEXT_BLOCK
    picks = np.linspace(0, available - 1, num=min(count, available)).round().astype(int) if available else []
    return [ids[i * TEXT_BLOCK : (i + 1) * TEXT_BLOCK] for i in sorted(set(int(p) for p in picks))]


def text_set(model_cfg, run_config: dict, data: str | None, run_dir: Path | None = None) -> LabelledSet:
    tokenizer = run_tokenizer(run_config, run_dir)
    if tokenizer.get_vocab_size() > model_cfg.vocab_size:  # its ids would index past the embedding table
        raise ValueError(
            f"the run's tokenizer has {tokenizer.get_vocab_size()} tokens, the model's vocabulary "
            f"{model_cfg.vocab_size}: the run was not trained with it (an imported checkpoint?); probe a "
            "run pretrained by d2v2 on its own data, or give the run the tokenizer it was trained with"
        )
    if data is None:
        topics = embedded.pydoc_topics()
        names = sorted(sorted(topics, key=lambda k: len(topics[k]), reverse=True)[:TEXT_TOPICS])
        documents = {name: [topics[name]] for name in names}
        description = f"the {TEXT_TOPICS} longest pydoc topics"
    else:
        folders = _class_folders(data, "text files")
        documents = {f.name: [p.read_text(encoding="utf-8", errors="replace") for p in text.list_text_files(f)] for f in folders}
        description = str(data)
    blocks, labels = [], []
    for label, name in enumerate(documents):
        ids = [i for doc in documents[name] for i in tokenizer.encode(doc).ids]
        found = _blocks(ids, BLOCKS_PER_DOCUMENT)
        blocks += found
        labels += [label] * len(found)
    if len(set(labels)) < 2:
        raise ValueError(f"the text probe needs at least two classes with {TEXT_BLOCK} tokens or more each")
    return LabelledSet(torch.tensor(blocks), {"document": torch.tensor(labels)}, {"document": list(documents)}, description)


LABELLED_SETS = {"image": image_set, "audio": audio_set, "text": text_set}
