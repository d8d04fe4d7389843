"""The probe's labelled sets for every modality, and the probe end to end on speech and text runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from d2v2.engine.cli import main
from d2v2.engine.data import embedded
from d2v2.engine.probe_sets import BLOCKS_PER_DOCUMENT, TEXT_BLOCK, TEXT_TOPICS, labelled_set
from d2v2.models import data2vec2_config

FAST = ["--set", "data.num_workers=0", "--set", "train.log_every=1"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


def test_synthetic_speech_labels_cycle_voices_then_rates():
    voices, rates = embedded.synthetic_speech_labels(20)
    assert voices[:7] == [0, 1, 2, 3, 4, 5, 0] and rates[:7] == [0, 0, 0, 0, 0, 0, 1]
    assert rates[18] == 0  # 6 voices x 3 rates, then again


def test_audio_folder_set_has_one_class_per_subfolder_and_equal_clips(tmp_path):
    for label, freq in (("low", 200.0), ("high", 2000.0)):
        (tmp_path / label).mkdir()
        for i in range(3):
            t = np.arange(16000 + 800 * i) / 16000
            sf.write(tmp_path / label / f"{i}.wav", np.sin(2 * np.pi * freq * t).astype(np.float32), 16000)
    labelled = labelled_set("audio", data2vec2_config("audio", "tiny"), {}, str(tmp_path))
    assert labelled.sources.shape == (6, 16000)  # cropped to the shortest clip
    assert labelled.classes == {"class": ["high", "low"]} and labelled.tasks["class"].tolist() == [0, 0, 0, 1, 1, 1]


def test_text_set_is_topic_blocks_in_the_runs_tokenizer():
    run_config = {"data": {"block_size": 128, "vocab_size": 2000}}
    labelled = labelled_set("text", data2vec2_config("text", "tiny"), run_config, None)
    labels = labelled.tasks["document"]
    assert labelled.sources.shape[1] == TEXT_BLOCK and len(labelled.classes["document"]) == TEXT_TOPICS
    assert labels.bincount().max() <= BLOCKS_PER_DOCUMENT and labels.unique().numel() == TEXT_TOPICS


def test_probe_set_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="one subfolder per class"):
        labelled_set("audio", data2vec2_config("audio", "tiny"), {}, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        labelled_set("text", data2vec2_config("text", "tiny"), {"data": {"vocab_size": 2000}}, str(tmp_path / "missing"))


def test_probe_runs_on_a_text_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", "text-tiny", "--out", str(run), "--max-steps", "2", *FAST]) == 0
    assert main(["probe", "--checkpoint", str(run), "--out", str(tmp_path / "probe.json")]) == 0
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["tasks"]["document"]["classes"] == TEXT_TOPICS and 0 <= result["linear_accuracy"] <= 1


def test_unreadable_and_too_short_audio_files_are_skipped_counted_and_named(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            sf.write(tmp_path / label / f"{i}.wav", np.random.default_rng(i).standard_normal(8000).astype(np.float32), 16000)
    (tmp_path / "a" / "notes.wav").write_text("not audio")
    sf.write(tmp_path / "b" / "click.wav", np.ones(50, np.float32), 16000)
    lines = []
    from d2v2.engine import probe_sets

    clips, labels = probe_sets._clips(
        [str(p) for p in sorted(tmp_path.rglob("*.wav"))], [0, 0, 0, 1, 1, 1], log=lines.append
    )  # sorted: a/0, a/1, a/notes, b/0, b/1, b/click
    assert clips.shape == (4, 8000) and labels == [0, 0, 1, 1]
    assert len(lines) == 1 and lines[0].startswith("probe: skipped 2 of 6 audio files:")
    assert "notes.wav (unreadable:" in lines[0] and "click.wav (50 samples, under 0.25 s)" in lines[0]


@pytest.mark.parametrize(
    "labels, fraction, message",
    [
        ([0, 1, 2], 0.3, "class(es) 0, 1, 2 have fewer than 2 samples"),
        ([0, 0, 1, 1, 2, 2], 0.99, "--test-fraction 0.99 leaves 0 training and 6 test samples of 6"),
    ],
)
def test_a_task_that_cannot_be_probed_is_refused_before_any_feature(labels, fraction, message):
    import torch

    from d2v2.engine.probe import probe_tasks
    from d2v2.engine.probe_sets import LabelledSet

    labelled = LabelledSet(torch.zeros(len(labels), 3), {"class": torch.tensor(labels)}, {"class": ["0", "1", "2"]}, "test")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        probe_tasks(None, labelled, test_fraction=fraction)  # no model: refused before it is used


def test_a_text_model_whose_vocabulary_is_smaller_than_the_tokenizer_is_refused():
    cfg = data2vec2_config("text", "tiny")
    cfg.vocab_size = 50  # an imported checkpoint's vocabulary, not the run's BPE
    with pytest.raises(ValueError, match="the run's tokenizer has 2000 tokens, the model's vocabulary 50"):
        labelled_set("text", cfg, {"data": {"vocab_size": 2000}}, None)


def test_the_embedded_speech_probe_is_keyword_spotting_with_voice_and_rate_beside():
    labels = embedded.spoken_keyword_labels()
    per_word = len(embedded.SPEECH_VOICES) * len(embedded.SPEECH_RATES) * len(embedded.KEYWORD_PITCHES)
    assert len(labels["keyword"]) == len(embedded.KEYWORDS) * per_word == 540
    assert np.bincount(labels["keyword"]).tolist() == [per_word] * len(embedded.KEYWORDS)
    labelled = labelled_set("audio", data2vec2_config("audio", "tiny"), {}, None)
    assert list(labelled.tasks) == ["keyword", "voice", "rate"]  # the first task is the probe's headline
    assert labelled.sources.shape == (540, 16000) and labelled.classes["keyword"][:3] == ["yes", "no", "up"]
    manifest = embedded.spoken_keywords()
    assert (manifest.parent / "train.lbl").read_text().split() == [embedded.KEYWORDS[k] for k in labels["keyword"]]
