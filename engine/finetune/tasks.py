"""The fine-tuning tasks, by name: what each reads, which head it puts on the encoder, how it is scored.

A ``Task`` is a modality and the functions below; ``d2v2 finetune`` looks its task up in ``TASKS`` and
never branches on the task's name:

- ``image-classification``: an ImageFolder (``train/`` + ``val/``) or the embedded digits; mean-pooled
  patches, LayerNorm and a linear head (the reference's ``mae_image_classification``); top-1 (and top-5
  from 10 classes up).
- ``audio-classification``: a manifest with its ``.lbl`` file, class folders, or the embedded spoken
  keywords; frames mean-pooled (padding left out) and a linear head; accuracy.
- ``text-classification``: a GLUE task folder, a CSV / JSONL of ``text[,text_pair],label``, or the
  embedded pydoc topics; RoBERTa's head on ``<s>``; the GLUE task's metrics, accuracy, or Pearson /
  Spearman for a regression target (STS-B).
- ``speech-recognition``: a manifest with its ``.ltr`` / ``.wrd`` transcripts and ``dict.ltr.txt``, or the
  embedded synthetic speech; a per-frame CTC head over the letters (``speech``); WER and CER.

The classification tasks share ``Classifier`` (``classifier_model``), ``LabelledCollater`` batches
(mixup / cutmix for images) and ``ClassScorer``; speech recognition brings its own three.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from d2v2.models import Classifier, PooledHead, SentenceHead

from ..data import audio, embedded, images
from ..data.augment import RandAugment, RandomErasing
from ..probe_sets import text_set
from .data import (
    FinetuneDataConfig,
    LabelledClips,
    LabelledCollater,
    LabelledSplits,
    LabelledTokens,
    Mixing,
    Normalized,
    Subset,
    split_indices,
)
from .labelled_audio import read_labelled_audio
from .labelled_images import has_validation_split, read_labelled_images
from .labelled_text import TextExamples, glue_task_of, read_glue, read_table
from .metrics import GLUE_METRICS, score
from .speech import build_recognizer, ctc_head, read_speech, speech_collater, speech_metrics, speech_scorer


@dataclass(kw_only=True, slots=True)
class HeadConfig:
    """The head on the encoder and how the whole is trained (the reference keeps these in its
    fine-tuning model's config)."""

    dropout: float = 0.0
    """Before the head's linear layer (text: RoBERTa's ``pooler_dropout``, applied twice, as there)."""
    init_std: float = 2e-5
    """Pooled heads: the linear weight's initial std (MAE fine-tuning's ``trunc_normal_(std=2e-5)``)."""
    label_smoothing: float = 0.0
    """Classes: label smoothing of the cross-entropy (0.1 in the reference's ImageNet fine-tuning)."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay (0.65 for ViT-B in the reference's ImageNet fine-tuning; 1 = none)."""
    freeze_feature_encoder: bool = False
    """Audio: keep the CNN feature encoder as pretrained (wav2vec 2.0's and data2vec's fine-tuning:
    ``feature_grad_mult: 0.0``)."""
    freeze_updates: int = 0
    """Speech recognition: the encoder stays as pretrained for this many updates, only the head learns
    (wav2vec 2.0's ``freeze_finetune_updates``)."""
    mask_prob: float = 0.0
    """Speech recognition: time masking in training, the probability of a frame starting a span
    (wav2vec 2.0's ``mask_prob``; 0 = off); masked frames take the method's fill (``Method.mask_fill``)."""
    mask_length: int = 10
    """Speech recognition: frames per time-mask span (``mask_length``)."""
    mask_channel_prob: float = 0.0
    """Speech recognition: channel masking, the probability of a channel starting a span of zeroed
    channels (``mask_channel_prob``; 0 = off)."""
    mask_channel_length: int = 64
    """Speech recognition: channels per channel-mask span (``mask_channel_length``)."""

    def __post_init__(self):
        for name in ("dropout", "label_smoothing", "mask_prob", "mask_channel_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"head.{name} must lie in [0, 1), got {getattr(self, name)}")
        for name in ("mask_length", "mask_channel_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"head.{name} must be >= 1, got {getattr(self, name)}")
        if self.freeze_updates < 0:
            raise ValueError(f"head.freeze_updates must be >= 0, got {self.freeze_updates}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"head.layer_decay must lie in (0, 1] (1 = no decay), got {self.layer_decay}")
        if self.init_std <= 0:
            raise ValueError(f"head.init_std must be > 0, got {self.init_std}")


@dataclass
class TaskContext:
    """What a task's reader may need beyond the data config: the model's config, and for text the
    tokenizer (with the pretraining run's config and folder for the embedded set)."""

    model_cfg: object
    tokenizer: object = None
    run_config: dict | None = None
    run_dir: Path | None = None


class ClassScorer:
    """Collects a split's logits and labels batch by batch, then scores them (``metrics.score``)."""

    def __init__(self, names: tuple[str, ...]):
        self.names, self.outputs, self.labels = names, [], []

    def add(self, out: dict, batch: dict) -> None:
        self.outputs.append(out["logits"].float().cpu())
        self.labels.append(batch["label"].cpu())

    def result(self) -> dict[str, float]:
        return score(self.names, torch.cat(self.outputs), torch.cat(self.labels))


def classifier_model(cfg, method, model_cfg, classes: list[str] | None) -> Classifier:
    """The task's head on ``method``'s (fresh) encoder, for ``classes`` (None: a regression)."""
    outputs = 1 if classes is None else len(classes)
    return Classifier(
        method.encoder, method.modality, task_named(cfg.task).head(cfg.head, model_cfg, outputs), regression=classes is None,
        label_smoothing=cfg.head.label_smoothing, layer_decay=cfg.head.layer_decay, layerdrop=method.skips_parameters,
        freeze_feature_encoder=cfg.head.freeze_feature_encoder,
    )  # fmt: skip


def labelled_collater(cfg, splits: LabelledSplits, model, seed: int, train: bool) -> LabelledCollater:
    """Stacked or padded batches with their labels; training batches of classes mixed as ``data`` asks."""
    mixing = None
    if train and splits.classes is not None:
        data = cfg.data
        mixing = Mixing(data.mixup, data.cutmix, data.mix_prob, data.switch_prob, cfg.head.label_smoothing, splits.num_outputs)
    return LabelledCollater(seed if train else 0, splits.pad_id, mixing)


def class_scorer(cfg, classes: list[str] | None, names: tuple[str, ...]) -> ClassScorer:
    return ClassScorer(names)


@dataclass(frozen=True)
class Task:
    name: str
    modality: str
    read: Callable[[FinetuneDataConfig, TaskContext], LabelledSplits]
    """The labelled train and valid splits."""
    head: Callable[[HeadConfig, object, int], nn.Module]
    """The head for ``(head config, model config, outputs)``."""
    metrics: Callable[[LabelledSplits], tuple[str, ...]]
    """The metrics to report, the first the one the best checkpoint is chosen by (``metrics.better``)."""
    model: Callable = classifier_model
    """``model(finetune config, method, model config, classes)``: the task's model around the method's encoder."""
    collater: Callable = labelled_collater
    """``collater(finetune config, splits, model, seed, train)``: what makes a batch of items."""
    scorer: Callable = class_scorer
    """``scorer(finetune config, classes, metric names)``: a fresh ``add(out, batch)`` / ``result()`` scorer."""


def _split(make, num: int, cfg: FinetuneDataConfig):
    """(train, valid) data sets of one labelled set by ``cfg.valid_fraction``: ``make(train: bool)``
    builds the whole set with the train or the validation transform."""
    train, valid = split_indices(num, cfg.valid_fraction, cfg.split_seed)
    return Subset(make(True), train), Subset(make(False), valid)


# -- images ------------------------------------------------------------------------------------------


def read_images(cfg: FinetuneDataConfig, ctx: TaskContext) -> LabelledSplits:
    size = ctx.model_cfg.image_size
    augment = images.PretrainTransform(
        size, scale=cfg.crop_scale, hflip=cfg.hflip,
        rand_augment=RandAugment(cfg.rand_augment) if cfg.rand_augment else None,
        random_erasing=RandomErasing(cfg.random_erasing) if cfg.random_erasing > 0 else None,
    )  # fmt: skip
    if cfg.path is None:
        pixels, labels = embedded.digits(size=size)
        classes = [str(d) for d in range(10)]
        train, valid = _split(lambda t: images.TensorImageDataset(pixels, labels, augment if t else Normalized(), classes), len(labels), cfg)
        return LabelledSplits(train, valid, classes, "embedded digits")

    def files(found, transform):
        return images.ImageFolderDataset(cfg.path, transform, listed=(found.paths, found.labels, found.classes))

    found = read_labelled_images(cfg.path, "train")
    if has_validation_split(cfg.path):
        train, valid = files(found, augment), files(read_labelled_images(cfg.path, "val", found.classes), images.EvalTransform(size))
    else:
        train, valid = _split(lambda t: files(found, augment if t else images.EvalTransform(size)), len(found), cfg)
    return LabelledSplits(train, valid, found.classes, str(cfg.path))


def image_head(head: HeadConfig, model_cfg, outputs: int) -> nn.Module:
    return PooledHead(model_cfg.embed_dim, outputs, skip_tokens=model_cfg.num_extra_tokens, norm=True,
                      norm_eps=model_cfg.norm_eps, dropout=head.dropout, init_std=head.init_std)  # fmt: skip


def image_metrics(splits: LabelledSplits) -> tuple[str, ...]:
    return ("accuracy", "top5") if splits.num_outputs >= 10 else ("accuracy",)


# -- audio -------------------------------------------------------------------------------------------


def read_audio(cfg: FinetuneDataConfig, ctx: TaskContext) -> LabelledSplits:
    if cfg.path is None:
        manifest = audio.read_manifest(embedded.spoken_keywords())
        paths = [os.path.join(manifest.root, p) for p in manifest.paths]
        labels = embedded.spoken_keyword_labels()["keyword"]
        train, valid = _split(lambda t: LabelledClips(paths, labels, cfg.max_samples, t), len(paths), cfg)
        return LabelledSplits(train, valid, list(embedded.KEYWORDS), "embedded spoken keywords", pad_id=0.0)
    found = read_labelled_audio(cfg.path, "train")
    root = Path(cfg.path)
    if root.is_dir() and ((root / "valid.tsv").is_file() or (root / "valid").is_dir()):
        held = read_labelled_audio(root, "valid", found.classes)
        train = LabelledClips(found.paths, found.labels, cfg.max_samples, True)
        valid = LabelledClips(held.paths, held.labels, cfg.max_samples, False)
    else:
        train, valid = _split(lambda t: LabelledClips(found.paths, found.labels, cfg.max_samples, t), len(found), cfg)
    return LabelledSplits(train, valid, found.classes, str(cfg.path), pad_id=0.0)


def audio_head(head: HeadConfig, model_cfg, outputs: int) -> nn.Module:
    return PooledHead(model_cfg.embed_dim, outputs, skip_tokens=model_cfg.num_extra_tokens, norm=False,
                      dropout=head.dropout, init_std=head.init_std)  # fmt: skip


def accuracy_only(splits: LabelledSplits) -> tuple[str, ...]:
    return ("accuracy",)


# -- text --------------------------------------------------------------------------------------------


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(``<s>``, ``</s>``, ``<pad>``) ids of a RoBERTa-style tokenizer, or a one-line error."""
    ids = [tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>")]
    if None in ids:
        raise ValueError("the run's tokenizer lacks <s>, </s> or <pad>; text fine-tuning needs a RoBERTa-style "
                         "tokenizer (the one d2v2 trains on text data has them)")  # fmt: skip
    return ids[0], ids[1], ids[2]


def encode_examples(examples: TextExamples, tokenizer, max_tokens: int) -> list[list[int]]:
    """RoBERTa's input: ``<s> a </s>`` or ``<s> a </s></s> b </s>``, each text cut so the whole fits in
    ``max_tokens`` (the longer text first)."""
    bos, eos, _ = special_ids(tokenizer)
    firsts = [e.ids for e in tokenizer.encode_batch(examples.texts, add_special_tokens=False)]
    seconds = [e.ids for e in tokenizer.encode_batch(examples.text_pairs, add_special_tokens=False)] if examples.text_pairs else None
    out = []
    for i, a in enumerate(firsts):
        b = seconds[i] if seconds is not None else None
        room = max_tokens - (2 if b is None else 4)
        a, b = list(a), (list(b) if b is not None else None)
        while len(a) + (len(b) if b is not None else 0) > room:
            (a if b is None or len(a) >= len(b) else b).pop()
        out.append([bos, *a, eos] + ([eos, *b, eos] if b is not None else []))
    return out


def _table_files(root: Path) -> tuple[Path, Path | None]:
    """A CSV / JSONL file itself, or a folder's ``train.*`` and ``dev.*`` (or ``valid.*``) tables."""
    if root.is_file():
        return root, None
    for ext in (".csv", ".jsonl"):
        if (root / f"train{ext}").is_file():
            held = next((root / f"{n}{ext}" for n in ("dev", "valid", "validation") if (root / f"{n}{ext}").is_file()), None)
            return root / f"train{ext}", held
    raise FileNotFoundError(f"{root} holds no GLUE task (its folder named as GLUE's: SST-2, MRPC ...) and no train.csv / "
                            "train.jsonl; give a GLUE task folder or a table of text[,text_pair],label")  # fmt: skip


def read_text(cfg: FinetuneDataConfig, ctx: TaskContext) -> LabelledSplits:
    tokenizer = ctx.tokenizer
    bos, eos, pad = special_ids(tokenizer)
    if cfg.path is None:  # the pydoc topic of a block of tokens
        found = text_set(ctx.model_cfg, ctx.run_config or {}, None, ctx.run_dir)
        task, labels = next(iter(found.tasks.items()))
        sequences = [[bos, *row, eos] for row in found.sources.tolist()]
        train, valid = _split(lambda t: LabelledTokens(sequences, labels.tolist()), len(sequences), cfg)
        return LabelledSplits(train, valid, found.classes[task], found.description, pad_id=pad)
    root = Path(cfg.path)
    glue = glue_task_of(root) if root.is_dir() else None
    if glue is not None:
        train_ex, valid_ex = read_glue(root, glue, "train"), read_glue(root, glue, "dev")
    else:
        train_file, valid_file = _table_files(root)
        train_ex = read_table(train_file)
        valid_ex = read_table(valid_file, train_ex.classes) if valid_file is not None else None
    train_seq = encode_examples(train_ex, tokenizer, cfg.max_tokens)
    extra = {"glue_task": glue} if glue else {}
    if valid_ex is None:
        train, valid = _split(lambda t: LabelledTokens(train_seq, train_ex.labels), len(train_seq), cfg)
    else:
        train, valid = LabelledTokens(train_seq, train_ex.labels), LabelledTokens(encode_examples(valid_ex, tokenizer, cfg.max_tokens), valid_ex.labels)
    return LabelledSplits(train, valid, train_ex.classes, str(cfg.path), pad_id=pad, extra=extra)


def text_head(head: HeadConfig, model_cfg, outputs: int) -> nn.Module:
    return SentenceHead(model_cfg.embed_dim, outputs, dropout=head.dropout)


def text_metrics(splits: LabelledSplits) -> tuple[str, ...]:
    if "glue_task" in splits.extra:
        return GLUE_METRICS[splits.extra["glue_task"]]
    return ("pearson", "spearman") if splits.classes is None else ("accuracy",)


TASKS = {
    task.name: task
    for task in (
        Task("image-classification", "image", read_images, image_head, image_metrics),
        Task("audio-classification", "audio", read_audio, audio_head, accuracy_only),
        Task("text-classification", "text", read_text, text_head, text_metrics),
        Task("speech-recognition", "audio", read_speech, ctc_head, speech_metrics, model=build_recognizer,
             collater=speech_collater, scorer=speech_scorer),
    )
}


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
