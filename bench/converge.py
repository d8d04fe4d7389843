"""``d2v2 bench converge``: the paper's claim in miniature, time to accuracy per method.

Each method of a modality pretrains from its own recipe (``<modality>-<size>`` for data2vec 2.0,
``d2v1-``, ``mae-``, ``wav2vec2-``, ``mlm-`` before it for the others) on the embedded data, with the
real engine: the recipe's loader (decode, augmentation, masks in its workers) and
``engine.training.trainer.Trainer.train_step`` (forward, backward, clipping, fused AdamW, EMA). Every method gets
the same wall-clock budget.

Schedules fitted to the budget
    A recipe's schedule is a length in updates, so each method first takes a few calibration steps,
    and its schedule is rescaled to the updates its measured step time allows in the budget: the
    learning rate's warm-up and total, the EMA anneal's length, and the per-update decays (EMA
    decays, the Gumbel temperature decay) so that the teacher averages over, and the temperature
    falls along, the same fraction of the run. Every method runs a whole schedule, not the first
    part of a longer one. The calibration model is thrown away.

Fair clocks
    The methods take turns in slices of a few seconds, round robin, so that load on the machine
    hits them all alike; each method's clock counts only its own training steps (data waiting
    included). At fixed points of its clock (t = 0 included) training pauses and the probe
    (``engine.probe``: linear probe and kNN on the frozen teacher's, or encoder's, mean-pooled
    features of the modality's labelled set) measures it; probing is not counted.

The headline
    For each pair (data2vec 2.0 against the modality's baseline and against data2vec 1.0) and seed:
    the best linear-probe accuracy the other method reaches in training, the time it first reaches it,
    and the time data2vec 2.0 first reaches it (at trained probe points: the resolution is the probe
    interval), and their ratio. Same seeds, and the same data order where the batch sizes match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import harness, report

MODALITIES = ("image", "audio", "text")
BASELINES = {"image": "mae", "audio": "wav2vec2", "text": "mlm"}
"""The modality's baseline in the paper's comparison (data2vec 1.0 is compared for every modality)."""
TARGETS = {"mae": 1 / 3, "data2vec": 1 / 2}
"""data2vec 2.0's time to the other's best accuracy, as a fraction of the other's time, that d2v2 aims at."""
CALIBRATION_STEPS = (2, 5)  # discarded, timed
TRANSCRIPTION = {"audio": "finetune-speech-tiny"}
"""With ``--eval finetune``, the modalities whose encoders also fine-tune for speech recognition (CTC, scored
by character error rate on the synthetic speech's held-out sentences): from no pretraining (data2vec 2.0's
fresh encoder) and from each method's encoder at the end of its budget (a few minutes each on a CPU, so
not at every probe point)."""


def recipe_for(method: str, modality: str, size: str) -> str:
    """The recipe ``method`` pretrains ``modality`` with; ValueError when there is none."""
    from d2v2.engine.config import METHOD_RECIPE_PREFIX, method_recipe, recipe_names

    if method not in METHOD_RECIPE_PREFIX:
        raise ValueError(f"unknown method {method!r}; expected some of {', '.join(METHOD_RECIPE_PREFIX)}")
    name = method_recipe(method, modality, size)
    if name not in recipe_names():
        raise ValueError(f"{method} has no {modality} recipe of size {size} ({name}); choose other --methods or --size")
    return name


def default_methods(modality: str) -> list[str]:
    return ["data2vec2", "data2vec", BASELINES[modality]]


def fitted_overrides(cfg, fitted_steps: int) -> list[str]:
    """``--set`` overrides that rescale ``cfg``'s schedules measured in updates to ``fitted_steps`` updates."""
    scale = fitted_steps / cfg.optim.total_steps
    overrides = [
        f"optim.total_steps={fitted_steps}",
        f"optim.warmup_steps={min(fitted_steps, round(cfg.optim.warmup_steps * scale))}",
        f"train.max_steps={fitted_steps}",
    ]
    model = cfg.model.build_config()
    if hasattr(model, "ema_anneal_end_step"):
        overrides.append(f"model.ema_anneal_end_step={max(1, round(model.ema_anneal_end_step * scale))}")
    # Per-update decays d: d ** (1 / scale) spans the same fraction of the run (1.0, frozen, stays).
    for name in ("ema_decay", "ema_end_decay", "temp_decay"):
        if hasattr(model, name):
            overrides.append(f"model.{name}={getattr(model, name) ** (1 / scale):.10g}")
    return overrides


