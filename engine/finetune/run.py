"""``finetune()`` and ``evaluate()``: a pretrained encoder with a task head, trained and scored.

``finetune`` resolves a ``finetune-*`` recipe, builds the encoder the pretrained run (``--checkpoint``)
was trained as, with its weights (student, or the EMA teacher's), or fresh (``--checkpoint none``),
puts the task's head on it and trains the whole with ``FinetuneTrainer``: the pretraining loop with
its run-folder lock, exact resume, SIGTERM / Ctrl-C checkpoints, precision, compile and torchrun, plus
validation and the best checkpoint. ``evaluate`` scores a fine-tuned run's best (or given) checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from d2v2.models import FinetuneModel, build_method, count_parameters, method_entry
from d2v2.models.config import finetune_fields

from ..training import distributed, runfolder
from ..training.checkpoint import BEST_DIR, STATE_FILE, checkpoint_folders, load_checkpoint, resolve_checkpoint, run_folder_of
from ..config import from_dict, to_dict
from ..data import text
from ..data.build import build_dataset
from ..export import encoder_state
from ..probe_sets import TOKENIZER_FILE, run_tokenizer
from ..run import absolute_paths, resolve_config, run_job
from .config import FinetuneConfig, finetune_config_from_dict, resolve_finetune_config
from .data import LabelledSplits, train_loader, valid_batches
from .tasks import TaskContext, task_named
from .trainer import FinetuneTrainer, _shown, run_scorer

FINETUNE_PATH_KEYS = ("data.path", "pretrained.checkpoint")
"""Paths config.yaml stores absolute, so that a run does not depend on the directory it started in."""


def encoder_config(method: str, values: dict, overrides: dict, where: str):
    """The method's config from a run's stored values, with fine-tuning's ``model`` overrides (fairseq's
    fine-tuning names spread over the method's fields: ``finetune_fields``)."""
    config = method_entry(method).config
    values = {k: v for k, v in values.items() if k != "size"}
    return from_dict(config, {**values, **finetune_fields(config, overrides)}, where)


class Pretrained:
    """The encoder a fine-tuning run starts from: its method, config, built model, and (text) tokenizer."""

    def __init__(self, cfg: FinetuneConfig, modality: str):
        self.weights_state = None
        if cfg.pretrained.checkpoint is not None:
            state = load_checkpoint(cfg.pretrained.checkpoint)
            config = state.get("config")
            if not isinstance(config, dict) or "model" not in config or "task" in config:
                what = "a fine-tuned run" if isinstance(config, dict) and "task" in config else "not a d2v2 pretraining checkpoint"
                raise ValueError(f"--checkpoint {cfg.pretrained.checkpoint} is {what}; give a pretraining run (or none)")
            self.method_name = config.get("method", "data2vec2")
            self.model_cfg = encoder_config(self.method_name, dict(config["model"]), cfg.model, "model")
            self.run_config, self.run_dir = config, run_folder_of(resolve_checkpoint(cfg.pretrained.checkpoint))
            self.weights_state = state["method"]
            self.tokenizer_file = None
        else:
            fields = finetune_fields(method_entry(resolve_config(cfg.pretrained.recipe).method).config, cfg.model)
            run_cfg = resolve_config(cfg.pretrained.recipe, [f"model.{k}={json.dumps(v)}" for k, v in fields.items()])
            dataset = build_dataset(run_cfg.model.modality, run_cfg.data)
            self.method_name = run_cfg.method
            self.model_cfg = run_cfg.model.build_config(**dataset.model_fields())
            self.run_config, self.run_dir = to_dict(run_cfg), None
            folder = getattr(dataset, "folder", None)
            self.tokenizer_file = folder / TOKENIZER_FILE if isinstance(folder, Path) else None
        if self.model_cfg.modality != modality:
            raise ValueError(f"task {cfg.task} takes {modality} encoders; the pretrained one is {self.model_cfg.modality} "
                             f"({cfg.pretrained.checkpoint or cfg.pretrained.recipe})")  # fmt: skip

    def tokenizer(self):
        if self.tokenizer_file is not None:
            return text.load_tokenizer(self.tokenizer_file)
        return run_tokenizer(self.run_config, self.run_dir)

    def load_weights(self, model: FinetuneModel, which: str) -> str:
        """Put the pretrained encoder's weights (the student's or the EMA teacher's) into ``model``; says
        which were taken."""
        if self.weights_state is None:
            return "a fresh encoder (no pretraining)"
        method = build_method(self.method_name, self.model_cfg)
        method.load_state_dict(self.weights_state)
        if which == "teacher" and getattr(method, "teacher", None) is None:
            raise ValueError(f"pretrained.weights=teacher: {self.method_name} has no EMA teacher; use student")
        model.load_encoder(encoder_state(method, which), method)
        return f"the {which}'s weights of {self.method_name}"


