"""A pretraining run: the resolved config, the run folder, and ``pretrain()`` that ties them together.

The run configuration composes each component's own config: the method's (its config dataclass,
filled from the preset the recipe names with ``method:`` and ``model: {modality, size}``, plus any
overridden fields), the data's, the optimizer's and the loop's. Resolution order: recipe (and its ``base:`` chain) ->
``--set key=value`` overrides -> validation, one line per error. A folder that already holds a run
is continued from its own ``config.yaml`` instead, and locked while it trains (``runfolder``).

Launched by torchrun, ``pretrain()`` trains data-parallel (see ``distributed``: how to launch, how the
data is sharded, what rank 0 alone does), with DDP or, with ``--set dist.strategy=fsdp``, FSDP2.
"""

from __future__ import annotations

import dataclasses
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from d2v2.models import DEFAULT_METHOD, build_method, count_parameters, method_entry
from d2v2.models.config import ModalityName

from .training import distributed, runfolder
from .config import apply_overrides, convert, from_dict, load_recipe, parse_override, to_dict
from .data.build import DataConfig, batches_by_size, build_dataset, build_loader, fingerprint
from .data.loader import DataPosition
from .probe_sets import TOKENIZER_FILE
from .training.schedule import OptimConfig
from .training.trainer import TrainConfig, Trainer


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """A method's released preset plus field overrides (``d2v2.models.method_config``)."""

    method: str
    """The method's registered name (``d2v2.models.METHODS``)."""
    modality: ModalityName
    size: str
    """A size of ``d2v2.models.ENCODER_SIZES`` (tiny, base, large, ...)."""
    overrides: dict = field(default_factory=dict)
    """Config fields that differ from the preset (``--set model.<field>=...``)."""

    def build_config(self, **extra):
        """The method's config: the preset, then ``overrides`` and the data-decided ``extra`` fields
        (those the method's config has; a user override of the same field wins)."""
        entry = method_entry(self.method)
        hints = typing.get_type_hints(entry.config)
        known = {f.name for f in dataclasses.fields(entry.config)} - {"modality"}
        extra = {k: v for k, v in extra.items() if k in known and k not in self.overrides}
        values = {}
        for key, value in {**self.overrides, **extra}.items():
            if key not in known:
                raise ValueError(f"unknown config key model.{key}; valid keys in model: size, {', '.join(sorted(known))}")
            values[key] = convert(value, hints[key], f"model.{key}")
        return entry.preset(self.modality, self.size, **values)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything a pretraining run needs; written to ``<run>/config.yaml``."""

    recipe: str
    """The recipe the run was resolved from (a name in ``engine/recipes`` or a YAML path)."""
    model: ModelSpec
    """The method, modality, size and model overrides (a recipe's top-level ``method:`` lands here)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: distributed.DistConfig = field(default_factory=distributed.DistConfig)

    @property
    def method(self) -> str:
        """The pretraining method (``d2v2.models.METHODS``), held once, by ``model``."""
        return self.model.method

    def resolved(self, model_cfg) -> dict:
        """What ``config.yaml`` holds: this config as plain values, the method named at the top, and as
        the model section the method's whole config (what resume, probe and export rebuild it from)."""
        values = to_dict(self)
        values["model"] = {"size": self.model.size, **to_dict(model_cfg)}
        return {"recipe": values.pop("recipe"), "method": self.method, **values}

    def __post_init__(self):
        if self.train.max_steps > self.optim.total_steps:
            raise ValueError(
                f"train.max_steps={self.train.max_steps} goes past the schedule's optim.total_steps={self.optim.total_steps}, "
                f"where the learning rate stays at optim.min_lr={self.optim.min_lr:g}; raise optim.total_steps with it "
                f"(--set optim.total_steps={self.train.max_steps})"
            )


DEFAULT_RECIPE = "image-tiny"


def build_run_method(cfg: RunConfig, fields: dict):
    """The run's method and its whole config: the preset the recipe names, its overrides, then the
    model ``fields`` the data decides (a data set's ``model_fields()``, or ``DataKind.model_fields``
    of the data config for synthetic batches). The one place ``pretrain`` and the benches build it."""
    model_cfg = cfg.model.build_config(**fields)
    return build_method(cfg.method, model_cfg), model_cfg


def resolve_config(recipe: str, overrides: list[str] = ()) -> RunConfig:
    """Recipe + ``key=value`` overrides -> a validated RunConfig."""
    return config_from_dict(apply_overrides(load_recipe(recipe), list(overrides)))


def config_from_dict(data: dict) -> RunConfig:
    """A recipe's merged sections (or a run's config.yaml) -> a validated RunConfig."""
    data = dict(data)
    recipe = data.get("recipe")
    if "task" in data:
        raise ValueError(f"recipe {recipe} is a fine-tuning recipe; run it with d2v2 finetune --recipe {recipe} --checkpoint RUN")
    model = dict(data.pop("model", {}) or {})
    if "modality" not in model or "size" not in model:
        raise ValueError(f"recipe {recipe} must give model.modality and model.size")
    method = str(data.pop("method", DEFAULT_METHOD))
    method_entry(method)  # an unknown method is a one-line error naming the known ones
    spec = ModelSpec(
        method=method,
        modality=convert(model.pop("modality"), ModalityName, "model.modality"),
        size=str(model.pop("size")),
        overrides=model,
    )
    cfg = from_dict(RunConfig, {**data, "model": spec})
    spec.build_config()  # validates the model section now, not after the data is built
    return cfg


PATH_KEYS = ("data.path", "data.tokenizer")


def absolute_paths(overrides: list[str], keys_with_paths: tuple[str, ...] = PATH_KEYS) -> list[str]:
    """Path overrides (``data.path`` / ``data.tokenizer``) made absolute: config.yaml stores them so, and
    a run (its resume, probe and export) does not depend on the directory it was started from."""
    out = []
    for text in overrides:
        keys, value = parse_override(text)
        if ".".join(keys) in keys_with_paths and isinstance(value, str) and value:
            text = f"{'.'.join(keys)}={os.path.abspath(os.path.expanduser(value))}"
        out.append(text)
    return out


def default_run_dir(recipe: str) -> Path:
    return Path("runs") / f"{Path(recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def pretrain(
    recipe: str | None,
    overrides: list[str] = (),
    data_path: str | None = None,
    out: str | None = None,
    max_steps: int | None = None,
    device: str | None = None,
    resume: str = "auto",
    init_from: str | None = None,
    log=print,
) -> dict:
    """Run (or continue) a pretraining job; returns the last logged metrics.

    ``recipe`` None: the run in ``out``'s config.yaml when there is one, else ``DEFAULT_RECIPE``.
    Under torchrun every process calls this; rank 0 alone logs (``log``) and writes files.
    """
    overrides = absolute_paths(list(overrides) + ([f"data.path={data_path}"] if data_path else []))
    overrides += [f"train.max_steps={max_steps}"] if max_steps is not None else []  # validated like any --set
    if resume not in ("auto", "none") and init_from:
        raise ValueError("--resume PATH and --init-from PATH exclude each other: resume continues a run, init-from starts a new one")
    stored = runfolder.read_config(Path(out)) if out else None
    if stored is not None:  # continuing a run: its own configuration, changed only where allowed
        cfg = config_from_dict(runfolder.continued_config(Path(out), stored, recipe, overrides))
    else:
        cfg = resolve_config(recipe or DEFAULT_RECIPE, overrides)
    return run_job(
        cfg.recipe, cfg.dist.strategy, device, out, resume, log,
        lambda env, dev, run_dir, log: _train_in(cfg, env, dev, run_dir, resume, init_from, log),
    )  # fmt: skip