class Runner:
    """One method and seed: its recipe's model, loader and trainer, with its own clock."""

    def __init__(self, method: str, modality: str, size: str, seed: int, device: torch.device, scratch: Path,
                 overrides: Sequence[str] = ()):  # fmt: skip
        from d2v2.engine.data.build import batches_by_size, build_dataset, build_loader
        from d2v2.engine.data.loader import DataPosition
        from d2v2.engine.run import build_run_method, resolve_config
        from d2v2.engine.training.trainer import Trainer

        self.method, self.modality, self.seed, self.device = method, modality, seed, device
        self.recipe = recipe_for(method, modality, size)
        self.cfg = cfg = resolve_config(self.recipe, [f"train.seed={seed}", *overrides])
        torch.manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            self.dataset = build_dataset(modality, cfg.data)
        model, model_cfg = build_run_method(cfg, self.dataset.model_fields())
        self.config_dict = cfg.resolved(model_cfg)
        self.batches = iter(build_loader(self.dataset, cfg.data, seed, model.modality, DataPosition()))
        hint = 0 if batches_by_size(self.dataset) else cfg.data.batch_size
        run_dir = scratch / f"{method}-{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.trainer = Trainer(model, None, cfg.optim, cfg.train, run_dir, device, hint, self.config_dict, log=lambda *_: None)
        self.total_steps = cfg.optim.total_steps
        self.clock_s = 0.0
        self.samples = 0
        self.loss: torch.Tensor | None = None
        self.step_ms: list[float] = []
        self.status = "ok"

    @property
    def done(self) -> bool:
        return self.status != "ok" or self.trainer.step >= self.total_steps

    def train_until(self, clock_s: float) -> None:
        """Train until this runner's clock reaches ``clock_s`` or its schedule ends."""
        while not self.done and self.clock_s < clock_s:
            harness._sync(self.device)
            start = time.perf_counter()
            out = self.trainer.train_step(self.batches)
            harness._sync(self.device)
            elapsed = time.perf_counter() - start
            self.clock_s += elapsed
            self.step_ms.append(elapsed * 1e3)
            self.samples += out["samples"]
            self.loss = out["loss"].detach()

    def probe(self, labelled, finetune_steps: int | None = None, scratch: Path | None = None) -> dict[str, Any]:
        """The probe's figures now, at this runner's clock, and with ``finetune_steps`` the validation
        accuracy of a copy of the encoder fine-tuned that long (``finetune-<modality>-tiny``; untimed);
        a non-finite loss ends the runner."""
        from d2v2.engine.probe import probe_tasks

        loss = float(self.loss) if self.loss is not None else None
        if loss is not None and not math.isfinite(loss):
            self.status = f"non-finite loss at step {self.trainer.step}"
        tasks = probe_tasks(self.trainer.method, labelled, device=str(self.device))
        main = next(iter(tasks.values()))
        point = {
            "modality": self.modality, "method": self.method, "seed": self.seed, "time_s": self.clock_s,
            "step": self.trainer.step, "epoch": self.samples / len(self.dataset), "loss": loss,
            "linear_accuracy": main["linear_accuracy"], "knn_accuracy": main["knn_accuracy"],
            "tasks": {k: {"linear": v["linear_accuracy"], "knn": v["knn_accuracy"]} for k, v in tasks.items()},
        }  # fmt: skip
        if finetune_steps:
            point["finetune_accuracy"] = self.fine_tuned(f"finetune-{self.modality}-tiny", finetune_steps, scratch)["score"]
        return point

    def fine_tuned(self, recipe: str, steps: int | None, scratch: Path | None) -> dict:
        """The best validation result (``finetune_copy``) of a copy of the encoder fine-tuned with ``recipe``
        for ``steps`` updates (default: the recipe's), in a fresh folder under ``scratch``; untimed."""
        from d2v2.engine.finetune.run import finetune_copy

        folder = Path(tempfile.mkdtemp(prefix=f"{recipe}-{self.method}-", dir=scratch))
        return finetune_copy(self.trainer.method, self.method, recipe, self.config_dict,
                             device=self.device, scratch=folder, seed=self.seed, steps=steps)  # fmt: skip

    def transcription(self, recipe: str, steps: int | None, scratch: Path | None = None) -> dict[str, float]:
        """The validation WER and CER (at the best CER) of a copy of the encoder fine-tuned for speech
        recognition with ``recipe`` for ``steps`` updates (default: the recipe's); untimed."""
        best = self.fine_tuned(recipe, steps, scratch)
        return {"finetune_wer": best["metrics"]["wer"], "finetune_cer": best["metrics"]["cer"], "transcription_step": best["step"]}

    def labelled_set(self, limit: int | None = None):
        """The modality's probe set, or a fixed random ``limit`` of its samples."""
        from d2v2.engine.probe_sets import labelled_set

        full = labelled_set(self.modality, self.trainer.method.cfg, self.config_dict, None)
        if limit is None or limit >= len(full.sources):
            return full
        keep = torch.randperm(len(full.sources), generator=torch.Generator().manual_seed(0))[:limit]
        return dataclasses.replace(full, sources=full.sources[keep], tasks={k: v[keep] for k, v in full.tasks.items()})


