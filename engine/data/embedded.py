"""Embedded default data: real data that ships with installed packages, never a download.

- images: scikit-learn's digits, 1,797 real handwritten digits (8x8 grey, UCI Optical
  Recognition of Handwritten Digits), upsampled and repeated over three channels, with labels
  for the linear probe;
- text: English prose that ships with Python itself, the pydoc topic help texts
  (``pydoc_data.topics``, about 460 kB);
- speech: utterances synthesised locally from sentences of that same English text with the
  eSpeak NG library in the ``espeakng-loader`` wheel, in several voices and speaking rates,
  resampled from 22,050 Hz to 16 kHz, with their transcripts (the sentences are known: speech
  recognition's ``.wrd`` / ``.ltr`` labels). This is synthetic speech, not recordings. Beside them, a
  keyword-spotting set in the manner of Speech Commands: one-second clips of ten command words in
  every voice, rate and pitch, labelled by word (a content task; voice and rate are speaker and
  prosody, which contextual targets keep less of).

Generated files go to the d2v2 cache folder (``$D2V2_CACHE``, else ``$XDG_CACHE_HOME/d2v2``,
else ``~/.cache/d2v2``) and are reused by later runs.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from .audio import resample
from .letters import DICT_FILE, LIBRISPEECH_LETTERS, normalize_words, write_dictionary, write_labels

SPEECH_VOICES = ("en-us", "en", "en-us+f2", "en+m3", "en-us+f4", "en+m7")
SPEECH_RATES = (140, 165, 190)
# Speech Commands' ten command words (Warden, 2018), each spoken in every voice, rate and pitch.
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
KEYWORD_PITCHES = (35, 50, 65)


def cache_dir() -> Path:
    """The folder for generated data and token caches."""
    if os.environ.get("D2V2_CACHE"):
        return Path(os.environ["D2V2_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "d2v2"


def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as images [1797, 3, size, size] in [0, 1] and labels [1797]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # [M, 1, 8, 8]
    images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
    return images.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(data.target.astype(np.int64))


def pydoc_topics() -> dict[str, str]:
    """The pydoc topic help texts of this Python: {topic: text}."""
    from pydoc_data.topics import topics

    return {k: topics[k].strip() for k in sorted(topics)}


def pydoc_text() -> str:
    """The pydoc topic help texts of this Python, in a stable order, one document per topic."""
    return "\n\n".join(pydoc_topics().values())


def pydoc_text_file() -> Path:
    """The pydoc topics written once as a plain text corpus file; returns its path."""
    folder = cache_dir() / "text"
    path = folder / "pydoc-topics.txt"
    text = pydoc_text()
    if not path.exists() or path.stat().st_size != len(text.encode("utf-8")):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def prose_sentences(min_words: int = 6, max_words: int = 24) -> list[str]:
    """Plain English sentences from the pydoc topics (no code, no markup), for speech synthesis."""
    sentences = []
    for para in re.split(r"\n\s*\n", pydoc_text()):
        if para.startswith((" ", "\t")):  # indented blocks are code samples or grammar
            continue
        for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
            words = s.split()
            if min_words <= len(words) <= max_words and re.fullmatch(r"[A-Za-z][A-Za-z ,;'\-]*[.!?]", s):
                sentences.append(s)
    return sentences


class _ESpeak:
    """The eSpeak NG shared library of ``espeakng-loader``, in synchronous mode through ctypes."""

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    AUDIO_OUTPUT_SYNCHRONOUS, ESPEAK_RATE, ESPEAK_PITCH = 2, 1, 3

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as e:
            raise ValueError("the embedded speech data needs the espeakng-loader package: pip install espeakng-loader") from e
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.sample_rate = self.lib.espeak_Initialize(
            self.AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
        )
        if self.sample_rate <= 0:
            raise ValueError("eSpeak NG failed to initialise; reinstall espeakng-loader")
        self._chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # keep a reference: C holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def speak(self, text: str, voice: str, rate: int, pitch: int = 50) -> np.ndarray:
        """Synthesise ``text`` -> int16 samples at ``self.sample_rate`` (pitch 0-100, eSpeak's default 50)."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(self.ESPEAK_RATE, rate, 0)
        self.lib.espeak_SetParameter(self.ESPEAK_PITCH, pitch, 0)
        self._chunks = []
        data = text.encode("utf-8")
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _corpus(name: str) -> tuple[Path, Path]:
    """A synthesised corpus's manifest path and its (created) wav folder in the cache."""
    folder = cache_dir() / name
    (folder / "wav").mkdir(parents=True, exist_ok=True)
    return folder / "train.tsv", folder / "wav"


def _write_manifest(manifest: Path, lines: list[str]) -> Path:
    """Written last and atomically: a manifest's presence means its corpus is whole."""
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, manifest)
    return manifest


