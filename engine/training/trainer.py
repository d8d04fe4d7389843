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

Beside the loop: the optimizer settings and learning-rate schedules in ``schedule``, resume and
init-from (with the RNG states) in ``resume``, the logged row and the closing summary in ``metrics_log``,
the unreadable files' bookkeeping in ``unreadable``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch

from .checkpoint import renamed_sharded, save_checkpoint, save_sharded, sharded_renames, step_folder
from ..data.base import derive_seed
from ..data.loader import DataPosition, close_batches, position_after
from .distributed import DistEnv, check_strategy, seed_all
from .metrics_log import MetricsLog, check_tensorboard, closing_summary, log_row, progress_line
from .runfolder import export_command
from .resume import init_weights_from, resume_from_checkpoint, rng_state, set_rng_state
from .schedule import OptimConfig, lr_at
from .signals import RunStopped, StopRequest
from .unreadable import TrainingStopped, UnreadableFiles


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

    command = "pretrain"
    """The ``d2v2`` subcommand that runs this loop (progress bar, closing summary, resume command)."""

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
        self.unreadable = UnreadableFiles(train.max_corrupt, log)
        self.last_checkpoint: Path | None = None
        # Known on this rank only until the next logging or checkpoint step agrees them (``_settle``).
        self._unsettled_samples = 0
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
                "skipped": sorted(self.unreadable.seen),
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
        """fsdp: the method and optimizer from a DCP folder written by any number of processes (an
        earlier d2v2's parameter names asked for by those names, then renamed back)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from .safe_dcp import load_sharded

        renames = sharded_renames(folder, type(self.method).upgrade_state_dict)
        state = renamed_sharded(self.sharded_state(), renames)
        load_sharded(folder, state=state)  # resharded to this job's processes; no pickled code run
        state = renamed_sharded(state, {old: new for new, old in renames.items()})
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
        self.unreadable.seen = set(t.get("skipped", []))
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

    def _advance(self, batch: dict) -> None:
        """The data position after a batch the loader gave (read or not)."""
        self.position = position_after(batch["epoch"], batch["batch"], self.dist.rank, self.dist.world_size)

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

    def _positions(self, batch: dict) -> int:
        """Positions per sample of a batch (masked or not): its masks' width, or the modality's count."""
        return batch["mask"].shape[1] if "mask" in batch else self.method.modality.num_positions(batch["source"])

    def train_step(self, batches: Iterator[dict]) -> dict:
        """One optimizer update; makes no host sync (see the module docstring).

        Returns the mean loss, gradient norm (device tensors), the learning rate, this rank's samples
        and tokens (shapes: positions per sample, masked or not) and the last micro-batch's outputs.
        """
        lr = lr_at(self.step, self.optim_cfg, self.peak_lr)
        for group in self.optimizer.param_groups:  # lr_scale: a method's per-group factor (layer decay)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        losses, outs, samples, tokens = [], [], 0, 0
        for micro in range(self.cfg.accum_steps):
            batch = self._to_device(self.unreadable.next_readable(batches, self.num_samples, self._advance))
            out = self.forward_backward(batch, sync=micro == self.cfg.accum_steps - 1)
            losses.append(out["loss"].detach())
            outs.append(out)
            samples += batch["source"].shape[0]
            tokens += batch["source"].shape[0] * self._positions(batch)
        if self.unreadable.pending and not self.dist.distributed:  # several processes agree on the next settle
            self.unreadable.record([self.unreadable.pending])
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
        counts = [float(self._unsettled_samples), float(len(self.unreadable.pending))]
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
        if num_skipped:  # every rank gathers: the count is the same everywhere
            self.unreadable.record(self.dist.all_gather_object(self.unreadable.pending))
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

            bar = tqdm(total=self.max_steps, initial=self.step, desc=self.command, unit="step", dynamic_ncols=True)
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
                    metrics = log_row(
                        self.step, logged, result["lr"], out, time.perf_counter() - window_start, len(self.unreadable.seen),
                        getattr(self.method, "log_keys", ()),
                    )  # fmt: skip
                    if metrics_file is not None:
                        metrics_file.write(metrics)
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                    else:
                        self.log(progress_line(metrics, self.max_steps))
                    self._check_health(metrics)
                    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
                self.after_update(metrics_file)
                if stop.agreed(self.dist, self.device, check=self.step % self.cfg.log_every == 0) and self.step < self.max_steps:
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
            command = f"d2v2 {self.command} --out {self.run_dir} --resume auto"
            raise RunStopped(
                f"{stopped_by} at step {self.step}: checkpoint {self.last_checkpoint} written; continue with: {command}",
                stop.exit_code,
            )
        return metrics

    def after_update(self, metrics_file: MetricsLog | None) -> None:
        """Interval work of a subclass after each update, before its checkpoint (fine-tuning's
        validation); ``metrics_file`` is rank 0's metrics.jsonl (None elsewhere)."""

    def closing_lines(self) -> list[str]:
        """What the closing summary adds after the checkpoint: the commands to run next."""
        return [f"probe:      d2v2 probe --checkpoint {self.run_dir}", f"export:     {export_command(self.run_dir)}"]

    def _summarise(self, start_step: int, start: float, samples: float, stopped_by: str | None = None) -> None:
        """Rank 0's closing lines: how the run ended and what to run next (``metrics_log.closing_summary``)."""
        if not self.dist.is_main:
            return
        for line in closing_summary(
            self.run_dir, step=self.step, max_steps=self.max_steps, start_step=start_step,
            seconds=time.perf_counter() - start, samples=samples, checkpoint=self.last_checkpoint, stopped_by=stopped_by,
            command=self.command,
        ) + self.closing_lines():  # fmt: skip
            self.log(line)

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
        init_weights_from(self, path)

    def resume(self, mode: str) -> bool:
        """``auto``: continue from this run's newest checkpoint that loads, if any; a path: from it."""
        return resume_from_checkpoint(self, mode)
