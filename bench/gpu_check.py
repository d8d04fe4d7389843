"""``d2v2 bench gpu-check --out DIR`` (``bench/gpu_check.sh DIR``): the prepared device check.

A GPU is lent only now and then, for minutes, bare and without network, so everything it should
validate and measure runs from this one command inside one call of at most 9 minutes. Each stage runs
in its own process group under its own time limit (a stage's unused seconds pass to the next ones;
the whole stays within ``budget_s``) and the report is rewritten after every stage, so a stage that
hangs or fails costs only itself:

0. compiled  the bf16 launches of image-base compiled and loaded on this GPU, their registers and
             shared memory compared with the committed ahead-of-time report (``d2v2 bench compile``,
             ``bench/results/<date>-compile``): any difference shows at once
1. machine   GPU, driver, torch/triton/CUDA versions; measured copy bandwidth and bf16/fp16/fp32
             matmul rates (the ceilings every other figure is divided by)
2. tests     the CUDA test mode (``D2V2_TEST_DEVICE=cuda``), ``-x`` off, junit saved
3. kernels   ``d2v2 bench kernels`` at the reference shapes, every provider, one process per op
4. train     ``d2v2 bench train --size base`` per modality: kernels vs the PyTorch path alternated,
             then ``torch.compile`` in a process of its own (compilation may eat its limit)
5. pretrain  30 bf16 steps of ``image-base`` on the embedded digits, with the metrics

Output (at most 8 files, what the device tool brings back): ``check.json`` (every stage's status,
time, limit, commands and log tail, plus the machine's figures and the test counts),
``summary.md`` (all of it readable, with the kernel and train tables), ``tests.xml`` (junit),
``kernels.json`` / ``kernels.png``, ``train.json`` / ``train.png``, ``pretrain.json``.

``--dry-run`` runs the same stages on the CPU with tiny shapes (the kernels interpreted, the CUDA
test mode collecting and skipping, the tiny recipes, fewer steps): the plumbing, the time limits and
the output files, proven without a GPU.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the repository (tests/ lives there)
OUTPUTS = ("check.json", "summary.md", "tests.xml", "kernels.json", "kernels.png", "train.json", "train.png", "pretrain.json")
BUDGET_S = 510.0  # inside a 9-minute call, with the install before it
DRY_BUDGET_S = 930.0
# (op, share of the stage's time): cheap first, the autotuned and compute-bound ones last and larger.
KERNEL_OPS = (("gather_tokens", 1), ("scatter_tokens", 1), ("masked_regression_loss", 1), ("layer_targets", 1),
              ("ema_", 1), ("conv_block1d", 1.5), ("conv_block2d", 1.5), ("attention", 2))  # fmt: skip
GRACE_S = 15.0  # after SIGINT (pytest still writes its junit), before SIGKILL


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: float  # on the GPU
    dry_limit_s: float  # on the CPU, --dry-run
    run: Callable[["Context", float], dict]


@dataclass
class Context:
    out: Path
    scratch: Path
    dry_run: bool
    python: str = sys.executable

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "D2V2_KERNELS")}
        env.update(PYTHONUNBUFFERED="1", **extra)
        if self.dry_run:
            env["TRITON_INTERPRET"] = "1"  # the kernels interpreted on the CPU
        return env


# ------------------------------------------------------------------------------------------ running


def _interruptible() -> None:
    """In the child before it starts: SIGINT back to its default, which a check started in the background
    of a shell (``&``: SIGINT ignored, and inherited) would otherwise pass on, and the interrupt that
    makes pytest write its junit would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_command(cmd: Sequence[str], limit_s: float, env: dict[str, str] | None = None, cwd: Path = ROOT) -> dict:
    """Run ``cmd`` in its own process group; past ``limit_s`` it gets SIGINT, then SIGKILL.

    Returns {cmd, status ("ok" | "failed" | "timeout"), returncode, seconds, log_tail}.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=_interruptible,
    )
    status = None
    try:
        output, _ = proc.communicate(timeout=max(limit_s, 0.1))
    except subprocess.TimeoutExpired:
        status = "timeout"
        os.killpg(proc.pid, signal.SIGINT)  # pytest writes its junit on an interrupt
        try:
            output, _ = proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
    status = status or ("ok" if proc.returncode == 0 else "failed")
    return {
        "cmd": " ".join(cmd), "status": status, "returncode": proc.returncode,
        "seconds": round(time.monotonic() - start, 1), "log_tail": (output or "")[-3000:],
    }  # fmt: skip


def _worst(records: Sequence[dict]) -> str:
    statuses = [r["status"] for r in records]
    return next((s for s in ("timeout", "failed") if s in statuses), "ok") if statuses else "skipped"


def _cli(ctx: Context, module: str, *args: str) -> list[str]:
    return [ctx.python, "-m", module, *args]


# ------------------------------------------------------------------------------------------- stages


MACHINE_SCRIPT = r"""
import json, subprocess, sys, torch
from d2v2.bench import harness, report
device = torch.device(sys.argv[2])
info = report.environment_stamp(device)
if device.type == "cuda":
    p = torch.cuda.get_device_properties(device)
    info.update(sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
size = None if device.type == "cuda" else 256
info["copy_gbps"] = harness.copy_bandwidth_gbps(device, None if device.type == "cuda" else 2**24)
for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
    info[f"matmul_{name}_tflops"] = harness.matmul_tflops(device, dtype, size)
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
"""


COMPILED_SCRIPT = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from d2v2.bench import compile as aot
report = aot.latest_report()
if report is None:
    sys.exit("no bench/results/*-compile/results.json to compare with")
rows = aot.device_check(report, Path(sys.argv[1]), dry_run=sys.argv[2] == "dry")
differ = [r for r in rows if r["same"] is False]
missing = [r for r in rows if r["same"] is None]
print(f"{len(rows)} launches against {report}: {len(rows) - len(differ) - len(missing)} same, "
      f"{len(differ)} different, {len(missing)} not in the report")
sys.exit(1 if differ or missing else 0)
"""


def stage_compiled(ctx: Context, limit_s: float) -> dict:
    target = ctx.scratch / "compiled.json"
    # The kernels compile: never interpreted here, even in the dry run (which compiles for sm_90 instead).
    env = {k: v for k, v in ctx.env().items() if k != "TRITON_INTERPRET"}
    cmd = [ctx.python, "-c", COMPILED_SCRIPT, str(target), "dry" if ctx.dry_run else "gpu"]
    record = run_command(cmd, limit_s, env)
    result = {"commands": [record]}
    if target.exists():
        result["metrics"] = [r for r in json.loads(target.read_text()) if r["same"] is not True] or [
            {"kernel": "every launch", "same": True}
        ]
    return result


def stage_machine(ctx: Context, limit_s: float) -> dict:
    target = ctx.scratch / "machine.json"
    device = "cpu" if ctx.dry_run else "cuda"
    record = run_command([ctx.python, "-c", MACHINE_SCRIPT, str(target), device], limit_s, ctx.env())
    result = {"commands": [record]}
    if target.exists():
        result["machine"] = json.loads(target.read_text())
    return result


def stage_tests(ctx: Context, limit_s: float) -> dict:
    junit = ctx.out / "tests.xml"
    cmd = _cli(ctx, "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit2")
    if importlib.util.find_spec("xdist") and not ctx.dry_run:
        cmd += ["-n", "6"]  # Triton compiles in parallel; one GPU holds six workers easily
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "120"]  # one hung kernel costs one test
    cmd += ["tests/kernels", "tests/models", "tests/engine"]
    env = ctx.env(D2V2_TEST_DEVICE="cuda")
    env.pop("TRITON_INTERPRET", None)  # the CUDA mode refuses the interpreter (on a CPU it skips all)
    record = run_command(cmd, limit_s, env)
    return {"commands": [record], "tests": junit_summary(junit)}


