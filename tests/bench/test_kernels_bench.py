"""``d2v2 bench kernels`` on CPU: the end-to-end quick run and its three files, the row schema, the
case modules' plug-in contract, and every ValueError path of the command line. Timing budgets are tiny:
these tests check the plumbing, never the speed. (Each op's formulas: tests/bench/test_<op>.py.)
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from d2v2.bench import cli, harness, kernels, shapes
from tests.bench.helpers import CPU

FAST = ["--rep-ms", "1", "--warmup-ms", "1"]
ROW_FIELDS = {
    "op", "shape", "dims", "dtype", "provider", "mode", "status", "note", "median_ms", "p20_ms", "p80_ms",
    "peak_mem_mb", "bytes", "gbps", "frac_copy_bw", "flops", "tflops", "speedup_vs_torch", "speedup_vs_compile",
    "device", "torch", "triton", "date",
}  # fmt: skip
BUILTIN_OPS = {
    "gather_tokens", "scatter_tokens", "layer_targets", "masked_regression_loss", "conv_block1d", "conv_block2d",
    "ema_",
}  # fmt: skip


def test_quick_cpu_run_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "report"
    rc = cli.main(["kernels", "--quick", "--providers", "torch", "--device", "cpu", "--out", str(out), *FAST])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()

    meta, rows = report["meta"], report["rows"]
    assert meta["copy_gbps"] > 0 and meta["matmul_tflops"] > 0  # the ceilings were measured
    assert {r["op"] for r in rows} >= BUILTIN_OPS
    for r in rows:
        assert r.keys() >= ROW_FIELDS, ROW_FIELDS - r.keys()
        assert r["status"] == "ok", r
        assert r["provider"] == "torch" and r["dtype"] in ("fp32", "bf16") and r["device"] == meta["device"]
        assert r["torch"] == torch.__version__ and r["date"] == meta["date"]
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["speedup_vs_torch"] == pytest.approx(1.0) and r["speedup_vs_compile"] is None
        if r["op"] in BUILTIN_OPS:  # contributed ops (attention) may count FLOPs only
            assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
            assert r["frac_copy_bw"] == pytest.approx(r["gbps"] / meta["copy_gbps"])
        if r["op"].startswith("conv_block"):
            assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
        assert f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | torch |" in markdown
    # Training-path ops run all three modes; the teacher-side ops only forward.
    modes = {(r["op"], r["shape"]): set() for r in rows}
    for r in rows:
        modes[r["op"], r["shape"]].add(r["mode"])
    assert modes["gather_tokens", "text-base"] == {"fwd", "bwd", "full"}
    assert modes["layer_targets", "vit-b"] == modes["ema_", "vit-b"] == {"fwd"}
    assert {r["dtype"] for r in rows if r["op"] == "ema_"} == {"fp32", "bf16"}  # fp32 and mixed students


def test_triton_provider_interpreted_on_cpu_and_skipped_without_interpreter(tmp_path, monkeypatch):
    select = dict(ops=["gather_tokens"], shapes=["vit-b"], providers=["triton", "torch"], modes=["fwd"])
    rows, _ = kernels.run(device=CPU, dtype=torch.float32, quick=True, out_dir=tmp_path / "on", rep_ms=1,
                          warmup_ms=1, log=lambda _: None, **select)  # fmt: skip
    triton_row = next(r for r in rows if r["provider"] == "triton")
    assert triton_row["status"] == "ok" and triton_row["speedup_vs_torch"] is not None

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rows, paths = kernels.run(device=CPU, dtype=torch.float32, quick=True, out_dir=tmp_path / "off", rep_ms=1,
                              warmup_ms=1, log=lambda _: None, **select)  # fmt: skip
    triton_row = next(r for r in rows if r["provider"] == "triton")
    assert triton_row["status"] == "skipped" and "TRITON_INTERPRET=1" in triton_row["note"]
    assert triton_row["median_ms"] is None
    assert "skipped: gather_tokens triton (vit-b): Triton kernels need" in paths["md"].read_text()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--providers", "torch,nope"], "providers: unknown 'nope'"),
        (["--ops", "gather"], "ops: unknown 'gather'"),
        (["--modes", "forward"], "modes: unknown 'forward'"),
        (["--shapes", "vit-l"], "shapes: unknown 'vit-l'"),
        (["--dtype", "int8"], "dtype must be one of"),
        (["--device", "tpu:0"], "device must be cpu or cuda"),
    ],
)
def test_unknown_names_raise_value_error(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        cli.main(["kernels", "--quick", "--device", "cpu", "--out", str(tmp_path), *FAST, *argv])
    assert not (tmp_path / "results.json").exists()


def _fake_case(op, setup, modes=harness.MODES):
    return harness.Case(op=op, shape="vit-b", dims="n=8", dtype=torch.float32, modes=modes,
                        providers=("sdpa",), bound="compute", setup=setup)  # fmt: skip


def test_case_modules_plug_in(tmp_path, monkeypatch):
    def good_setup(provider, device):
        if provider != "sdpa":
            raise ValueError(f"provider must be 'sdpa', got {provider!r}")
        x = torch.randn(8, device=device, requires_grad=True)
        return harness.Workload(fn=lambda: (x * 2).sum(), grad_inputs=(x,), bytes={"fwd": 32}, flops={"fwd": 8.0})

    def broken_setup(provider, device):
        raise RuntimeError("kernel exploded")

    module = types.SimpleNamespace(bench_cases=lambda shapes, dtype: [
        _fake_case("fake_op", good_setup), _fake_case("fake_broken", broken_setup, ("fwd",))
    ])  # fmt: skip
    monkeypatch.setattr(kernels, "CASE_MODULES", (module,))

    rows, paths = kernels.run(device=CPU, dtype=torch.float32, quick=True, providers=["sdpa"],
                              out_dir=tmp_path / "out", rep_ms=1, warmup_ms=1, log=lambda _: None)  # fmt: skip
    good = [r for r in rows if r["op"] == "fake_op"]
    assert [r["mode"] for r in good] == ["fwd", "bwd", "full"] and all(r["status"] == "ok" for r in good)
    assert good[0]["bytes"] == 32 and good[0]["tflops"] is not None and good[1]["bytes"] is None
    broken = next(r for r in rows if r["op"] == "fake_broken")
    assert broken["status"] == "error" and "kernel exploded" in broken["note"]
    assert "- error: fake_broken sdpa (vit-b): RuntimeError: kernel exploded" in paths["md"].read_text()


def test_every_kernel_has_a_case_module():
    # One bench module per public op (conv_block covers both conv ops), each contributing its cases.
    from d2v2 import kernels as ops

    cases = kernels.collect_cases(shapes.QUICK_SHAPES, torch.float32)
    assert {c.op for c in cases} == set(ops.OPS) and set(ops.OPS) <= set(ops.__all__)
