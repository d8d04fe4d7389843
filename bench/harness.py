"""Timing and reporting shared by every d2v2 benchmark (kernels now; train and converge later).

A benchmark builds plain-dict result rows, then hands them to the writers here, so every report has the
same shape: ``results.json`` (a ``meta`` stamp plus the rows), ``results.md`` (a markdown table) and
``results.png`` (grouped bars), all in one output folder named by what, device and date.

Timing
    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every repetition, gradients of
    ``grad_to_none`` reset outside the timed region), reporting the 50/20/80 percentiles.
    CPU (or CUDA without Triton): a plain ``time.perf_counter`` loop with the same warm-up / repetition
    budget semantics and the same percentiles; CPU ops are synchronous, so no sync is needed there.

Ceilings
    ``copy_bandwidth_gbps`` times a device-to-device copy of a tensor far larger than any cache: bytes
    read plus bytes written over the time. Memory-bound ops are judged as a fraction of it (an
    achievable ceiling, not the datasheet figure). ``matmul_tflops`` does the same for compute with one
    large square matmul.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median first, then the 20th and 80th percentiles


@dataclass(frozen=True)
class Timing:
    """One measurement, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _plain_timer(
    fn: Callable[[], Any], device: torch.device, warmup_ms: float, rep_ms: float, grad_to_none: Sequence[torch.Tensor]
) -> Timing:
    """do_bench's budget rule with a host clock: estimate one call, then warm up and repeat to fill the budget."""
    _reset_grads(grad_to_none)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    # At least 3 timed calls, so that the percentiles mean something even for calls of seconds.
    n_warmup = max(1, min(1000, int(warmup_ms / estimate_ms)))
    n_repeat = max(3, min(1000, int(rep_ms / estimate_ms)))
    for _ in range(n_warmup):
        _reset_grads(grad_to_none)
        fn()
    samples = []
    for _ in range(n_repeat):
        _reset_grads(grad_to_none)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(*percentiles(samples, QUANTILES))


def percentiles(samples: Sequence[float], quantiles: Sequence[float]) -> list[float]:
    """Linearly interpolated quantiles of ``samples`` (the rule torch.quantile and do_bench use)."""
    if not samples:
        raise ValueError("samples must not be empty")
    ordered = sorted(samples)
    out = []
    for q in quantiles:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantiles must lie in [0, 1], got {q}")
        pos = q * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> Timing:
    """Median and 20/80 percentiles of ``fn()`` on ``device``.

    ``fn`` is called twice before timing starts, so that one-off work (torch.compile, Triton JIT,
    autotuning, the first backward of a compiled graph) never lands in do_bench's run-time estimate.
    """
    for _ in range(2):
        _reset_grads(grad_to_none)
        fn()
    _sync(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            median, p20, p80 = do_bench(
                fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None, quantiles=list(QUANTILES)
            )
            return Timing(median, p20, p80)
    return _plain_timer(fn, device, warmup_ms, rep_ms, grad_to_none)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated device memory (MiB) over one call of ``fn``, counting everything live at the time
    (inputs, saved activations); None off CUDA, where PyTorch keeps no allocator statistics."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None, *, rep_ms: float = 200.0) -> float:
    """Measured copy ceiling: (bytes read + bytes written) / time of ``dst.copy_(src)``, in GB/s (1e9).

    The default size (1 GiB on CUDA, 64 MiB on CPU) is far past every cache level, so the copy streams
    from and to main memory.
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, rep_ms=rep_ms)
    return 2 * src.numel() * src.element_size() / (timing.median_ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """Measured compute ceiling: 2 n^3 / time of one n x n matmul in ``dtype``, in TFLOP/s."""
    if size is None:
        size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    timing = measure(lambda: a @ b, device)
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e12


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model ("model name" in /proc/cpuinfo on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    """A file-name-safe, lower-case form of ``text`` ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def environment_stamp(device: torch.device) -> dict[str, Any]:
    """Device and versions: recorded in every report's ``meta`` and in every result row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def default_out_dir(what: str, device: torch.device, root: str | Path = "bench-out") -> Path:
    """``<root>/<what>-<device>-<YYYY-MM-DD>``: e.g. ``bench-out/kernels-nvidia-h100-80gb-hbm3-2025-01-31``."""
    name = "cpu" if device.type == "cpu" else device_name(device)
    return Path(root) / f"{what}-{slug(name)}-{_dt.date.today().isoformat()}"


def speedups(
    rows: list[dict[str, Any]],
    *,
    group_keys: Sequence[str],
    label_key: str,
    baseline: str,
    value_key: str = "median_ms",
    out_key: str | None = None,
) -> None:
    """Add ``out_key`` = baseline's value / this row's value to each row, within groups sharing ``group_keys``.

    Rows without a baseline in their group, or without a value, get None.
    """
    out_key = out_key or f"speedup_vs_{baseline}"
    base = {
        tuple(r[k] for k in group_keys): r[value_key]
        for r in rows
        if r[label_key] == baseline and r.get(value_key) is not None
    }
    for r in rows:
        ref = base.get(tuple(r[k] for k in group_keys))
        r[out_key] = ref / r[value_key] if ref is not None and r.get(value_key) else None


def write_json(path: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": dict(meta), "rows": list(rows)}, indent=2, default=str) + "\n")
    return path


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, fmt) if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are (header, row key, format spec for floats)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(key), fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, title: str, meta: Mapping[str, Any], sections: Sequence[str]) -> Path:
    """``# title``, a bullet list of ``meta``, then each section (already-formatted markdown) in order."""
    header = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in meta.items() if v is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n")
    return path


def write_bar_plot(
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    panel_key: str,
    group: Callable[[Mapping[str, Any]], str],
    series_key: str,
    value_key: str,
    ylabel: str,
    title: str,
    reference_line: float | None = None,
    log_scale: bool = False,
) -> Path:
    """Grouped bars: one panel per ``panel_key`` value, groups along x, one bar colour per series.

    Rows whose value is None are left out; a panel with nothing to draw says so.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    drawn = [r for r in rows if r.get(value_key) is not None]
    panels = list(dict.fromkeys(r[panel_key] for r in rows)) or ["(none)"]
    series = list(dict.fromkeys(r[series_key] for r in drawn))
    width_in = max(6.0, 0.9 * max((len({group(r) for r in drawn if r[panel_key] == p}) for p in panels), default=1))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 3.8 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        here = [r for r in drawn if r[panel_key] == panel]
        groups = list(dict.fromkeys(group(r) for r in here))
        bar = 0.8 / max(len(series), 1)
        for i, s in enumerate(series):
            values = {group(r): r[value_key] for r in here if r[series_key] == s}
            xs = [g for g, name in enumerate(groups) if name in values]
            ax.bar([x + (i - (len(series) - 1) / 2) * bar for x in xs], [values[groups[x]] for x in xs], bar, label=s)
        if not groups:
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(range(len(groups)), groups, fontsize=7, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_title(f"{panel_key} = {panel}", fontsize=9)
        ax.set_ylabel(ylabel)
        if log_scale and groups:
            ax.set_yscale("log")
        if reference_line is not None:
            ax.axhline(reference_line, color="grey", linewidth=0.8, linestyle="--")
        if series and groups:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
