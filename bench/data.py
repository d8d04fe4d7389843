"""``d2v2 bench data``: the training loader's throughput per worker, and how many workers feed one GPU.

What is timed
    For each modality, the loader ``d2v2 pretrain`` builds from the base recipe ``<modality>-base``
    (``engine.data.build.build_dataset`` + ``build_loader``, the method's modality as the masker):
    decode, augment, collate and the K masks per sample with their kept ids, exactly as training
    runs them, on the recipe's data (its embedded default unless ``--set data.path=...``):

        image  the embedded digits upscaled, RandomResizedCrop to 224 + flip + normalisation,
               16 inverse block masks per image, batches of 16
        audio  the embedded synthetic speech read from its WAV files, normalised, cropped to the
               batch's shortest clip, 8 span masks per clip, batches of up to max_tokens samples
        text   512-token blocks of the tokenized embedded prose, 8 random masks per block, batches of 4

    Each worker count (0 = the main process does the work, as ``data.num_workers=0``) gets a fresh
    loader; the first ``2 * workers + 1`` batches (start-up and the prefetch queue, which fills while
    the first batch is awaited) are discarded, then ``batches`` more are timed from arrival to arrival.

Reported per (modality, workers)
    batches/s and samples/s of the loader, the same per worker (the main process counts as one),
    the data rate in the modality's unit (images, seconds of audio, 512-token blocks) and the time
    to the first batch.

How many workers feed one GPU
    A training step consumes one batch of the recipe per GPU (the audio recipe: ``max_tokens`` samples,
    62.5 s of audio, whatever the clip lengths). With a step time of ``step_ms`` (``--step-ms``, a
    figure from ``d2v2 bench train --size base`` on the GPU that will train), the GPU needs
    1000 / step_ms batches/s, i.e. that many units per second; dividing by the best per-worker rate
    measured here (workers >= 1) gives the workers one GPU needs on a CPU like this one. Without
    ``--step-ms`` the assumption ``DEFAULT_STEP_MS`` is used and the report says so.

Limits
    The embedded speech clips are 2.5-6 s long, so an audio batch holds many short clips instead of
    three 20 s ones: the rate in seconds of audio is the comparable figure. On a machine whose cores
    are busy with other work, more workers need not mean more throughput; the per-worker rate is the
    one to scale from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import harness, report

MODALITIES = ("image", "audio", "text")
WORKERS = (0, 1, 2)
BATCHES = 20
QUICK_WORKERS = (0, 1)
QUICK_BATCHES = 3
# An assumed step of the base recipes on one current GPU (bf16), per modality: the order of the
# train bench's figures, not a measurement of this machine. Pass --step-ms for a measured one.
DEFAULT_STEP_MS = {"image": 250.0, "audio": 250.0, "text": 250.0}


def build(modality: str, overrides: Sequence[str] = ()) -> tuple[Callable[[int], Any], Any]:
    """The base recipe's data set and masker for ``modality``, built by the engine's own code as
    ``d2v2 pretrain`` builds them. Returns (``loader(workers)``: a fresh training loader with that many
    worker processes, the resolved run config)."""
    from d2v2.engine.data.build import build_dataset, build_loader
    from d2v2.engine.data.loader import DataPosition
    from d2v2.engine.run import resolve_config
    from d2v2.models import modality_for

    cfg = resolve_config(f"{modality}-base", list(overrides))
    dataset = build_dataset(modality, cfg.data)
    masker = modality_for(cfg.model.build_config(**dataset.model_fields()))

    def loader(workers: int):
        return build_loader(dataset, replace(cfg.data, num_workers=workers), cfg.train.seed, masker, DataPosition())

    return loader, cfg


def _kind(modality: str):
    """The engine's entry for the modality's data: its unit (images, seconds of audio, token blocks)."""
    from d2v2.engine.data.kinds import data_kind

    return data_kind(modality)


def _units(modality: str, batch: Mapping[str, Any]) -> float:
    """A batch's size in the modality's unit."""
    return _kind(modality).amount(batch["source"])


def _need_per_s(modality: str, cfg, step_ms: float) -> float:
    """Units per second one GPU consumes at ``step_ms`` a step, one recipe batch per step."""
    return _kind(modality).per_batch(cfg.data) * 1000.0 / step_ms


def measure(modality: str, loader: Callable[[int], Any], workers: int, batches: int) -> dict[str, Any]:
    """One (modality, workers) row: rates over ``batches`` timed batches after the discarded ones."""
    from d2v2.engine.data.loader import close_batches

    start = time.perf_counter()
    skip = 2 * workers + 1
    stream = iter(loader(workers))
    try:
        first_s = None
        arrivals, samples, units = [], 0, 0.0
        for i in range(skip + batches):
            batch = next(stream)
            now = time.perf_counter()
            if first_s is None:
                first_s = now - start
            if i >= skip - 1:  # the last discarded batch's arrival starts the clock
                arrivals.append(now)
            if i >= skip:
                samples += batch["source"].shape[0]
                units += _units(modality, batch)
    finally:
        close_batches(stream)  # no worker outlives a row, whatever ended it
    elapsed = arrivals[-1] - arrivals[0]
    share = max(workers, 1)  # the main process does the work when there are no workers
    row = {
        "modality": modality, "workers": workers, "status": "ok", "batches": batches,
        "samples_per_batch": samples / batches, "unit": _kind(modality).unit,
        "batches_per_s": batches / elapsed, "samples_per_s": samples / elapsed, "units_per_s": units / elapsed,
        "batches_per_s_per_worker": batches / elapsed / share, "samples_per_s_per_worker": samples / elapsed / share,
        "units_per_s_per_worker": units / elapsed / share, "first_batch_s": first_s,
    }  # fmt: skip
    return row


def run(
    *,
    modalities: Sequence[str] = MODALITIES,
    workers: Sequence[int] = WORKERS,
    batches: int = BATCHES,
    step_ms: Mapping[str, float] | None = None,
    overrides: Sequence[str] = (),
    out_dir: Path | None = None,
    argv: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Time every (modality, workers); write results.json, results.md and results.png."""
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"modalities: unknown {', '.join(map(repr, unknown))}; expected some of {', '.join(MODALITIES)}")
    if not workers or any(w < 0 for w in workers) or batches < 1:
        raise ValueError(f"need worker counts >= 0 and batches >= 1, got workers {list(workers)} and batches {batches}")
    bad = [m for m in (step_ms or {}) if m not in MODALITIES or not step_ms[m] > 0]
    if bad:
        raise ValueError(f"--step-ms: need a positive time per modality ({', '.join(MODALITIES)}), got {dict(step_ms)}")
    device = torch.device("cpu")
    stamp = report.environment_stamp(device)
    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    for modality in modalities:
        measured = step_ms is not None and modality in step_ms
        step = step_ms[modality] if measured else DEFAULT_STEP_MS[modality]
        loader, cfg, build_error = None, None, None
        try:
            loader, cfg = build(modality, overrides)
        except ValueError:
            raise  # bad input (a recipe override, missing data): the one-line error, nothing to measure
        except Exception as e:  # noqa: BLE001 - one failing modality must not lose the others
            build_error = e
        for w in workers:
            try:
                if build_error is not None:
                    raise build_error
                row = measure(modality, loader, w, batches)
            except Exception as e:  # noqa: BLE001 - one failing loader must not lose the others
                row = {"modality": modality, "workers": w, "status": "error", "unit": _kind(modality).unit,
                       "note": harness.error_line(e)}  # fmt: skip
            row.update(device=stamp["device"], torch=stamp["torch"], date=stamp["date"])
            rows.append(row)
            log(_progress_line(row))
        mine = [r for r in rows if r["modality"] == modality]
        summary[modality] = _workers_needed(modality, cfg, step, measured, mine)
    meta = {
        **stamp, "benchmark": "data", "batches": batches, "workers": list(workers),
        "overrides": list(overrides) or None, "per_gpu": summary,
        "command": " ".join(argv) if argv is not None else None,
    }  # fmt: skip
    out_dir = Path(out_dir) if out_dir is not None else report.default_out_dir("data", device)
    return rows, write_report(out_dir, meta, rows)