def synthetic_speech_labels(num_utterances: int) -> tuple[list[int], list[int]]:
    """The voice (index into SPEECH_VOICES) and rate (index into SPEECH_RATES) of each synthetic utterance."""
    voices = [u % len(SPEECH_VOICES) for u in range(num_utterances)]
    rates = [(u // len(SPEECH_VOICES)) % len(SPEECH_RATES) for u in range(num_utterances)]
    return voices, rates


def synthetic_speech(num_utterances: int = 240, min_seconds: float = 2.5, sample_rate: int = 16_000) -> Path:
    """Synthesise (once) the embedded speech corpus and its manifest; returns the manifest path.

    Utterances join consecutive sentences until ``min_seconds`` is reached, cycling through the
    voices and rates, so that every clip passes the reference's 2 s minimum. Beside the manifest, the
    transcripts in fairseq's speech recognition layout: ``train.wrd`` (the sentences' words as
    LibriSpeech writes them), ``train.ltr`` (their letters) and ``dict.ltr.txt`` (LibriSpeech's letters
    with this corpus's counts). A corpus made before the transcripts were kept is made again (the same audio).
    """
    manifest, wav_dir = _corpus(f"speech-{num_utterances}")
    if manifest.exists() and manifest.with_suffix(".ltr").exists():
        return manifest
    engine = _ESpeak()
    sentences = prose_sentences()
    lines, s, words = [str(wav_dir.resolve())], 0, []
    voices, rates = synthetic_speech_labels(num_utterances)
    for u in range(num_utterances):
        voice, rate = SPEECH_VOICES[voices[u]], SPEECH_RATES[rates[u]]
        pieces: list[np.ndarray] = []
        spoken = []
        while sum(p.shape[0] for p in pieces) < min_seconds * engine.sample_rate:
            spoken.append(sentences[s % len(sentences)])
            pieces.append(engine.speak(spoken[-1], voice, rate))
            s += 1
        wav = resample(np.concatenate(pieces).astype(np.float32) / 32768.0, engine.sample_rate, sample_rate)
        name = f"utt{u:04d}.wav"
        sf.write(wav_dir / name, np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16")
        lines.append(f"{name}\t{wav.shape[0]}")
        words.append(normalize_words(" ".join(spoken)))
    write_labels(manifest.parent, "train", words)
    write_dictionary(manifest.parent / DICT_FILE, words, order=LIBRISPEECH_LETTERS)
    return _write_manifest(manifest, lines)


def spoken_keyword_labels() -> dict[str, list[int]]:
    """Per clip of ``spoken_keywords``: the keyword, voice and rate (indices into KEYWORDS, SPEECH_VOICES,
    SPEECH_RATES); clips run keyword-major, then voice, rate and pitch."""
    order = [(k, v, r) for k in range(len(KEYWORDS)) for v in range(len(SPEECH_VOICES))
             for r in range(len(SPEECH_RATES)) for _ in KEYWORD_PITCHES]  # fmt: skip
    return {"keyword": [k for k, _, _ in order], "voice": [v for _, v, _ in order], "rate": [r for _, _, r in order]}


def spoken_keywords(sample_rate: int = 16_000, seconds: float = 1.0) -> Path:
    """Synthesise (once) the keyword-spotting set; returns its manifest ``train.tsv``.

    Each clip is ``seconds`` long, the word centred in silence (cropped about its centre if longer), as
    Speech Commands' one-second clips. Beside the manifest, ``train.lbl`` names each clip's keyword:
    the audio-classification layout (a manifest and a label file with a line per clip).
    """
    manifest, wav_dir = _corpus("keywords")
    if manifest.exists():
        return manifest
    engine = _ESpeak()
    length = int(seconds * sample_rate)
    lines, words = [str(wav_dir.resolve())], []
    labels = spoken_keyword_labels()
    for i, (k, v, r) in enumerate(zip(labels["keyword"], labels["voice"], labels["rate"])):
        pitch = KEYWORD_PITCHES[i % len(KEYWORD_PITCHES)]
        speech = engine.speak(KEYWORDS[k], SPEECH_VOICES[v], SPEECH_RATES[r], pitch).astype(np.float32) / 32768.0
        speech = resample(speech, engine.sample_rate, sample_rate)
        start = max(0, (speech.shape[0] - length) // 2)
        speech = speech[start : start + length]
        clip = np.zeros(length, np.float32)
        offset = (length - speech.shape[0]) // 2
        clip[offset : offset + speech.shape[0]] = speech
        name = f"kw{i:04d}.wav"
        sf.write(wav_dir / name, np.clip(clip, -1.0, 1.0), sample_rate, subtype="PCM_16")
        lines.append(f"{name}\t{length}")
        words.append(KEYWORDS[k])
    (manifest.parent / "train.lbl").write_text("\n".join(words) + "\n", encoding="utf-8")
    return _write_manifest(manifest, lines)
