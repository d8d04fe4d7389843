"""``d2v2 bench kernels``: every op of ``d2v2.kernels`` against its providers at the reference shapes.

This module is the driver: it collects the cases of every op's bench module (``CASE_MODULES``: one
``bench/<op>.py`` per kernel, each with its setup functions, bytes/FLOP formulas and providers),
measures them with the shared harness (``harness.run_case``) and writes the report.

What is measured
    For each case (one op at one named shape spec and dtype), each provider and each mode:
    median and 20/80-percentile time (``harness.measure``: do_bench on CUDA, a plain timer on CPU),
    peak allocated memory (CUDA), achieved GB/s from the op's bytes-moved formula and its fraction
    of the copy bandwidth measured once per run, TFLOP/s (compute-bound ops) and its fraction of a
    measured matmul ceiling, and the speedups over the "torch" and "compile" providers (and over any
    provider a case's targets name). Output: ``results.json`` (meta + one row per op, shape, dtype,
    provider and mode, measured or skipped with the reason), ``results.md`` (table, targets, sizes,
    skips) and ``results.png`` (speedup over torch eager per mode) in ``bench-out/kernels-<device>-<date>/``.

Providers: triton, torch (the op's own ``<op>_ref``), compile (see ``harness``); apex where it has a
real equivalent (``bench/ema.py``, ``bench/layer_targets.py``); SDPA, FlexAttention and xformers for
attention (``bench/attention.py``). Modes: fwd, bwd, full (``harness``); ema_ and layer_targets run
without autograd in training (teacher side), so they have "fwd" only. The public ops' index-range
check (one host sync per call) is switched off while timing: the "torch" and "compile" providers
call ``<op>_ref``, which never checks.

Shapes: ``shapes.REFERENCE_SHAPES`` (vit-b, audio-base, text-base: the base recipes and presets);
``--quick`` uses ``shapes.QUICK_SHAPES``, the same structure scaled down.

Targets (the issue's, for H100; checked on CUDA and listed in results.md)
    memory-bound ops: >= 85 % of the measured copy bandwidth, >= 1.5x torch, >= 1.2x compile;
    conv blocks: fwd+bwd ("full") >= 1.3x torch; attention: see ``bench/attention.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import attention, conv_block, ema, gather_tokens, harness, layer_targets, masked_regression_loss, report
from . import scatter_tokens
from .harness import Case, dtype_name
from .shapes import QUICK_SHAPES, REFERENCE_SHAPES, ShapeSpec

# One module per kernel, each with ``bench_cases(shapes, dtype) -> list[Case]``, in report order.
CASE_MODULES = (gather_tokens, scatter_tokens, layer_targets, masked_regression_loss, conv_block, ema, attention)


def collect_cases(shapes: Mapping[str, ShapeSpec], dtype: torch.dtype) -> list[Case]:
    """Every op's cases at ``shapes`` (reference or quick) for activation ``dtype``."""
    return [case for module in CASE_MODULES for case in module.bench_cases(shapes, dtype)]


