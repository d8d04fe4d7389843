"""``d2v2 bench compile``: every Triton kernel of ``d2v2.kernels`` compiled ahead of time for the GPUs it
targets, on a machine without a GPU.

What is compiled
    The launches the ops make at the shapes of the data2vec 2.0 recipes (``RECIPES``, each read by
    ``shapes.spec_from_recipe``), forward and backward, in each dtype (fp32, bf16, fp16): the kernel
    bench's own cases (``kernels.collect_cases``), attention with ALiBi, key padding and dropout each
    on and off at every recipe's head dim, and the audio recipes' positional conv stack (data2vec's
    ``ConvPositionalEncoder``: k = max(3, width // depth), its groups, at D). ``d2v2.kernels.
    trace_launches`` records each launch without running it, and every config an autotuned kernel
    may choose at that shape (its own pruning applied) as a launch of its own; identical launches
    are compiled once. wav2vec 2.0's weight-normalised positional conv is plain PyTorch (no kernel).

What is reported, per launch and architecture (sm_80, sm_90, sm_100 where Triton targets them)
    compiled or the compiler's error, registers per thread, spill stores / loads (``ptxas -v``),
    shared memory against the architecture's per-block limit (``d2v2.kernels.ARCHS``, with the
    source of each figure), the resident blocks and occupancy that follow, and whether the kernel's
    device filter (``fits_device``) keeps the config on that architecture. ``results.json`` and
    ``results.md`` in ``bench-out/compile-<date>/`` unless ``--out``.

Failures (the command exits 1): a compile error, or shared memory over the limit, of a launch the
autotuner may choose on that architecture; or a spill in a bf16 / fp16 launch (every kernel of d2v2
is on the training step's hot path). fp32 launches may spill; the report lists where.

The kernels must be compiled ones: when TRITON_INTERPRET=1 is set (as in the test suite), the work
runs in a child process without it (``run`` does that itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RECIPES = ("image-base", "image-large", "image-huge", "audio-base", "audio-large", "text-base", "text-large")
CI_RECIPES = ("image-base", "audio-base", "text-base")
DTYPES = ("fp32", "bf16", "fp16")
ARCH_NAMES = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
HOT_DTYPES = ("bf16", "fp16")


def parse_archs(names: Sequence[str]) -> list[int]:
    archs = []
    for name in names:
        if name not in ARCH_NAMES:
            raise ValueError(f"--arch must be among {', '.join(ARCH_NAMES)}, got {name!r}")
        archs.append(ARCH_NAMES[name])
    return archs


# ----------------------------------------------------------------------------------------------
# Variants: the launches the ops make at the recipes' shapes


def _backward(out: torch.Tensor) -> None:
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.backward(None if out.dim() == 0 else torch.zeros_like(out))


def _attention_variants(spec, dtype, every_mix: bool = True):
    """(label, thunk) for attention at the spec's student shape with every ALiBi / padding / dropout mix
    (``every_mix=False``: the recipe's own, ALiBi for audio, without padding, with dropout)."""
    from d2v2.kernels import attention
    from d2v2.models import alibi_slopes

    from .attention import shape_from_spec

    shape = shape_from_spec(spec)
    rows, heads, length, head_dim = shape.rows, shape.heads, shape.length, shape.head_dim
    mixes = [(a, p, d) for a in (False, True) for p in (False, True) for d in (0.0, 0.1)]
    for alibi, padding, dropout in mixes if every_mix else [(spec.alibi, False, 0.1)]:
        if True:
            if True:

                def thunk(alibi=alibi, padding=padding, dropout=dropout):
                    qkv = torch.zeros(rows, length, 3, heads, head_dim, dtype=dtype, requires_grad=True)
                    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                    slopes = alibi_slopes(heads).requires_grad_() if alibi else None
                    positions = torch.arange(length).expand(rows, length) if alibi else None
                    mask = torch.zeros(rows, length, dtype=torch.bool) if padding else None
                    out = attention(q, k, v, positions=positions, alibi_slopes=slopes, key_padding_mask=mask,
                                    dropout_p=dropout, seed=0, impl="triton")  # fmt: skip
                    _backward(out)

                flags = f"alibi={'on' if alibi else 'off'} padding={'on' if padding else 'off'} dropout={'on' if dropout else 'off'}"
                yield "attention", f"L={length} Dh={head_dim} {flags}", thunk


def _pos_conv_variant(spec, dtype):
    from d2v2.kernels import conv_block1d
    from d2v2.models import data2vec2_config

    cfg = data2vec2_config("audio", spec.size)
    kernel = max(3, cfg.conv_pos_width // cfg.conv_pos_depth)
    dim, groups = cfg.embed_dim, cfg.conv_pos_groups

    def thunk():
        x = torch.zeros(spec.batch, spec.length, dim, dtype=dtype, requires_grad=True)
        weight = torch.zeros(dim, dim // groups, kernel, requires_grad=True)
        bias = torch.zeros(dim, requires_grad=True)
        _backward(conv_block1d(x, weight, bias, groups, residual=False, impl="triton"))

    yield "conv_block1d", f"positional conv N={spec.length} C={dim} k={kernel} g={groups}", thunk


def _case_variants(spec, dtype, with_ema: bool):
    from . import kernels

    for case in kernels.collect_cases({spec.name: spec}, dtype):
        if case.op == "attention" or (case.op == "ema_" and not with_ema):
            continue  # attention: every flag mix below; EMA: its launches depend on dtypes only

        def thunk(case=case):
            work = case.setup("triton", torch.device("cpu"))
            out = work.fn()
            if "bwd" in case.modes:
                _backward(out)

        yield case.op, case.dims, thunk


def trace_variants(recipes: Sequence[str], dtypes: Sequence[str], log: Callable[[str], None] = print,
                   every_mix: bool = True):
    """Every distinct launch the ops make at ``recipes`` in ``dtypes``: [(launch, [where used, ...])]."""
    from d2v2.kernels import trace_launches

    from .harness import dtype_from_name
    from .shapes import spec_from_recipe

    found: dict[Any, tuple[Any, list[dict]]] = {}
    for recipe in recipes:
        spec = spec_from_recipe(recipe, recipe)
        for dtype_name in dtypes:
            dtype = dtype_from_name(dtype_name)
            sources = list(_case_variants(spec, dtype, with_ema=recipe in CI_RECIPES))
            sources += list(_attention_variants(spec, dtype, every_mix))
            if spec.pos_conv:
                sources += list(_pos_conv_variant(spec, dtype))
            for op, dims, thunk in sources:
                with trace_launches() as launches:
                    thunk()
                for launch in launches:
                    use = {"op": op, "recipe": recipe, "dtype": dtype_name, "dims": dims}
                    found.setdefault(launch, (launch, []))[1].append(use)
        log(f"traced {recipe}: {len(found)} distinct launches so far")
    return list(found.values())


# ----------------------------------------------------------------------------------------------
# Compiling


_WORK: list = []  # the (launch, arch) jobs of the running compile_all, inherited by forked workers


def _compile_one(index: int) -> dict:
    from d2v2.kernels import compile_launch

    launch, arch = _WORK[index]
    return compile_launch(launch, arch)


def compile_all(variants, archs: Sequence[int], jobs: int = 1, log: Callable[[str], None] = print,
                kept_only: bool = False) -> list[dict]:
    """One row per (launch, arch): the launch's identity, where it is used, and what it compiled to.
    ``kept_only``: only on the architectures whose pruning keeps the launch (a quicker check that
    leaves out the pruned configs' compile errors and spills)."""
    from d2v2.kernels import ARCHS

    work = [(launch, arch) for launch, _ in variants for arch in archs
            if not kept_only or launch.kept_on is None or arch in launch.kept_on]  # fmt: skip
    _WORK[:] = work
    start = time.perf_counter()
    from tqdm import tqdm

    # The full matrix takes tens of minutes: a bar on a terminal, a line every half minute in a log.
    progress = dict(total=len(work), desc="compile", unit="launch", mininterval=1 if sys.stderr.isatty() else 30)
    if jobs > 1:
        import multiprocessing

        # fork: the workers inherit the traced launches (their JIT functions do not pickle).
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = list(tqdm(pool.imap(_compile_one, range(len(work)), chunksize=1), **progress))
    else:
        results = [_compile_one(i) for i in tqdm(range(len(work)), **progress)]
    log(f"compiled {len(work)} launches in {time.perf_counter() - start:.0f} s")
    uses = {launch: used for launch, used in variants}
    rows = []
    for (launch, arch), result in zip(work, results):
        dtypes = sorted({u["dtype"] for u in uses[launch]})
        row = {
            "arch": f"sm_{arch}",
            "kernel": launch.kernel,
            "ops": sorted({u["op"] for u in uses[launch]}),
            "dtypes": dtypes,
            "config": launch.config,
            "num_warps": launch.num_warps,
            "num_stages": launch.num_stages,
            "constexprs": dict(launch.constexprs),
            "used_by": [f"{u['recipe']} {u['dtype']}: {u['dims']}" for u in uses[launch]],
            # the device filter's bound there: the kernel's estimate and the architecture's compiler margin
            "smem_estimate": None if launch.smem_estimate is None else launch.smem_estimate + ARCHS[arch].compiler_smem_margin,
            "autotuner_keeps": launch.kept_on is None or arch in launch.kept_on,
            **result,
        }
        row["hot"] = any(d in HOT_DTYPES for d in dtypes)
        row["problems"] = problems(row)
        rows.append(row)
    return rows


def problems(row: dict) -> list[str]:
    """What fails the check in one row: compile error, shared memory over the limit, a hot-path spill.

    A config the kernel's own device filter drops on this architecture never launches there, so only
    its compile error would count (the filter must not hide a broken kernel)."""
    if row["status"] != "ok":
        return [f"compile error: {row['error']}"]
    if not row["autotuner_keeps"]:
        return []
    found = []
    if row.get("smem_estimate") is not None and row["shared"] > row["smem_estimate"]:
        found.append(f"shared memory {row['shared']} B above the device filter's bound {row['smem_estimate']} B")
    if not row["fits_smem"]:
        found.append(f"shared memory {row['shared']} B > {row['smem_limit']} B")
    if row["hot"] and (row["spill_stores"] or row["spill_loads"]):
        found.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads in {'/'.join(row['dtypes'])}")
    return found


# ----------------------------------------------------------------------------------------------
# The command


def available_archs() -> list[int]:
    """The architectures of ``ARCHS`` this Triton's NVIDIA backend can target (sm_100 needs its ptxas)."""
    from d2v2.kernels import ARCHS

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return [arch for arch in ARCHS if get_ptxas(arch).path]
    except Exception:  # noqa: BLE001 - no NVIDIA backend: nothing to target
        return []


def run(
    *,
    archs: Sequence[int] | None = None,
    dtypes: Sequence[str] = DTYPES,
    recipes: Sequence[str] = RECIPES,
    out_dir: Path | None = None,
    jobs: int | None = None,
    argv: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict[str, Path]]:
    """Trace, compile and write results.json / results.md; returns (rows, paths)."""
    from d2v2.kernels import ARCHS, ptxas_available, triton_interpret

    from . import report

    if not ptxas_available():
        raise ValueError("bench compile needs Triton's NVIDIA backend and its ptxas; this Triton has neither")
    archs = list(archs or available_archs())
    out_dir = Path(out_dir) if out_dir is not None else Path("bench-out") / f"compile-{time.strftime('%Y-%m-%d')}"
    if triton_interpret():
        return _run_in_child(archs, dtypes, recipes, out_dir, jobs, argv, log)
    jobs = jobs or min(8, os.cpu_count() or 1)
    # Triton 3.9 warns once per process that its FP-fusion default will change; the launches compile
    # with today's default, as they do on the GPU.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    variants = trace_variants(recipes, dtypes, log)
    rows = compile_all(variants, archs, jobs=jobs, log=log)
    meta = {
        **report.environment_stamp(torch.device("cpu")),
        "benchmark": "compile",
        "archs": [f"sm_{a}" for a in archs],
        "dtypes": list(dtypes),
        "recipes": list(recipes),
        "smem_limits": {f"sm_{a}": ARCHS[a].smem_per_block for a in archs},
        "command": " ".join(argv) if argv is not None else None,
    }
    return rows, write_report(out_dir, meta, rows)


def _run_in_child(archs, dtypes, recipes, out_dir, jobs, argv, log):
    """The same run in a child process without TRITON_INTERPRET (interpreted kernels do not compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "d2v2.bench.cli", "compile", "--arch", ",".join(f"sm_{a}" for a in archs),
           "--dtype", ",".join(dtypes), "--recipes", ",".join(recipes), "--out", str(out_dir)]  # fmt: skip
    if jobs:
        cmd += ["--jobs", str(jobs)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        log(line)
    json_path = Path(out_dir) / "results.json"
    if not json_path.exists():
        raise RuntimeError(f"bench compile in a child process failed: {done.stderr.strip()[-2000:]}")
    rows = json.loads(json_path.read_text())["rows"]
    return rows, {"json": json_path, "md": Path(out_dir) / "results.md"}


# ----------------------------------------------------------------------------------------------
# Report

_COLUMNS = (
    ("arch", "arch", ""), ("kernel", "kernel", ""), ("dtypes", "dtype_text", ""), ("config", "config_text", ""),
    ("status", "status", ""), ("regs", "registers", ""), ("spill st/ld B", "spill_text", ""),
    ("smem B", "shared", ""), ("smem %", "smem_pct", ".0f"), ("blocks/SM", "blocks_per_sm", ""),
    ("occupancy", "occupancy", ".2f"), ("kept", "kept_text", ""), ("problems", "problem_text", ""),
)  # fmt: skip


def _display(row: dict) -> dict:
    shown = dict(row)
    shown["dtype_text"] = "/".join(row["dtypes"])
    shown["config_text"] = row["config"] or f"w={row['num_warps']} (fixed)"
    if row["status"] == "ok":
        shown["spill_text"] = f"{row['spill_stores']}/{row['spill_loads']}"
        shown["smem_pct"] = 100 * row["shared"] / row["smem_limit"]
    else:
        shown["status"] = row["error"]
    shown["kept_text"] = "yes" if row["autotuner_keeps"] else "pruned"
    shown["problem_text"] = "; ".join(row["problems"]) or None
    return shown


def _spill(row: dict) -> int:
    return row["spill_stores"] + row["spill_loads"]


def summary(rows: Sequence[dict]) -> dict[str, dict]:
    """Per architecture: launches compiled / failed / kept there by the autotuners' pruning, the kept
    launches that spill (bf16 / fp16 ones fail the check) and the worst, the pruned configs that spill
    (most are pruned for it) and the worst, and the largest shared memory of a kept launch."""
    out = {}
    for arch in dict.fromkeys(r["arch"] for r in rows):
        here = [r for r in rows if r["arch"] == arch]
        ok = [r for r in here if r["status"] == "ok"]
        kept = [r for r in ok if r["autotuner_keeps"]]
        spilling = sorted((r for r in kept if _spill(r)), key=lambda r: -_spill(r))
        pruned = sorted((r for r in ok if not r["autotuner_keeps"] and _spill(r)), key=lambda r: -_spill(r))
        largest = max(kept, key=lambda r: r["shared"], default=None)
        out[arch] = {
            "launches": len(here),
            "compiled": len(ok),
            "errors": len(here) - len(ok),
            "kept": len(kept),
            "spilling": len(spilling),
            "hot_spilling": sum(1 for r in spilling if r["hot"]),
            "worst_spill": _where(spilling[0], f"{spilling[0]['spill_stores']}/{spilling[0]['spill_loads']} B") if spilling else None,
            "pruned_spilling": len(pruned),
            "worst_pruned_spill": _where(pruned[0], f"{pruned[0]['spill_stores']}/{pruned[0]['spill_loads']} B") if pruned else None,
            "largest_smem": _where(largest, f"{largest['shared']} B of {largest['smem_limit']}") if largest else None,
            "problems": sum(1 for r in here if r["problems"]),
        }
    return out


def _where(row: dict, what: str) -> str:
    return f"{what}: {row['kernel']} {'/'.join(row['dtypes'])} {row['config'] or ''}".strip()


def write_report(out_dir: Path, meta: dict, rows: Sequence[dict]) -> dict[str, Path]:
    from . import report

    heads = summary(rows)
    paths = {"json": report.write_json(Path(out_dir) / "results.json", {**meta, "summary": heads}, rows)}
    lines = ["## Summary", ""]
    for arch, s in heads.items():
        lines.append(
            f"- {arch}: {s['compiled']} of {s['launches']} launches compiled ({s['errors']} errors), {s['kept']} "
            f"kept there by the autotuners' pruning; of those {s['spilling']} spill ({s['hot_spilling']} in "
            f"bf16/fp16), worst {s['worst_spill'] or 'none'}; largest shared memory {s['largest_smem']}; "
            f"{s['problems']} failing the check. Configs pruned there that spill: {s['pruned_spilling']}, "
            f"worst {s['worst_pruned_spill'] or 'none'}"
        )
    limits = ", ".join(f"{a} {b} B" for a, b in meta["smem_limits"].items())
    lines += ["", f"Shared memory per block (opt-in): {limits} (CUDA C++ Programming Guide, compute capability "
              "tables). Occupancy: resident blocks x warps / 64 warp slots, from registers (256-register "
              "warp granules of 64K per SM), shared memory (+1 KiB reserved per block), warps and 32 blocks."]  # fmt: skip
    table = "## Launches\n\n" + report.markdown_table([_display(r) for r in rows], _COLUMNS)
    spills = [r for r in rows if r["status"] == "ok" and r["spill_stores"] + r["spill_loads"]]
    spill_lines = [f"- {r['arch']} {r['kernel']} {'/'.join(r['dtypes'])} {r['config'] or ''}: "
                   f"{r['spill_stores']}/{r['spill_loads']} B{'' if r['autotuner_keeps'] else ' (pruned)'}"
                   for r in spills]  # fmt: skip
    spill_section = "## Where it spills\n\n" + ("\n".join(spill_lines) or "Nowhere.")
    header = {k: meta[k] for k in ("device", "torch", "triton", "date", "command") if meta.get(k)}
    header.update(archs=", ".join(meta["archs"]), dtypes=", ".join(meta["dtypes"]), recipes=", ".join(meta["recipes"]))
    paths["md"] = report.write_markdown(
        Path(out_dir) / "results.md", "d2v2 kernels compiled ahead of time", header,
        ["\n".join(lines), spill_section, table],
    )  # fmt: skip
    return paths


# ----------------------------------------------------------------------------------------------
# The device check's comparison


def _row_key(arch: str, kernel: str, config: str | None, constexprs: dict) -> str:
    return json.dumps([arch, kernel, config, sorted((k, str(v)) for k, v in constexprs.items())])


def latest_report(root: Path | None = None) -> Path | None:
    """The newest committed ``bench/results/<date>-compile/results.json``."""
    root = root or Path(__file__).resolve().parent / "results"
    found = sorted(root.glob("*-compile/results.json"))
    return found[-1] if found else None


def device_check(report_path: Path, out_json: Path, *, dry_run: bool = False, recipe: str = "image-base") -> list[dict]:
    """Compile and load on this GPU the bf16 launches of ``recipe`` and compare registers and shared memory
    with the ahead-of-time report (``dry_run``: compiled for sm_90 ahead of time, the plumbing only).
    Rows are written to ``out_json`` after each launch, so a time limit loses nothing done."""
    from d2v2.kernels import compile_launch, load_launch

    aot = {_row_key(r["arch"], r["kernel"], r["config"], r["constexprs"]): r
           for r in json.loads(Path(report_path).read_text())["rows"]}  # fmt: skip
    rows = []
    for launch, _ in trace_variants([recipe], ["bf16"], log=lambda _: None, every_mix=False):
        if dry_run:
            got = compile_launch(launch, 90)
            got = {"arch": "sm_90", "registers": got.get("registers"), "shared": got.get("shared"),
                   "spills": got.get("spill_stores")}  # fmt: skip
        else:
            got = load_launch(launch)
        want = aot.get(_row_key(got["arch"], launch.kernel, launch.config, dict(launch.constexprs)))
        row = {"kernel": launch.kernel, "config": launch.config, "arch": got["arch"],
               "gpu_regs": got["registers"], "aot_regs": want and want.get("registers"),
               "gpu_smem": got["shared"], "aot_smem": want and want.get("shared")}  # fmt: skip
        row["same"] = None if want is None else (row["gpu_regs"], row["gpu_smem"]) == (row["aot_regs"], row["aot_smem"])
        rows.append(row)
        Path(out_json).write_text(json.dumps(rows, indent=1))
    return rows
