"""Ahead-of-time view of the Triton kernels: which launches the ops make, and what each compiles to
on a GPU architecture, found on a machine without a GPU.

``trace_launches()`` runs the public ops on CPU tensors with every Triton launch recorded instead of
executed (the host code takes its GPU branches: this is not the interpreter), and every config an
autotuned kernel may choose there is recorded as its own launch. ``compile_launch(launch, arch)``
compiles one recorded launch with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` and reads
what ``ptxas -v`` says: registers per thread, spill stores / loads; Triton's metadata gives the
shared memory. ``ARCHS`` holds the per-architecture limits those numbers are judged against.

The kernels must have been defined by ``triton.jit`` (TRITON_INTERPRET unset when ``d2v2.kernels``
was imported): interpreted kernels cannot be compiled. Private: ``d2v2.kernels`` re-exports the names
the compile bench uses. Uses Triton internals (the JIT's binder and ``_pack_args``), checked against
Triton 3.9.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from . import _utils


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM and per-block limits of one compute capability (CUDA C++ Programming Guide, "Technical
    Specifications per Compute Capability"; the opt-in shared memory per block is what
    ``cudaDevAttrMaxSharedMemoryPerBlockOptin`` reports, and Triton launches with all of it)."""

    name: str
    smem_per_block: int  # bytes, opt-in maximum
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_smem_per_block: int = 1024  # the driver's per-block reservation on sm_80 and later
    compiler_smem_margin: int = 0  # added to the kernels' shared-memory estimates there (``_utils.smem_margin``)


# A100 (8.0): 163 KB per block, 164 KB per SM; H100 (9.0) and B200 (10.0): 227 KB per block, 228 KB per SM.
ARCHS = {
    80: ArchLimits("sm_80", smem_per_block=163 * 1024, smem_per_sm=164 * 1024, compiler_smem_margin=_utils.smem_margin(80)),
    90: ArchLimits("sm_90", smem_per_block=227 * 1024, smem_per_sm=228 * 1024, compiler_smem_margin=_utils.smem_margin(90)),
    100: ArchLimits("sm_100", smem_per_block=227 * 1024, smem_per_sm=228 * 1024, compiler_smem_margin=_utils.smem_margin(100)),
}


@dataclass(frozen=True)
class Launch:
    """One kernel specialisation as the ops launch it: the kernel, its argument types and divisibility
    (from the example tensors), its constexprs and launch options (num_warps, num_stages)."""

    kernel: str
    signature: tuple  # ((argument, type), ...)
    constexprs: tuple  # ((argument, value), ...), values as text
    options: tuple  # ((option, value), ...): num_warps, num_stages
    config: str | None  # the autotune config this launch is, or None for a fixed launch
    fn: Any = field(compare=False, hash=False, repr=False)
    attrs: Any = field(compare=False, hash=False, repr=False)
    values: Any = field(compare=False, hash=False, repr=False)  # the constexprs keyed as ASTSource wants
    smem_estimate: int | None = field(default=None, compare=False)  # the device filter's bound (autotuned)
    kept_on: frozenset | None = field(default=None, compare=False)  # archs whose limits the autotuner keeps it on

    @property
    def num_warps(self) -> int:
        return dict(self.options).get("num_warps", 4)

    @property
    def num_stages(self) -> int:
        return dict(self.options).get("num_stages", 3)

    def constexpr(self, name: str):
        return dict(self.constexprs).get(name)


_TRACE: list[Launch] | None = None


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def _text(value) -> str:
    return str(value) if not isinstance(value, str) else repr(value)


def _record(fn, args, kwargs, config, smem_estimate=None, kept_on=None) -> None:
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"{getattr(fn, '__name__', fn)} is not a compiled Triton kernel: import d2v2.kernels with "
            "TRITON_INTERPRET unset to trace its launches"
        )
    backend = make_backend(_target(90))  # the specialisation (types, 16-byte divisibility) is the same on every arch
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    names = [p.name for p in fn.params]
    launch_options = tuple((k, kwargs[k]) for k in ("num_warps", "num_stages") if k in kwargs)
    _TRACE.append(
        Launch(
            kernel=fn.__name__,
            signature=tuple(signature.items()),
            constexprs=tuple((names[path[0]], _text(value)) for path, value in sorted(constexprs.items())),
            options=launch_options,
            config=None if config is None else _config_label(config),
            fn=fn,
            attrs=attrs,
            values=constexprs,
            smem_estimate=smem_estimate,
            kept_on=kept_on,
        )
    )


def _config_label(config) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} w={config.num_warps} s={config.num_stages}"


def _pruned_for(autotuner, kwargs, arch: int) -> list:
    """The configs ``autotuner``'s own pruning keeps on a device of compute capability ``arch`` (its
    shared memory, and the configs the kernel drops there because they spill)."""
    _utils._smem_limit, _utils._arch = ARCHS[arch].smem_per_block, arch
    try:
        return autotuner.prune_configs(kwargs)
    finally:
        _utils._smem_limit, _utils._arch = None, None


