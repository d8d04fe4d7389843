"""Labelled audio: a manifest with its .lbl file (the embedded keywords are one), and class folders."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from d2v2.engine.data import embedded
from d2v2.engine.finetune.labelled_audio import read_labelled_audio


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


def test_the_embedded_keywords_read_as_a_labelled_manifest():
    clips = read_labelled_audio(embedded.spoken_keywords())
    assert len(clips) == 540 and clips.classes == sorted(embedded.KEYWORDS)
    words = [clips.classes[i] for i in clips.labels]
    assert words == [embedded.KEYWORDS[k] for k in embedded.spoken_keyword_labels()["keyword"]]
    assert clips.sizes[0] == 16000 and clips.paths[0].endswith("kw0000.wav")


def test_a_label_file_that_does_not_match_the_manifest_is_an_error(tmp_path):
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\na.wav\t16000\nb.wav\t16000\n")
    with pytest.raises(FileNotFoundError, match="train.lbl is missing"):
        read_labelled_audio(tmp_path)
    (tmp_path / "train.lbl").write_text("yes\n")
    with pytest.raises(ValueError, match="has 1 labels for the 2 clips"):
        read_labelled_audio(tmp_path)
    (tmp_path / "train.lbl").write_text("yes\n\n")
    with pytest.raises(ValueError, match="has 1 labels for the 2 clips"):
        read_labelled_audio(tmp_path)
    (tmp_path / "train.lbl").write_text("yes\n \nno\n")
    with pytest.raises(ValueError, match="3 labels"):
        read_labelled_audio(tmp_path)
    (tmp_path / "valid.tsv").write_text(f"{tmp_path}\na.wav\t16000\n")
    (tmp_path / "valid.lbl").write_text("maybe\n")
    with pytest.raises(ValueError, match="maybe are not among the training classes"):
        read_labelled_audio(tmp_path, "valid", classes=["no", "yes"])


def test_class_folders_with_train_and_valid(tmp_path):
    for split in ("train", "valid"):
        for name in ("dog", "cat"):
            (tmp_path / split / name).mkdir(parents=True)
            sf.write(tmp_path / split / name / "x.wav", np.zeros(1600, np.float32), 16000)
    train = read_labelled_audio(tmp_path)
    valid = read_labelled_audio(tmp_path, "valid", classes=train.classes)
    assert train.classes == ["cat", "dog"] and train.labels == [0, 1] == valid.labels
    with pytest.raises(FileNotFoundError, match="no test.tsv"):
        read_labelled_audio(tmp_path, "test")