def _workers_needed(modality: str, cfg, step_ms: float, measured: bool, rows: Sequence[Mapping[str, Any]]) -> dict:
    """The GPU's need at ``step_ms`` and the workers that meet it at the best per-worker rate measured."""
    ok = [r for r in rows if r["status"] == "ok"]
    per_worker = max((r["units_per_s_per_worker"] for r in ok if r["workers"] > 0), default=None)
    if per_worker is None and ok:  # only the main process was measured: its rate stands in for a worker's
        per_worker = ok[0]["units_per_s_per_worker"]
    need = _need_per_s(modality, cfg, step_ms) if cfg is not None else None
    return {
        "step_ms": step_ms, "step_ms_source": "--step-ms" if measured else "assumed (DEFAULT_STEP_MS)",
        "unit": _kind(modality).unit, "need_per_s": need, "per_worker_per_s": per_worker,
        "workers_per_gpu": math.ceil(need / per_worker) if need and per_worker else None,
    }  # fmt: skip


def _progress_line(row: Mapping[str, Any]) -> str:
    head = f"{row['modality']:<6} workers={row['workers']:<2}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['note']}"
    return (f"{head} {row['batches_per_s']:8.2f} batches/s {row['samples_per_s']:9.1f} samples/s "
            f"{row['units_per_s_per_worker']:9.1f} {row['unit']}/s per worker")  # fmt: skip


