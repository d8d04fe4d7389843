"""Letter vocabularies and transcripts for speech recognition, in fairseq's layout.

- ``dict.ltr.txt``: one symbol and its count per line (``E 51860``): what fairseq's wav2vec 2.0
  fine-tuning predicts, upper-case letters, the apostrophe and ``|``, the word boundary;
- ``<split>.ltr``: a line per manifest line, the transcript's letters separated by spaces with ``|``
  after every word (``H E L L O | W O R L D |``); ``<split>.wrd``: its words (``HELLO WORLD``), as
  fairseq's ``examples/wav2vec/libri_labels.py`` writes them from LibriSpeech's ``*.trans.txt``.

The vocabulary is fairseq's ``Dictionary`` over ``dict.ltr.txt``: ``<s>``, ``<pad>``, ``</s>``, ``<unk>``
first (indices 0-3), then the file's symbols in its order. The CTC blank is index 0, ``<s>``: fairseq's
``audio_finetuning`` task sets ``blank_symbol = "<s>"``, and its ``ctc`` criterion and its decoders
(``w2l_decoder.py``: ``tgt_dict.bos()``) take that index. Hugging Face's ``Wav2Vec2ForCTC`` checkpoints
converted from fairseq keep the same rows and call index 0 ``<pad>`` (``pad_token_id`` 0, their CTC
blank) and index 1 ``<s>`` in ``vocab.json``: the logits need no reordering, only the names differ.
Without a ``dict.ltr.txt`` beside the data, the run takes LibriSpeech's (``LIBRISPEECH_LETTERS``,
the one fairseq's released fine-tuned models use).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .audio import read_manifest

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
"""fairseq ``Dictionary``'s first four symbols."""
BLANK = 0
"""The CTC blank: ``<s>``, index 0 (see the module docstring)."""
PAD = 1
WORD_BOUNDARY = "|"
DICT_FILE = "dict.ltr.txt"
LIBRISPEECH_LETTERS = ("|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C", "F", "G", "Y",
                       "P", "B", "V", "K", "'", "X", "J", "Q", "Z")  # fmt: skip
"""LibriSpeech's ``dict.ltr.txt`` (the 960 h training transcripts' letters by descending count)."""


@dataclass(frozen=True)
class Letters:
    """A letter vocabulary: ``symbols[i]`` is output i of the CTC head (specials first)."""

    symbols: tuple[str, ...]

    @classmethod
    def of(cls, letters) -> "Letters":
        return cls(SPECIALS + tuple(letters))

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def letters(self) -> tuple[str, ...]:
        return self.symbols[len(SPECIALS) :]

    def encode(self, line: str, where: str) -> list[int]:
        """A ``.ltr`` line -> symbol indices; ``where`` (``file:line``) names it in the one-line errors."""
        index = self._index()
        tokens = line.split()
        if not tokens:
            raise ValueError(f"{where}: an empty transcript; every utterance needs one")
        unknown = sorted({t for t in tokens if t not in index or index[t] < len(SPECIALS)})
        if unknown:
            raise ValueError(f"{where}: {', '.join(repr(t) for t in unknown[:5])} not in the letter dictionary "
                             f"({' '.join(self.letters)}); fix the transcript or give a {DICT_FILE} that has it")  # fmt: skip
        return [index[t] for t in tokens]

    def decode(self, ids) -> str:
        """Symbol indices (blanks and repeats already removed) -> words: letters joined, ``|`` a space
        (fairseq's ``post_process`` "letter"); special symbols are left out."""
        text = "".join(self.symbols[i] for i in ids if i >= len(SPECIALS))
        return " ".join(text.replace(WORD_BOUNDARY, " ").split())

    def _index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.symbols)}


STANDARD = Letters.of(LIBRISPEECH_LETTERS)


def read_dictionary(path: str | os.PathLike) -> Letters:
    """A ``dict.ltr.txt`` (``SYMBOL COUNT`` per line, the count optional) -> its vocabulary."""
    path = Path(path)
    symbols = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        symbol = line.split()[0]
        if symbol in SPECIALS or symbol in symbols:
            raise ValueError(f"{path}:{number}: {symbol!r} is listed twice or is one of {', '.join(SPECIALS)}, which come first anyway")
        symbols.append(symbol)
    if not symbols:
        raise ValueError(f"{path} lists no letters; one symbol (and its count) per line, e.g. 'E 51860'")
    return Letters.of(symbols)


def dictionary_of(folder: Path | None) -> tuple[Letters, str]:
    """The vocabulary of a data folder (its ``dict.ltr.txt``, else LibriSpeech's) and where it came from."""
    if folder is not None and (folder / DICT_FILE).is_file():
        return read_dictionary(folder / DICT_FILE), str(folder / DICT_FILE)
    return STANDARD, "LibriSpeech's letters"