def _silent(*_args, **_kwargs) -> None:
    pass


def run_job(recipe: str, strategy: str, device: str | None, out: str | None, resume: str, log, body):
    """A training job's frame, for ``pretrain`` and ``finetune`` alike: this process's place in a torchrun
    job and its device, the run folder (``out``, or ``runs/<recipe>-<time>``) locked by rank 0 for the
    whole job (every rank stops if it cannot), then ``body(env, device, run_dir, log)`` (``log`` silent
    off rank 0). A dead peer ends it in one line, not a traceback per rank."""
    env = distributed.detect()
    dev = distributed.setup(env, device, strategy)
    finished = False
    try:
        log = log if env.is_main else _silent
        run_dir = Path(out) if out else Path(env.broadcast_object(str(default_run_dir(recipe))))
        folder = _decided_by_rank0(env, lambda: runfolder.RunFolder.open(run_dir, resume))
        try:
            if env.is_main and (hazard := distributed.restart_hazard()):
                log(f"warning: {hazard}")
            if folder is not None and folder.removed_temporaries:
                log(f"removed the leftovers of an interrupted checkpoint write: {', '.join(folder.removed_temporaries)}")
            with distributed.deterministic_on_cpu(dev):
                result = body(env, dev, run_dir, log)
                finished = True
                return result
        finally:
            if folder is not None:
                folder.close()
    except RuntimeError as e:
        lost = distributed.as_peer_lost(e, env.rank) if env.distributed else None
        if lost is None:
            raise
        raise lost from e
    finally:
        distributed.teardown(finished)