@contextlib.contextmanager
def trace_launches() -> Iterator[list[Launch]]:
    """Record (not run) every Triton launch the ops make inside the block; yields the list it fills.

    An autotuned kernel records every config its own pruning keeps for the arguments: the configs it
    may choose at that shape. Outputs of traced ops are left uninitialised.
    """
    global _TRACE
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def run_jit(self, *args, grid, warmup, **kwargs):
        _record(self, args, kwargs, None)

    def run_autotuned(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            estimate = getattr(self, "smem_estimate", None)
            kept = {arch: {id(c) for c in _pruned_for(self, kwargs, arch)} for arch in ARCHS}
            for config in self.prune_configs(kwargs):  # every arch's configs: no device limit while tracing
                bound = estimate(config, {**self.nargs, **kwargs}) if estimate else None
                kept_on = frozenset(arch for arch in ARCHS if id(config) in kept[arch])
                _record(self.fn, args, {**kwargs, **config.all_kwargs()}, config, bound, kept_on)
        finally:
            self.nargs = None

    if _TRACE is not None:
        raise RuntimeError("trace_launches() does not nest")
    saved = JITFunction.run, Autotuner.run
    _TRACE = []
    JITFunction.run, Autotuner.run = run_jit, run_autotuned
    _utils._tracing = True
    try:
        yield _TRACE
    finally:
        JITFunction.run, Autotuner.run = saved
        _utils._tracing = False
        _TRACE = None


# ----------------------------------------------------------------------------------------------
# Compiling one launch

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def occupancy(arch: int, regs: int, shared: int, num_warps: int) -> tuple[int, float]:
    """(resident blocks per SM, fraction of the SM's warp slots they fill) for one kernel: the least of
    the register, shared memory, warp and block limits (registers allocated per warp in units of 256)."""
    limits = ARCHS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = limits.regs_per_sm // (regs_per_warp * num_warps)
    by_smem = limits.smem_per_sm // (shared + limits.reserved_smem_per_block)
    by_warps = limits.max_warps_per_sm // num_warps
    blocks = max(0, min(by_regs, by_smem, by_warps, limits.max_blocks_per_sm))
    return blocks, blocks * num_warps / limits.max_warps_per_sm


def ptxas_available() -> bool:
    """Whether this Triton can compile for NVIDIA targets here (its NVIDIA backend and ptxas)."""
    if not _utils.HAS_TRITON:
        return False
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return bool(get_ptxas(90).path)
    except Exception:  # noqa: BLE001 - any failure means "cannot compile here"
        return False


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile ``launch`` for sm_``arch``; returns status ("ok" | "error"), error, registers,
    spill_stores, spill_loads (bytes), shared (bytes), smem_limit, fits_smem, blocks_per_sm, occupancy."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource, make_backend

    target = _target(arch)
    limit = ARCHS[arch].smem_per_block
    backend = make_backend(target)
    options = backend.parse_options(dict(launch.options))
    src = ASTSource(launch.fn, dict(launch.signature), launch.values, launch.attrs)
    log = io.StringIO()
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    # Always run ptxas (the on-disk cache would skip it and its -v report); it prints the report.
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - the compiler's error is the result
        message = str(e).strip().splitlines()
        return {"status": "error", "error": f"{type(e).__name__}: {message[0] if message else ''}", "smem_limit": limit}
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    text = log.getvalue()
    regs = max((int(m) for m in _REGS.findall(text)), default=0)
    spills = [(int(s), int(lo)) for s, lo in _SPILLS.findall(text)]
    shared = int(compiled.metadata.shared)
    blocks, occ = occupancy(arch, regs, shared, launch.num_warps)
    return {
        "status": "ok",
        "error": None,
        "registers": regs,
        "spill_stores": max((s for s, _ in spills), default=0),
        "spill_loads": max((lo for _, lo in spills), default=0),
        "shared": shared,
        "smem_limit": limit,
        "fits_smem": shared <= limit,
        "blocks_per_sm": blocks,
        "occupancy": occ,
    }



def load_launch(launch: Launch) -> dict:
    """Compile ``launch`` for the current GPU and load it there: registers, spills (bytes) and shared
    memory as the driver reports them (what ``compile_launch`` found ahead of time should match)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import driver

    target = driver.active.get_current_target()
    options = make_backend(target).parse_options(dict(launch.options))
    compiled = triton.compile(ASTSource(launch.fn, dict(launch.signature), launch.values, launch.attrs),
                              target=target, options=options.__dict__)  # fmt: skip
    compiled._init_handles()  # loads the module: n_regs and n_spills come from the driver
    return {"arch": f"sm_{target.arch}", "registers": compiled.n_regs, "spills": compiled.n_spills,
            "shared": int(compiled.metadata.shared)}  # fmt: skip
