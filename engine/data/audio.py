"""Audio data: the fairseq/wav2vec manifest, read with soundfile, 16 kHz mono.

A manifest is a TSV whose first line is the root folder and every other line
``relative/path<TAB>num_samples``. ``write_manifest`` builds one from a folder (``d2v2 manifest``).
Waveforms are normalised per utterance (zero mean, unit variance over the whole file, as
``normalize: true`` in the reference) and, in the collater, cropped to the shortest clip of the
batch at a seeded random offset, so batches need no padding.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .base import CorruptSample

SAMPLE_RATE = 16_000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed manifest: the root folder and (relative path, number of samples) per utterance."""

    root: str
    paths: list[str]
    sizes: list[int]


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse a fairseq manifest TSV; a folder is read as ``<folder>/train.tsv``."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.tsv"
    if not path.exists():
        raise FileNotFoundError(
            f"audio manifest {path} does not exist; write one with `d2v2 manifest AUDIO_DIR --dest DIR`"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"audio manifest {path} is empty; its first line must be the audio root folder")
    root = lines[0].strip()
    paths, sizes = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[1].strip().isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'relative/path<TAB>num_samples', got {line!r}")
        paths.append(fields[0])
        sizes.append(int(fields[1]))
    if not paths:
        raise ValueError(f"audio manifest {path} lists no files")
    return Manifest(root, paths, sizes)