def junit_summary(path: Path) -> dict:
    """Counts and the failing test ids from a junit file (none if pytest never wrote it)."""
    if not path.exists():
        return {"written": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            message = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
            failing.append(f"{case.get('classname')}::{case.get('name')}: {message}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"written": True, **counts, "failing": failing}


def bench_processes(ctx: Context, jobs: Sequence[tuple[list[str], float]], limit_s: float) -> tuple[list, list, dict | None]:
    """Run ``d2v2 bench`` jobs (arguments, share) one after another within ``limit_s``; each gets its
    share of the time still left. Returns the command records, every job's result rows, the first meta."""
    deadline = time.monotonic() + limit_s
    records, rows, meta = [], [], None
    for i, (args, share) in enumerate(jobs):
        folder = ctx.scratch / f"job-{i}"
        cmd = _cli(ctx, "d2v2.bench.cli", *args, "--out", str(folder))
        left = deadline - time.monotonic()
        if left < 3:
            records.append({"cmd": " ".join(cmd), "status": "timeout", "returncode": None, "seconds": 0,
                            "log_tail": "not started: no time left in the stage"})  # fmt: skip
            continue
        # (less the grace an interrupted job gets, so that the stage ends within its limit)
        limit = max(1.0, left * share / sum(s for _, s in jobs[i:]) - GRACE_S)
        records.append(run_command(cmd, limit, ctx.env()))
        if (folder / "results.json").exists():
            report = json.loads((folder / "results.json").read_text())
            meta = meta or report["meta"]
            rows += report["rows"]
    return records, rows, meta


def publish(ctx: Context, name: str, write_report, meta: dict, rows: list) -> str:
    """A merged bench report: <name>.json and <name>.png into the output, its markdown returned."""
    paths = write_report(ctx.scratch / name, meta, rows)
    shutil.copy(paths["json"], ctx.out / f"{name}.json")
    shutil.copy(paths["png"], ctx.out / f"{name}.png")
    return _body(paths["md"])


def stage_kernels(ctx: Context, limit_s: float) -> dict:
    from . import kernels

    # (dry run: torch.compile on a CPU builds C++ for minutes; the other providers show the plumbing)
    extra = ["--quick", "--device", "cpu", "--providers", "triton,torch"] if ctx.dry_run else []
    jobs = [(["kernels", "--ops", op, "--warmup-ms", "10", "--rep-ms", "40", *extra], share) for op, share in KERNEL_OPS]
    records, rows, meta = bench_processes(ctx, jobs, limit_s)
    result = {"commands": records}
    if meta is not None:  # each op's rows carry their own speedups and targets; meta is the first process's
        meta["command"] = "d2v2 bench kernels, one process per op (bench/gpu_check.py)"
        result["markdown"] = publish(ctx, "kernels", kernels.write_report, meta, rows)
    return result


def stage_train(ctx: Context, limit_s: float) -> dict:
    from . import harness, train

    size = ["--size", "tiny", "--quick", "--device", "cpu"] if ctx.dry_run else ["--size", "base", "--warmup", "2", "--steps", "6"]
    modalities = ("image", "text") if ctx.dry_run else train.MODALITIES
    # kernels vs torch alternated (the comparison that matters), then compile alone: its first step
    # compiles the whole step and may run past its share without costing the other two. (Dry run:
    # torch.compile on a CPU builds C++ for minutes; the flag's plumbing is the same.)
    jobs = [(["train", "--modalities", m, "--variants", "kernels,torch", *size], 0.45) for m in modalities]
    jobs += [] if ctx.dry_run else [(["train", "--modalities", m, "--variants", "compile", *size], 0.55) for m in modalities]
    records, rows, meta = bench_processes(ctx, jobs, limit_s)
    result = {"commands": records}
    if meta is not None:
        for row in rows:  # compile ran in processes of its own: its speedups over the merged rows
            for key in [k for k in row if k.startswith("speedup_vs_")]:
                del row[key]
        for baseline in ("torch", "compile"):
            harness.speedups(rows, group_keys=("method", "modality"), label_key="variant", baseline=baseline)
        meta["command"] = "d2v2 bench train per modality: kernels,torch alternated, then compile alone (bench/gpu_check.py)"
        result["markdown"] = publish(ctx, "train", train.write_report, meta, rows)
    return result


def stage_pretrain(ctx: Context, limit_s: float) -> dict:
    run_dir = ctx.scratch / "pretrain"
    recipe, steps, every = ("image-tiny", 3, 1) if ctx.dry_run else ("image-base", 30, 5)
    args = ["pretrain", "--recipe", recipe, "--max-steps", str(steps), "--out", str(run_dir), "--resume", "none",
            "--set", f"train.log_every={every}", "--set", "train.checkpoint_every=100000",
            "--set", f"data.num_workers={1 if ctx.dry_run else 8}"]  # fmt: skip
    args += ["--device", "cpu"] if ctx.dry_run else ["--device", "cuda", "--set", "train.precision=bf16"]
    record = run_command(_cli(ctx, "d2v2.engine.cli", *args), limit_s, ctx.env())
    metrics_file = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    report = {"command": "d2v2 " + " ".join(args), "status": record["status"], "metrics": metrics, "log_tail": record["log_tail"]}
    (ctx.out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return {"commands": [record], "metrics": metrics}


# GPU limits sum to 490 s of the 510 s budget: compilation (torch.compile providers, Triton autotuning
# at new shapes) is most of the kernels' and train stages' time.
STAGES = (
    Stage("compiled", 60, 90, stage_compiled),
    Stage("machine", 20, 60, stage_machine),
    Stage("tests", 100, 120, stage_tests),
    Stage("kernels", 120, 300, stage_kernels),
    Stage("train", 140, 240, stage_train),
    Stage("pretrain", 50, 120, stage_pretrain),
)


# ------------------------------------------------------------------------------------------- report


def _body(md_path: Path) -> str:
    """A bench report's markdown without its title, headings one level down."""
    lines = md_path.read_text().splitlines()[1:]
    return "\n".join("#" + line if line.startswith("## ") else line for line in lines).strip()


def write_summary(out: Path, check: dict) -> None:
    """check.json, and summary.md from it: stage table, figures, failures, tables, log tails."""
    (out / "check.json").write_text(json.dumps(check, indent=2, default=str) + "\n")
    lines = [f"# d2v2 device check{' (dry run on CPU)' if check['dry_run'] else ''}", ""]
    lines += [f"- {k}: {check[k]}" for k in ("started", "command", "budget_s") if check.get(k) is not None]
    lines += ["", "| stage | status | seconds | limit s |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit_s']} |" for s in check["stages"]]
    for stage in check["stages"]:
        lines += ["", f"## {stage['name']}", ""]
        if "machine" in stage:
            lines += [f"- {k}: {v}" for k, v in stage["machine"].items()]
        if "tests" in stage:
            t = stage["tests"]
            if t.get("written"):
                lines.append(f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
                lines += [f"- {f}" for f in t["failing"][:40]]
            else:
                lines.append("pytest wrote no junit file")
        if stage.get("metrics"):
            keys = ("step", "loss", "lr", "target_var", "pred_var", "grad_norm", "samples_per_s", "peak_memory_mb")
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(m.get(k)) for k in keys) + " |" for m in stage["metrics"]]
        if stage.get("markdown"):
            lines += [stage["markdown"]]
        for record in stage.get("commands", []):
            if record["status"] != "ok":
                lines += ["", f"`{record['cmd']}`: {record['status']} (exit {record['returncode']}, {record['seconds']} s)",
                          "", "```", record["log_tail"][-1500:].strip(), "```"]  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(out: Path, *, dry_run: bool = False, budget_s: float | None = None, stages: Sequence[Stage] = STAGES) -> int:
    """Run ``stages`` into ``out``; 0 when every stage succeeded, 1 otherwise (the report says which)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; give a new folder (a device check never overwrites one)")
    out.mkdir(parents=True, exist_ok=True)
    budget = budget_s if budget_s is not None else (DRY_BUDGET_S if dry_run else BUDGET_S)
    deadline = time.monotonic() + budget
    check = {
        "dry_run": dry_run, "budget_s": budget, "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["d2v2 bench gpu-check", "--out", str(out)] + (["--dry-run"] if dry_run else [])),
        "stages": [],
    }  # fmt: skip
    carry = 0.0
    with tempfile.TemporaryDirectory(prefix="d2v2-gpu-check-") as scratch:
        ctx = Context(out=out, scratch=Path(scratch), dry_run=dry_run)
        for stage in stages:
            planned = (stage.dry_limit_s if dry_run else stage.limit_s) + carry
            limit = round(min(planned, deadline - time.monotonic()), 1)
            entry = {"name": stage.name, "limit_s": limit, "status": "skipped", "seconds": 0.0}
            if limit >= 3:
                start = time.monotonic()
                try:
                    entry.update(stage.run(ctx, limit))
                    entry["status"] = _worst(entry.get("commands", []))
                except Exception as e:  # noqa: BLE001 - a broken stage must not lose the others
                    entry.update(status="failed", error=f"{type(e).__name__}: {e}")
                entry["seconds"] = round(time.monotonic() - start, 1)
                carry = max(0.0, planned - entry["seconds"])
            check["stages"].append(entry)
            write_summary(out, check)
            print(f"gpu-check: {stage.name} {entry['status']} in {entry['seconds']} s (limit {limit} s)", flush=True)
    extra = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
    if extra:  # the device tool brings back 8 files at most
        raise AssertionError(f"gpu-check wrote files outside its list: {extra}")
    return 0 if all(s["status"] == "ok" for s in check["stages"]) else 1
