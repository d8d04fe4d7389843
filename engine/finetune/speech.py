"""Speech recognition's data, model and scoring (the ``speech-recognition`` task of ``tasks``).

Data, in fairseq's layout (``data.letters``): a folder with ``train.tsv`` (the manifest ``d2v2 manifest``
writes), ``train.ltr`` and ``train.wrd`` beside it, ``dict.ltr.txt``, and the validation split likewise
under ``data.valid_split`` (``valid``; the released configs validate on ``dev_other``), else
``data.valid_fraction`` of the training utterances held out. With no ``--data``, the embedded synthetic
speech with its transcripts. Utterances are never cropped (a transcript covers its whole clip);
batches hold up to ``data.max_batch_samples`` samples (count x longest, fairseq's ``max_tokens``,
utterances of similar length together) or ``data.batch_size`` utterances, padded, with a
``padding_mask``; fine-tuning's time and channel masks (``FrameMasking``) are made in the loader workers.

The model is a ``SpeechRecognizer``: the encoder, the method's ``MaskFill``, a ``CTCHead`` over the
letters. Scores: WER and CER of the decoded validation split (greedy, or ``decode``'s beam search).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from d2v2.models import CTCHead, SpeechRecognizer
from d2v2.models.tasks import FrameMasking

from ..data import audio, embedded
from ..data.base import derive_seed
from ..data.letters import BLANK, PAD, Letters, dictionary_of, read_labels
from .data import FinetuneDataConfig, LabelledSplits, Subset, pad_batch, readable, split_indices
from .decoding import Decoder, error_rates


class TranscribedClips(torch.utils.data.Dataset):
    """Utterances with their transcripts: item ``(index, seed)`` -> {"source": normalised waveform,
    "label": symbol ids, "words": the reference}. Unreadable files raise ``CorruptSample`` (skipped, counted)."""

    def __init__(self, paths: list[str], labels: list[list[int]], words: list[str]):
        self.paths, self.labels, self.words = paths, labels, words

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, _ = item
        wave = audio.normalize_waveform(audio.read_waveform(self.paths[index]))
        return {"source": torch.from_numpy(wave), "label": self.labels[index], "words": self.words[index]}


def _split_of(manifest: Path, letters: Letters) -> tuple[TranscribedClips, list[int]]:
    parsed = audio.read_manifest(manifest)
    labels, words = read_labels(manifest, len(parsed.paths), letters)
    paths = [os.path.join(parsed.root, p) for p in parsed.paths]
    return TranscribedClips(paths, labels, words), list(parsed.sizes)


def read_speech(cfg: FinetuneDataConfig, ctx) -> LabelledSplits:
    """The train and valid splits of transcribed speech (see the module docstring)."""
    manifest = Path(embedded.synthetic_speech()) if cfg.path is None else Path(cfg.path)
    if manifest.is_dir():
        manifest = manifest / "train.tsv"
    folder = manifest.parent
    letters, where = dictionary_of(folder)
    train, sizes = _split_of(manifest, letters)
    held = folder / f"{cfg.valid_split}.tsv"
    what = "embedded synthetic speech" if cfg.path is None else str(cfg.path)
    if held.is_file() and held != manifest:
        valid, valid_sizes = _split_of(held, letters)
        description = f"{what} ({held.stem} for validation; {where})"
    else:
        train_ids, valid_ids = split_indices(len(train), cfg.valid_fraction, cfg.split_seed)
        train, valid = Subset(train, train_ids), Subset(train, valid_ids)
        sizes, valid_sizes = [sizes[i] for i in train_ids], [sizes[i] for i in valid_ids]
        description = f"{what} ({len(valid_ids)} utterances held out for validation; {where})"
    return LabelledSplits(train, valid, list(letters.symbols), description, pad_id=0.0, train_sizes=sizes, valid_sizes=valid_sizes)


def ctc_head(head, model_cfg, outputs: int) -> CTCHead:
    return CTCHead(model_cfg.embed_dim, outputs, dropout=head.dropout)


def build_recognizer(cfg, method, model_cfg, classes: list[str]) -> SpeechRecognizer:
    """The ``SpeechRecognizer`` of a fine-tuning config around ``method``'s (fresh) encoder."""
    head = cfg.head
    fill = method.mask_fill()
    if fill is None and (head.mask_prob > 0 or head.mask_channel_prob > 0):
        raise ValueError(f"{type(method).__name__} has no fine-tuning masks; set head.mask_prob=0 and head.mask_channel_prob=0")
    return SpeechRecognizer(
        method.encoder, method.modality, ctc_head(head, model_cfg, len(classes)), fill, blank=BLANK,
        freeze_updates=head.freeze_updates, layer_decay=head.layer_decay, layerdrop=method.skips_parameters,
        freeze_feature_encoder=head.freeze_feature_encoder,
    )  # fmt: skip


class TranscriptCollater:
    """Transcribed utterances -> {"source" [B, T] padded, "padding_mask"?, "label" [B, S] (padded with
    ``<pad>``), "label_lengths" [B], "words", "mask"? [B, N], "channel_mask"? [B, D], "skipped", "epoch", "batch"}."""

    def __init__(self, seed: int, masking: FrameMasking | None = None):
        self.seed, self.masking = seed, masking

    def __call__(self, items: list[dict]) -> dict:
        good, out = readable(items)
        if not good:
            return out
        out["source"], padding = pad_batch([it["source"] for it in good], 0.0)
        if padding is not None:
            out["padding_mask"] = padding
        labels = [torch.tensor(it["label"], dtype=torch.long) for it in good]
        out["label"] = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=PAD)
        out["label_lengths"] = torch.tensor([len(t) for t in labels])
        out["words"] = [it["words"] for it in good]
        if self.masking is not None:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "mask", out["epoch"], out["batch"]))
            lengths = torch.tensor([it["source"].shape[0] for it in good])
            out.update(self.masking(lengths, out["source"].shape[1], generator))
        return out


def speech_collater(cfg, splits: LabelledSplits, model: SpeechRecognizer, seed: int, train: bool) -> TranscriptCollater:
    """Training batches with fine-tuning's masks (where ``head`` asks for them); validation batches without."""
    head = cfg.head
    masking = None
    if train and (head.mask_prob > 0 or head.mask_channel_prob > 0):
        masking = FrameMasking(model.modality, model.head.linear.in_features, head.mask_prob, head.mask_length,
                               model.fill.min_spans, head.mask_channel_prob, head.mask_channel_length)  # fmt: skip
    return TranscriptCollater(seed, masking)


class TranscriptScorer:
    """Decodes each validation batch (greedy, or ``decode``'s beam search) and scores the split: WER, CER."""

    def __init__(self, decoder: Decoder):
        self.decoder, self.references, self.hypotheses = decoder, [], []

    def add(self, out: dict, batch: dict) -> None:
        self.hypotheses += self.decoder(out["logits"].float(), out["lengths"])
        self.references += batch["words"]

    def result(self) -> dict[str, float]:
        return error_rates(self.references, self.hypotheses)

    def examples(self, n: int = 5) -> list[dict]:
        """The first ``n`` (reference, hypothesis) pairs, for the evaluation's JSON."""
        return [{"reference": r, "hypothesis": h} for r, h in zip(self.references[:n], self.hypotheses[:n])]


def speech_scorer(cfg, classes: list[str], names: tuple[str, ...]) -> TranscriptScorer:
    return TranscriptScorer(Decoder(Letters(tuple(classes)), cfg.decode))


def speech_metrics(splits: LabelledSplits) -> tuple[str, ...]:
    return ("wer", "cer")
