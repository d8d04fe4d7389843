"""What every d2v2 benchmark shares: timing, ceilings, the case and workload types, and the runner.

Timing
    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every repetition, gradients of
    ``grad_to_none`` reset outside the timed region), reporting the 50/20/80 percentiles.
    CPU (or CUDA without Triton): a plain ``time.perf_counter`` loop with the same warm-up / repetition
    budget semantics and the same percentiles; CPU ops are synchronous, so no sync is needed there.

Ceilings
    ``copy_bandwidth_gbps`` times a device-to-device copy of a tensor far larger than any cache: bytes
    read plus bytes written over the time. Memory-bound ops are judged as a fraction of it (an
    achievable ceiling, not the datasheet figure). ``matmul_tflops`` does the same for compute with one
    large square matmul.

Cases (the contract of every ``bench/<op>.py``)
    A case module defines ``bench_cases(shapes: Mapping[str, ShapeSpec], dtype) -> list[Case]``: for
    the run's shape specs (``bench/shapes.py``, reference or quick) and activation dtype, ``Case``
    objects with ``op``, ``shape`` (a spec name), ``dims`` (a readable size string), ``dtype``,
    ``modes``, ``providers`` (its own names are fine, e.g. "sdpa", "xformers"), ``bound`` ("memory"
    or "compute": which ceiling the report compares against), ``targets`` (tuples of (mode or None
    for all, metric, minimum), e.g. ("full", "speedup_vs_sdpa", 0.9): a speedup over any named
    provider is computed for the report) and ``setup(provider, device) -> Workload``. ``setup`` raises
    ValueError for a provider the case does not know and ``Unavailable(reason)`` for one that cannot
    run here (the report records the reason). ``Workload.fn`` runs one forward on prebuilt inputs and
    returns the output tensor; ``Workload.grad_inputs`` are the leaves whose .grad is reset between
    repetitions; ``Workload.bytes`` / ``Workload.flops`` map each mode to its formula's count (leave a
    mode out where the formula does not apply).

Providers every op has (``op_provider``)
    triton   the public op with impl="triton" (on CPU only under TRITON_INTERPRET=1, else Unavailable)
    torch    the op's own ``<op>_ref`` in eager PyTorch: the test oracle is the baseline, never a copy
    compile  ``torch.compile(<op>_ref)``

Modes
    fwd   one forward call (inputs that get gradients in training require grad, so the forward
          saves what its backward needs, as in a training step)
    bwd   ``out.backward(grad, retain_graph=True)`` on one prebuilt forward graph
    full  forward then backward

The runner (``run_case``) measures one (case, provider) in each mode: median and 20/80 percentiles,
peak memory (CUDA), GB/s and TFLOP/s from the workload's formulas and their fractions of the ceilings;
a provider that is unavailable or fails becomes a "skipped" / "error" row with the reason, never a
lost run. ``select_cases`` filters by name, ``apply_targets`` judges the triton rows on CUDA.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median first, then the 20th and 80th percentiles


@dataclass(frozen=True)
class Timing:
    """One measurement, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def error_line(e: BaseException) -> str:
    """An error as one report cell: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _plain_timer(
    fn: Callable[[], Any], device: torch.device, warmup_ms: float, rep_ms: float, grad_to_none: Sequence[torch.Tensor]
) -> Timing:
    """do_bench's budget rule with a host clock: estimate one call, then warm up and repeat to fill the budget."""
    _reset_grads(grad_to_none)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    # At least 3 timed calls, so that the percentiles mean something even for calls of seconds.
    n_warmup = max(1, min(1000, int(warmup_ms / estimate_ms)))
    n_repeat = max(3, min(1000, int(rep_ms / estimate_ms)))
    for _ in range(n_warmup):
        _reset_grads(grad_to_none)
        fn()
    samples = []
    for _ in range(n_repeat):
        _reset_grads(grad_to_none)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(*percentiles(samples, QUANTILES))