def _decided_by_rank0(env: distributed.DistEnv, decide):
    """``decide()`` on rank 0 (None on the others); a ``RunFolderError`` it raises stops every rank alike."""
    value, refusal = None, None
    if env.is_main:
        try:
            value = decide()
        except runfolder.RunFolderError as e:
            refusal = str(e)
    refusal = env.broadcast_object(refusal)
    if refusal:
        raise runfolder.RunFolderError(refusal)
    return value


def _train_in(
    cfg: RunConfig, env: distributed.DistEnv, dev: torch.device, run_dir: Path, resume: str, init_from: str | None, log,
) -> dict:
    torch.manual_seed(cfg.train.seed)
    # Rank 0 fills the data caches before the others read them; forked so that the model's init
    # stream is the same on every rank whoever built what.
    with torch.random.fork_rng(devices=[]):
        dataset = env.in_turns(lambda: build_dataset(cfg.model.modality, cfg.data))
    def check_data():  # before anything is written: data that moved must be the same data
        found = fingerprint(dataset, cfg.data.path) if cfg.data.path is not None else None
        runfolder.check_moved_data(run_dir, cfg.data.path, found, log)
        return found

    data_print = _decided_by_rank0(env, check_data)  # rank 0 alone reads and records it
    # The data decides some model fields (the text vocabulary and padding id, the image size).
    model, model_cfg = build_run_method(cfg, dataset.model_fields())  # same weights on every rank: same seed, same draws
    env.offset_rng(cfg.train.seed)

    resolved = cfg.resolved(model_cfg)

    def loader_fn(position: DataPosition):
        return build_loader(
            dataset, cfg.data, cfg.train.seed, model.modality, position, rank=env.rank, world_size=env.world_size
        )

    samples_hint = 0 if batches_by_size(dataset) else cfg.data.batch_size
    trainer = Trainer(
        model, loader_fn, cfg.optim, cfg.train, run_dir, dev, samples_hint, resolved, log=log,
        dist=env, find_unused_parameters=model.skips_parameters, strategy=cfg.dist.strategy,
    )  # fmt: skip
    encoder_millions = count_parameters(model.encoder) / 1e6
    processes = f" | {env.world_size} processes" if env.distributed else ""
    processes += " | fsdp" if cfg.dist.strategy == "fsdp" else ""
    log(f"run folder {run_dir} | {cfg.method} {cfg.model.modality} {cfg.model.size} | "
        f"{encoder_millions:.1f} M encoder parameters | {dev}{processes}")
    if not trainer.resume(resume) and init_from:
        trainer.init_from(init_from)
    if env.is_main:  # only now that the run is known to be valid: its config, its metrics up to here
        runfolder.write_config(run_dir, resolved)
        runfolder.record_data(run_dir, cfg.data.path, data_print)
        if isinstance(getattr(dataset, "folder", None), Path):  # a text run: its probe and export read it here
            runfolder.keep_file(dataset.folder / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
        dropped = runfolder.truncate_metrics(run_dir, trainer.step)
        if dropped:
            log(f"metrics.jsonl: dropped {dropped} line(s) logged after step {trainer.step}, which run again now")
    return trainer.train()