def write_manifest(
    audio_dir: str | os.PathLike,
    dest: str | os.PathLike,
    ext: str = "wav,flac",
    valid_percent: float = 0.0,
    seed: int = 42,
    warn=None,
) -> tuple[Path, Path | None, int]:
    """Walk ``audio_dir`` for audio files and write ``dest/train.tsv`` (and ``valid.tsv``).

    Frame counts come from ``soundfile.info``; each file goes to valid with probability
    ``valid_percent`` from a seeded RNG. Files it cannot read (not audio, whatever their name) are
    left out, and files not at 16 kHz listed (training would stop at the first); ``warn(message)``
    names both. The manifests appear whole or not at all (written aside, then renamed), so a failed
    write leaves any earlier ones as they were. Returns (train path, valid path or None, files listed).
    """
    root = Path(audio_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder {audio_dir} does not exist")
    if not 0.0 <= valid_percent < 1.0:
        raise ValueError(f"valid_percent must be in [0, 1), got {valid_percent}")
    exts = tuple("." + e.strip().lstrip(".").lower() for e in ext.split(",") if e.strip())
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise ValueError(f"no audio files ({', '.join(exts)}) under {root}")
    rng = random.Random(seed)
    lines: dict[str, list[str]] = {"train": [str(root)], "valid": [str(root)]}
    other_rates, unreadable = [], []
    for f in files:
        try:
            info = sf.info(str(f))
        except Exception as e:  # noqa: BLE001 - libsndfile raises several types for bad files
            reason = getattr(e, "error_string", None) or str(e).strip().splitlines()[0] or type(e).__name__
            unreadable.append(f"{f.relative_to(root)} ({reason.rstrip('.')})")
            continue
        if info.samplerate != SAMPLE_RATE:
            other_rates.append(f"{f.relative_to(root)} ({info.samplerate} Hz)")
        lines["valid" if rng.random() < valid_percent else "train"].append(f"{f.relative_to(root)}\t{info.frames}")
    if len(unreadable) == len(files):
        raise ValueError(f"none of the {len(files)} audio files under {root} could be read: {_first(unreadable)}; "
                         "check that they are audio files")  # fmt: skip
    if warn is not None and unreadable:
        warn(f"left out {len(unreadable)} unreadable file(s): {_first(unreadable)}")
    if other_rates and warn is not None:
        warn(
            f"{len(other_rates)} file(s) are not at {SAMPLE_RATE} Hz, which training needs: "
            f"{_first(other_rates)}; resample them, e.g. with sox"
        )
    dest = Path(dest)
    train_path, valid_path = dest / "train.tsv", dest / "valid.tsv" if valid_percent > 0 else None
    written = {"train": train_path, **({"valid": valid_path} if valid_path else {})}
    temporaries = {name: path.with_name(f".{path.name}.tmp-{os.getpid()}") for name, path in written.items()}
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name, tmp in temporaries.items():
            tmp.write_text("\n".join(lines[name]) + "\n", encoding="utf-8")
        for name, tmp in temporaries.items():
            os.replace(tmp, written[name])
    except OSError as e:
        for tmp in temporaries.values():
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise ValueError(
            f"cannot write the manifest into {dest} ({e.strerror or e}); give a writable folder with --dest"
        ) from None
    return train_path, valid_path, len(files) - len(unreadable)


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def read_waveform(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a file as float32 mono at ``sample_rate``; a different rate is a ValueError (no resampling)."""
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for bad files
        raise CorruptSample(path, e) from e
    if sr != sample_rate:
        raise ValueError(
            f"{path}: sample rate {sr} Hz, the recipe needs {sample_rate} Hz; resample it, e.g. with sox "
            f"(sox in.wav -r {sample_rate} out.wav)"
        )
    if wav.shape[0] == 0:
        raise CorruptSample(path, "no samples")
    return wav.mean(axis=1)


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling by truncating (or zero-padding) the spectrum."""
    n_out = int(round(wav.shape[0] * sr_out / sr_in))
    spectrum = np.fft.rfft(wav.astype(np.float64))
    return (np.fft.irfft(spectrum[: n_out // 2 + 1], n_out) * (n_out / wav.shape[0])).astype(np.float32)


def read_resampled(path: str, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """Read a file as float32 mono (channels averaged) at ``sample_rate``, resampling another rate
    (``resample``); returns (waveform, the file's own rate). An unreadable or empty file is a ValueError."""
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for bad files
        raise ValueError(f"{path} cannot be read as audio ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from e
    if wav.shape[0] == 0:
        raise ValueError(f"{path} holds no samples")
    wav = wav.mean(axis=1)
    return (wav if sr == sample_rate else resample(wav, sr, sample_rate)), sr


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the utterance (a parameter-free layer norm, eps 1e-5)."""
    return ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)).astype(np.float32)


class AudioManifestDataset(torch.utils.data.Dataset):
    """Utterances of a manifest; item ``(index, seed)`` -> {"source": float32 [T], "index": int}.

    Files shorter than ``min_samples`` are left out when the manifest is read (their sizes are
    known without opening them), as the reference does.
    """

    def __init__(self, manifest: str | os.PathLike, min_samples: int = 32_000, normalize: bool = True):
        m = read_manifest(manifest)
        if not os.path.isdir(m.root):
            raise FileNotFoundError(
                f"audio manifest {manifest} names the root folder {m.root}, which does not exist; "
                "fix its first line or write the manifest again with `d2v2 manifest`"
            )
        keep = [i for i, n in enumerate(m.sizes) if n >= min_samples]
        if not keep:
            raise ValueError(
                f"every file in {manifest} is shorter than min_samples={min_samples} "
                f"({min_samples / SAMPLE_RATE:.1f} s); lower it with --set data.min_samples=N"
            )
        self.root = m.root
        self.paths = [m.paths[i] for i in keep]
        self.sizes = np.array([m.sizes[i] for i in keep], dtype=np.int64)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.paths)

    def model_fields(self) -> dict:
        """Model config fields this data decides: none (16 kHz waveforms of any length)."""
        return {}

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, _seed = item
        wav = read_waveform(os.path.join(self.root, self.paths[index]))
        if self.normalize:
            wav = normalize_waveform(wav)
        return {"source": torch.from_numpy(wav), "index": index}


def crop_batch(waves: list[torch.Tensor], max_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Crop every waveform to the shortest one (at most ``max_samples``) at a random offset -> [B, T]."""
    length = min(min(w.shape[0] for w in waves), max_samples)
    out = torch.empty(len(waves), length)
    for i, w in enumerate(waves):
        start = int(torch.randint(0, w.shape[0] - length + 1, (1,), generator=generator))
        out[i] = w[start : start + length]
    return out
