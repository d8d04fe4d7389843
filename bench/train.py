"""``d2v2 bench train``: the real training step of each method and variant, alternated in one run.

What is timed
    One optimizer update of ``engine.training.trainer.Trainer.train_step`` (forward, backward, gradient clipping,
    fused AdamW, the EMA teacher update), built from the recipe ``<modality>-<size>`` exactly as
    ``d2v2 pretrain`` builds it, on synthetic batches of the recipe's per-GPU size (random images,
    waveforms or token ids; masks made on the CPU as the loader makes them, pinned, copied with
    ``non_blocking``). Every (method, modality, variant) gets its own model from the same seed;
    ``warmup`` steps of each are discarded (compilation, autotuning, allocator growth), then the
    variants take turns, round robin, so that clock and thermal drift hit them all alike.

Variants
    kernels  d2v2's Triton kernels (``impl="auto"``: Triton on CUDA)
    torch    the same engine on the PyTorch path (``D2V2_KERNELS=torch`` while its steps run)
    compile  the kernels variant with ``train.compile`` (``torch.compile`` of the method)

Per variant: step time median and 20/80 percentiles (host clock around a synchronised step),
samples/s, tokens/s (positions per sample, as the trainer counts them), peak memory of a step
(CUDA), the host syncs of one step as ``torch.cuda.set_sync_debug_mode("warn")`` reports them (CUDA), model FLOPs per step (``torch.utils.flop_counter`` over one step of the PyTorch path, which
runs only aten ops; the same count for every variant, since the math is the same) and MFU against
a bf16 matmul ceiling measured in the same run, and the speedups over the torch variant.

Methods
    Every method registered in ``d2v2.models.METHODS`` that has a preset for the modality (by default;
    ``--methods`` chooses), built by ``build`` alone at the encoder size and batch of the data2vec 2.0
    recipe ``<modality>-<size>``, so that all compare at equal encoder size on the same batches. All
    contestants of a modality (every method, every variant) take turns in one round robin. data2vec 2.0
    runs every variant; the baselines run ``baseline_variants`` (default: kernels, i.e. the same
    engine). Each row of a method other than data2vec 2.0 also gets ``data2vec2_speedup``: its step time
    per source sample over data2vec 2.0's in the same variant (above 1: data2vec 2.0 processes a source
    sample faster). That is the cost of one update per sample, not the time to an accuracy: data2vec 2.0
    does K masked copies per sample and needs fewer epochs; ``d2v2 bench converge`` measures the latter.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import harness, report

VARIANTS = ("kernels", "torch", "compile")
MODALITIES = ("image", "audio", "text")
SIZES = ("tiny", "base")


def build(method: str, modality: str, size: str):
    """The one place a benchmarked method is built: ``method`` (a name in ``d2v2.models.METHODS``) for
    the recipe ``<modality>-<size>``, as ``d2v2 pretrain`` builds it (``build_run_method``), with the
    fields its data would decide taken from the recipe's data section (``DataKind.model_fields``:
    synthetic data has no tokenizer, so the engine BPE's special ids). Returns (method, resolved run
    config)."""
    from d2v2.engine.data.kinds import data_kind
    from d2v2.engine.run import build_run_method, resolve_config

    cfg = resolve_config(f"{modality}-{size}")
    cfg.model.method = method
    return build_run_method(cfg, data_kind(modality).model_fields(cfg.data))[0], cfg


def default_size(device: torch.device) -> str:
    """The released base sizes on a GPU; on a CPU the tiny recipes, which run in seconds (base takes many GB)."""
    return "base" if device.type == "cuda" else "tiny"


def supports(method: str, modality: str) -> bool:
    """Whether ``method`` has a preset for ``modality`` (MAE is image-only, wav2vec 2.0 audio-only, ...)."""
    from d2v2.models import method_config

    try:
        method_config(method, modality, "tiny")
    except ValueError:
        return False
    return True


def synthetic_batches(method, cfg, batch: int | None = None, seed: int = 0) -> Iterator[dict]:
    """Endless batches of the recipe's per-GPU size (or ``batch`` samples), made as the loader makes
    them: the method's modality draws the masks on the CPU, kept ids beside them, pinned."""
    from d2v2.engine.data.kinds import data_kind
    from d2v2.models import mask_to_ids

    gen = torch.Generator().manual_seed(seed)
    kind = data_kind(cfg.model.modality)
    size = batch or kind.batch_size(cfg.data)
    pin = torch.cuda.is_available()
    index = 0
    while True:
        source = kind.source(cfg.data, size, gen)
        mask = method.modality.make_masks(size, source, gen)
        tensors = {"source": source, "mask": mask, "ids_keep": mask_to_ids(mask)}
        if pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        yield {**tensors, "skipped": [], "epoch": 0, "batch": index}
        index += 1


