"""A fine-tuning run's configuration: the task, where the encoder comes from, the head, the data, the
optimizer and the loop; resolved from a ``finetune-*`` recipe and ``--set`` overrides, as pretraining's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import apply_overrides, finetune_recipe_names, from_dict, load_recipe
from ..training.distributed import DistConfig
from ..training.schedule import OptimConfig
from ..training.trainer import TrainConfig
from .data import FinetuneDataConfig
from .decoding import DecodeConfig
from .tasks import HeadConfig, task_named


@dataclass(kw_only=True, slots=True)
class PretrainedConfig:
    """The encoder a run starts from."""

    checkpoint: str | None = None
    """A pretraining run (its folder, a checkpoint folder or a state.pt) of any method, or one written by
    ``d2v2 import-fairseq``; None (``--checkpoint none``) = a freshly initialised encoder, the
    "no pretraining" baseline, built as ``recipe`` builds it."""
    weights: Literal["student", "teacher"] = "student"
    """The student's weights (what the reference fine-tunes: it drops the EMA teacher) or, for a method
    with an EMA teacher, the teacher's."""
    recipe: str = ""
    """``--checkpoint none`` only: the pretraining recipe whose encoder is built fresh (its method,
    modality, size and data-decided fields: a fair baseline for runs of that recipe)."""


@dataclass(kw_only=True, slots=True)
class FinetuneTrainConfig(TrainConfig):
    """The loop's settings, plus validation."""

    eval_every: int = 100
    """Score the validation split every this many updates (and after the last); the best score's
    weights are kept in ``<run>/best/``."""

    def __post_init__(self):
        TrainConfig.__post_init__(self)
        if self.eval_every < 1:
            raise ValueError(f"train.eval_every must be >= 1, got {self.eval_every}")


@dataclass(kw_only=True, slots=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs; written to ``<run>/config.yaml`` (with the encoder's whole
    config under ``encoder``, what resume and ``evaluate`` rebuild it from)."""

    recipe: str
    task: str
    """A task of ``d2v2.engine.finetune.tasks.TASKS`` (image-, audio-, text-classification, speech-recognition)."""
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    model: dict = field(default_factory=dict)
    """Encoder config fields that fine-tuning changes (drop path, dropouts, LayerDrop), over the
    pretrained run's."""
    head: HeadConfig = field(default_factory=HeadConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Speech recognition: how logits become words in validation, ``evaluate`` and ``transcribe``."""

    def __post_init__(self):
        task_named(self.task)  # an unknown task is a one-line error naming the known ones
        if self.train.max_steps > self.optim.total_steps:
            raise ValueError(f"train.max_steps={self.train.max_steps} goes past optim.total_steps={self.optim.total_steps}; "
                             f"raise optim.total_steps with it")  # fmt: skip
        if self.pretrained.checkpoint is None and not self.pretrained.recipe:
            raise ValueError("--checkpoint none needs pretrained.recipe, the pretraining recipe whose encoder is "
                             "built fresh (e.g. --set pretrained.recipe=image-tiny)")  # fmt: skip


RESOLVED_ONLY = ("encoder", "method", "classes")
"""What config.yaml holds beyond the recipe's sections: the built encoder's method and whole config, and the
class names the head predicts (speech recognition: its letter vocabulary, blank first)."""


def finetune_config_from_dict(data: dict) -> FinetuneConfig:
    """A recipe's merged sections (or a fine-tuning run's config.yaml) -> a validated FinetuneConfig."""
    data = {k: v for k, v in data.items() if k not in RESOLVED_ONLY}
    if "task" not in data:
        raise ValueError(f"recipe {data.get('recipe')} names no task; a fine-tuning recipe gives task: (e.g. image-classification)")
    return from_dict(FinetuneConfig, data)


def resolve_finetune_config(recipe: str, overrides: list[str] = ()) -> FinetuneConfig:
    return finetune_config_from_dict(apply_overrides(load_recipe(recipe, finetune_recipe_names), list(overrides)))