def build_model(cfg: FinetuneConfig, method_name: str, model_cfg, classes: list[str] | None) -> FinetuneModel:
    """The task's model around a freshly built ``method_name`` encoder, for ``classes`` (the class names,
    the letters of speech recognition; None: a regression)."""
    return task_named(cfg.task).model(cfg, build_method(method_name, model_cfg), model_cfg, classes)


def _splits(cfg: FinetuneConfig, model_cfg, tokenizer_fn, run_config, run_dir) -> LabelledSplits:
    task = task_named(cfg.task)
    data_cfg = cfg.data
    if model_cfg.modality == "text":
        data_cfg = from_dict(type(cfg.data), {**to_dict(cfg.data), "max_tokens": min(cfg.data.max_tokens, model_cfg.max_positions)})
    tokenizer = tokenizer_fn() if task.modality == "text" else None
    return task.read(data_cfg, TaskContext(model_cfg, tokenizer, run_config, run_dir))


def finetune(
    recipe: str | None, checkpoint: str | None = None, overrides: list[str] = (), data_path: str | None = None,
    out: str | None = None, max_steps: int | None = None, device: str | None = None, resume: str = "auto",
    weights: str | None = None, log=print,
) -> dict:
    """Fine-tune (or continue fine-tuning); returns the best validation metrics."""
    extra = [f"pretrained.checkpoint={checkpoint}"] if checkpoint not in (None, "none") else []
    extra += ["pretrained.checkpoint=null"] if checkpoint == "none" else []
    extra += [f"data.path={data_path}"] if data_path else []
    extra += [f"pretrained.weights={weights}"] if weights else []
    extra += [f"train.max_steps={max_steps}"] if max_steps is not None else []
    overrides = absolute_paths(list(overrides) + extra, FINETUNE_PATH_KEYS)
    stored = runfolder.read_config(Path(out)) if out else None
    if stored is not None:
        if "task" not in stored:
            raise runfolder.RunFolderError(f"{out} is a pretraining run, not a fine-tuning one; pick a new --out")
        cfg = finetune_config_from_dict(runfolder.continued_config(Path(out), stored, recipe, overrides))
    else:
        if recipe is None:
            raise ValueError("give --recipe (e.g. finetune-image-tiny) for a new fine-tuning run")
        cfg = resolve_finetune_config(recipe, overrides)
        if checkpoint is None and cfg.pretrained.checkpoint is None:
            raise ValueError("give --checkpoint RUN (a pretraining run) or --checkpoint none (a fresh encoder)")
    return run_job(
        cfg.recipe, cfg.dist.strategy, device, out, resume, log,
        lambda env, dev, run_dir, log: _finetune_in(cfg, stored, env, dev, run_dir, resume, log),
    )  # fmt: skip


def resolved_config(cfg: FinetuneConfig, method_name: str, model_cfg, classes: list[str] | None) -> dict:
    """A fine-tuning run's config.yaml (and its checkpoints' ``config``): the run's config, the encoder it
    built (its method and whole config: what resume, ``evaluate`` and ``export`` rebuild it from) and
    the classes its head predicts (speech recognition: the letters, blank first; None: a regression)."""
    return {"recipe": cfg.recipe, "method": method_name, **{k: v for k, v in to_dict(cfg).items() if k != "recipe"},
            "encoder": {"method": method_name, "config": to_dict(model_cfg)}, "classes": classes}  # fmt: skip


def split_batches(cfg: FinetuneConfig, splits: LabelledSplits, model: FinetuneModel):
    """``() -> the validation split's batches``, in order, as the task batches them."""
    collate = task_named(cfg.task).collater(cfg, splits, model, 0, False)
    return lambda: valid_batches(splits.valid, cfg.data.batch_size, collate, splits.valid_sizes, cfg.data.max_batch_samples)


def make_trainer(cfg: FinetuneConfig, model: FinetuneModel, splits: LabelledSplits, run_dir: Path, dev: torch.device,
                 resolved: dict, log, env: distributed.DistEnv | None = None) -> FinetuneTrainer:  # fmt: skip
    """The loop for ``model`` on ``splits``: its resumable loader (the task's batches), validation."""
    env = env or distributed.DistEnv()
    task = task_named(cfg.task)
    collate = task.collater(cfg, splits, model, cfg.train.seed, True)
    names = task.metrics(splits)

    def loader_fn(position):
        return train_loader(splits, cfg.data, cfg.train.seed, collate, position, rank=env.rank, world_size=env.world_size)

    by_size = splits.train_sizes is not None and cfg.data.max_batch_samples > 0
    return FinetuneTrainer(
        model, loader_fn, cfg.optim, cfg.train, run_dir, dev, 0 if by_size else cfg.data.batch_size, resolved, log=log,
        dist=env, find_unused_parameters=model.skips_parameters, strategy=cfg.dist.strategy,
        valid_batches=split_batches(cfg, splits, model), scorer=lambda: task.scorer(cfg, splits.classes, names),
        metric_names=names, eval_every=cfg.train.eval_every,
    )  # fmt: skip