def memory_estimate(lineup: Sequence[tuple[str, str]], modality: str, size: str, batch: int | None = None) -> int:
    """Bytes one modality's race needs on the CPU, estimated from models built on ``meta`` (no memory).

    Every contestant lives for the whole race: its weights (the teacher's too), gradients and AdamW's two
    moments, in fp32. One step runs at a time: the student's activations, about 20 saved tensors of
    its width per block and kept token (what a pre-LN transformer block keeps for backward), plus about
    10 per masked-copy position for the decoder, head and targets. A fifth on top for the allocator,
    the batches and the interpreter. Measured against it: the image base race held 18 GB resident.
    """
    state, step = 0, 0
    for method, variants in Counter(method for method, _variant in lineup).items():  # one build per method
        with torch.device("meta"):
            model, cfg = build(method, modality, size)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        state += variants * 4 * (sum(t.numel() for t in model.state_dict().values()) + 3 * trainable)
        mask = next(synthetic_batches(model, cfg, batch))["mask"]
        kept = int((~mask).sum())
        step = max(step, 4 * model.cfg.embed_dim * (20 * model.cfg.depth * kept + 10 * mask.numel()))
    return int(1.2 * (state + step))


def available_memory() -> int | None:
    """Bytes the kernel says a new process can take without swapping (Linux's MemAvailable), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(lineup: Mapping[str, Sequence[tuple[str, str]]], size: str, batch: int | None, log) -> None:
    """On the CPU: refuse, before building anything, a race whose estimate exceeds the free memory."""
    free = available_memory()
    if free is None:
        return
    needed = max(memory_estimate(contestants, modality, size, batch) for modality, contestants in lineup.items() if contestants)
    gib = 2**30
    if needed > free:
        raise ValueError(
            f"--size {size} on the CPU needs about {needed / gib:.1f} GiB (every contestant's weights and optimizer "
            f"state, one step's activations), {free / gib:.1f} GiB is free: use --size tiny, fewer --methods or "
            f"--variants, a smaller --batch, or a GPU"
        )
    log(f"memory: about {needed / gib:.1f} GiB needed of {free / gib:.1f} GiB free")


@contextlib.contextmanager
def kernels_env(value: str | None):
    """``D2V2_KERNELS`` set to ``value`` (None: unset) for the duration."""
    old = os.environ.get("D2V2_KERNELS")
    if value is None:
        os.environ.pop("D2V2_KERNELS", None)
    else:
        os.environ["D2V2_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("D2V2_KERNELS", None)
        else:
            os.environ["D2V2_KERNELS"] = old


class Contestant:
    """One (method, modality, variant): its own model, trainer and batch stream."""

    def __init__(
        self, method: str, modality: str, size: str, variant: str, device: torch.device, run_dir: Path,
        batch: int | None = None,
    ):
        from d2v2.engine.training.trainer import Trainer

        self.method, self.modality, self.variant, self.device = method, modality, variant, device
        torch.manual_seed(0)  # the same weights for every variant
        model, cfg = build(method, modality, size)
        cfg.train.compile = variant == "compile"
        cfg.train.log_every = cfg.train.checkpoint_every = 10**9
        cfg.train.accum_steps = 1
        self.env = "torch" if variant == "torch" else None
        self.batches = synthetic_batches(model, cfg, batch)
        first = next(self.batches)
        self.samples = first["source"].shape[0]
        self.tokens = self.samples * first["mask"].shape[1]
        self.trainer = Trainer(model, None, cfg.optim, cfg.train, run_dir, device, self.samples, {}, log=lambda *_: None)
        self.times_ms: list[float] = []
        self.peak_mb: float | None = None
        self.error: str | None = None

    def step(self, record: bool) -> None:
        with kernels_env(self.env):
            harness._sync(self.device)
            before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            self.trainer.train_step(self.batches)
            harness._sync(self.device)
            elapsed_ms = (time.perf_counter() - start) * 1e3
        if record:
            self.times_ms.append(elapsed_ms)
            if self.device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(self.device) - before) / 2**20 + self.state_mb()
                self.peak_mb = max(self.peak_mb or 0.0, peak)

    def state_mb(self) -> float:
        """Parameters (student, teacher, decoder) and optimizer state: what lives between steps."""
        tensors = list(self.trainer.method.state_dict().values())
        tensors += [v for s in self.trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    def flops(self) -> float:
        """Model FLOPs of one step, counted on the PyTorch path (aten ops only; Triton calls are invisible)."""
        from torch.utils.flop_counter import FlopCounterMode

        with kernels_env("torch"), FlopCounterMode(display=False) as counter:
            self.trainer.train_step(self.batches)
        return float(counter.get_total_flops())

    def host_syncs(self) -> tuple[int, list[str]]:
        """CUDA: the host syncs of one step as CUDA's sync detector reports them (count, first few)."""
        import warnings

        with kernels_env(self.env), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.trainer.train_step(self.batches)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        where = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        return len(where), list(dict.fromkeys(where))[:5]


