"""``d2v2 bench kernels`` on CPU: the end-to-end quick run and its three files, the row schema, the
bytes/FLOP formulas, the plug-in hook for other op modules, the harness pieces, and every ValueError
path. Timing budgets are tiny: these tests check the plumbing, never the speed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types

import pytest
import torch

from d2v2.bench import cli, harness, kernels

CPU = torch.device("cpu")
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


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # Tiny ops on a shared, loaded CPU: with several OpenMP threads a busy peer core turns a 0.1 ms
    # convolution into 100 ms of spin-waiting. One thread keeps these tests fast and steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_setup_functions_reject_providers_that_do_not_apply():
    vit, audio = kernels.QUICK_SHAPES["vit-b"], kernels.QUICK_SHAPES["audio-base"]
    with pytest.raises(ValueError, match="provider must be one of"):
        kernels.setup_gather_tokens(vit, "nope", CPU, torch.float32)
    with pytest.raises(ValueError, match="provider must be one of"):
        kernels.setup_gather_tokens(vit, "apex", CPU, torch.float32)  # apex has no gather
    with pytest.raises(ValueError, match="provider must be one of"):
        kernels.setup_layer_targets(audio, "apex", CPU, torch.float32)  # no final LayerNorm for audio
    with pytest.raises(ValueError, match="grid"):
        kernels.setup_conv_block2d(audio, "torch", CPU, torch.float32)
    with pytest.raises(ValueError, match="provider must be one of"):
        kernels.op_provider("gather_tokens", "gather_tokens", "sdpa", CPU)


def test_bytes_and_flops_formulas():
    base = kernels.QUICK_SHAPES["vit-b"]  # B=2, M=2, N=16, D=48, fp32 features, fp32 pos
    b, m, n, d = base.batch, base.clones, base.length, base.dim
    r = b * m

    # Every position kept: every x row and every pos row is read, the output has R*N rows.
    every = dataclasses.replace(base, kept=n)
    gather = kernels.setup_gather_tokens(every, "torch", CPU, torch.float32)
    ids = r * n * 8
    assert gather.bytes["fwd"] == ids + b * n * d * 4 + n * d * 4 + r * n * d * 4
    assert gather.bytes["bwd"] == ids + r * n * d * 4 + b * n * d * 4
    assert gather.bytes["full"] == gather.bytes["fwd"] + gather.bytes["bwd"]

    k = base.kept
    scatter = kernels.setup_scatter_tokens(base, "torch", CPU, torch.bfloat16)
    assert scatter.bytes["fwd"] == r * k * d * 2 + r * k * 8 + r * n * d * 2
    assert scatter.bytes["bwd"] == r * k * 8 + 2 * r * k * d * 2

    # Nothing kept: every (row, position) is masked, every target row is read once for its M clones.
    loss = kernels.setup_masked_regression_loss(dataclasses.replace(base, kept=0), "torch", CPU, torch.bfloat16)
    assert loss.bytes["fwd"] == r * n + r * n * d * 2 + b * n * d * 4
    assert loss.bytes["bwd"] == loss.bytes["fwd"] + r * n * d * 2

    targets = kernels.setup_layer_targets(base, "torch", CPU, torch.bfloat16)
    assert targets.bytes == {"fwd": base.target_layers * b * n * d * 2 + b * n * d * 4}

    c, g, taps = base.dec_dim, base.dec_groups, base.dec_kernel**2
    conv = kernels.setup_conv_block2d(base, "torch", CPU, torch.float32)
    assert conv.flops["fwd"] == 2 * r * n * c * (c // g) * taps
    assert conv.flops["full"] == 3 * conv.flops["fwd"]
    weights = (c * (c // g) * taps + c) * 4
    assert conv.bytes["fwd"] == 2 * r * n * c * 4 + weights

    numel = sum(math.prod(s) for s in kernels.vit_parameter_shapes(base.dim, base.depth, base.patch))
    assert kernels.setup_ema(base, "torch", CPU, torch.float32).bytes == {"fwd": numel * 12}
    assert kernels.setup_ema(base, "torch", CPU, torch.bfloat16).bytes == {"fwd": numel * (8 + 2)}


def test_vit_b_parameter_list_is_the_86m_encoder():
    shapes = kernels.vit_parameter_shapes(768, 12, 16)
    assert (2304, 768) in shapes and (768, 3, 16, 16) in shapes
    assert sum(s == (3072, 768) for s in shapes) == 12
    assert 85e6 < sum(math.prod(s) for s in shapes) < 87e6


def _fake_case(op, setup, modes=kernels.MODES):
    return kernels.Case(op=op, shape="vit-b", dims="n=8", dtype=torch.float32, modes=modes,
                        providers=("sdpa",), bound="compute", setup=setup)  # fmt: skip


def test_contributed_cases_plug_in(tmp_path, monkeypatch):
    def good_setup(provider, device):
        if provider != "sdpa":
            raise ValueError(f"provider must be 'sdpa', got {provider!r}")
        x = torch.randn(8, device=device, requires_grad=True)
        return kernels.Workload(fn=lambda: (x * 2).sum(), grad_inputs=(x,), bytes={"fwd": 32}, flops={"fwd": 8.0})

    def broken_setup(provider, device):
        raise RuntimeError("kernel exploded")

    contributor = types.ModuleType("fake_attention_bench")
    contributor.bench_cases = lambda shapes, dtype: [_fake_case("fake_op", good_setup),
                                                     _fake_case("fake_broken", broken_setup, ("fwd",))]  # fmt: skip
    monkeypatch.setitem(sys.modules, "fake_attention_bench", contributor)
    (tmp_path / "fake_unimportable_bench.py").write_text("raise ImportError('needs d2v2.kernels.fake')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        kernels, "CONTRIBUTORS", ("fake_attention_bench", "fake_unimportable_bench", "d2v2.bench.no_such_module")
    )

    rows, paths = kernels.run(device=CPU, dtype=torch.float32, quick=True, ops=["fake_op", "fake_broken"],
                              providers=["sdpa"], out_dir=tmp_path / "out", rep_ms=1, warmup_ms=1,
                              log=lambda _: None)  # fmt: skip
    good = [r for r in rows if r["op"] == "fake_op"]
    assert [r["mode"] for r in good] == ["fwd", "bwd", "full"] and all(r["status"] == "ok" for r in good)
    assert good[0]["bytes"] == 32 and good[0]["tflops"] is not None and good[1]["bytes"] is None
    broken = next(r for r in rows if r["op"] == "fake_broken")
    assert broken["status"] == "error" and "kernel exploded" in broken["note"]
    meta = json.loads(paths["json"].read_text())["meta"]
    assert any("fake_unimportable_bench" in n and "d2v2.kernels.fake" in n for n in meta["notes"])
    assert not any("no_such_module" in n for n in meta["notes"])  # a contributor not written yet is silent


def test_harness_percentiles_speedups_and_timer():
    samples = torch.rand(101, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.quantile(samples, torch.tensor(harness.QUANTILES, dtype=torch.float64))
    samples = samples.tolist()
    assert harness.percentiles(samples, harness.QUANTILES) == pytest.approx(expected.tolist())
    with pytest.raises(ValueError, match="quantiles"):
        harness.percentiles(samples, [1.5])

    rows = [
        {"op": "a", "provider": "torch", "median_ms": 4.0},
        {"op": "a", "provider": "triton", "median_ms": 1.0},
        {"op": "b", "provider": "triton", "median_ms": 1.0},  # no baseline in its group
    ]
    harness.speedups(rows, group_keys=("op",), label_key="provider", baseline="torch")
    assert [r["speedup_vs_torch"] for r in rows] == [1.0, 4.0, None]

    x = torch.ones(3, requires_grad=True)
    calls = []

    def step():  # the timer must reset .grad before every call, outside the timed region
        assert x.grad is None
        (x * 3).sum().backward()
        calls.append(1)

    timing = harness.measure(step, CPU, warmup_ms=0.1, rep_ms=0.1, grad_to_none=(x,))
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms and len(calls) >= 3 + 2
    assert harness.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    table = harness.markdown_table([{"v": None, "w": 1.23456}], [("v", "v", ""), ("w", "w", ".2f")])
    assert table.splitlines() == ["| v | w |", "|---|---|", "| – | 1.23 |"]