def _finetune_in(cfg: FinetuneConfig, stored: dict | None, env, dev, run_dir: Path, resume: str, log) -> dict:
    task = task_named(cfg.task)
    torch.manual_seed(cfg.train.seed)
    pretrained = None
    if stored is not None and "encoder" in stored:  # a continued run: the encoder it was built as
        method_name = stored["encoder"]["method"]
        model_cfg = encoder_config(method_name, stored["encoder"]["config"], {}, "encoder.config")
        tokenizer_fn = lambda: text.load_tokenizer(run_dir / TOKENIZER_FILE)  # noqa: E731
        run_config, pre_dir = stored, run_dir
    else:
        pretrained = Pretrained(cfg, task.modality)
        method_name, model_cfg = pretrained.method_name, pretrained.model_cfg
        tokenizer_fn, run_config, pre_dir = pretrained.tokenizer, pretrained.run_config, pretrained.run_dir
    with torch.random.fork_rng(devices=[]):
        splits = env.in_turns(lambda: _splits(cfg, model_cfg, tokenizer_fn, run_config, pre_dir))
    model = build_model(cfg, method_name, model_cfg, splits.classes)
    # The pretrained weights go in before the trainer shards or wraps the model; a run that resumes
    # replaces them with its checkpoint's.
    taken = None
    if stored is None or not checkpoint_folders(run_dir):
        pretrained = pretrained or Pretrained(cfg, task.modality)
        taken = pretrained.load_weights(model, cfg.pretrained.weights)
    env.offset_rng(cfg.train.seed)
    resolved = resolved_config(cfg, method_name, model_cfg, splits.classes)
    trainer = make_trainer(cfg, model, splits, run_dir, dev, resolved, log, env)
    log(f"run folder {run_dir} | {cfg.task}: {splits.description}, {len(splits.train)} train / {len(splits.valid)} valid "
        f"samples, {splits.num_outputs if splits.classes is not None else 'a regression'} "
        f"{'outputs' if splits.classes is not None else 'target'} | {method_name} {model_cfg.modality} encoder, "
        f"{count_parameters(model.encoder) / 1e6:.1f} M parameters | {dev}")  # fmt: skip
    if not trainer.resume(resume) and taken is not None:
        log(f"starting from {taken}" + (f" ({cfg.pretrained.checkpoint})" if cfg.pretrained.checkpoint else ""))
    if env.is_main:
        runfolder.write_config(run_dir, resolved)
        if task.modality == "text" and not (run_dir / TOKENIZER_FILE).exists():
            tokenizer_fn().save(str(run_dir / TOKENIZER_FILE))  # evaluate and export read the text with it
        dropped = runfolder.truncate_metrics(run_dir, trainer.step)
        if dropped:
            log(f"metrics.jsonl: dropped {dropped} line(s) logged after step {trainer.step}, which run again now")
    trainer.train()
    return trainer.best


# ---------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------


def finetuned_state_file(checkpoint: str) -> Path:
    """A fine-tuning run folder's best checkpoint (``best/``), else what ``checkpoint`` names."""
    best = Path(checkpoint) / BEST_DIR / STATE_FILE
    return best if best.is_file() else resolve_checkpoint(checkpoint)


def finetune_run_dir(state_file: Path) -> Path:
    """The fine-tuning run folder a checkpoint lies in (``RUN/best/`` or ``RUN/checkpoints/step-X/``), else its folder."""
    if state_file.parent.name == BEST_DIR:
        return state_file.parent.parent
    return run_folder_of(state_file) or state_file.parent


def load_finetuned(checkpoint: str):
    """A fine-tuned run's checkpoint: (its state, the run's config, its state file)."""
    state_file = finetuned_state_file(checkpoint)
    state = load_checkpoint(state_file)
    config = state.get("config")
    if not isinstance(config, dict) or "task" not in config:
        raise ValueError(f"{checkpoint} is not a fine-tuned run; fine-tune it first: d2v2 finetune --recipe "
                         f"finetune-<modality>-tiny --checkpoint {checkpoint}")  # fmt: skip
    return state, config, state_file


