"""Labelled images for classification: an ImageFolder tree with ``train/`` and ``val/`` (ImageNet's
layout as the reference fine-tunes on it), or one tree of class folders that the caller splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import images

VALIDATION_FOLDERS = ("val", "valid", "validation")


@dataclass
class LabelledImages:
    paths: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def has_validation_split(root: str | Path) -> bool:
    return (Path(root) / "train").is_dir() and any((Path(root) / v).is_dir() for v in VALIDATION_FOLDERS)


def read_labelled_images(root: str | Path, split: str = "train", classes: list[str] | None = None) -> LabelledImages:
    """``split`` ("train" or "val") of ``root``: ``root/<split>/<class>/**/<image>``, or for "train" a tree
    without a ``train/`` folder. The validation classes must be the training classes (``classes``)."""
    root = Path(root)
    if split == "train":
        where = root
    else:
        found = [root / v for v in VALIDATION_FOLDERS if (root / v).is_dir()]
        if not found:
            raise FileNotFoundError(f"{root} has no {'/, '.join(VALIDATION_FOLDERS)}/ folder beside train/; add one, or split the training images")
        where = found[0]
    paths, labels, names = images.list_images(where)  # reads <root>/train/ when there is one
    if classes is None and len(names) < 2:
        raise ValueError(f"{where} must hold one folder of images per class, at least two (found {len(names)})")
    if classes is not None and names != list(classes):
        extra = sorted(set(names) - set(classes))
        if extra:
            raise ValueError(f"{where}: class folder(s) {', '.join(extra[:5])} are not among the training classes")
        labels = [classes.index(names[label]) for label in labels]  # validation may lack a class: keep the training indices
        names = list(classes)
    return LabelledImages(paths, labels, list(names))
