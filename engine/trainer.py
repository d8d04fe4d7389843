"""The pretraining loop: ``train()`` -> ``train_step()`` -> ``forward_backward()``.

Each step, in order: set the learning rate from a pure function of the step; run the
micro-batches (loss divided by the accumulation count); unscale and clip; check that loss and
gradient norm are finite *on the device*, and make a non-finite update a no-op (the fused AdamW's
``found_inf`` flag, as GradScaler uses it); step; ``method.after_step(step)`` (the EMA teacher
update); then interval work — a metrics line, a checkpoint.

No host sync outside logging and checkpoint steps: the step reads nothing back from the GPU.
Samples and tokens come from shapes the CPU knows, unreadable files from the loader's CPU-side
report; the first non-finite step is recorded in a device tensor and read (with the logged values,
one ``.tolist()``) on the next logging or checkpoint step, which stops the run naming that step.
The weights are never touched by a non-finite update; the teacher's EMA still runs on such a step,
towards the unchanged student.

The trainer is stateful: its step, samples seen and data position live in its state dict, which
the checkpoint stores with the student, teacher, optimizer, grad scaler and RNG states, so that a
resumed run continues exactly where the interrupted one stopped.

Under torchrun (``dist``, see ``distributed``) the method runs inside DDP (its teacher left out) or,
with ``strategy="fsdp"``, sharded by FSDP2 (checkpoints through ``torch.distributed.checkpoint``),
every stop decision is agreed by all ranks (the non-finite flags by an all-reduce on the device,
which the host does not wait for; counts of samples and skipped files on logging and checkpoint
steps), and rank 0 alone logs and writes.

SIGTERM and Ctrl-C (``signals.StopRequest``) stop the loop at a step boundary: the step finishes, a
checkpoint is written and ``RunStopped`` tells the caller how to continue.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from .checkpoint import newest_loadable, save_checkpoint, save_sharded, step_folder
from .data.base import derive_seed
from .data.loader import DataPosition, close_batches, position_after
from .distributed import DistEnv, check_strategy, seed_all
from .metrics_log import MetricsLog, check_tensorboard, closing_summary
from .signals import RunStopped, StopRequest


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW (decoupled weight decay, as fairseq's ``adam``) with a learning-rate schedule (``schedules``)."""

    lr: float = 1e-3
    """Peak learning rate at ``ref_batch`` samples per update."""
    ref_batch: int = 0
    """The effective batch (samples per update) ``lr`` was tuned for; 0 = use ``lr`` as is.
    Otherwise the actual peak LR is ``lr * effective_batch / ref_batch`` (linear scaling rule)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 0
    """Linear warm-up from 0 to the peak LR over this many updates."""
    total_steps: int = 1000
    """Length of the schedule (updates); the decay reaches ``min_lr`` here."""
    min_lr: float = 0.0
    schedule: Literal["cosine", "polynomial", "tri_stage"] = "cosine"
    """After the warm-up: "cosine" (half-cosine to ``min_lr``: data2vec 2.0, MAE), "polynomial"
    (``(1 - progress) ** power`` to ``min_lr``: wav2vec 2.0; power 1 = linear: RoBERTa) or
    "tri_stage" (data2vec 1.0 audio: warm-up from ``init_lr_scale`` x peak over ``phase_ratio[0]``
    of the steps, hold for ``phase_ratio[1]``, exponential decay to ``final_lr_scale`` x peak;
    ``warmup_steps`` is unused)."""
    power: float = 1.0
    """Exponent of the polynomial decay."""
    phase_ratio: tuple[float, float, float] = (0.03, 0.9, 0.07)
    """tri_stage: fractions of ``total_steps`` for warm-up, hold and decay (summing to 1)."""
    init_lr_scale: float = 0.01
    """tri_stage: the warm-up starts at this fraction of the peak learning rate."""
    final_lr_scale: float = 0.05
    """tri_stage: the decay ends at this fraction of the peak learning rate."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.total_steps < 1:
            raise ValueError(f"optim.total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"optim.warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0 (0 disables), got {self.clip_grad}")
        if self.schedule not in ("cosine", "polynomial", "tri_stage"):
            raise ValueError(f"optim.schedule must be cosine, polynomial or tri_stage, got {self.schedule!r}")
        if self.power <= 0:
            raise ValueError(f"optim.power must be > 0, got {self.power}")
        if len(self.phase_ratio) != 3 or min(self.phase_ratio) < 0 or abs(sum(self.phase_ratio) - 1) > 1e-6:
            raise ValueError(f"optim.phase_ratio must be three fractions >= 0 summing to 1, got {list(self.phase_ratio)}")
        for name in ("init_lr_scale", "final_lr_scale"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"optim.{name} must lie in (0, 1], got {getattr(self, name)}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must both lie in [0, 1), got {list(self.betas)}; e.g. [0.9, 0.95]")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must lie in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.ref_batch < 0:
            raise ValueError(f"optim.ref_batch must be >= 0 (0 = use optim.lr as is), got {self.ref_batch}")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """What the loop does around the optimizer."""

    seed: int = 1
    max_steps: int = 0
    """Stop after this many optimizer updates in all (resumed ones included); 0 = optim.total_steps.
    At most optim.total_steps: past the schedule's end the learning rate would stay at min_lr."""
    accum_steps: int = 1
    """Micro-batches per optimizer update (gradient accumulation)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU; fp16 uses a GradScaler."""
    compile: bool = False
    """torch.compile the student's forward."""
    tensorboard: bool = False
    """Also write the metrics.jsonl scalars as TensorBoard events into ``<run>/tensorboard/`` (rank 0;
    needs the ``tensorboard`` extra)."""
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_corrupt: int = 100
    """Stop when more than this many distinct data files were unreadable (a file counts once, however
    often it is read); also the most unreadable files passed over in a row before the loader stops."""

    def __post_init__(self):
        for name in ("accum_steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise ValueError(f"train.max_steps must be >= 0 (0 = the schedule's total_steps), got {self.max_steps}")


class TrainingStopped(Exception):
    """Training cannot go on (non-finite loss, collapse, too many bad files); the message says why."""


class DataUnreadable(ValueError):
    """The loader yields nothing: every file it tried was unreadable (a bad path or format)."""


def lr_at(step: int, cfg: OptimConfig, peak: float) -> float:
    """The learning rate of update ``step`` (0-based), a pure function of the step.

    cosine / polynomial: linear warm-up from 0 to ``peak`` over ``warmup_steps``, then the decay to
    ``min_lr`` at ``total_steps`` (fairseq ``cosine``, ``polynomial_decay``). tri_stage: fairseq's
    ``tri_stage`` (see ``OptimConfig.schedule``).
    """
    if cfg.schedule == "tri_stage":
        return _tri_stage_lr(step, cfg, peak)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    if cfg.schedule == "polynomial":
        return cfg.min_lr + (peak - cfg.min_lr) * (1.0 - progress) ** cfg.power
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def _tri_stage_lr(step: int, cfg: OptimConfig, peak: float) -> float:
    warmup, hold, decay = (int(round(r * cfg.total_steps)) for r in cfg.phase_ratio)
    init_lr, final_lr = cfg.init_lr_scale * peak, cfg.final_lr_scale * peak
    if step < warmup:
        return init_lr + (peak - init_lr) * step / warmup
    if step < warmup + hold:
        return peak
    if step < warmup + hold + decay:
        return peak * math.exp(math.log(cfg.final_lr_scale) * (step - warmup - hold) / decay)
    return final_lr


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain values (``weights_only``-loadable)."""
    _, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_gauss": (int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Drives one method through the ``d2v2.models.Method`` protocol only: ``forward(batch) -> dict``
    with ``loss``, ``after_step(step)``, ``param_groups(weight_decay)`` and ``health(step, metrics)``.

    Args:
        method: a ``d2v2.models.Method`` (e.g. built by ``d2v2.models.build_method``).
        loader_fn: ``loader_fn(position) -> iterator of batches`` starting at a data position.
        optim: optimizer and schedule settings.
        train: loop settings.
        run_dir: the run folder (metrics.jsonl, checkpoints/).
        device: where to train.
        samples_per_batch_hint: samples per micro-batch and process (0 = varies), for the start-up
            print of the effective batch and the learning-rate scaling.
        config_dict: the resolved run configuration, stored in every checkpoint.
        dist: this process's place in a torchrun job (default: a single process).
        find_unused_parameters: for DDP, when some parameters may get no gradient in a step (LayerDrop).
        strategy: ``distributed.DistConfig.strategy``: "ddp" (DDP under torchrun, else plain) or
            "fsdp" (FSDP2 sharding, also in one process; needs an initialised process group).
    """

    def __init__(
        self,
        method: torch.nn.Module,
        loader_fn,
        optim: OptimConfig,
        train: TrainConfig,
        run_dir: Path,
        device: torch.device,
        samples_per_batch_hint: int,
        config_dict: dict,
        log=print,
        dist: DistEnv | None = None,
        find_unused_parameters: bool = False,
        strategy: str = "ddp",
    ):
        self.method, self.loader_fn, self.optim_cfg, self.cfg = method.to(device), loader_fn, optim, train
        self.run_dir, self.device, self.config_dict, self.log = Path(run_dir), device, config_dict, log
        self.dist = dist or DistEnv()
        self.max_steps = train.max_steps or optim.total_steps
        world = self.dist.world_size
        if samples_per_batch_hint:
            effective = samples_per_batch_hint * train.accum_steps * world
            processes = f" x {world} processes" if world > 1 else ""
            batch_line = (
                f"effective batch {effective} samples ({samples_per_batch_hint} x {train.accum_steps} accumulation{processes})"
            )
            self.peak_lr = optim.lr * effective / optim.ref_batch if optim.ref_batch else optim.lr
        else:  # batches by total audio samples: no fixed batch to scale the learning rate by
            processes = f" on each of {world} processes" if world > 1 else ""
            batch_line = f"batches by total samples, {train.accum_steps} micro-batch(es) per update{processes}"
            self.peak_lr = optim.lr
        self.log(
            f"{batch_line}; base lr {optim.lr:.3g}" + (f" for batch {optim.ref_batch}" if optim.ref_batch else "")
            + f", actual lr {self.peak_lr:.3g}"
        )
        precision = train.precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        if precision in ("bf16", "fp16") and device.type != "cuda":
            raise ValueError(f"train.precision={precision} needs a CUDA device; use fp32 (or auto) on {device.type}")
        self.precision = precision
        if train.tensorboard:
            check_tensorboard()  # on every rank, before any work
        check_strategy(strategy, find_unused_parameters, precision)
        self.sharded = strategy == "fsdp"
        if self.sharded:  # before the optimizer: its parameters are the shards
            self.dist.shard(method, device, precision)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        # Fused (CUDA and CPU): its step takes a device ``found_inf`` flag and then leaves the
        # weights and moments as they were, which is how a non-finite update is skipped without a sync.
        self.optimizer = torch.optim.AdamW(
            method.param_groups(optim.weight_decay),
            lr=self.peak_lr, betas=optim.betas, eps=optim.eps, fused=True,
        )
        # The optimizer and after_step work on the unwrapped method; only the forward goes through DDP.
        self.ddp = self.dist.wrap(method, device, find_unused_parameters) if self.dist.distributed and not self.sharded else None
        model = self.ddp if self.ddp is not None else method
        self.forward = torch.compile(model) if train.compile else model
        # Trainer state (Stateful): what a checkpoint needs beyond the modules.
        self.step = 0
        self.samples_seen = 0
        self.position = DataPosition()
        self.skipped: set[str] = set()  # distinct unreadable files: a bad file counts once, however often it is read
        self.last_checkpoint: Path | None = None
        # Known on this rank only until the next logging or checkpoint step agrees them (``_settle``).
        self._unsettled_samples = 0
        self._unsettled_skipped: list[str] = []
        # Device int64 [2]: the first step with a non-finite loss, and with a non-finite gradient
        # norm (0 = none yet); read on logging and checkpoint steps only.
        self._first_bad: torch.Tensor | None = None
        self.samples_per_batch_hint = samples_per_batch_hint
        self.num_samples = math.inf  # the data set's size, once train() has its loader

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything a checkpoint holds; sharded (fsdp): all but ``method`` and ``optimizer`` (``sharded_state``)."""
        modules = {} if self.sharded else {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict()}
        return {
            **modules,
            "scaler": self.scaler.state_dict(),
            "trainer": {
                "step": self.step,
                "samples_seen": self.samples_seen,
                "epoch": self.position.epoch,
                "batch": self.position.batch,
                "skipped": sorted(self.skipped),
                "world_size": self.dist.world_size,
            },
            "rng": rng_state(),
            "config": self.config_dict,
        }

    def sharded_state(self) -> dict:
        """fsdp: this process's shards of the method and optimizer, keyed by parameter name (DCP's input)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        method, optimizer = get_state_dict(self.method, self.optimizer)
        return {"method": method, "optimizer": optimizer}

    def _load_sharded(self, folder: Path) -> None:
        """fsdp: the method and optimizer from a DCP folder written by any number of processes."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from .safe_dcp import load_sharded

        state = self.sharded_state()
        load_sharded(folder, state=state)  # resharded to this job's processes; no pickled code run
        set_state_dict(self.method, self.optimizer, model_state_dict=state["method"], optim_state_dict=state["optimizer"])

    def load_state_dict(self, state: dict, folder: Path | None = None) -> None:
        """Restore a checkpoint's ``state``; a sharded one's method and optimizer come from ``folder``."""
        if self.sharded:
            self._load_sharded(Path(folder) / state["sharded"])
        else:
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        t = state["trainer"]
        self.step, self.samples_seen = int(t["step"]), int(t["samples_seen"])
        self.position = DataPosition(int(t["epoch"]), int(t["batch"]))
        self.skipped = set(t.get("skipped", []))
        saved = state.get("rng_ranks") or [state["rng"]]
        if self.dist.rank < len(saved):
            set_rng_state(saved[self.dist.rank])
        else:  # resumed on more processes than the checkpoint's run had: a fresh stream for this rank
            seed_all(derive_seed(self.cfg.seed, "rank", self.dist.rank, "step", self.step))

    def save(self) -> Path:
        """Write a checkpoint (rank 0); every rank calls this, and returns once it is complete."""
        self._settle()  # agreed counts in the checkpoint, and never one written after a non-finite step
        rng_ranks = self.dist.gather_object(rng_state())
        state = None
        if self.dist.is_main:
            state = self.state_dict()
            if self.dist.distributed:
                state["rng_ranks"] = rng_ranks
        if self.sharded:  # every rank writes its shards
            save_sharded(self.run_dir, self.step, state, self.sharded_state(), self.dist, self.cfg.keep_checkpoints)
        elif self.dist.is_main:
            save_checkpoint(self.run_dir, self.step, state, self.cfg.keep_checkpoints)
        self.dist.barrier()
        self.last_checkpoint = step_folder(self.run_dir, self.step)
        return self.last_checkpoint

    # ------------------------------------------------------------------------------ loop
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _next_batch(self, batches: Iterator[dict], skipped: list[str]) -> dict:
        """The next batch with samples; the paths of unreadable files go to ``skipped``.

        Batches whose every file was unreadable are passed over, but not forever: once more distinct
        files than ``train.max_corrupt`` (or every file of the data set) failed in a row, it stops.
        """
        tried: dict[str, None] = {}  # unreadable files since the last good batch, in order
        while True:
            batch = next(batches)
            self.position = position_after(batch["epoch"], batch["batch"], self.dist.rank, self.dist.world_size)
            skipped.extend(batch["skipped"])
            if "source" in batch:
                return batch
            tried.update(dict.fromkeys(batch["skipped"]))
            if len(tried) > self.cfg.max_corrupt or len(tried) >= self.num_samples:
                paths = list(tried)
                folder = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
                raise DataUnreadable(
                    f"every file tried in {folder} was unreadable ({len(paths)} files: {', '.join(paths[:5])}"
                    f"{', ...' if len(paths) > 5 else ''}); check the data path and the files' format"
                )

    def _count_skipped(self, skipped: list[str]) -> None:
        """Record a step's unreadable files (every rank's); too many distinct ones stop the run."""
        paths = sorted({p for rank_paths in self.dist.all_gather_object(skipped) for p in rank_paths})
        new = [p for p in paths if p not in self.skipped]
        self.skipped.update(paths)
        self.log(f"skipped {len(paths)} unreadable file(s) ({len(new)} new, {len(self.skipped)} in all): {', '.join(paths[:3])}")
        if len(self.skipped) > self.cfg.max_corrupt:
            listing = "\n  ".join(sorted(self.skipped)[:50])
            raise TrainingStopped(
                f"{len(self.skipped)} data files could not be read (more than train.max_corrupt="
                f"{self.cfg.max_corrupt}); fix or remove them:\n  {listing}"
            )

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def forward_backward(self, batch: dict, sync: bool = True) -> dict:
        """One micro-batch; ``sync=False`` keeps DDP (FSDP) from all-reducing (reduce-scattering) its
        gradients (accumulation)."""
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        if self.sharded:
            self.method.set_requires_gradient_sync(sync)
        with no_sync:
            with self._autocast():
                out = self.forward(batch)
            self.scaler.scale(out["loss"] / self.cfg.accum_steps).backward()
        return out

    def train_step(self, batches: Iterator[dict]) -> dict:
        """One optimizer update; makes no host sync (see the module docstring).

        Returns the mean loss, gradient norm (device tensors), the learning rate, this rank's samples
        and tokens (shapes: positions per sample, masked or not) and the last micro-batch's outputs.
        """
        lr = lr_at(self.step, self.optim_cfg, self.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, outs, samples, tokens, skipped = [], [], 0, 0, []
        for micro in range(self.cfg.accum_steps):
            batch = self._to_device(self._next_batch(batches, skipped))
            out = self.forward_backward(batch, sync=micro == self.cfg.accum_steps - 1)
            losses.append(out["loss"].detach())
            outs.append(out)
            samples += batch["source"].shape[0]
            tokens += batch["source"].shape[0] * batch["mask"].shape[1]  # positions per sample
        if skipped:  # known on the CPU: one process records them now, several agree on the next settle
            self._unsettled_skipped.extend(skipped)
            if not self.dist.distributed:
                self._settle_skipped(len(self._unsettled_skipped))
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.optim_cfg.clip_grad if self.optim_cfg.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.sharded:  # a replicated DTensor: every rank holds the global norm
            grad_norm = grad_norm.to_local()
        loss = torch.stack(losses).mean()
        # Decided on the device: [non-finite loss, non-finite gradient norm], the same on every rank
        # (an all-reduce the host does not wait for), so that all skip and stop alike.
        bad = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm.to(loss.device))]).int()
        if self.dist.distributed:
            bad = self.dist.all_reduce(bad, op="max")
        self.optimizer.found_inf = bad.amax().float()  # fused AdamW: no update where it is 1
        self.optimizer.grad_scale = None  # already unscaled (scaler.unscale_ above)
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf, self.optimizer.grad_scale
        self.scaler.update()  # fp16: lowers the scale after an overflow (its found_inf from unscale_)
        self.optimizer.zero_grad(set_to_none=True)
        if self.precision == "fp16":
            bad = torch.stack([bad[0], torch.zeros_like(bad[1])])  # overflows are the scaler's to skip
        if self._first_bad is None:
            self._first_bad = torch.zeros(2, dtype=torch.int64, device=bad.device)
        self._first_bad = torch.where((self._first_bad == 0) & (bad > 0), self.step + 1, self._first_bad)
        self.step += 1
        self._unsettled_samples += samples
        self.method.after_step(self.step)
        last = outs[-1]
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "samples": samples, "tokens": tokens, "out": last}

    def _settle(self, extra: torch.Tensor | None = None) -> list[float]:
        """Agree what the ranks learnt since the last settle, and stop on a recorded non-finite step.

        One host sync (a ``.tolist()``; a collective under torchrun): the samples seen, the skipped
        files and the first non-finite steps. ``extra`` (a float vector) rides along, summed over
        ranks; its values are returned.
        """
        counts = [float(self._unsettled_samples), float(len(self._unsettled_skipped))]
        device = self._first_bad.device if self._first_bad is not None else self.device
        first_bad = self._first_bad if self._first_bad is not None else torch.zeros(2, dtype=torch.int64, device=device)
        values = torch.cat([
            torch.tensor(counts, dtype=torch.float64).to(device, non_blocking=True),
            first_bad.double(),  # the same on every rank: the sum is world_size times it
            (extra if extra is not None else torch.zeros(0, device=device)).to(device, torch.float64),
        ])  # fmt: skip
        samples, num_skipped, bad_loss, bad_grad, *rest = self.dist.all_reduce(values).tolist()
        self.samples_seen += int(samples)
        self._unsettled_samples = 0
        if num_skipped:
            self._settle_skipped(int(num_skipped))
        bad_loss, bad_grad = int(bad_loss) // self.dist.world_size, int(bad_grad) // self.dist.world_size
        if bad_loss or bad_grad:
            what = "loss" if bad_loss and (not bad_grad or bad_loss <= bad_grad) else "gradient norm"
            where = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
            raise TrainingStopped(
                f"non-finite {what} at step {min(s for s in (bad_loss, bad_grad) if s)}; that update and any "
                f"later non-finite one were skipped, stopped at step {self.step} ({where}). "
                "Lower optim.lr or use train.precision=fp32"
            )
        return rest

    def _settle_skipped(self, num_skipped: int) -> None:
        """Record the unreadable files every rank holds (``num_skipped`` in all, agreed or local)."""
        if num_skipped:
            skipped, self._unsettled_skipped = self._unsettled_skipped, []
            self._count_skipped(skipped)

    def _check_health(self, metrics: dict) -> None:
        """Stop when the method reports a reason (e.g. collapsed representations), naming the last checkpoint."""
        reason = self.method.health(self.step, metrics)
        if reason:
            raise TrainingStopped(f"{reason} (last good checkpoint: {self.last_checkpoint})")

    def train(self) -> dict:
        """Train to ``max_steps`` updates; returns the last logged metrics."""
        with StopRequest() as stop:
            return self._train(stop)

    def _train(self, stop: StopRequest) -> dict:
        resume_step = self.step
        loader = self.loader_fn(self.position)
        dataset = getattr(loader, "dataset", None)
        self.num_samples = len(dataset) if dataset is not None else math.inf
        batches = iter(loader)
        try:
            return self._train_on(stop, batches, resume_step)
        finally:  # on any ending: no loader worker may outlive the run
            stop.ending = True
            close_batches(batches)

    def _train_on(self, stop: StopRequest, batches: Iterator[dict], resume_step: int) -> dict:
        main = self.dist.is_main
        metrics_file = MetricsLog(self.run_dir, self.cfg.tensorboard, self.step) if main else None
        use_bar = main and sys.stderr.isatty()
        bar = None
        if use_bar:
            from tqdm import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        metrics: dict = {}
        session_start, session_samples, stopped_by = time.perf_counter(), 0.0, None
        window_start, window_samples, window_tokens = session_start, 0, 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            while self.step < self.max_steps:
                result = self.train_step(batches)
                out = result["out"]
                window_samples += result["samples"]
                window_tokens += result["tokens"]
                if bar is not None:
                    bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.max_steps:
                    logged = self._logged_values(result, window_samples, window_tokens)  # the sync
                    session_samples += logged["samples"]
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    metrics = {
                        "step": self.step,
                        "loss": logged["loss"],
                        "lr": result["lr"],
                        "ema_decay": float(out.get("ema_decay", float("nan"))),
                        "target_var": logged["target_var"],
                        "pred_var": logged["pred_var"],
                        "grad_norm": logged["grad_norm"],
                        "samples_per_s": logged["samples"] / elapsed,
                        "tokens_per_s": logged["tokens"] / elapsed,
                        "peak_memory_mb": logged["peak_memory_mb"],
                        "skipped_files": len(self.skipped),
                        **{k: float(out[k]) for k in getattr(self.method, "log_keys", ()) if k in out},  # rank 0's
                    }
                    if metrics_file is not None:
                        metrics_file.write(metrics)
                    variances = "".join(  # the methods with a teacher log these; the others do not
                        f"{key} {metrics[key]:.3f} " for key in ("target_var", "pred_var") if math.isfinite(metrics[key])
                    )
                    line = (f"step {self.step}/{self.max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} "
                            f"{variances}{metrics['samples_per_s']:.1f} samples/s")
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                    else:
                        self.log(line)
                    self._check_health(metrics)
                    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
                if self._stop_agreed(stop) and self.step < self.max_steps:
                    self.save()
                    stop.ending = True
                    stopped_by = stop.name or "stop request"
                    break
                if self.step % self.cfg.checkpoint_every == 0 and self.step < self.max_steps:
                    self.save()
            if not stopped_by and (self.step > resume_step or self.last_checkpoint is None):
                self.save()
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if bar is not None:
                bar.close()
        self._summarise(resume_step, session_start, session_samples, stopped_by)
        if stopped_by:
            command = f"d2v2 pretrain --out {self.run_dir} --resume auto"
            raise RunStopped(
                f"{stopped_by} at step {self.step}: checkpoint {self.last_checkpoint} written; continue with: {command}",
                stop.exit_code,
            )
        return metrics

    def _summarise(self, start_step: int, start: float, samples: float, stopped_by: str | None = None) -> None:
        """Rank 0's closing lines: how the run ended and what to run next (``metrics_log.closing_summary``)."""
        if not self.dist.is_main:
            return
        for line in closing_summary(
            self.run_dir, step=self.step, max_steps=self.max_steps, start_step=start_step,
            seconds=time.perf_counter() - start, samples=samples, checkpoint=self.last_checkpoint, stopped_by=stopped_by,
        ):  # fmt: skip
            self.log(line)

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether to stop after this step on a signal; under torchrun every rank stops at the same step.

        A single process reads its flag every step (no sync). Under torchrun the flags are all-reduced
        only on logging steps, which sync anyway, so the loop gains no per-step host sync; a signal
        then stops the job at the next logging step.
        """
        if not self.dist.distributed:
            return stop.requested
        if self.step % self.cfg.log_every != 0:
            return False
        flag = torch.tensor([stop.signum or 0], device=self.device)
        agreed = int(self.dist.all_reduce(flag, op="max").item())  # a sync: logging steps only
        if agreed and not stop.requested:
            stop.signum = agreed  # a rank that got no signal stops with the others, under their signal
        return bool(agreed)

    def _logged_values(self, result: dict, window_samples: int, window_tokens: int) -> dict:
        """A logging step's values: loss, target and prediction variance averaged over ranks, the
        gradient norm, the largest peak memory (MiB), and the job's samples and tokens in the window.

        The one ``.tolist()`` (in ``_settle``) is a CPU-GPU sync (and a collective under torchrun):
        logging steps only. It also stops the run if a step since the last settle was non-finite.
        """
        nan = float("nan")
        out, loss = result["out"], result["loss"]
        peak_memory = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        values = torch.stack([
            torch.as_tensor(v, dtype=torch.float32, device=loss.device)
            for v in (loss, out.get("target_var", nan), out.get("pred_var", nan), result["grad_norm"])
        ] + [torch.tensor(float(v), device=loss.device) for v in (window_samples, window_tokens)])  # fmt: skip
        loss, target_var, pred_var, grad_norm, samples, tokens = self._settle(values)
        world = self.dist.world_size
        if self.dist.distributed:  # every rank's peak, the largest reported
            peak_memory = float(self.dist.all_reduce(torch.tensor([peak_memory], device=self.device), op="max"))
        return {
            "loss": loss / world, "target_var": target_var / world, "pred_var": pred_var / world,
            "grad_norm": grad_norm / world,  # the same on every rank
            "peak_memory_mb": peak_memory, "samples": samples, "tokens": tokens,
        }  # fmt: skip

    def init_from(self, path) -> None:
        """Start a new run from another run's weights (student, teacher, decoder); nothing else."""
        from .checkpoint import load_checkpoint

        state = load_checkpoint(path)
        check_same_model(state["method"], self.method, path)
        if self.sharded:  # every rank takes its shards of the whole weights
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.method, state["method"], options=StateDictOptions(full_state_dict=True))
        else:
            self.method.load_state_dict(state["method"])
        self.log(f"initialised the weights from {path}")

    def resume(self, mode: str) -> bool:
        """``auto``: continue from this run's newest checkpoint that loads, if any; a path: from it."""
        from .checkpoint import load_checkpoint, resolve_checkpoint

        if mode == "none":
            return False
        found, error = None, None
        if self.dist.is_main:  # rank 0 picks: every rank loads the same checkpoint
            try:
                found = (
                    newest_loadable(self.run_dir, self.log, tensors=not self.sharded)
                    if mode == "auto"
                    else (Path(mode), load_checkpoint(mode, tensors=not self.sharded))
                )
            except (ValueError, FileNotFoundError) as e:
                error = e
        path, message = self.dist.broadcast_object((None if found is None else str(found[0]), error and str(error)))
        if message:  # every rank stops, not rank 0 alone
            raise error if error is not None else ValueError(message)
        if path is None:
            return False
        state = found[1] if found is not None else load_checkpoint(path, tensors=not self.sharded)
        if "optimizer" not in state and "sharded" not in state:  # weights only, e.g. a fairseq import
            raise ValueError(f"checkpoint {path} holds weights only (no optimizer or trainer state), so it "
                             "cannot be resumed; start a new run from it with --init-from and a new --out")
        check_same_model(state["method"], self.method, path)
        if ("sharded" in state) != self.sharded:
            kinds = ("a sharded (fsdp)", "a ddp") if "sharded" in state else ("a ddp", "a sharded (fsdp)")
            raise ValueError(
                f"checkpoint {path} is {kinds[0]} checkpoint and this is {kinds[1]} run; start a new --out "
                f"with --init-from {path} (weights only), or resume with the strategy it was written by"
            )
        self.load_state_dict(state, resolve_checkpoint(path).parent)
        self.last_checkpoint = Path(path)
        self.log(f"resumed from {path} at step {self.step} (epoch {self.position.epoch}, batch {self.position.batch})")
        self._note_world_size(int(state["trainer"].get("world_size", len(state.get("rng_ranks") or [0]))))
        return True

    def _note_world_size(self, saved: int) -> None:
        """Say so when a run resumes on another number of processes: its effective batch changed."""
        world = self.dist.world_size
        if saved == world:
            return
        if not self.samples_per_batch_hint:
            self.log(f"resumed on {world} process(es), the checkpoint's run had {saved}: each update now sees "
                     f"{world / saved:g} x the samples")
            return
        per_process = self.samples_per_batch_hint * self.cfg.accum_steps
        before, after = per_process * saved, per_process * world
        lr_before = self.optim_cfg.lr * before / self.optim_cfg.ref_batch if self.optim_cfg.ref_batch else self.optim_cfg.lr
        self.log(
            f"resumed on {world} process(es), the checkpoint's run had {saved}: effective batch {before} -> {after} "
            f"samples, peak learning rate {lr_before:.3g} -> {self.peak_lr:.3g}"
        )


def check_same_model(saved: dict, model: torch.nn.Module, path) -> None:
    """A checkpoint of another model (modality, size or architecture) is a clear error, not a crash."""
    current = model.state_dict()
    for name, tensor in saved.items():
        if name not in current or (torch.is_tensor(tensor) and tuple(tensor.shape) != tuple(current[name].shape)):
            there = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            here = tuple(current[name].shape) if name in current else "absent"
            raise ValueError(
                f"checkpoint {path} is of another model ({name}: {there} there, {here} here); "
                "use the recipe and --set overrides it was trained with, or a new --out folder"
            )
    missing = sorted(set(current) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {path} is of another model (it lacks {missing[0]}); use the recipe it was trained with")