def run(
    *,
    device: torch.device,
    size: str | None = None,
    modalities: Sequence[str] = MODALITIES,
    methods: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    baseline_variants: Sequence[str] = ("kernels",),
    warmup: int = 3,
    steps: int = 10,
    batch: int | None = None,
    out_dir: Path | None = None,
    argv: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Time every (modality, method, variant); write results.json, results.md and results.png.

    ``methods`` None: every registered method with a preset for the modality. ``variants`` are data2vec
    2.0's (None: all on a GPU; kernels and torch on a CPU); the other methods run ``baseline_variants``.
    ``size`` None: ``default_size(device)``. On a CPU the memory the race needs is estimated first
    (``memory_estimate``) and a race that cannot fit is refused before anything is built.
    """
    from d2v2.models import METHODS

    if size is None:
        size = default_size(device)
        log(f"size {size}: " + ("the tiny recipes on the CPU (the released sizes: --size base)" if size == "tiny" else "the released sizes"))
    if variants is None:
        variants = VARIANTS if device.type == "cuda" else ("kernels", "torch")
        if device.type == "cpu":
            log("variants kernels, torch: torch.compile takes minutes to compile on a CPU (--variants compile adds it)")
    for name, chosen, known in (("size", [size], SIZES), ("modalities", modalities, MODALITIES),
                                ("methods", methods or (), tuple(METHODS)), ("variants", variants, VARIANTS),
                                ("baseline variants", baseline_variants, VARIANTS)):  # fmt: skip
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise ValueError(f"{name}: unknown {', '.join(map(repr, unknown))}; expected some of {', '.join(known)}")
    if warmup < 0 or steps < 1 or (batch is not None and batch < 1):
        raise ValueError(f"need warmup >= 0, steps >= 1 and batch >= 1, got {warmup}, {steps} and {batch}")
    lineup = {
        modality: [(m, v) for m in (methods or METHODS) if supports(m, modality)
                   for v in (variants if m == "data2vec2" else baseline_variants)]
        for modality in modalities
    }  # fmt: skip
    if not any(lineup.values()):
        raise ValueError(f"none of the methods {', '.join(methods or ())} has a preset for {', '.join(modalities)}")
    if device.type == "cpu":
        check_memory(lineup, size, batch, log)
    stamp = report.environment_stamp(device)
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceiling = harness.matmul_tflops(device, gemm_dtype)
    log(f"{str(gemm_dtype).removeprefix('torch.')} matmul ceiling {ceiling:.2f} TFLOP/s")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="d2v2-bench-train-") as scratch:
        for modality, contestants in lineup.items():
            rows += _race(modality, contestants, size, batch, device, warmup, steps, ceiling, stamp, Path(scratch), log)
    harness.speedups(rows, group_keys=("method", "modality"), label_key="variant", baseline="torch")
    harness.speedups(rows, group_keys=("method", "modality"), label_key="variant", baseline="compile")
    per_sample_speedups(rows)
    meta = {
        **stamp, "benchmark": "train", "size": size, "batch": batch or "recipe", "warmup_steps": warmup, "timed_steps": steps,
        "matmul_tflops": ceiling, "matmul_dtype": str(gemm_dtype).removeprefix("torch."),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "command": " ".join(argv) if argv is not None else None,
    }  # fmt: skip
    out_dir = Path(out_dir) if out_dir is not None else report.default_out_dir("train", device)
    return rows, write_report(out_dir, meta, rows)


def per_sample_speedups(rows: list[dict[str, Any]]) -> None:
    """``data2vec2_speedup`` on every other method's row: its step time per source sample over data2vec
    2.0's, in the same modality and variant (None where either is missing)."""
    reference = {
        (r["modality"], r["variant"]): r["median_ms"] / r["samples"]
        for r in rows if r["method"] == "data2vec2" and r.get("median_ms")
    }  # fmt: skip
    for r in rows:
        ref = reference.get((r["modality"], r["variant"]))
        own = r["median_ms"] / r["samples"] if r.get("median_ms") else None
        r["data2vec2_speedup"] = own / ref if own and ref and r["method"] != "data2vec2" else None


def _race(modality, lineup, size, batch, device, warmup, steps, ceiling, stamp, scratch, log) -> list[dict]:
    """One modality: build every (method, variant), count each method's FLOPs once, then alternate their steps."""
    contestants: dict[tuple[str, str], Contestant] = {}
    rows = []
    for method, variant in lineup:
        row = {"method": method, "modality": modality, "size": size, "variant": variant, "status": "ok", "note": ""}
        rows.append(row)
        try:
            contestants[method, variant] = Contestant(method, modality, size, variant, device, scratch, batch)
        except Exception as e:  # noqa: BLE001 - one failing contestant must not lose the others
            row.update(status="error", note=harness.error_line(e))
    flops = {}
    for method in dict.fromkeys(m for m, _ in lineup):
        eager = [c for (m, v), c in contestants.items() if m == method and v != "compile"]
        try:  # on an eager model (a compiled one runs code the counter cannot see)
            flops[method] = (eager[0] if eager else Contestant(method, modality, size, "torch", device, scratch, batch)).flops()
        except Exception as e:  # noqa: BLE001 - the times still mean something without it
            log(f"{method} {modality}: FLOP count failed: {harness.error_line(e)}")
    alive = dict(contestants)
    for i in range(warmup + steps):
        for key, c in list(alive.items()):
            try:
                c.step(record=i >= warmup)
            except Exception as e:  # noqa: BLE001
                c.error = harness.error_line(e)
                del alive[key]
    syncs = {}
    if device.type == "cuda":
        for key, c in alive.items():
            try:
                syncs[key] = c.host_syncs()
            except Exception as e:  # noqa: BLE001 - a report, not a measurement
                syncs[key] = (None, [harness.error_line(e)])
    for row in rows:
        key = (row["method"], row["variant"])
        c = contestants.get(key)
        if c is None:
            continue
        if c.error:
            row.update(status="error", note=c.error)
            continue
        median, p20, p80 = harness.percentiles(c.times_ms, harness.QUANTILES)
        method_flops = flops.get(row["method"])
        row.update(
            median_ms=median, p20_ms=p20, p80_ms=p80, samples=c.samples, tokens=c.tokens,
            samples_per_s=c.samples / (median * 1e-3), tokens_per_s=c.tokens / (median * 1e-3),
            peak_mem_mb=c.peak_mb, flops=method_flops,
            tflops=method_flops / (median * 1e-3) / 1e12 if method_flops else None,
        )  # fmt: skip
        row["mfu"] = row["tflops"] / ceiling if row["tflops"] and ceiling else None
        row["host_syncs"], row["host_sync_examples"] = syncs.get(key, (None, []))
        log(f"{row['method']:<10} {modality:<6} {row['variant']:<8} {median:9.2f} ms  {row['samples_per_s']:9.1f} samples/s")
    for row in rows:
        row.update(device=stamp["device"], torch=stamp["torch"], triton=stamp["triton"], date=stamp["date"])
        if row["status"] != "ok":
            log(f"{row['method']:<10} {modality:<6} {row['variant']:<8} {row['status']}: {row['note']}")
    del contestants, alive
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


_COLUMNS = (
    ("method", "method", ""), ("modality", "modality", ""), ("variant", "variant", ""),
    ("median ms", "median_ms", ".2f"), ("p20-p80 ms", "spread", ""), ("samples/s", "samples_per_s", ".1f"),
    ("tokens/s", "tokens_per_s", ".0f"), ("peak MiB", "peak_mem_mb", ".0f"), ("GFLOP/step", "gflops", ".1f"),
    ("TFLOP/s", "tflops", ".1f"), ("MFU %", "pct_mfu", ".1f"), ("x torch", "speedup_vs_torch", ".2f"),
    ("x compile", "speedup_vs_compile", ".2f"), ("d2v2 x / sample", "data2vec2_speedup", ".2f"),
    ("host syncs/step", "host_syncs", ""), ("status", "status", ""),
)  # fmt: skip


def _display(row: Mapping[str, Any]) -> dict[str, Any]:
    shown = dict(row)
    if row.get("median_ms") is not None:
        shown["spread"] = f"{row['p20_ms']:.2f}-{row['p80_ms']:.2f}"
    shown["gflops"] = row["flops"] / 1e9 if row.get("flops") else None
    shown["pct_mfu"] = 100 * row["mfu"] if row.get("mfu") is not None else None
    return shown


def _ratios_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per (modality, baseline): data2vec 2.0's step cost per source sample against it."""
    lines = []
    for r in rows:
        if r.get("data2vec2_speedup") is not None:
            faster = "faster" if r["data2vec2_speedup"] >= 1 else "slower"
            lines.append(
                f"- {r['modality']}, {r['variant']}: data2vec 2.0 {r['data2vec2_speedup']:.2f}x per source sample "
                f"against {r['method']} ({faster}: {r['median_ms'] / r['samples'] / r['data2vec2_speedup']:.2f} ms "
                f"against {r['median_ms'] / r['samples']:.2f} ms per sample)"
            )
    for r in rows:
        if r["method"] == "data2vec2" and r["variant"] != "torch" and r.get("speedup_vs_torch") is not None:
            lines.append(f"- {r['modality']}: data2vec 2.0 {r['variant']} {r['speedup_vs_torch']:.2f}x the PyTorch path")
    note = (
        "Per source sample, one update. data2vec 2.0 encodes K masked copies of each sample and runs a "
        "decoder and a teacher pass, so at equal size its update per sample can cost more than a baseline's; "
        "its claim is fewer updates to an accuracy, which `d2v2 bench converge` measures."
    )
    return "## Ratios\n\n" + ("\n".join(lines) or "No pair to compare.") + "\n\n" + note


def write_report(out_dir: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """results.json (meta + rows), results.md (table, ratios, failures) and results.png (step time per method)."""
    paths = {"json": report.write_json(out_dir / "results.json", meta, rows)}
    header = {k: meta.get(k) for k in ("device", "torch", "triton", "cuda", "date", "size", "batch", "precision")}
    header["steps"] = f"{meta['warmup_steps']} warm-up (discarded) + {meta['timed_steps']} timed per contestant, round robin"
    header["matmul ceiling"] = f"{meta['matmul_tflops']:.2f} TFLOP/s ({meta['matmul_dtype']})"
    header["command"] = meta.get("command")
    table = "## Results\n\n" + report.markdown_table([_display(r) for r in rows if r["status"] == "ok"], _COLUMNS)
    failed = [f"- {r['method']} {r['modality']} {r['variant']}: {r['note']}" for r in rows if r["status"] != "ok"]
    sections = [table, _ratios_section(rows), "## Failed\n\n" + ("\n".join(failed) or "Nothing failed.")]
    paths["md"] = report.write_markdown(out_dir / "results.md", "d2v2 training-step benchmark", header, sections)
    paths["png"] = report.write_bar_plot(
        out_dir / "results.png", rows, panel_key="modality", group=lambda r: r["method"], series_key="variant",
        value_key="median_ms", ylabel="median step ms (lower is better)",
        title=f"d2v2 train step, {meta['size']} size, on {meta['device']} ({meta['date'][:10]})",
    )  # fmt: skip
    return paths