_COLUMNS = (
    ("modality", "modality", ""), ("workers", "workers", ""), ("samples/batch", "samples_per_batch", ".1f"),
    ("batches/s", "batches_per_s", ".2f"), ("samples/s", "samples_per_s", ".1f"),
    ("batches/s/worker", "batches_per_s_per_worker", ".2f"), ("samples/s/worker", "samples_per_s_per_worker", ".1f"),
    ("unit/s/worker", "units_per_s_per_worker", ".1f"), ("unit", "unit", ""), ("first batch s", "first_batch_s", ".2f"),
)  # fmt: skip
_SUMMARY_COLUMNS = (
    ("modality", "modality", ""), ("step ms", "step_ms", ".0f"), ("step time", "step_ms_source", ""),
    ("GPU needs /s", "need_per_s", ".1f"), ("unit", "unit", ""), ("best per worker /s", "per_worker_per_s", ".1f"),
    ("workers per GPU", "workers_per_gpu", ""),
)  # fmt: skip


def write_report(out_dir: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """results.json (meta + rows), results.md (rates, workers per GPU, failures), results.png (per-worker rates)."""
    paths = {"json": report.write_json(out_dir / "results.json", meta, rows)}
    header = {k: meta.get(k) for k in ("device", "torch", "python", "date", "batches", "overrides", "command")}
    header["discarded"] = "the first 2 * workers + 1 batches of each loader (start-up, prefetch)"
    table = "## Loader throughput\n\n" + report.markdown_table([r for r in rows if r["status"] == "ok"], _COLUMNS)
    per_gpu = [{"modality": m, **s} for m, s in meta["per_gpu"].items()]
    summary = (
        "## Workers per GPU\n\nOne recipe batch per step and GPU, divided by the best per-worker rate "
        "(workers >= 1) measured here.\n\n" + report.markdown_table(per_gpu, _SUMMARY_COLUMNS)
    )
    failed = [f"- {r['modality']} workers={r['workers']}: {r['note']}" for r in rows if r["status"] != "ok"]
    sections = [table, summary, "## Failed\n\n" + ("\n".join(failed) or "Nothing failed.")]
    paths["md"] = report.write_markdown(out_dir / "results.md", "d2v2 data loader benchmark", header, sections)
    # One bar per worker count, in each modality's own unit (panel titles name the modality).
    shown = [{**r, "rate": "per worker (the main process for 0)"} for r in rows]
    paths["png"] = report.write_bar_plot(
        out_dir / "results.png", shown, panel_key="modality", group=lambda r: f"{r['workers']} workers",
        series_key="rate", value_key="units_per_s_per_worker",
        ylabel="images | audio s | blocks per s",
        title=f"d2v2 loader throughput per worker on {meta['device']} ({meta['date'][:10]})",
    )  # fmt: skip
    return paths