def calibrate(methods: Sequence[str], modality: str, size: str, seed: int, device: torch.device, scratch: Path,
              steps: tuple[int, int], log) -> dict[str, Runner]:  # fmt: skip
    """Each method's runner on its recipe after ``steps`` (discarded, timed) updates taken round robin,
    with the timed ones in ``step_ms``; the caller keeps their configs and throws the models away."""
    runners = {m: Runner(m, modality, size, seed, device, scratch / "calibration") for m in methods}
    warmup, timed = steps
    for i in range(warmup + timed):
        for r in runners.values():
            r.train_until(r.clock_s + 1e-9)  # one step
            if i < warmup:
                r.step_ms.clear()
    for m, r in runners.items():
        log(f"{modality} {m:<10} calibration: {statistics.median(r.step_ms):.1f} ms per update")
    return runners


def race(methods: Sequence[str], modality: str, size: str, seed: int, device: torch.device, budget_s: float,
         probes: int, slice_s: float, calibration: tuple[int, int], probe_samples: int | None, scratch: Path,
         log, finetune_steps: int | None = None, speech_steps: int | None = None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """One seed of one modality: every method for ``budget_s`` of its own clock, probed ``probes``
    times after t = 0 (and fine-tuned there with ``finetune_steps``; speech recognition as
    ``TRANSCRIPTION`` says, ``speech_steps`` updates). Returns (probe points, one summary per method)."""
    seconds, runners = {}, []
    for m, calibrated in calibrate(methods, modality, size, seed, device, scratch, calibration, log).items():
        seconds[m] = statistics.median(calibrated.step_ms) / 1e3
        fitted = max(10, int(budget_s / seconds[m]))
        runners.append(Runner(m, modality, size, seed, device, scratch / "race", fitted_overrides(calibrated.cfg, fitted)))
    labelled = {r.method: r.labelled_set(probe_samples) for r in runners}
    marks = [budget_s * (i + 1) / probes for i in range(probes)]
    measure = {"finetune_steps": finetune_steps, "scratch": scratch}
    points = [r.probe(labelled[r.method], **measure) for r in runners]
    transcribe = TRANSCRIPTION.get(modality) if finetune_steps else None

    def transcribed(runner: Runner, point: dict) -> None:
        point.update(runner.transcription(transcribe, speech_steps, scratch))
        log(f"{modality} {runner.method:<10} seed {seed} t {point['time_s']:7.1f} s  speech recognition: "
            f"CER {100 * point['finetune_cer']:5.1f} %  WER {100 * point['finetune_wer']:5.1f} %")

    if transcribe:  # no pretraining: data2vec 2.0's fresh encoder, as in the fine-tuned table
        fresh = next(i for i, r in enumerate(runners) if r.method == "data2vec2")
        transcribed(runners[fresh], points[fresh])
    next_mark = {r.method: 0 for r in runners}
    while any(not r.done and r.clock_s < budget_s for r in runners):
        for r in runners:
            if r.done or r.clock_s >= budget_s:
                continue
            r.train_until(min(r.clock_s + slice_s, marks[next_mark[r.method]]))
            if r.clock_s >= marks[next_mark[r.method]] or r.done:
                points.append(r.probe(labelled[r.method], **measure))
                p = points[-1]
                tuned = f"  fine-tuned {100 * p['finetune_accuracy']:5.1f} %" if "finetune_accuracy" in p else ""
                log(f"{modality} {r.method:<10} seed {seed} t {p['time_s']:7.1f} s  step {p['step']:5d}  "
                    f"epoch {p['epoch']:6.2f}  linear {100 * p['linear_accuracy']:5.1f} %  kNN {100 * p['knn_accuracy']:5.1f} %{tuned}")
                while next_mark[r.method] < probes - 1 and r.clock_s >= marks[next_mark[r.method]]:
                    next_mark[r.method] += 1
    if transcribe:
        for r in runners:
            transcribed(r, [p for p in points if p["method"] == r.method][-1])
    summaries = [
        {
            "modality": modality, "method": r.method, "seed": seed, "recipe": r.recipe, "status": r.status,
            "calibrated_ms": 1e3 * seconds[r.method], "scheduled_steps": r.total_steps, "steps": r.trainer.step,
            "time_s": r.clock_s, "median_step_ms": statistics.median(r.step_ms) if r.step_ms else None,
            "epochs": r.samples / len(r.dataset),
        }
        for r in runners
    ]  # fmt: skip
    return points, summaries


def trained(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The probe points taken after some training (t > 0)."""
    return [p for p in points if p["time_s"] > 0]


def first_time(points: Sequence[Mapping[str, Any]], accuracy: float, key: str = "linear_accuracy") -> float | None:
    """The first trained probe time (t > 0) at which ``key`` (the linear accuracy) reaches ``accuracy`` (None: never)."""
    reached = [p["time_s"] for p in trained(points) if p[key] >= accuracy - 1e-12]
    return min(reached) if reached else None


def headline(points: Sequence[Mapping[str, Any]], key: str = "linear_accuracy") -> list[dict[str, Any]]:
    """Per modality, seed and other method: data2vec 2.0's time to the other's best accuracy (``key``:
    the linear probe's, or the fine-tuned one).

    Only trained points count (t > 0): the untrained encoders' accuracy (t = 0) says what the
    architecture gives for free, not what a method learnt, so the fastest possible time is one probe
    interval."""
    rows = []
    keys = dict.fromkeys((p["modality"], p["seed"]) for p in points)
    for modality, seed in keys:
        mine = [p for p in points if (p["modality"], p["seed"], p["method"]) == (modality, seed, "data2vec2")]
        others = dict.fromkeys(p["method"] for p in points if (p["modality"], p["seed"]) == (modality, seed))
        for other in others:
            theirs = [p for p in points if (p["modality"], p["seed"], p["method"]) == (modality, seed, other)]
            if other == "data2vec2" or not mine or not theirs:
                continue
            best = max(p[key] for p in trained(theirs) or theirs)
            t_other, t_mine = first_time(theirs, best, key), first_time(mine, best, key)
            target = TARGETS.get(other, 1.0)
            ratio = t_mine / t_other if t_mine is not None and t_other else None
            rows.append({
                "modality": modality, "seed": seed, "other": other, "other_best_accuracy": best,
                "other_time_s": t_other, "data2vec2_time_s": t_mine,
                "data2vec2_best_accuracy": max(p[key] for p in trained(mine) or mine),
                "time_ratio": ratio, "target_ratio": target,
                "met": ratio is not None and ratio <= target + 1e-9,
            })  # fmt: skip
    return rows


def run(
    *,
    device: torch.device,
    size: str = "tiny",
    modalities: Sequence[str] = MODALITIES,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (1, 2),
    budget_s: float = 180.0,
    probes: int = 6,
    slice_s: float = 5.0,
    calibration: tuple[int, int] = CALIBRATION_STEPS,
    probe_samples: int | None = None,
    out_dir: Path | None = None,
    argv: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    finetune_steps: int | None = None,
    speech_steps: int | None = None,
) -> tuple[dict[str, list[dict]], dict[str, Path]]:
    """Race the methods of every modality for ``budget_s`` seconds each, per seed; write the report.
    ``finetune_steps``: also fine-tune every probe point's encoder that many updates (``--eval finetune``),
    and speech encoders for recognition (``TRANSCRIPTION``) for ``speech_steps`` updates (default: the recipe's)."""
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"modalities: unknown {', '.join(map(repr, unknown))}; expected some of {', '.join(MODALITIES)}")
    for bad, message in (
        (not 0 < budget_s < math.inf, f"--budget-s must be a positive number of seconds, got {budget_s:g}"),
        (probes < 1, f"--probes must be >= 1, got {probes}"),
        (not 0 < slice_s < math.inf, f"--slice-s must be a positive number of seconds, got {slice_s:g}"),
        (not seeds, "--seeds needs at least one seed"),
        (probe_samples is not None and probe_samples < 20, f"--probe-samples must be >= 20, got {probe_samples}"),
        (finetune_steps is not None and finetune_steps < 1, f"--finetune-steps must be >= 1, got {finetune_steps}"),
        (speech_steps is not None and speech_steps < 1, f"--speech-steps must be >= 1, got {speech_steps}"),
    ):
        if bad:
            raise ValueError(message)
    lineup = {m: [x for x in (methods or default_methods(m))] for m in modalities}
    for modality, chosen in lineup.items():
        for method in chosen:
            recipe_for(method, modality, size)  # every name checked before anything trains
        if "data2vec2" not in chosen:
            raise ValueError("--methods must include data2vec2: the bench measures it against the others")
    transcribed = [TRANSCRIPTION[m] for m in lineup if m in TRANSCRIPTION]
    stamp = report.environment_stamp(device)
    points, summaries = [], []
    with tempfile.TemporaryDirectory(prefix="d2v2-bench-converge-") as scratch:
        for modality, chosen in lineup.items():
            for seed in seeds:
                p, s = race(chosen, modality, size, seed, device, budget_s, probes, slice_s, calibration,
                            probe_samples, Path(scratch) / f"{modality}-{seed}", log, finetune_steps, speech_steps)  # fmt: skip
                points += p
                summaries += s
    results = {"points": points, "methods": summaries, "headline": headline(points)}
    if finetune_steps:
        results["headline_finetune"] = headline(points, "finetune_accuracy")
    meta = {
        **stamp, "benchmark": "converge", "size": size, "budget_s": budget_s, "probes": probes, "slice_s": slice_s,
        "seeds": list(seeds), "probe_samples": probe_samples, "finetune_steps": finetune_steps,
        "speech_steps": _recipe_steps(transcribed[0], speech_steps) if finetune_steps and transcribed else None, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "command": " ".join(argv) if argv is not None else None,
    }  # fmt: skip
    out_dir = Path(out_dir) if out_dir is not None else report.default_out_dir("converge", device)
    return results, write_report(out_dir, meta, results)


def _recipe_steps(recipe: str, steps: int | None) -> int:
    """The updates a fine-tuning with ``recipe`` takes: ``steps``, or the recipe's."""
    from d2v2.engine.finetune.config import resolve_finetune_config

    if steps is not None:
        return steps
    return resolve_finetune_config(recipe, ["pretrained.checkpoint=in-memory"]).optim.total_steps


# ----------------------------------------------------------------------------- report
_HEADLINE_COLUMNS = (
    ("modality", "modality", ""), ("seed", "seed", ""), ("against", "other", ""),
    ("their best %", "other_best_pct", ".1f"), ("their time s", "other_time_s", ".1f"),
    ("data2vec 2.0 time s", "data2vec2_time_s", ".1f"), ("ratio", "time_ratio", ".2f"),
    ("target", "target", ""), ("met", "met_word", ""), ("data2vec 2.0 best %", "data2vec2_best_pct", ".1f"),
)  # fmt: skip
_METHOD_COLUMNS = (
    ("modality", "modality", ""), ("method", "method", ""), ("seed", "seed", ""), ("recipe", "recipe", ""),
    ("updates (scheduled)", "updates", ""), ("time s", "time_s", ".1f"), ("median step ms", "median_step_ms", ".1f"),
    ("epochs", "epochs", ".2f"), ("untrained linear %", "initial_pct", ".1f"), ("best linear %", "best_pct", ".1f"), ("final linear %", "final_pct", ".1f"),
    ("final kNN %", "final_knn_pct", ".1f"), ("status", "status", ""),
)  # fmt: skip


_FINETUNE_COLUMNS = (
    ("no pretraining: fine-tuned %", "initial_ft_pct", ".1f"), ("best fine-tuned %", "best_ft_pct", ".1f"),
    ("final fine-tuned %", "final_ft_pct", ".1f"),
)  # fmt: skip


def _finetune_section(results: Mapping[str, list], meta: Mapping[str, Any]) -> str:
    """Fine-tuned accuracy against pretraining time (the paper's protocol), with "no pretraining" (each
    method's encoder fine-tuned from its random initialisation, t = 0) beside every method."""
    rows = results["headline_finetune"]
    shown = [
        {**r, "other_best_pct": _pct(r["other_best_accuracy"]), "data2vec2_best_pct": _pct(r["data2vec2_best_accuracy"]),
         "target": f"≤ {r['target_ratio']:.2f}", "met_word": "yes" if r["met"] else "no"}
        for r in rows
    ]  # fmt: skip
    lines = []
    for modality in dict.fromkeys(p["modality"] for p in results["points"]):
        here = [p for p in results["points"] if p["modality"] == modality]
        fresh = [p["finetune_accuracy"] for p in here if p["method"] == "data2vec2" and p["time_s"] == 0]
        best = {}
        for method in dict.fromkeys(p["method"] for p in here):
            own = [p for p in here if p["method"] == method]
            best[method] = max(p["finetune_accuracy"] for p in trained(own) or own)
        ranked = ", ".join(f"{m} {100 * v:.1f} %" for m, v in sorted(best.items(), key=lambda kv: -kv[1]))
        lines.append(f"- {modality}: no pretraining (data2vec 2.0's encoder, random init) fine-tunes to "
                     f"{', '.join(f'{100 * v:.1f} %' for v in fresh)}; best fine-tuned accuracy by method: {ranked}")  # fmt: skip
    return (
        f"## Fine-tuned accuracy against pretraining time\n\nAt every probe point a copy of the encoder (the "
        f"student's) is fine-tuned with `finetune-<modality>-tiny` for {meta.get('finetune_steps')} updates, untimed, "
        "and scored on the recipe's validation split (its best score).\n\n" + "\n".join(lines) + "\n\n"
        + ("\n".join(_headline_lines(rows, "fine-tuned")) or "Nothing to compare.") + "\n\n"
        + report.markdown_table(shown, _HEADLINE_COLUMNS)
    )


_TRANSCRIPTION_COLUMNS = (
    ("modality", "modality", ""), ("seed", "seed", ""), ("encoder", "encoder", ""),
    ("pretraining updates", "step", ""), ("pretraining s", "time_s", ".1f"),
    ("valid CER %", "cer_pct", ".1f"), ("valid WER %", "wer_pct", ".1f"),
)  # fmt: skip


def _transcription_section(points: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """Speech recognition after pretraining: no pretraining and each method at the end of its budget."""
    rows = [
        {**p, "encoder": "no pretraining" if p["time_s"] == 0 else p["method"],
         "cer_pct": _pct(p["finetune_cer"]), "wer_pct": _pct(p["finetune_wer"])}
        for p in points if "finetune_cer" in p
    ]  # fmt: skip
    lines = []
    for modality, seed in dict.fromkeys((r["modality"], r["seed"]) for r in rows):
        here = sorted((r for r in rows if (r["modality"], r["seed"]) == (modality, seed)), key=lambda r: r["finetune_cer"])
        lines.append(f"- {modality}, seed {seed}: valid CER by encoder, best first: "
                     + ", ".join(f"{r['encoder']} {r['cer_pct']:.1f} %" for r in here))  # fmt: skip
    return (
        "## Speech recognition after pretraining\n\nThe encoder at t = 0 (data2vec 2.0's, random init) and each "
        f"method's at the end of its budget are fine-tuned for CTC speech recognition with `{', '.join(dict.fromkeys(TRANSCRIPTION.values()))}` "
        f"for {meta.get('speech_steps')} updates, untimed, and scored on the synthetic speech's held-out sentences "
        "(greedy decoding; the best CER of the run).\n\n" + "\n".join(lines) + "\n\n"
        + report.markdown_table(rows, _TRANSCRIPTION_COLUMNS)
    )


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _headline_lines(rows: Sequence[Mapping[str, Any]], what: str = "linear-probe") -> list[str]:
    """One line per (modality, other): the ratios over seeds, their median, and the target."""
    lines = []
    for modality, other in dict.fromkeys((r["modality"], r["other"]) for r in rows):
        mine = [r for r in rows if (r["modality"], r["other"]) == (modality, other)]
        ratios = [r["time_ratio"] for r in mine]
        shown = ", ".join("never" if x is None else f"{x:.2f}" for x in ratios)
        reached = [x for x in ratios if x is not None]
        median = f"median {statistics.median(reached):.2f}" if len(reached) == len(ratios) else "not reached in every seed"
        verdict = "met" if all(r["met"] for r in mine) else "missed"
        lines.append(
            f"- {modality}: data2vec 2.0 reaches {other}'s best {what} accuracy in {shown} of {other}'s time "
            f"({median}; target ≤ {mine[0]['target_ratio']:.2f}: {verdict})"
        )
    return lines


def write_report(out_dir: Path, meta: Mapping[str, Any], results: Mapping[str, list]) -> dict[str, Path]:
    """results.json (meta + points, methods, headline), results.md (tables) and results.png (accuracy curves)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json"}
    paths["json"].write_text(json.dumps({"meta": dict(meta), **results}, indent=2, default=str) + "\n")
    points, headline_rows = results["points"], results["headline"]
    header = {k: meta.get(k) for k in ("device", "torch", "triton", "cuda", "date", "size", "precision")}
    header["budget"] = f"{meta['budget_s']:g} s of training per method and seed, probed at t = 0 and {meta['probes']} times after"
    header["seeds"] = ", ".join(map(str, meta["seeds"]))
    header["command"] = meta.get("command")
    shown = [
        {**r, "other_best_pct": _pct(r["other_best_accuracy"]), "data2vec2_best_pct": _pct(r["data2vec2_best_accuracy"]),
         "target": f"≤ {r['target_ratio']:.2f}", "met_word": "yes" if r["met"] else "no"}
        for r in headline_rows
    ]  # fmt: skip
    tuned = "headline_finetune" in results
    methods = []
    for s in results["methods"]:
        own = [p for p in points if (p["modality"], p["method"], p["seed"]) == (s["modality"], s["method"], s["seed"])]
        methods.append({
            **s, "updates": f"{s['steps']} ({s['scheduled_steps']})",
            "initial_pct": _pct(own[0]["linear_accuracy"]) if own else None,
            "best_pct": _pct(max((p["linear_accuracy"] for p in trained(own)), default=None)),
            "final_pct": _pct(own[-1]["linear_accuracy"]) if own else None,
            "final_knn_pct": _pct(own[-1]["knn_accuracy"]) if own else None,
            **({"initial_ft_pct": _pct(own[0]["finetune_accuracy"]) if own else None,
                "best_ft_pct": _pct(max((p["finetune_accuracy"] for p in trained(own)), default=None)),
                "final_ft_pct": _pct(own[-1]["finetune_accuracy"]) if own else None} if tuned else {}),
        })  # fmt: skip
    sections = [
        "## Time to accuracy\n\n" + ("\n".join(_headline_lines(headline_rows)) or "Nothing to compare.")
        + "\n\n" + report.markdown_table(shown, _HEADLINE_COLUMNS)
        + "\n\nTimes are each method's own training clock at the first trained probe point (t > 0) reaching the "
        "accuracy; the resolution is the probe interval. The untrained encoders' accuracy is in the table below.",
    ]
    if tuned:
        sections.append(_finetune_section(results, meta))
    if any("finetune_cer" in p for p in points):
        sections.append(_transcription_section(points, meta))
    sections.append("## Methods\n\n" + report.markdown_table(methods, _METHOD_COLUMNS + (_FINETUNE_COLUMNS if tuned else ())))
    paths["md"] = report.write_markdown(out_dir / "results.md", "d2v2 convergence benchmark", header, sections)
    paths["png"] = write_plot(out_dir / "results.png", meta, points, headline_rows)
    return paths


def write_plot(path: Path, meta: Mapping[str, Any], points: Sequence[Mapping[str, Any]],
               headline_rows: Sequence[Mapping[str, Any]]) -> Path:  # fmt: skip
    """Linear-probe accuracy against time, updates and epochs: a row per modality, a colour per method,
    a line per seed; on the time panel a dotted line at each other method's best accuracy, a circle
    where it first reached it and a star where data2vec 2.0 did."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    modalities = list(dict.fromkeys(p["modality"] for p in points)) or ["(none)"]
    methods = list(dict.fromkeys(p["method"] for p in points))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    axes_x = (("time_s", "training time (s)"), ("step", "updates"), ("epoch", "epochs"))
    fig, axes = plt.subplots(len(modalities), 3, figsize=(13, 3.6 * len(modalities)), squeeze=False)
    for row, modality in zip(axes, modalities):
        here = [p for p in points if p["modality"] == modality]
        for ax, (key, label) in zip(row, axes_x):
            for method in methods:
                for i, seed in enumerate(dict.fromkeys(p["seed"] for p in here if p["method"] == method)):
                    curve = [p for p in here if (p["method"], p["seed"]) == (method, seed)]
                    ax.plot([p[key] for p in curve], [100 * p["linear_accuracy"] for p in curve], marker="o",
                            markersize=3, linewidth=1, color=colours[method], alpha=0.9 if i == 0 else 0.5,
                            label=method if i == 0 else None)  # fmt: skip
                    if all("finetune_accuracy" in p for p in curve):  # dashed: fine-tuned
                        ax.plot([p[key] for p in curve], [100 * p["finetune_accuracy"] for p in curve], marker="x",
                                markersize=3, linewidth=1, linestyle="--", color=colours[method],
                                alpha=0.9 if i == 0 else 0.5, label=f"{method} fine-tuned" if i == 0 else None)  # fmt: skip
            ax.set_xlabel(label)
            ax.set_ylabel(f"{modality}: accuracy % (linear probe; dashed: fine-tuned)")
            ax.grid(alpha=0.3)
        for h in (h for h in headline_rows if h["modality"] == modality):
            ax = row[0]
            ax.axhline(100 * h["other_best_accuracy"], color=colours[h["other"]], linestyle=":", linewidth=0.8)
            if h["other_time_s"] is not None:
                ax.plot(h["other_time_s"], 100 * h["other_best_accuracy"], "o", mfc="none", ms=9, color=colours[h["other"]])
            if h["data2vec2_time_s"] is not None:
                ax.plot(h["data2vec2_time_s"], 100 * h["other_best_accuracy"], "*", ms=11, color=colours["data2vec2"])
        if here:
            row[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"d2v2 convergence, {meta['size']} recipes, {meta['budget_s']:g} s per method, on {meta['device']} "
                 f"({meta['date'][:10]})", fontsize=10)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