def run(
    *,
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    ops: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    out_dir: Path | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    argv: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run the selected cases and write results.json, results.md and results.png into ``out_dir``."""
    all_cases = collect_cases(QUICK_SHAPES if quick else REFERENCE_SHAPES, dtype)
    cases, providers, modes = harness.select_cases(all_cases, ops=ops, shapes=shapes, providers=providers, modes=modes)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    stamp = report.environment_stamp(device)
    ceilings = {"copy_gbps": harness.copy_bandwidth_gbps(device), "matmul_tflops": None}
    if any(c.bound == "compute" for c in cases):
        ceilings["matmul_tflops"] = harness.matmul_tflops(device, dtype)
    log(f"copy bandwidth ceiling {ceilings['copy_gbps']:.1f} GB/s" + (
        f", {dtype_name(dtype)} matmul ceiling {ceilings['matmul_tflops']:.2f} TFLOP/s"
        if ceilings["matmul_tflops"] else ""
    ))  # fmt: skip
    rows: list[dict[str, Any]] = []
    for case in cases:
        for provider in (p for p in providers if p in case.providers):
            for row in harness.run_case(case, provider, modes, device, ceilings, stamp, warmup_ms=warmup_ms, rep_ms=rep_ms):
                rows.append(row)
                log(_progress_line(row))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for baseline in harness.baselines(cases):
        harness.speedups(rows, group_keys=("op", "shape", "dtype", "mode"), label_key="provider", baseline=baseline)
    harness.apply_targets(rows, cases, device)
    meta = {
        **stamp,
        "benchmark": "kernels",
        "shapes": "quick" if quick else "reference",
        "dtype": dtype_name(dtype),
        "copy_gbps": ceilings["copy_gbps"],
        "matmul_tflops": ceilings["matmul_tflops"],
        "timer": "triton.testing.do_bench" if device.type == "cuda" else "time.perf_counter",
        "command": " ".join(argv) if argv is not None else None,
    }
    out_dir = Path(out_dir) if out_dir is not None else report.default_out_dir("kernels", device)
    return rows, write_report(out_dir, meta, rows)


def _progress_line(row: Mapping[str, Any]) -> str:
    head = f"{row['op']:<23} {row['shape']:<11} {row['dtype']:<5} {row['provider']:<9} {row['mode']:<4}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['note']}"
    rate = f"{row['gbps']:9.4g} GB/s" if row["gbps"] is not None else ""
    return f"{head} {row['median_ms']:10.4f} ms {rate}"


# ----------------------------------------------------------------------------------------------
# Report

_COLUMNS = (
    ("op", "op", ""), ("shape", "shape", ""), ("dtype", "dtype", ""), ("mode", "mode", ""),
    ("provider", "provider", ""), ("median ms", "median_ms", ".4f"), ("p20-p80 ms", "spread", ""),
    ("GB/s", "gbps", ".4g"), ("% copy BW", "pct_copy_bw", ".1f"), ("TFLOP/s", "tflops", ".4g"),
    ("% matmul", "pct_matmul", ".1f"), ("x torch", "speedup_vs_torch", ".2f"),
    ("x compile", "speedup_vs_compile", ".2f"), ("x others", "other_speedups", ""),
    ("peak MiB", "peak_mem_mb", ".1f"), ("status", "status", ""),
)  # fmt: skip
_SHOWN_SPEEDUPS = ("speedup_vs_torch", "speedup_vs_compile")


def _display(row: Mapping[str, Any]) -> dict[str, Any]:
    shown = dict(row)
    if row["median_ms"] is not None:
        shown["spread"] = f"{row['p20_ms']:.4f}-{row['p80_ms']:.4f}"
    for frac, pct in (("frac_copy_bw", "pct_copy_bw"), ("frac_matmul", "pct_matmul")):
        shown[pct] = None if row.get(frac) is None else 100 * row[frac]
    others = [
        f"{key.removeprefix('speedup_vs_')} {value:.2f}"
        for key, value in row.items()
        if key.startswith("speedup_vs_") and key not in _SHOWN_SPEEDUPS and value is not None
    ]
    shown["other_speedups"] = ", ".join(others) or None
    return shown


def _targets_section(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    lines = ["## Targets (H100): Triton rows", ""]
    judged = [r for r in rows if r.get("targets")]
    if meta["device_type"] != "cuda":
        return "\n".join(lines + ["Not judged: the targets are for a CUDA GPU and this run was on CPU."])
    if not judged:
        return "\n".join(lines + ["No Triton rows with targets in this run."])
    for r in judged:
        parts = []
        for metric, minimum in r["targets"].items():
            value = r.get(metric)
            shown = "–" if value is None else f"{value:.2f}"
            parts.append(f"{metric} {shown} (>= {minimum})")
        verdict = {True: "met", False: "MISSED", None: "incomplete"}[r["meets_targets"]]
        lines.append(f"- {verdict}: {r['op']} {r['shape']} {r['dtype']} {r['mode']}: " + ", ".join(parts))
    return "\n".join(lines)


def _notes_section(rows: Sequence[Mapping[str, Any]]) -> str:
    shapes: dict[tuple, list[str]] = {}  # one line per (status, op, provider, reason), listing its shapes
    for r in rows:
        if r["status"] != "ok":
            listed = shapes.setdefault((r["status"], r["op"], r["provider"], r["note"]), [])
            if r["shape"] not in listed:
                listed.append(r["shape"])
    lines = [
        f"- {status}: {op} {provider} ({', '.join(where)}): {note}"
        for (status, op, provider, note), where in shapes.items()
    ]
    return "\n".join(["## Skipped and failed", ""] + (lines or ["Nothing skipped."]))


def _dims_section(rows: Sequence[Mapping[str, Any]]) -> str:
    sizes = dict.fromkeys((r["op"], r["shape"], r["dtype"], r["dims"]) for r in rows)
    return "## Sizes\n\n" + report.markdown_table(
        [dict(zip(("op", "shape", "dtype", "dims"), s)) for s in sizes],
        [("op", "op", ""), ("shape", "shape", ""), ("dtype", "dtype", ""), ("sizes", "dims", "")],
    )


def write_report(out_dir: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """results.json (meta + every row), results.md (tables, targets, skips) and results.png (speedups)."""
    paths = {"json": report.write_json(out_dir / "results.json", meta, rows)}
    header = {k: meta[k] for k in ("device", "torch", "triton", "cuda", "date", "shapes", "dtype", "timer")}
    header["copy bandwidth ceiling"] = f"{meta['copy_gbps']:.1f} GB/s"
    if meta.get("matmul_tflops"):
        header["matmul ceiling"] = f"{meta['matmul_tflops']:.2f} TFLOP/s ({meta['dtype']})"
    measured = [_display(r) for r in rows if r["status"] == "ok"]  # the rest are listed under "Skipped"
    table = "## Results\n\n" + report.markdown_table(measured, _COLUMNS)
    sections = [table, _targets_section(rows, meta), _dims_section(rows), _notes_section(rows)]
    paths["md"] = report.write_markdown(out_dir / "results.md", "d2v2 kernel benchmark", header, sections)
    # Speedups over torch eager (the dashed line at 1 is torch itself); plain times when no torch row ran.
    by_speedup = any(r.get("speedup_vs_torch") is not None and r["provider"] != "torch" for r in rows)
    paths["png"] = report.write_bar_plot(
        out_dir / "results.png",
        [r for r in rows if r["provider"] != "torch"] if by_speedup else rows,
        panel_key="mode",
        group=lambda r: f"{r['op']} {r['shape']} {r['dtype']}",
        series_key="provider",
        value_key="speedup_vs_torch" if by_speedup else "median_ms",
        ylabel="speedup over torch eager" if by_speedup else "median ms",
        title=f"d2v2 kernels on {meta['device']} ({meta['date'][:10]})",
        reference_line=1.0 if by_speedup else None,
        log_scale=True,
    )
    return paths
