"""The EMA teacher shared by data2vec 2.0 and 1.0: its decay schedule, one update, and the collapse statistic.

Reference: fairseq ``EMAModule`` and ``get_annealed_rate``; the EMA is fp32 arithmetic on the
teacher's own copy (``kernels.ema_``), one launch per dtype group. Under FSDP2 (``fully_shard``) the
teacher is sharded like the student, so each process updates its own shards (``local_shard``).
"""

from __future__ import annotations

import copy as copy_module

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed: no sharded tensors to meet
    DTensor = ()

from d2v2.kernels.ema import ema_

__all__ = ["ema_decay_schedule", "ema_update", "frozen_copy", "local_shard", "weighted_std"]


def ema_decay_schedule(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Teacher decay after ``step`` optimizer updates: linear from ``start`` to ``end`` over
    ``anneal_steps`` updates, ``end`` from then on (the reference's ``get_annealed_rate``)."""
    if step >= anneal_steps:
        return float(end)
    return float(start + (end - start) * step / anneal_steps)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, impl: str = "auto", copy: tuple[str, ...] = ()) -> None:
    """``teacher <- decay * teacher + (1 - decay) * student`` for every teacher parameter whose student
    twin (same name in ``student``) trains; parameters the student does not train, parameters whose
    name starts with one of ``copy`` (the reference's ``skip_keys``) and all buffers are copied.

    Sharded (FSDP2) teacher and student: every pair is updated on this process's local shards, which
    line up because both are sharded alike (dim 0 over the same mesh); no communication."""
    student_params = dict(student.named_parameters())
    averaged_t, averaged_s, copied_t, copied_s = [], [], [], []
    for name, t in teacher.named_parameters():
        s = student_params[name]
        averaged = s.requires_grad and not (copy and name.startswith(copy))
        (averaged_t if averaged else copied_t).append(local_shard(t))
        (averaged_s if averaged else copied_s).append(local_shard(s))
    student_buffers = dict(student.named_buffers())
    for name, t in teacher.named_buffers():
        copied_t.append(t)
        copied_s.append(student_buffers[name])
    ema_(averaged_t, averaged_s, decay, impl=impl)
    for t, s in zip(copied_t, copied_s):
        t.copy_(s)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2 parameter), sharing its storage; any other tensor as is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def frozen_copy(module: nn.Module, omit: tuple[str, ...] = ()) -> nn.Module:
    """A deep copy of ``module`` without the submodules named in ``omit`` (dotted paths, e.g.
    ``embed.local_encoder``), never trained, in eval mode."""
    teacher = copy_module.deepcopy(module)
    for path in omit:
        parent, _, name = path.rpartition(".")
        setattr(teacher.get_submodule(parent), name, None)
    teacher.requires_grad_(False)
    return teacher.eval()


def weighted_std(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the per-channel std of ``values`` [R, N, D] over the positions, each
    counted ``weights`` [R, N] times (a bool mask, or clone counts): data2vec's representation-collapse
    statistic (fairseq ``data2vec2.py: compute_var``). Weights, not a boolean index, so that it makes no host sync."""
    weights = weights.to(torch.float32)
    values = values.detach().float()
    count = weights.sum()
    mean = torch.einsum("rn,rnd->d", weights, values) / count
    var = torch.einsum("rn,rnd->d", weights, (values - mean).square()) / (count - 1)
    return torch.sqrt(var + 1e-6).mean()


def std_within_samples(values: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples and channels of the per-channel std of ``values`` [B, N, D] over each sample's own
    positions (``padding_mask`` [B, N], True = padding, left out). Near 0 when an encoder gives every
    position of a sample the same vector: a local encoder that collapsed while the loss and the batch-wide
    variances look fine (the failure users of the reference report in fairseq #4177 / #5239)."""
    values = values.detach().float()
    keep = torch.ones(values.shape[:2], device=values.device) if padding_mask is None else (~padding_mask).float()
    count = keep.sum(dim=1, keepdim=True).clamp(min=2)  # [B, 1]
    mean = torch.einsum("bn,bnd->bd", keep, values) / count
    var = torch.einsum("bn,bnd->bd", keep, (values - mean[:, None]).square()) / (count - 1)
    return torch.sqrt(var + 1e-6).mean()
