"""``d2v2 bench data`` on the CPU: the engine's real loaders per modality and worker count, end to end
through the command line with --quick, the report's three files, and the bad-input errors."""

from __future__ import annotations

import json
import math

import pytest

from d2v2.bench import cli, data

# Small data for the suite: 12 synthetic utterances (one short batch of them), a small BPE vocabulary.
SMALL = ["--set", "data.embedded_utterances=12", "--set", "data.vocab_size=600"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


def test_quick_run_of_every_modality_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "report"
    rc = cli.main(["data", "--quick", "--batches", "2", "--step-ms", "image=100,audio=400,text=50", *SMALL, "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    meta, rows = report["meta"], report["rows"]
    assert [(r["modality"], r["workers"], r["status"]) for r in rows] == [
        (m, w, "ok") for m in ("image", "audio", "text") for w in data.QUICK_WORKERS
    ]
    for r in rows:
        assert r["batches"] == 2 and r["batches_per_s"] > 0 and r["first_batch_s"] > 0
        assert r["samples_per_s"] == pytest.approx(r["batches_per_s"] * r["samples_per_batch"])
        assert r["samples_per_s_per_worker"] == pytest.approx(r["samples_per_s"] / max(r["workers"], 1))
        assert f"| {r['modality']} | {r['workers']} | {r['samples_per_batch']:.1f} |" in markdown
    # The base recipes' batches: 16 images of 224 px with 16 masks each, 4 blocks of 512 tokens.
    image = next(r for r in rows if r["modality"] == "image")
    assert image["samples_per_batch"] == 16 and image["units_per_s"] == pytest.approx(image["samples_per_s"])
    # One GPU at 100 ms a step eats 160 images/s; at 400 ms, 62.5 s of audio per step.
    per_gpu = meta["per_gpu"]
    assert per_gpu["image"]["need_per_s"] == pytest.approx(160.0) and per_gpu["text"]["need_per_s"] == pytest.approx(80.0)
    assert per_gpu["audio"]["need_per_s"] == pytest.approx(1_000_000 / 16_000 / 0.4)
    for modality, s in per_gpu.items():
        best = max(r["units_per_s_per_worker"] for r in rows if r["modality"] == modality and r["workers"] > 0)
        assert s["step_ms_source"] == "--step-ms" and s["workers_per_gpu"] == math.ceil(s["need_per_s"] / best)
    assert "## Workers per GPU" in markdown and meta["command"].startswith("d2v2 bench data --quick")


def test_loader_is_the_engines(tmp_path):
    # The batches are those the training loader makes: masks and kept ids of the method's modality.
    loader, cfg = data.build("text", SMALL[1::2])
    batch = next(iter(loader(0)))
    clones = 8  # text base's K
    assert batch["source"].shape == (cfg.data.batch_size, cfg.data.block_size)
    assert batch["mask"].shape == (cfg.data.batch_size * clones, cfg.data.block_size)
    assert batch["ids_keep"].shape[0] == batch["mask"].shape[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modalities", "video"], "modalities: unknown 'video'"),
        (["--workers", "one"], "--workers takes worker counts"),
        (["--workers", "-1"], "worker counts >= 0"),
        (["--batches", "0"], "batches >= 1"),
        (["--step-ms", "image=0"], "step-ms: need a positive time"),
        (["--set", "data.batch_size=0"], "data.batch_size must be >= 1"),
    ],
)
def test_bad_input_is_a_value_error(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        cli.main(["data", "--quick", "--modalities", "text", *SMALL, "--out", str(tmp_path), *argv])
    assert not (tmp_path / "results.json").exists()
