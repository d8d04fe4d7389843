"""bench/report.py: folder naming, the environment stamp and the three writers."""

from __future__ import annotations

import datetime as dt
import json

import torch

from d2v2.bench import report


def test_names_stamp_and_writers(tmp_path):
    assert report.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    out = report.default_out_dir("data", torch.device("cpu"), root=tmp_path)
    assert out == tmp_path / f"data-cpu-{dt.date.today().isoformat()}"
    stamp = report.environment_stamp(torch.device("cpu"))
    assert stamp["device_type"] == "cpu" and stamp["torch"] == torch.__version__ and stamp["cuda"] is None

    rows = [{"what": "a|b", "v": None, "w": 1.23456}, {"what": "c", "v": 2.0, "w": 3.0}]
    table = report.markdown_table(rows, [("what", "what", ""), ("v", "v", ".1f"), ("w", "w", ".2f")])
    assert table.splitlines() == ["| what | v | w |", "|---|---|---|", "| a\\|b | – | 1.23 |", "| c | 2.0 | 3.00 |"]
    assert json.loads(report.write_json(out / "results.json", stamp, rows).read_text())["rows"] == rows
    md = report.write_markdown(out / "results.md", "title", {"device": "cpu", "skip": None}, [table]).read_text()
    assert md.startswith("# title\n\n- device: cpu\n\n| what |") and "skip" not in md
    png = report.write_bar_plot(out / "results.png", rows, panel_key="what", group=lambda r: "g",
                                series_key="what", value_key="w", ylabel="ms", title="t")  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
