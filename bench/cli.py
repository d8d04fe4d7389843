"""``d2v2 bench ...``: the benchmark subcommands (``d2v2.engine.cli`` forwards ``d2v2 bench`` here).

This module imports only argparse at load time; torch, Triton and matplotlib are imported when a
subcommand runs, so ``d2v2 --help`` stays fast. Bad names (an unknown op, provider, mode, shape or
dtype) raise ValueError naming the option; the engine's command line prints it as a one-line error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _names(text: str) -> list[str]:
    """Comma-separated names: ``--ops gather_tokens,ema_`` (repeating the option or spaces also work)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _flatten(groups: list[list[str]] | None) -> list[str] | None:
    return None if groups is None else [name for group in groups for name in group]


def _finish(paths: dict[str, Path], failed: list, what: str) -> int:
    """Name the files written and the failures ("N <what>"); 1 when anything failed, else 0."""
    for path in paths.values():
        print(f"wrote {path}")
    if failed:
        print(f"{len(failed)} {what}", file=sys.stderr)
    return 1 if failed else 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from . import harness, kernels

    device = _device(args.device)
    dtype = harness.dtype_from_name(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    providers = _flatten(args.providers)
    if providers is None and args.quick and device.type == "cpu":
        quick_cases = kernels.collect_cases(kernels.QUICK_SHAPES, dtype)
        providers = [p for p in dict.fromkeys(p for case in quick_cases for p in case.providers) if p != "compile"]
        print("providers: all but compile, which spends minutes compiling on a CPU (--providers compile adds it)")
    rows, paths = kernels.run(
        device=device,
        dtype=dtype,
        quick=args.quick,
        ops=_flatten(args.ops),
        shapes=_flatten(args.shapes),
        providers=providers,
        modes=_flatten(args.modes),
        out_dir=args.out,
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else (5.0 if args.quick else 25.0),
        rep_ms=args.rep_ms if args.rep_ms is not None else (20.0 if args.quick else 100.0),
        argv=["d2v2", "bench", *args.argv],
    )
    return _finish(paths, [r for r in rows if r["status"] == "error"], f"result rows failed; see the notes in {paths['md']}")


def _device(name: str | None):
    """--device as a torch.device (default: cuda when visible); a bad or absent device is a ValueError."""
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible")
    return device


def cmd_train(args: argparse.Namespace) -> int:
    from . import train

    rows, paths = train.run(
        device=_device(args.device),
        size=args.size,
        modalities=_flatten(args.modalities) or train.MODALITIES,
        methods=_flatten(args.methods),
        variants=_flatten(args.variants),
        baseline_variants=_flatten(args.baseline_variants) or ("kernels",),
        batch=args.batch,
        warmup=1 if args.quick else args.warmup,
        steps=2 if args.quick else args.steps,
        out_dir=args.out,
        argv=["d2v2", "bench", *args.argv],
    )
    return _finish(paths, [r for r in rows if r["status"] != "ok"], f"contestants failed; see {paths['md']}")


# `bench converge` settings: (full run, --quick). --quick changes only what was not given.
CONVERGE_DEFAULTS = {"budget_s": (180.0, 2.0), "probes": (6, 1), "slice_s": (5.0, 1.0), "probe_samples": (None, 400)}


def _seeds(groups: list[list[str]] | None, quick: bool) -> list[int]:
    if groups is None:
        return [1] if quick else [1, 2]
    names = _flatten(groups)
    try:
        return [int(name) for name in names]
    except ValueError:
        raise ValueError(f"--seeds takes integers such as 1,2; got {','.join(names)!r}") from None


def cmd_converge(args: argparse.Namespace) -> int:
    from . import converge

    settings = {name: getattr(args, name) for name in CONVERGE_DEFAULTS}
    settings = {name: CONVERGE_DEFAULTS[name][args.quick] if value is None else value for name, value in settings.items()}
    settings["seeds"] = _seeds(args.seeds, args.quick)
    if args.quick:
        settings["calibration"] = (1, 2)
    if args.eval == "finetune":
        settings["finetune_steps"] = args.finetune_steps if args.finetune_steps is not None else (20 if args.quick else 200)
        settings["speech_steps"] = args.speech_steps if args.speech_steps is not None else (20 if args.quick else None)
    elif args.finetune_steps is not None or args.speech_steps is not None:
        raise ValueError(f"{'--finetune-steps' if args.finetune_steps is not None else '--speech-steps'} applies to --eval finetune")
    results, paths = converge.run(
        device=_device(args.device),
        size=args.size,
        modalities=_flatten(args.modalities) or converge.MODALITIES,
        methods=_flatten(args.methods),
        out_dir=args.out,
        argv=["d2v2", "bench", *args.argv],
        **settings,
    )
    stopped = [m for m in results["methods"] if m["status"] != "ok"]
    return _finish(paths, stopped, f"runs stopped early; see {paths['md']}")


def _step_ms(text: str) -> dict[str, float]:
    """--step-ms: one time for every modality ("180") or per modality ("image=180,audio=320")."""
    from .data import MODALITIES

    try:
        if "=" not in text:
            return dict.fromkeys(MODALITIES, float(text))
        return {name.strip(): float(ms) for name, ms in (part.split("=", 1) for part in _names(text))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, e.g. 180 or image=180,audio=320; got {text!r}") from None


def cmd_data(args: argparse.Namespace) -> int:
    from . import data

    workers = data.QUICK_WORKERS if args.quick else data.WORKERS
    if args.workers:
        try:
            workers = [int(w) for w in _flatten(args.workers)]
        except ValueError:
            raise ValueError(f"--workers takes worker counts such as 0,1,2; got {','.join(_flatten(args.workers))!r}") from None
    rows, paths = data.run(
        modalities=_flatten(args.modalities) or data.MODALITIES,
        workers=workers,
        batches=args.batches if args.batches is not None else (data.QUICK_BATCHES if args.quick else data.BATCHES),
        step_ms=args.step_ms,
        overrides=args.set,
        out_dir=args.out,
        argv=["d2v2", "bench", *args.argv],
    )
    return _finish(paths, [r for r in rows if r["status"] != "ok"], f"loaders failed; see {paths['md']}")


def cmd_compile(args: argparse.Namespace) -> int:
    from . import compile as aot

    archs = aot.parse_archs(_flatten(args.arch)) if args.arch else None
    dtypes = _flatten(args.dtype) or list(aot.DTYPES)
    for name in dtypes:
        if name not in aot.DTYPES:
            raise ValueError(f"--dtype must be among {', '.join(aot.DTYPES)}, got {name!r}")
    recipes = _flatten(args.recipes) or list(aot.RECIPES)
    for name in recipes:
        if name not in aot.RECIPES:
            raise ValueError(f"--recipes must be among {', '.join(aot.RECIPES)}, got {name!r}")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    rows, paths = aot.run(archs=archs, dtypes=dtypes, recipes=recipes, out_dir=args.out, jobs=args.jobs,
                          argv=["d2v2", "bench", *args.argv])  # fmt: skip
    return _finish(paths, [r for r in rows if r["problems"]], f"launches failed the check; see {paths['md']}")


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from . import gpu_check

    return gpu_check.main(args.out, dry_run=args.dry_run, budget_s=args.budget_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2v2 bench", description="d2v2 benchmarks")
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    p = sub.add_parser(
        "kernels",
        help="each kernel against PyTorch eager, torch.compile and apex at the reference shapes",
        description="Time every op of d2v2.kernels against its providers (see d2v2.bench.kernels). "
        "List options take comma-separated names.",
    )
    p.add_argument("--ops", type=_names, action="append", help="ops to run (default: all)")
    p.add_argument("--shapes", type=_names, action="append", help="shape specs: vit-b, audio-base, text-base")
    p.add_argument("--providers", type=_names, action="append", help="triton, torch, compile, apex (default: all)")
    p.add_argument("--modes", type=_names, action="append", help="fwd, bwd, full (default: all)")
    p.add_argument("--dtype", help="activation dtype: fp32, bf16, fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when visible)")
    p.add_argument("--quick", action="store_true", help="toy shapes of the same structure, shorter timing budgets "
                   "(5 + 20 ms) and, on a CPU, no compile provider: seconds on a CPU")
    p.add_argument("--out", type=Path, help="output folder (default: bench-out/kernels-<device>-<date>)")
    p.add_argument("--warmup-ms", type=float, help="warm-up budget per measurement (do_bench's; default 25, --quick 5)")
    p.add_argument("--rep-ms", type=float, help="timing budget per measurement (do_bench's; default 100, --quick 20)")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser(
        "train",
        help="the training step of every method per modality, and our kernels vs the PyTorch path vs torch.compile",
        description="Time Trainer.train_step of each method, modality and variant, alternated (see d2v2.bench.train).",
    )
    p.add_argument("--size", help="model and batch size of the recipes: tiny or base (default: base on a GPU, tiny on "
                   "a CPU; base on a CPU is refused when its memory estimate exceeds the free memory)")
    p.add_argument("--modalities", type=_names, action="append", help="image, audio, text (default: all)")
    p.add_argument("--methods", type=_names, action="append",
                   help="methods to compare (default: every method with a preset for the modality)")
    p.add_argument("--variants", type=_names, action="append", help="data2vec2's: kernels, torch, compile (default: all on a GPU, kernels and torch on a CPU)")
    p.add_argument("--baseline-variants", type=_names, action="append",
                   help="the other methods' variants (default: kernels)")
    p.add_argument("--warmup", type=int, default=3, help="steps per variant discarded before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--batch", type=int, help="samples (audio: clips) per step (default: the recipe's per-GPU batch)")
    p.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps (on a CPU: seconds, at the tiny size)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when visible)")
    p.add_argument("--out", type=Path, help="output folder (default: bench-out/train-<device>-<date>)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "converge",
        help="time to accuracy: every method of a modality for the same wall-clock budget, probed as it trains",
        description="Pretrain each method of a modality for the same budget on the embedded data, probing the "
        "frozen encoder at fixed points of its clock; report the time data2vec 2.0 needs to reach the other "
        "methods' best accuracy (see d2v2.bench.converge).",
    )
    p.add_argument("--size", default="tiny", help="recipe size: tiny (default, CPU) or base (GPU)")
    p.add_argument("--modalities", type=_names, action="append", help="image, audio, text (default: all)")
    p.add_argument("--methods", type=_names, action="append",
                   help="methods to race, data2vec2 among them (default: data2vec2, data2vec and the modality's baseline)")
    p.add_argument("--seeds", type=_names, action="append", help="seeds, each a whole race (default: 1,2)")
    p.add_argument("--budget-s", type=float, help="training seconds per method and seed (default: 180)")
    p.add_argument("--probes", type=int, help="probe points after t = 0, evenly over the budget (default: 6)")
    p.add_argument("--slice-s", type=float, help="seconds a method trains before the next takes its turn (default: 5)")
    p.add_argument("--probe-samples", type=int, help="probe on this many samples of the labelled set (default: all)")
    p.add_argument("--eval", choices=("probe", "finetune"), default="probe",
                   help="probe: linear probe and kNN (default); finetune: also fine-tune every probe point's encoder "
                   "with finetune-<modality>-tiny (untimed), the paper's protocol")  # fmt: skip
    p.add_argument("--finetune-steps", type=int, help="updates of each fine-tuning with --eval finetune (default: 200; "
                   "--quick: 20)")  # fmt: skip
    p.add_argument("--speech-steps", type=int, help="updates of each speech-recognition fine-tuning of the audio encoders "
                   "with --eval finetune (default: finetune-speech-tiny's 2000; --quick: 20)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="defaults of 2 s per method, probed at the start and the end on 400 samples, one seed: the "
                   "plumbing, not a result (options given explicitly still count)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when visible)")
    p.add_argument("--out", type=Path, help="output folder (default: bench-out/converge-<device>-<date>)")
    p.set_defaults(func=cmd_converge)

    p = sub.add_parser(
        "data",
        help="the training loader's throughput per worker per modality, and the workers one GPU needs",
        description="Time the base recipes' loaders (decode, augment, masks) with 0, 1, 2... workers "
        "(see d2v2.bench.data).",
    )
    p.add_argument("--modalities", type=_names, action="append", help="image, audio, text (default: all)")
    p.add_argument("--workers", type=_names, action="append", help="loader worker counts (default: 0,1,2; 0 = main process)")
    p.add_argument("--batches", type=int, help="timed batches per loader (default: 20; --quick 3)")
    p.add_argument("--step-ms", type=_step_ms, help="the GPU's base-recipe step time: 180 or image=180,audio=320 "
                   "(default: an assumed 250 ms; see d2v2.bench.data)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, as d2v2 pretrain's")
    p.add_argument("--quick", action="store_true", help="workers 0,1 and 3 timed batches each (under a minute)")
    p.add_argument("--out", type=Path, help="output folder (default: bench-out/data-cpu-<date>)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "compile",
        help="every Triton kernel variant compiled ahead of time for sm_80 / sm_90 / sm_100, without a GPU",
        description="Compile every launch of d2v2.kernels at the recipes' shapes for each architecture and "
        "report registers, spills, shared memory and occupancy (see d2v2.bench.compile).",
    )
    p.add_argument("--arch", type=_names, action="append", help="sm_80, sm_90, sm_100 (default: all Triton targets)")
    p.add_argument("--dtype", type=_names, action="append", help="fp32, bf16, fp16 (default: all)")
    p.add_argument("--recipes", type=_names, action="append", help="data2vec 2.0 recipes (default: all)")
    p.add_argument("--jobs", type=int, help="compiler processes (default: CPU count, at most 8)")
    p.add_argument("--out", type=Path, help="output folder (default: bench-out/compile-<date>)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "gpu-check",
        help="the prepared device check: ceilings, CUDA tests, kernel and train benches, a bf16 run",
        description="Run every stage of the device check under its own time limit (see d2v2.bench.gpu_check).",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (at most 8 files are written)")
    p.add_argument("--dry-run", action="store_true", help="every stage's plumbing on CPU with tiny shapes")
    p.add_argument("--budget-s", type=float, default=None, help="total seconds for all stages (default: 510, dry run 600)")
    p.set_defaults(func=cmd_gpu_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"d2v2 bench: error: {e}", file=sys.stderr)
        sys.exit(2)
