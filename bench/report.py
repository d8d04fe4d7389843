"""The reports every d2v2 benchmark writes, in one shape: where, what about, and the three files.

A benchmark builds plain-dict result rows, then hands them to the writers here: ``results.json`` (a
``meta`` stamp plus the rows), ``results.md`` (a title, the meta as a bullet list, then markdown
sections such as ``markdown_table``) and ``results.png`` (grouped bars), all in one output folder
named by bench, device and date (``default_out_dir``). ``environment_stamp`` is the device and
version record every report's ``meta`` and every result row carry.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


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