def words_to_letters(words: str) -> str:
    """``HELLO WORLD`` -> ``H E L L O | W O R L D |`` (``libri_labels.py``)."""
    return " ".join(words.replace(" ", WORD_BOUNDARY)) + " " + WORD_BOUNDARY


def normalize_words(text: str) -> str:
    """English text as LibriSpeech transcribes it: upper case, apostrophes kept, hyphens as spaces, other
    punctuation dropped (for the embedded speech, whose sentences have punctuation)."""
    text = re.sub(r"[^A-Z' ]", " ", text.upper().replace("-", " "))
    return " ".join(text.split())


def read_labels(manifest: Path, num_lines: int, letters: Letters) -> tuple[list[list[int]], list[str]]:
    """The ``.ltr`` (symbol indices) and ``.wrd`` (words) beside ``manifest``, one line per utterance;
    a missing file, a count that differs from the manifest's, an empty transcript or a letter outside
    ``letters`` is a one-line error naming the file and line. Without ``.wrd`` the words are the letters'."""
    ltr = manifest.with_suffix(".ltr")
    if not ltr.is_file():
        raise FileNotFoundError(f"{ltr} is missing: speech recognition needs a .ltr file beside the manifest, one "
                                f"transcript per line (d2v2 manifest AUDIO_DIR --labels writes them for LibriSpeech)")  # fmt: skip
    lines = _lines(ltr, num_lines, manifest)
    labels = [letters.encode(line, f"{ltr}:{number}") for number, line in enumerate(lines, start=1)]
    wrd = manifest.with_suffix(".wrd")
    if wrd.is_file():
        words = [" ".join(w.split()) for w in _lines(wrd, num_lines, manifest)]
        for number, line in enumerate(words, start=1):
            if not line:
                raise ValueError(f"{wrd}:{number}: an empty transcript; every utterance needs one")
    else:
        words = [letters.decode(ids) for ids in labels]
    return labels, words


def _lines(path: Path, expected: int, manifest: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != expected:
        raise ValueError(f"{path} has {len(lines)} lines for the {expected} utterances of {manifest}: one line per "
                         "utterance, in the manifest's order")  # fmt: skip
    return lines


def write_labels(folder: Path, name: str, words: list[str]) -> tuple[Path, Path]:
    """``<name>.wrd`` and ``<name>.ltr`` in ``folder`` from one transcript per utterance (atomically)."""
    written = []
    for suffix, lines in ((".wrd", words), (".ltr", [words_to_letters(w) for w in words])):
        path = folder / f"{name}{suffix}"
        _write_atomic(path, "\n".join(lines) + "\n")
        written.append(path)
    return written[0], written[1]


def write_dictionary(path: Path, words: list[str], order: tuple[str, ...] | None = None) -> Path:
    """``dict.ltr.txt`` of ``words``' letters with their counts: by descending count (fairseq's
    ``Dictionary.finalize``), or in ``order`` (letters it lacks are added after it)."""
    counts = Counter(s for w in words for s in words_to_letters(w).split())
    symbols = list(order or ()) + sorted((s for s in counts if s not in (order or ())), key=lambda s: (-counts[s], s))
    _write_atomic(path, "".join(f"{s} {counts.get(s, 0)}\n" for s in symbols))
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def librispeech_words(manifest: Path) -> list[str]:
    """The transcript of every utterance of a LibriSpeech manifest, from the ``*.trans.txt`` of its
    chapter folder (``SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt``, lines ``UTTERANCE-ID WORDS``), as
    fairseq's ``libri_labels.py`` reads them; a missing file or utterance is a one-line error."""
    parsed = read_manifest(manifest)
    chapters: dict[str, dict[str, str]] = {}
    words = []
    for path in parsed.paths:
        folder = os.path.dirname(path)
        if folder not in chapters:
            parts = Path(folder).parts
            if len(parts) < 2:
                raise ValueError(f"{manifest}: {path} is not in a SPEAKER/CHAPTER folder, where LibriSpeech keeps its "
                                 "*.trans.txt; --labels reads LibriSpeech's layout")  # fmt: skip
            trans = Path(parsed.root) / folder / f"{parts[-2]}-{parts[-1]}.trans.txt"
            if not trans.is_file():
                raise FileNotFoundError(f"{trans} is missing: --labels reads each chapter's transcripts from it")
            texts = {}
            for line in trans.read_text(encoding="utf-8").splitlines():
                items = line.strip().split()
                if items:
                    texts[items[0]] = " ".join(items[1:])
            chapters[folder] = texts
        utterance = os.path.basename(path).split(".")[0]
        if not chapters[folder].get(utterance):
            raise ValueError(f"{Path(parsed.root) / folder} has no transcript for {utterance} in its .trans.txt")
        words.append(chapters[folder][utterance])
    return words
