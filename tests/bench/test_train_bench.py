"""d2v2 bench train on the CPU: the real trainer step per variant, alternated, and its report."""

from __future__ import annotations

import json

import pytest
import torch

from d2v2.bench import train


def test_tiny_image_step_per_variant_and_report(tmp_path):
    rows, paths = train.run(
        device=torch.device("cpu"), size="tiny", modalities=("image",), methods=("data2vec2",),
        variants=("kernels", "torch"), warmup=0, steps=2, batch=4, out_dir=tmp_path, log=lambda *_: None,
    )  # fmt: skip
    assert [(r["variant"], r["status"]) for r in rows] == [("kernels", "ok"), ("torch", "ok")]
    for row in rows:
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        # 4 image-tiny samples of 8 x 8 patches per step; FLOPs counted once, shared by the variants
        assert row["samples"] == 4 and row["tokens"] == 4 * 64
        assert row["flops"] == rows[0]["flops"] > 0 and 0 < row["mfu"]
    assert rows[1]["speedup_vs_torch"] == 1.0
    assert {p.name for p in paths.values()} == {"results.json", "results.md", "results.png"}
    report = json.loads(paths["json"].read_text())
    assert report["meta"]["size"] == "tiny" and report["meta"]["timed_steps"] == 2
    assert "| data2vec2 | image | kernels |" in paths["md"].read_text()


def test_every_method_of_a_modality_races_with_per_sample_ratios(tmp_path):
    rows, paths = train.run(
        device=torch.device("cpu"), size="tiny", modalities=("image",), variants=("kernels",),
        warmup=0, steps=1, batch=2, out_dir=tmp_path, log=lambda *_: None,
    )  # fmt: skip
    assert [(r["method"], r["variant"], r["status"]) for r in rows] == [
        ("data2vec2", "kernels", "ok"), ("data2vec", "kernels", "ok"), ("mae", "kernels", "ok"),
    ]  # fmt: skip
    d2v2 = rows[0]["median_ms"] / rows[0]["samples"]
    assert rows[0]["data2vec2_speedup"] is None
    for row in rows[1:]:
        assert row["data2vec2_speedup"] == pytest.approx(row["median_ms"] / row["samples"] / d2v2)
        assert row["flops"] > 0 and row["flops"] != rows[0]["flops"]  # counted per method
    md = paths["md"].read_text()
    assert "## Ratios" in md and "against mae" in md and "against data2vec (" in md


def test_methods_are_matched_to_the_modalities_they_have_presets_for():
    assert [m for m in ("data2vec2", "data2vec", "mae", "wav2vec2", "mlm") if train.supports(m, "audio")] == [
        "data2vec2", "data2vec", "wav2vec2",
    ]  # fmt: skip
    assert train.supports("mlm", "text") and not train.supports("mae", "text")


def test_build_makes_a_registered_method_from_its_recipe():
    method, cfg = train.build("data2vec2", "text", "tiny")
    assert cfg.model.modality == "text" and method.cfg.vocab_size == cfg.data.vocab_size
    batch = next(train.synthetic_batches(method, cfg, batch=2))
    assert batch["source"].shape == (2, cfg.data.block_size) and batch["ids_keep"].shape[0] == batch["mask"].shape[0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(size="huge"), "size: unknown 'huge'"),
        (dict(modalities=("video",)), "modalities: unknown 'video'"),
        (dict(methods=("byol",)), "methods: unknown 'byol'; expected some of data2vec"),
        (dict(variants=("jax",)), "variants: unknown 'jax'"),
        (dict(steps=0), "steps >= 1"),
        (dict(batch=0), "batch >= 1"),
    ],
)
def test_bad_names_are_value_errors(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.run(device=torch.device("cpu"), out_dir=tmp_path, **kwargs)


def test_quick_on_a_cpu_takes_the_tiny_recipes_and_says_so(tmp_path, capsys):
    from d2v2.engine.cli import main

    argv = ["bench", "train", "--quick", "--device", "cpu", "--modalities", "text", "--methods", "mlm", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "size tiny: the tiny recipes on the CPU (the released sizes: --size base)" in out
    assert "GiB needed of" in out
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["meta"]["size"] == "tiny" and report["meta"]["timed_steps"] == 2
    assert [(r["method"], r["size"], r["variant"]) for r in report["rows"]] == [("mlm", "tiny", "kernels")]


def test_base_on_a_cpu_is_refused_when_its_estimate_exceeds_the_free_memory(tmp_path, monkeypatch, capsys):
    from d2v2.engine.cli import main

    monkeypatch.setattr(train, "available_memory", lambda: 2 * 2**30)
    argv = ["bench", "train", "--size", "base", "--device", "cpu", "--modalities", "image", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--size base on the CPU needs about" in err[0] and "2.0 GiB is free: use --size tiny" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was built or written


def test_the_memory_estimate_of_the_base_image_race_is_near_what_it_held():
    lineup = [("data2vec2", "kernels"), ("data2vec2", "torch"), ("data2vec2", "compile"), ("data2vec", "kernels"), ("mae", "kernels")]
    gib = train.memory_estimate(lineup, "image", "base") / 2**30
    assert 12 < gib < 30  # the whole race was measured at 18 GB resident
    assert train.memory_estimate(lineup[:1], "image", "tiny") < 2**30