def evaluate(checkpoint: str, data: str | None = None, out: str | None = None, device: str | None = None,
             decode: dict | None = None, log=print) -> dict:  # fmt: skip
    """Score a fine-tuned checkpoint on its run's validation split (or on ``data``, in the task's layout);
    prints the metrics and writes them as JSON into the run folder (``<run>/eval/``). ``decode`` overrides
    the run's ``DecodeConfig`` fields (speech recognition: ``beam``, ``lm``, ``lm_weight``, ``word_score``)."""
    dev = _device(device)
    start = time.perf_counter()
    model, _, model_cfg, config, state_file, step = finetuned_model(checkpoint)
    run_dir = finetune_run_dir(state_file)
    changed = {"data": {**config["data"], "path": str(Path(data).resolve())}} if data else {}
    if decode:
        changed["decode"] = {**config.get("decode", {}), **decode}
    cfg = finetune_config_from_dict({**config, **changed})
    splits = _splits(cfg, model_cfg, lambda: text.load_tokenizer(run_dir / TOKENIZER_FILE), config, run_dir)
    if splits.classes != config.get("classes", splits.classes):
        raise ValueError(f"--data {data} has the outputs (classes, letters) {splits.classes}, the run was fine-tuned on "
                         f"{config['classes']}")  # fmt: skip
    model.to(dev)
    task = task_named(cfg.task)
    scorer = task.scorer(cfg, splits.classes, task.metrics(splits))
    metrics = run_scorer(model, split_batches(cfg, splits, model)(), scorer, dev, torch.bfloat16 if dev.type == "cuda" else None)
    result = {"checkpoint": str(state_file), "step": step, "task": cfg.task, "data": splits.description,
              "samples": len(splits.valid), "metrics": metrics}  # fmt: skip
    if hasattr(scorer, "examples"):
        result.update(decoding=scorer.decoder.description, examples=scorer.examples())
    target = Path(out) if out else run_dir / "eval" / f"{state_file.parent.name}-step-{step:08d}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1))
    shown = " | ".join(f"{k} {_shown(v, k)}" for k, v in metrics.items())
    log(f"evaluate done: step {step} of {checkpoint} on {splits.description} ({result['samples']} samples) in "
        f"{time.perf_counter() - start:.1f} s: {shown}")
    log(f"results:    {target}")
    return result


def _device(device: str | None) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def finetuned_model(checkpoint: str):
    """The fine-tuned model of a run (its best checkpoint) or checkpoint, with its weights, in eval mode; returns (model, encoder method name, encoder config, run config, state file, its update step)."""
    state, config, state_file = load_finetuned(checkpoint)
    return finetuned_model_from(state, state_file)


def finetuned_model_from(state: dict, state_file: Path):
    """``finetuned_model`` of a fine-tuning checkpoint already read from ``state_file``."""
    config = state["config"]
    cfg = finetune_config_from_dict(config)
    method_name = config["encoder"]["method"]
    model_cfg = encoder_config(method_name, config["encoder"]["config"], {}, "encoder.config")
    model = build_model(cfg, method_name, model_cfg, config.get("classes"))
    model.load_state_dict(state["method"])
    return model.eval(), method_name, model_cfg, config, state_file, int(state.get("trainer", {}).get("step", 0))


def finetune_copy(method, method_name: str, recipe: str, run_config: dict, *, device: torch.device, scratch: Path,
                  seed: int = 1, steps: int | None = None, run_dir: Path | None = None) -> dict:  # fmt: skip
    """Fine-tune a copy of ``method``'s student encoder (the method itself is left as it is) with the
    fine-tuning ``recipe`` on its embedded data, in folder ``scratch`` (no lock, nothing logged), and
    return the best validation score: ``{"step", "score", "metrics"}``. ``steps`` rescales the recipe's
    schedule (warm-up in proportion); ``run_config`` is the pretraining run's (text: its tokenizer).

    For benches that judge pretraining by what fine-tuning makes of it (``bench converge --eval finetune``).
    """
    base = resolve_finetune_config(recipe, ["pretrained.checkpoint=in-memory"])
    steps = steps or base.optim.total_steps
    cfg = resolve_finetune_config(recipe, [
        "pretrained.checkpoint=in-memory", f"train.seed={seed}", f"optim.total_steps={steps}", f"train.max_steps={steps}",
        f"optim.warmup_steps={round(base.optim.warmup_steps * steps / base.optim.total_steps)}",
        f"train.eval_every={max(1, steps // 4)}", f"train.checkpoint_every={steps}", "train.keep_checkpoints=1",
        "data.num_workers=0",
    ])  # fmt: skip
    model_cfg = method.cfg
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        splits = _splits(cfg, model_cfg, lambda: run_tokenizer(run_config, run_dir), run_config, run_dir)
        model = build_model(cfg, method_name, model_cfg, splits.classes)
        model.load_encoder(encoder_state(method, "student"), method)
        trainer = make_trainer(cfg, model, splits, scratch, device, {}, lambda *_: None)
        trainer.train()
    return trainer.best