def percentiles(samples: Sequence[float], quantiles: Sequence[float]) -> list[float]:
    """Linearly interpolated quantiles of ``samples`` (the rule torch.quantile and do_bench use)."""
    if not samples:
        raise ValueError("samples must not be empty")
    ordered = sorted(samples)
    out = []
    for q in quantiles:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantiles must lie in [0, 1], got {q}")
        pos = q * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> Timing:
    """Median and 20/80 percentiles of ``fn()`` on ``device``.

    ``fn`` is called twice before timing starts, so that one-off work (torch.compile, Triton JIT,
    autotuning, the first backward of a compiled graph) never lands in do_bench's run-time estimate.
    """
    for _ in range(2):
        _reset_grads(grad_to_none)
        fn()
    _sync(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            median, p20, p80 = do_bench(
                fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None, quantiles=list(QUANTILES)
            )
            return Timing(median, p20, p80)
    return _plain_timer(fn, device, warmup_ms, rep_ms, grad_to_none)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated device memory (MiB) over one call of ``fn``, counting everything live at the time
    (inputs, saved activations); None off CUDA, where PyTorch keeps no allocator statistics."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None, *, rep_ms: float = 200.0) -> float:
    """Measured copy ceiling: (bytes read + bytes written) / time of ``dst.copy_(src)``, in GB/s (1e9).

    The default size (1 GiB on CUDA, 64 MiB on CPU) is far past every cache level, so the copy streams
    from and to main memory.
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, rep_ms=rep_ms)
    return 2 * src.numel() * src.element_size() / (timing.median_ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """Measured compute ceiling: 2 n^3 / time of one n x n matmul in ``dtype``, in TFLOP/s."""
    if size is None:
        size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    timing = measure(lambda: a @ b, device)
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e12


def speedups(
    rows: list[dict[str, Any]],
    *,
    group_keys: Sequence[str],
    label_key: str,
    baseline: str,
    value_key: str = "median_ms",
    out_key: str | None = None,
) -> None:
    """Add ``out_key`` = baseline's value / this row's value to each row, within groups sharing ``group_keys``.

    Rows without a baseline in their group, or without a value, get None.
    """
    out_key = out_key or f"speedup_vs_{baseline}"
    base = {
        tuple(r[k] for k in group_keys): r[value_key]
        for r in rows
        if r[label_key] == baseline and r.get(value_key) is not None
    }
    for r in rows:
        ref = base.get(tuple(r[k] for k in group_keys))
        r[out_key] = ref / r[value_key] if ref is not None and r.get(value_key) else None




# ----------------------------------------------------------------------------------------------
# Cases and workloads

MODES = ("fwd", "bwd", "full")
TRAIN_MODES = MODES
NO_GRAD_MODES = ("fwd",)  # teacher-side ops (targets, EMA) run without autograd in training
BASE_PROVIDERS = ("triton", "torch", "compile")
PROVIDERS = BASE_PROVIDERS + ("apex",)  # every op's providers, plus apex where it has an equivalent

# (mode or None for every mode, metric, minimum): the targets for our Triton kernels on H100.
MEMORY_TARGETS = ((None, "frac_copy_bw", 0.85), (None, "speedup_vs_torch", 1.5), (None, "speedup_vs_compile", 1.2))
CONV_TARGETS = (("full", "speedup_vs_torch", 1.3),)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class Unavailable(RuntimeError):
    """A provider that applies to a case but cannot run here (not installed, no GPU...)."""


@dataclass
class Workload:
    """Prebuilt inputs behind one callable: what the harness times for one (case, provider)."""

    fn: Callable[[], torch.Tensor | None]  # one forward call; returns the output for bwd/full
    grad_inputs: tuple[torch.Tensor, ...] = ()  # leaves whose .grad is reset between repetitions
    bytes: Mapping[str, int] = field(default_factory=dict)  # mode -> bytes moved (formula)
    flops: Mapping[str, float] = field(default_factory=dict)  # mode -> floating-point operations


@dataclass(frozen=True)
class Case:
    """One op at one shape spec and dtype; see the module docstring for the contract."""

    op: str
    shape: str
    dims: str
    dtype: torch.dtype
    modes: tuple[str, ...]
    providers: tuple[str, ...]
    bound: str  # "memory" | "compute"
    setup: Callable[[str, torch.device], Workload]
    targets: tuple[tuple[str | None, str, float], ...] = ()


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32" / "bf16" / "fp16" (else torch's own name without the prefix)."""
    return _DTYPE_NAMES.get(dtype) or str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------
# Providers


def require_triton(device: torch.device) -> None:
    """Unavailable unless Triton kernels can run on ``device`` (CUDA, or the CPU interpreter), or are
    only traced (``d2v2.kernels.trace_launches``: the compile bench)."""
    from d2v2.kernels import HAS_TRITON, tracing_launches, triton_interpret

    if not HAS_TRITON:
        raise Unavailable("triton is not installed")
    if device.type != "cuda" and not triton_interpret() and not tracing_launches():
        raise Unavailable("Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to interpret them on CPU")


def op_provider(op: Callable[..., Any], reference: Callable[..., Any], provider: str, device: torch.device) -> Callable[..., Any]:
    """The callable behind a generic provider: the op (triton), its reference ``<op>_ref`` (torch) or the
    compiled reference."""
    name = op.__name__
    check_provider(name, provider, BASE_PROVIDERS)
    if provider == "triton":
        require_triton(device)
        # The bench's ids are valid by construction: no per-call range check (a host sync) in the timing.
        unchecked = {"check_ids": False} if name in ("gather_tokens", "scatter_tokens") else {}
        return functools.partial(op, impl="triton", **unchecked)
    if provider == "torch":
        return reference
    torch._dynamo.reset()  # a fresh cache per case: recompiles never hit the cache-size limit
    return compiled(reference)


def compiled(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile(fn)`` whose graphs can be backpropagated more than once, as "bwd" times them.

    AOTAutograd donates the saved activations to the compiled backward, which frees them and then
    refuses ``retain_graph=True`` ("compiled with non-empty donated buffers"); "bwd" repeats the
    backward of one forward graph, so the compile providers build theirs without donation (a memory
    saving only: the backward's kernels are the same).
    """
    compiled_fn = torch.compile(fn, **options)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with torch._functorch.config.patch(donated_buffer=False):
            return compiled_fn(*args, **kwargs)

    return call


def check_provider(op: str, provider: str, allowed: Sequence[str]) -> None:
    if provider not in allowed:
        raise ValueError(f"provider must be one of {tuple(allowed)} for {op}, got {provider!r}")


def require_cuda_for_apex(device: torch.device) -> None:
    # apex's fused modules quietly fall back to PyTorch on CPU tensors: that would not be apex's number.
    if device.type != "cuda":
        raise Unavailable("apex runs on CUDA only")


# ----------------------------------------------------------------------------------------------
# Inputs


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, device, dtype, gen, requires_grad=False, std=1.0) -> torch.Tensor:
    t = (torch.randn(shape, device=device, generator=gen) * std).to(dtype)
    return t.requires_grad_(requires_grad)


def ids_keep(rows: int, length: int, kept: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """[rows, kept] int64: ``kept`` distinct positions of ``length`` per row, sorted, as the masking code makes them."""
    noise = torch.rand(rows, length, device=device, generator=gen)
    return noise.argsort(dim=1)[:, :kept].sort(dim=1).values


# ----------------------------------------------------------------------------------------------
# The runner


def select_cases(
    cases: Sequence[Case],
    *,
    ops: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
) -> tuple[list[Case], tuple[str, ...], tuple[str, ...]]:
    """Filter ``cases``; raise ValueError for a name that no case knows. Returns (cases, providers, modes)."""

    def check(arg: str, wanted: Sequence[str] | None, known: Sequence[str]) -> None:
        unknown = [w for w in wanted or () if w not in known]
        if unknown:
            raise ValueError(f"{arg}: unknown {', '.join(map(repr, unknown))}; expected some of {', '.join(known)}")

    known_ops = list(dict.fromkeys(c.op for c in cases))
    known_shapes = list(dict.fromkeys(c.shape for c in cases))
    known_providers = list(dict.fromkeys(PROVIDERS + tuple(p for c in cases for p in c.providers)))
    check("ops", ops, known_ops)
    check("shapes", shapes, known_shapes)
    check("providers", providers, known_providers)
    check("modes", modes, MODES)
    chosen = [c for c in cases if (not ops or c.op in ops) and (not shapes or c.shape in shapes)]
    return chosen, tuple(providers or known_providers), tuple(modes or MODES)


def mode_fn(work: Workload, mode: str) -> Callable[[], Any]:
    """The function to time for ``mode`` (see the module docstring)."""
    if mode == "fwd":
        return work.fn
    out = work.fn()
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise ValueError(f"mode {mode!r} needs a forward that returns a tensor requiring grad")
    grad = None if out.dim() == 0 else torch.randn_like(out)
    if mode == "bwd":
        return lambda: out.backward(grad, retain_graph=True)
    return lambda: work.fn().backward(grad)


def _row(case: Case, provider: str, mode: str, stamp: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "op": case.op, "shape": case.shape, "dims": case.dims, "dtype": dtype_name(case.dtype),
        "provider": provider, "mode": mode, "bound": case.bound, "status": "ok", "note": "",
        "median_ms": None, "p20_ms": None, "p80_ms": None, "peak_mem_mb": None,
        "bytes": None, "gbps": None, "frac_copy_bw": None, "flops": None, "tflops": None, "frac_matmul": None,
        "device": stamp["device"], "torch": stamp["torch"], "triton": stamp["triton"], "date": stamp["date"],
    }  # fmt: skip


def run_case(
    case: Case,
    provider: str,
    modes: Sequence[str],
    device: torch.device,
    ceilings: Mapping[str, float | None],
    stamp: Mapping[str, Any],
    *,
    warmup_ms: float,
    rep_ms: float,
) -> list[dict[str, Any]]:
    """Rows for one (case, provider): measured, or marked skipped / error with the reason."""
    modes = [m for m in modes if m in case.modes]
    rows = [_row(case, provider, m, stamp) for m in modes]
    try:
        work = case.setup(provider, device)
        for row in rows:
            fn = mode_fn(work, row["mode"])
            timing = measure(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=work.grad_inputs)
            row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)
            row["peak_mem_mb"] = peak_memory_mb(fn, device)
            _add_rates(row, work.bytes.get(row["mode"]), work.flops.get(row["mode"]), ceilings)
            del fn
    except Unavailable as e:
        for row in rows:
            if row["median_ms"] is None:
                row.update(status="skipped", note=str(e))
    except Exception as e:  # noqa: BLE001 - one failing provider must not lose the rest of the run
        message = error_line(e)
        for row in rows:
            if row["median_ms"] is None:
                row.update(status="error", note=message)
    return rows


def _add_rates(row: dict[str, Any], nbytes: int | None, flops: float | None, ceilings: Mapping[str, float | None]):
    seconds = row["median_ms"] * 1e-3
    if nbytes is not None:
        row["bytes"] = int(nbytes)
        row["gbps"] = nbytes / seconds / 1e9
        if ceilings.get("copy_gbps"):
            row["frac_copy_bw"] = row["gbps"] / ceilings["copy_gbps"]
    if flops is not None:
        row["flops"] = float(flops)
        row["tflops"] = flops / seconds / 1e12
        if ceilings.get("matmul_tflops"):
            row["frac_matmul"] = row["tflops"] / ceilings["matmul_tflops"]


def baselines(cases: Sequence[Case]) -> list[str]:
    """torch and compile, plus every provider a case's targets compare against (e.g. "sdpa")."""
    named = (m.removeprefix("speedup_vs_") for c in cases for _, m, _ in c.targets if m.startswith("speedup_vs_"))
    return list(dict.fromkeys(("torch", "compile", *named)))


def apply_targets(rows: list[dict[str, Any]], cases: Sequence[Case], device: torch.device) -> None:
    """Mark each triton row on CUDA with the targets that apply and whether it meets all of them."""
    by_key = {(c.op, c.shape, dtype_name(c.dtype)): c for c in cases}
    for row in rows:
        row["targets"], row["meets_targets"] = None, None
        case = by_key.get((row["op"], row["shape"], row["dtype"]))
        if device.type != "cuda" or row["provider"] != "triton" or row["status"] != "ok" or case is None:
            continue
        wanted = {metric: minimum for mode, metric, minimum in case.targets if mode in (None, row["mode"])}
        if not wanted:
            continue
        row["targets"] = wanted
        values = [row.get(metric) for metric in wanted]
        if all(v is not None for v in values):
            row["meets_targets"] = all(v >= wanted[m] for m, v in zip(wanted, values))
