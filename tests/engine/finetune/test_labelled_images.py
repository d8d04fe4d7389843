"""Labelled images: train/ and val/ ImageFolder trees, the validation read in the training classes."""

from __future__ import annotations

import pytest
from PIL import Image

from d2v2.engine.finetune.labelled_images import has_validation_split, read_labelled_images


def tree(root, classes):
    for name in classes:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "a.png")


def test_train_and_val_in_the_training_classes(tmp_path):
    tree(tmp_path / "train", ["cat", "dog", "eel"])
    tree(tmp_path / "val", ["dog", "eel"])  # a validation split may lack a class
    assert has_validation_split(tmp_path)
    train = read_labelled_images(tmp_path)
    val = read_labelled_images(tmp_path, "val", classes=train.classes)
    assert train.classes == ["cat", "dog", "eel"] and train.labels == [0, 1, 2]
    assert val.classes == train.classes and val.labels == [1, 2]


def test_validation_errors(tmp_path):
    tree(tmp_path / "train", ["cat", "dog"])
    assert not has_validation_split(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no val/, valid/, validation/ folder"):
        read_labelled_images(tmp_path, "val")
    tree(tmp_path / "val", ["cow"])
    with pytest.raises(ValueError, match="cow are not among the training classes"):
        read_labelled_images(tmp_path, "val", classes=["cat", "dog"])
    with pytest.raises(ValueError, match="at least two"):
        read_labelled_images(tmp_path / "val")
