"""Labelled audio for classification: a fairseq-style manifest with a label file beside it, or a folder
per class.

- ``train.tsv`` (the manifest ``d2v2 manifest`` writes: the root folder, then ``path<TAB>samples``) and
  ``train.lbl`` beside it, one label per manifest line in the same order (fairseq's audio
  classification layout); the validation split likewise as ``valid.tsv`` / ``valid.lbl``;
- a folder with one subfolder of audio files per class (a ``train/`` and ``valid/`` pair, or one
  folder that the caller splits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..data import audio


@dataclass
class LabelledClips:
    """Audio files of one split with a class index each; ``sizes`` in samples where the manifest gives them."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    sizes: list[int] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def read_labelled_manifest(manifest: str | Path, classes: list[str] | None = None) -> LabelledClips:
    """A manifest and its ``.lbl`` file. ``classes`` None: the sorted label names of this file (the
    training split's order; give the training split's classes when reading the validation split)."""
    manifest = Path(manifest)
    parsed = audio.read_manifest(manifest)
    labels_file = manifest.with_suffix(".lbl")
    if not labels_file.is_file():
        raise FileNotFoundError(f"{labels_file} is missing: a labelled manifest needs a .lbl file beside it, one label per clip")
    names = labels_file.read_text(encoding="utf-8").splitlines()
    while names and not names[-1].strip():
        names.pop()
    if len(names) != len(parsed.paths):
        raise ValueError(
            f"{labels_file} has {len(names)} labels for the {len(parsed.paths)} clips of {manifest}: one line per clip, in order"
        )
    for number, name in enumerate(names, start=1):
        if not name.strip():
            raise ValueError(f"{labels_file}:{number}: an empty label; every clip needs one")
    names = [n.strip() for n in names]
    classes = classes if classes is not None else sorted(set(names))
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{labels_file}: label(s) {', '.join(unknown[:5])} are not among the training classes ({', '.join(classes)})")
    paths = [os.path.join(parsed.root, p) for p in parsed.paths]
    return LabelledClips(paths, [classes.index(n) for n in names], list(classes), list(parsed.sizes))


def read_class_folders(root: str | Path, classes: list[str] | None = None) -> LabelledClips:
    """``root/<class>/**/<audio file>``; ``classes`` None: the subfolders' sorted names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give a folder with one subfolder of audio files per class")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = classes if classes is not None else found
    if len(classes) < 2:
        raise ValueError(f"{root} must hold one subfolder of audio files per class, at least two (found {len(found)})")
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"{root}: folder(s) {', '.join(extra[:5])} are not among the training classes ({', '.join(classes)})")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (root / name).rglob("*") if p.suffix.lower() in audio.AUDIO_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"no audio files ({', '.join(audio.AUDIO_EXTENSIONS)}) under {root}")
    return LabelledClips(paths, labels, list(classes))


def read_labelled_audio(path: str | Path, split: str = "train", classes: list[str] | None = None) -> LabelledClips:
    """``split`` ("train" or "valid") of labelled audio at ``path``: a manifest file, a folder holding
    ``<split>.tsv`` and ``<split>.lbl``, or a folder of class folders (with ``<split>/`` inside, or itself)."""
    path = Path(path)
    if path.is_file():
        return read_labelled_manifest(path, classes)
    if (path / f"{split}.tsv").is_file():
        return read_labelled_manifest(path / f"{split}.tsv", classes)
    if (path / split).is_dir():
        return read_class_folders(path / split, classes)
    if split == "train":
        return read_class_folders(path, classes)
    raise FileNotFoundError(f"{path} holds no {split}.tsv (with {split}.lbl) and no {split}/ folder of classes")
