"""The optimizer's settings and the learning-rate schedules: the rate of an update is a pure
function of its step (``lr_at``), so that a resumed run continues on the same curve."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


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
