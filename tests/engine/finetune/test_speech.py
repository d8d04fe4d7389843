"""Speech recognition's data and decoding: fairseq's letter layout, label errors naming file and line,
``d2v2 manifest --labels`` from LibriSpeech's transcripts, batches by total samples, greedy decoding, WER / CER."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v2.engine.cli import main
from d2v2.engine.data import embedded
from d2v2.engine.data.letters import STANDARD, Letters, normalize_words, read_dictionary, words_to_letters
from d2v2.engine.finetune.data import FinetuneDataConfig, valid_batches
from d2v2.engine.finetune.decoding import DecodeConfig, Decoder, error_rates, greedy_ids
from d2v2.engine.finetune.speech import TranscriptCollater, read_speech

from ...helpers import one_line_error


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


def test_the_vocabulary_is_fairseqs_with_the_blank_first():
    assert STANDARD.symbols[:5] == ("<s>", "<pad>", "</s>", "<unk>", "|") and len(STANDARD) == 32
    assert words_to_letters("IT'S OK") == "I T ' S | O K |"
    ids = STANDARD.encode(words_to_letters("IT'S OK"), "x:1")
    assert STANDARD.decode(ids) == "IT'S OK"
    assert normalize_words("Built-in types, e.g; don't!") == "BUILT IN TYPES E G DON'T"


def test_greedy_decoding_merges_repeats_and_drops_blanks():
    letters = Letters.of(("|", "A", "B"))  # ids 4, 5, 6
    frames = [5, 5, 0, 5, 4, 6, 6, 4, 0, 6]  # A A - A | B B | - B (the last frame is padding)
    logits = torch.nn.functional.one_hot(torch.tensor([frames]), len(letters)).float()
    assert greedy_ids(logits, torch.tensor([9])) == [[5, 5, 4, 6, 4]]
    assert Decoder(letters)(logits, torch.tensor([9])) == ["AA B"]
    assert error_rates(["AA B"], ["AA C"]) == {"wer": 0.5, "cer": 0.25}


def test_beam_search_without_pyctcdecode_is_a_one_line_error(monkeypatch):
    real_import = builtins.__import__

    def no_pyctcdecode(name, *args, **kwargs):
        if name == "pyctcdecode":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyctcdecode)
    with pytest.raises(ValueError, match=r"pip install 'd2v2\[lm\]'"):
        Decoder(STANDARD, DecodeConfig(beam=8))
    with pytest.raises(ValueError, match="decode.lm needs a beam search"):
        DecodeConfig(lm="4gram.arpa")


def test_beam_search_finds_the_best_path_of_a_clear_signal():
    pytest.importorskip("pyctcdecode")
    letters = Letters.of(("|", "A", "B"))
    logits = torch.nn.functional.one_hot(torch.tensor([[5, 0, 4, 6, 6]]), len(letters)).float() * 10
    assert Decoder(letters, DecodeConfig(beam=4))(logits, torch.tensor([5])) == ["A B"]


def _corpus(folder, transcripts: list[str], ltr: list[str] | None = None, name: str = "train"):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [str(folder)]
    for i, _ in enumerate(transcripts):
        sf.write(folder / f"{name}{i}.wav", np.random.default_rng(i).normal(0, 0.1, 8000 + 800 * i).astype(np.float32), 16000)
        lines.append(f"{name}{i}.wav\t{8000 + 800 * i}")
    (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    (folder / f"{name}.wrd").write_text("\n".join(transcripts) + "\n")
    (folder / f"{name}.ltr").write_text("\n".join(ltr or [words_to_letters(t) for t in transcripts]) + "\n")


def test_transcribed_splits_and_bad_labels(tmp_path):
    data = tmp_path / "data"
    _corpus(data, ["HELLO WORLD", "A B", "NO"])
    _corpus(data, ["YES"], name="dev_other")
    splits = read_speech(FinetuneDataConfig(path=str(data), valid_split="dev_other"), None)
    assert len(splits.train) == 3 and len(splits.valid) == 1 and splits.train_sizes == [8000, 8800, 9600]
    assert splits.classes == list(STANDARD.symbols) and "dev_other for validation" in splits.description
    item = splits.train[(1, 0)]
    assert item["words"] == "A B" and STANDARD.decode(item["label"]) == "A B"
    held = read_speech(FinetuneDataConfig(path=str(data), valid_fraction=0.34), None)  # no valid.tsv: held out
    assert len(held.valid) == 1 and len(held.train) == 2
    _corpus(data, ["HELLO WORLD", "A B", "NO"], ltr=["H I |", "A | 1 |", "N O |"])
    with pytest.raises(ValueError, match=r"train.ltr:2: '1' not in the letter dictionary"):
        read_speech(FinetuneDataConfig(path=str(data)), None)
    _corpus(data, ["HELLO WORLD", "A B", "NO"], ltr=["H I |", "", "N O |"])
    with pytest.raises(ValueError, match=r"train.ltr:2: an empty transcript"):
        read_speech(FinetuneDataConfig(path=str(data)), None)
    _corpus(data, ["HELLO WORLD", "A B", "NO"], ltr=["H I |", "N O |"])
    with pytest.raises(ValueError, match=r"train.ltr has 2 lines for the 3 utterances of .*train.tsv"):
        read_speech(FinetuneDataConfig(path=str(data)), None)
    (data / "dict.ltr.txt").write_text("A 3\nB 1\n|\n")  # a dictionary of its own
    _corpus(data, ["A B", "B"])
    assert read_speech(FinetuneDataConfig(path=str(data)), None).classes == ["<s>", "<pad>", "</s>", "<unk>", "A", "B", "|"]
    assert read_dictionary(data / "dict.ltr.txt").letters == ("A", "B", "|")


def test_a_bad_transcript_stops_finetune_in_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    _corpus(data, ["HELLO", "WORLD"], ltr=["H E L L O |", "W 0 R L D |"])
    error = one_line_error(capsys, ["finetune", "--recipe", "finetune-speech-tiny", "--checkpoint", "none", "--data",
                                    str(data), "--out", str(tmp_path / "run")])  # fmt: skip
    assert "train.ltr:2: '0' not in the letter dictionary" in error


def test_the_embedded_speech_has_its_transcripts():
    manifest = embedded.synthetic_speech()
    words = (manifest.parent / "train.wrd").read_text().splitlines()
    assert len(words) == 240 and all(w == normalize_words(w) for w in words)
    assert (manifest.parent / "dict.ltr.txt").is_file()


def test_manifest_labels_from_librispeech_transcripts(tmp_path, capsys):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "103" / "1240"
    chapter.mkdir(parents=True)
    for i in range(2):
        sf.write(chapter / f"103-1240-000{i}.flac", np.zeros(4000, np.float32), 16000)
    (chapter / "103-1240.trans.txt").write_text("103-1240-0000 CHAPTER ONE\n103-1240-0001 IT'S HERE\n")
    dest = tmp_path / "manifest"
    assert main(["manifest", str(tmp_path / "LibriSpeech"), "--dest", str(dest), "--labels"]) == 0
    assert (dest / "train.wrd").read_text().splitlines() == ["CHAPTER ONE", "IT'S HERE"]
    assert (dest / "train.ltr").read_text().splitlines() == ["C H A P T E R | O N E |", "I T ' S | H E R E |"]
    assert read_dictionary(dest / "dict.ltr.txt").letters == STANDARD.letters  # LibriSpeech's order
    assert "2 transcripts ->" in capsys.readouterr().out
    (chapter / "103-1240.trans.txt").unlink()
    assert "103-1240.trans.txt is missing" in one_line_error(capsys, ["manifest", str(tmp_path / "LibriSpeech"), "--dest",
                                                                      str(dest), "--labels"])  # fmt: skip


def test_batches_pad_audio_and_labels_and_group_by_total_samples():
    items = [{"source": torch.ones(n), "label": list(range(4, 4 + k)), "words": "X", "epoch": 0, "batch": 3}
             for n, k in ((400, 2), (640, 3))]  # fmt: skip
    batch = TranscriptCollater(0)(items)
    assert batch["source"].shape == (2, 640) and batch["padding_mask"][0, 400:].all()
    assert batch["label"].tolist() == [[4, 5, 1], [4, 5, 6]] and batch["label_lengths"].tolist() == [2, 3]
    assert "mask" not in batch  # validation batches are never masked

    class Items:
        def __len__(self):
            return 5

        def __getitem__(self, item):
            return item[0]

    grouped = list(valid_batches(Items(), 2, list, sizes=[10, 10, 30, 10, 10], max_batch_samples=40))
    assert grouped == [[0, 1], [2], [3, 4]]  # in order, each at most 40 samples (count x longest)
    assert list(valid_batches(Items(), 2, list)) == [[0, 1], [2, 3], [4]]
