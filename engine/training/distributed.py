"""Data-parallel pretraining across processes launched by ``torchrun``: DDP over the student, or FSDP2.

Launch one process per GPU; every option of ``d2v2 pretrain`` works as in a single process::

    torchrun --nproc_per_node 8 -m d2v2.engine.cli pretrain --recipe image-base --data /data/imagenet/train
    torchrun --nproc_per_node 8 $(which d2v2) pretrain --recipe image-base --data /data/imagenet/train
    torchrun --no-python --nproc_per_node 8 d2v2 pretrain ...   # when `which d2v2` is a shell shim (pyenv)
    # two nodes (run on each; a shared file system holds the run folder):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m d2v2.engine.cli pretrain --recipe image-large --data ... --out /shared/runs/large

Without torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) a run is one process, exactly as
before; so is a world size of 1. With W > 1 processes:

- Process group: NCCL on CUDA (each process on cuda:LOCAL_RANK), gloo on CPU (``--device cpu``).
- Batch: ``data.batch_size`` is per process, so the effective batch is batch_size x accum_steps x W,
  and the linear learning-rate scaling by ``optim.ref_batch`` uses that global batch.
- Data: all ranks walk the one global batch sequence of a single-process run; rank r reads global
  batches r, r + W, r + 2W, ... (``data.loader.EpochBatchSampler``). An update consumes W x accum_steps
  consecutive global batches, so a W-rank run trains on exactly the data of a 1-process run with
  W x accum_steps accumulation, and the checkpointed data position (epoch, next global batch) is the
  same on every rank. Each epoch's last (batches mod W) batches are left out so no group of W spans
  two epochs.
- Model and RNGs: the model is built from the same seed on every rank (identical weights, teacher
  included), then every rank but 0 reseeds its RNGs from (seed, rank), so dropout, LayerDrop and
  decoder noise differ between ranks; rank 0 keeps the single-process stream.
- DDP wraps the whole method but ignores its ``teacher`` (no broadcast, no gradient reduction; it has
  no trainable parameters). ``after_step`` (the EMA) runs on the unwrapped method after the optimizer
  step, identically on every rank since the students are identical. LayerDrop needs
  ``find_unused_parameters`` (a skipped block has no gradient on that rank). With accumulation, the
  gradients are all-reduced on the last micro-batch only (``no_sync`` on the others).
- Agreement: whether the loss and gradient norm are finite is all-reduced every step on the device
  (the host never waits for it, so every rank skips a non-finite update alike); the samples seen and
  the files skipped (each rank knows its own on the CPU) and the first non-finite step are agreed on
  logging and checkpoint steps, together with the logged metrics, averaged over ranks (target_var and
  pred_var: of each rank's last micro-batch), so every rank stops at the same step and none waits
  forever in a collective.
- Files: rank 0 alone logs and writes config.yaml, metrics.jsonl and checkpoints; the others wait at a
  barrier while it writes. Data caches (tokenizer, token blocks, synthetic speech) are built by rank 0
  before the other ranks read them (``DistEnv.in_turns``). Every rank resumes from the checkpoint rank 0 picks (loaded to the CPU,
  then copied to its device). Checkpoints hold every rank's RNG state (``rng_ranks``, besides rank 0's
  ``rng``), so a resumed run continues exactly on the same world size. Another world size resumes at
  the same data position, and a rank without a saved state reseeds from (seed, rank, step).

FSDP2 (``--set dist.strategy=fsdp``) instead of DDP, for models whose weights, gradients and AdamW
moments do not fit one GPU several times over (``shard``):

- ``fully_shard`` on every transformer block (student and EMA teacher alike), then on the method
  (the rest: local encoders, decoder, the teacher's embeddings). Each parameter is split along dim
  0 over the processes, so a teacher parameter's local shard lines up with its student twin's and
  the EMA updates the shards where they lie (``d2v2.models.layers.teacher.ema_update``), with no
  communication. Mixed precision: bf16 compute copies with fp32 gradient reduction under bf16
  (fp32 shards throughout), plain fp32 otherwise.
- Checkpoints through ``torch.distributed.checkpoint`` (``checkpoint.save_sharded``): every process
  writes its shards into the same ``checkpoints/step-XXXXXXXX/`` folder (published atomically as
  before); they resume on any number of processes, and whatever reads checkpoints through
  ``checkpoint.load_checkpoint`` (``probe``, ``--init-from``) reads them whole in one process.
- One process works too (torchrun with one process, or no torchrun: a one-process group is
  started), e.g. to continue a sharded run on one GPU.
- Needs: no LayerDrop (a block skipped on one rank would leave the others waiting in its
  all-gather; every parameter must take part in every step), and bf16 or fp32 (fp16's GradScaler
  is not offered on shards). Both are refused with a one-line error.

Limits:
- FSDP2 is tested on CPU processes over gloo (fp32); its bf16 policy, NCCL and ``train.compile``
  with it have not yet run on GPUs.
- Student buffers are not re-broadcast before each forward: Data2Vec2's are constants.
- A micro-batch whose every file is unreadable makes that rank read on to its next batch, one group
  ahead of the others (the shards stay disjoint; a resume realigns them at rank 0's position).
- Multi-node runs need the run folder on a file system every node sees, and, for torchrun's elastic
  restarts (``--max-restarts``), ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` on every node (``restart_hazard``).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import random
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Literal, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from d2v2.models import PostNormBlock, PreNormBlock

from ..data.base import derive_seed

# Generous: while rank 0 builds a tokenizer or token cache, or writes a large checkpoint, the other
# ranks wait in a collective that would otherwise time out.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)

T = TypeVar("T")

# No buffer broadcast before every forward (torch 2.13 renames broadcast_buffers to forward_sync_buffers).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device):
    """On CPU, train with PyTorch's deterministic algorithms (restored on exit); elsewhere, nothing.

    The one non-deterministic op of the CPU path is the backward of advanced indexing
    (``index_put_(accumulate=True)``, in ``gather_tokens_ref``'s ``x[sample, ids]``): over more than
    32768 elements with more than one thread, it adds with parallel float atomics whose order
    follows thread timing, so two runs of audio-tiny on a loaded CPU differed by ~1e-7. The
    deterministic mode makes it add serially. Uninitialised memory is not filled (that costs a
    write of every new tensor and changes no result of ours).
    """
    if device.type != "cpu":
        yield
        return
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and every CUDA device's) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(kw_only=True, slots=True)
class DistConfig:
    """How the student is spread over the processes of a torchrun job."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """"ddp": every process holds the whole model (DistributedDataParallel; a single process is
    plain). "fsdp": FSDP2 ``fully_shard`` per transformer block, the EMA teacher sharded alike,
    checkpoints through ``torch.distributed.checkpoint`` (resumable on another number of
    processes); also runs in one process. No LayerDrop and no fp16 with fsdp."""


# The modules FSDP2 shards one by one: every transformer block of every method (student and teacher).
SHARDED_UNITS = (PostNormBlock, PreNormBlock)


@dataclass(frozen=True, slots=True)
class DistEnv:
    """This process's place in the job; its collectives are no-ops in a single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK must lie in [0, WORLD_SIZE={self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"LOCAL_RANK must be >= 0, got {self.local_rank}")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---------------------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks (``op``: "sum" or "max"); returns ``tensor``."""
        if self.distributed:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (a picklable value)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` in rank order on rank 0; None on the others."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj`` in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def in_turns(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 first, then on each other node's local rank 0, then on the rest.

        For work that fills a file cache (tokenizer, token blocks, synthetic speech): the first
        process on a file system builds it and the later ones read it, so no two write it at once.
        """
        if not self.distributed:
            return fn()
        turn = 0 if self.is_main else 1 if self.local_rank == 0 else 2
        result = None
        for t in range(3):
            if t == turn:
                result = fn()
            dist.barrier()
        return result

    # -------------------------------------------------------------------------------- setup
    def offset_rng(self, seed: int) -> None:
        """After the (identical) model init: give every rank but 0 its own dropout / noise stream."""
        if self.rank > 0:
            seed_all(derive_seed(seed, "rank", self.rank))

    def wrap(self, method: torch.nn.Module, device: torch.device, find_unused_parameters: bool) -> DistributedDataParallel:
        """``method`` in DDP, with its ``teacher`` submodule (if any) left out of every sync."""
        teacher = getattr(method, "teacher", None)
        if isinstance(teacher, torch.nn.Module):
            owned = {id(t) for t in (*teacher.parameters(), *teacher.buffers())}
            named = (*method.named_parameters(), *method.named_buffers())
            ignored = [name for name, t in named if id(t) in owned]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, ignored)
        return DistributedDataParallel(
            method,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
            **_NO_BUFFER_SYNC,  # the student's buffers are constants (ALiBi slopes)
        )

    def shard(self, method: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        """``method`` sharded in place with FSDP2: each transformer block, then the rest (see the module
        docstring). Call before building the optimizer (the parameters become DTensors).

        Args:
            device: where this process trains (the mesh's device type: a CPU run on a machine with
                GPUs stays on the CPU).
            precision: the trainer's resolved precision ("bf16": bf16 compute copies, fp32 gradient
                reduction; "fp32": no mixed precision).
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise ValueError(
                "dist.strategy=fsdp needs torch.distributed initialised (run through d2v2 pretrain, or call "
                "distributed.setup(env, device, strategy='fsdp') first)"
            )
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"dist.strategy=fsdp trains in bf16 or fp32, not {precision}; set train.precision=bf16")
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
        # Blocks return their FFN output, a view of the MLP's matmul, which no caller changes in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        units = [m for m in method.modules() if isinstance(m, SHARDED_UNITS)]
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(method, mesh=mesh, mp_policy=policy)
        return method


class PeerLost(Exception):
    """A collective failed because another process of the job ended (killed, crashed, its node lost).

    Every rank that sees it says so and exits 1 at once (no rank waits on a dead peer), so that
    torchrun's elastic restart (``--max-restarts``) or ``--resume auto`` continues the job from its
    newest complete checkpoint.
    """


# How gloo and NCCL word a peer that went away (torch raises them as plain RuntimeErrors).
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited", "ncclRemoteError")  # fmt: skip


def as_peer_lost(e: BaseException, rank: int) -> PeerLost | None:
    """``e`` as a one-line ``PeerLost`` when it is a collective's failure on a lost peer, else None."""
    text = str(e)
    cause = next((words for words in _PEER_GONE if words in text), None)
    if cause is None and not isinstance(e, dist.DistNetworkError):
        return None
    return PeerLost(
        f"rank {rank} lost another process of the job ({cause or text.splitlines()[0][:200]}); it stops too. "
        "Under torchrun --max-restarts N the job restarts from its newest checkpoint; otherwise continue with "
        "the same torchrun command (--resume auto)"
    )


def restart_hazard() -> str | None:
    """A warning when torchrun's elastic restarts of this multi-node job would fail to reconnect.

    By default torchrun's c10d rendezvous lends its own store to the processes, which keeps the
    process-group keys of a dead round; a restarted process then reads its peers' old addresses
    (pytorch#135712). Only the agents read the setting, so the processes can only say so.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("TORCHELASTIC_MAX_RESTARTS", "0") == "0":
        return None
    if env.get("GROUP_WORLD_SIZE", "1") == "1":  # one node: its agent restarts every rank alike
        return None
    return ("torchrun's --max-restarts will not reconnect this multi-node job after a lost process unless every node "
            "sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (pytorch#135712)")


def check_strategy(strategy: str, skips_parameters: bool, precision: str) -> None:
    """A one-line error for what FSDP2 cannot train (see the module docstring); nothing for ddp."""
    if strategy != "fsdp":
        return
    if skips_parameters:
        raise ValueError(
            "dist.strategy=fsdp cannot train with LayerDrop (a block skipped on one process leaves the others "
            "waiting in its all-gather); set model.layerdrop=0 (data2vec 2.0: and model.prenet_layerdrop=0), "
            "or use dist.strategy=ddp"
        )
    if precision == "fp16":
        raise ValueError("dist.strategy=fsdp does not train in fp16 (no sharded GradScaler); use train.precision=bf16")


def detect() -> DistEnv:
    """The job torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK, or a single process."""
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return DistEnv()
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ.get(name)
        if raw is None:
            raise ValueError(f"{name} is not set while RANK or WORLD_SIZE is; launch with torchrun, which sets all three")
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    return DistEnv(rank=values["RANK"], local_rank=values["LOCAL_RANK"], world_size=values["WORLD_SIZE"])


def setup(env: DistEnv, device: str | None = None, strategy: str = "ddp") -> torch.device:
    """This process's device (cuda:LOCAL_RANK under torchrun), with the process group started if W > 1
    or the strategy is fsdp (a one-process group without torchrun: FSDP2 needs a group, even of one).

    Args:
        env: from ``detect()``.
        device: "cpu", "cuda" (or "cuda:N" in a single process); None = cuda when available.
        strategy: ``DistConfig.strategy``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if env.distributed:
            if dev.index is not None and dev.index != env.local_rank:
                raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK (cuda:{env.local_rank}), got device {dev}")
            if env.local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                    "lower --nproc_per_node"
                )
            dev = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(dev)  # collectives and pinned memory use the current device
    if (env.distributed or strategy == "fsdp") and not dist.is_initialized():
        # torchrun's variables name the rendezvous; a lone process without them gets an in-memory store.
        lone = {} if "MASTER_ADDR" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=PROCESS_GROUP_TIMEOUT,
            **({"device_id": dev} if dev.type == "cuda" else {}),
            **lone,
        )
    return dev


def teardown(finished: bool = True) -> None:
    """End the process group, if one was started.

    A job that ``finished`` first waits for every rank (a rank that closes its connections while a
    peer's gloo threads still use them can abort that peer), then lets the collector free what still
    holds the group (DDP's reducer, FSDP's state) while the interpreter is whole: a group that outlives
    ``destroy_process_group`` is freed at interpreter exit, where gloo's threads abort the process
    ("terminate called without an active exception"). A job ending on an error skips the wait, which a
    dead peer would stretch to the group's timeout."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished and dist.get_world_size() > 1:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
