"""Compute budgets and the learning-rate schedule that spans them.

A run stops at the first limit it would pass: training compute in GFLOPs (3 x the forward GFLOPs
per sample of ``fastclip.flops``, at each phase's mask ratio, with SLIP's extra views), samples
seen, optimiser steps, or wall-clock seconds of training.  A step runs only if it fits: the
compute, sample and step limits are never exceeded.

Progress is the largest used/limit fraction.  For the deterministic limits (GFLOPs, samples,
steps) the whole run is planned before it starts (:meth:`Budget.plan`): how many steps each phase
gets, so that the schedule knows its length and a budget too small for one step is refused before
any work.  With a time limit, progress is also measured on the clock.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from .config import BudgetConfig, ConfigError, OptimConfig

__all__ = ["Budget", "BudgetUsed", "lr_at"]


@dataclass
class BudgetUsed:
    """What a run has used so far (saved in checkpoints, logged, written to summary.json)."""

    steps: int = 0
    samples: int = 0
    gflops: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Budget:
    """Limits, per-phase costs and the plan.

    ``phases``: ``[(end_progress, mask_ratio)]`` from the strategy; ``cost(mask_ratio)``: training
    GFLOPs per sample in that phase; ``batch_size``: samples per step (global).
    """

    limits: BudgetConfig
    phases: list
    cost: Callable[[float], float]
    batch_size: int
    used: BudgetUsed = field(default_factory=BudgetUsed)

    def __post_init__(self):
        self._costs = {r: float(self.cost(r)) for _, r in self.phases}
        first = self.step_cost(self.phases[0][1])
        lim = self.limits
        if lim.gflops is not None and first > lim.gflops:
            raise ConfigError(f"budget.gflops={lim.gflops:g} is smaller than one step "
                              f"({first:g} GFLOPs = {self.batch_size} samples x {first / self.batch_size:g} GFLOPs)")
        if lim.samples is not None and self.batch_size > lim.samples:
            raise ConfigError(f"budget.samples={lim.samples} is smaller than one step (batch_size={self.batch_size})")
        self.planned_steps = self.plan()

    # -- costs -------------------------------------------------------------------------------
    def step_cost(self, mask_ratio: float) -> float:
        """GFLOPs of one optimiser step in the phase with ``mask_ratio``."""
        if mask_ratio not in self._costs:
            self._costs[mask_ratio] = float(self.cost(mask_ratio))
        return self._costs[mask_ratio] * self.batch_size

    def mask_ratio_at(self, progress: float) -> float:
        for end, ratio in self.phases:
            if progress < end:
                return ratio
        return self.phases[-1][1]

    # -- progress ----------------------------------------------------------------------------
    def fractions(self, used: Optional[BudgetUsed] = None, *, clock: bool = True) -> dict:
        u = used or self.used
        out = {}
        for k in ("gflops", "samples", "steps") + (("seconds",) if clock else ()):
            lim = getattr(self.limits, k)
            if lim is not None:
                out[k] = getattr(u, k) / lim
        return out

    def progress(self, used: Optional[BudgetUsed] = None, *, clock: bool = True) -> float:
        """max over the limits of used / limit, in [0, 1]."""
        return min(1.0, max(self.fractions(used, clock=clock).values(), default=0.0))

    def fits(self, mask_ratio: float, used: Optional[BudgetUsed] = None, *, clock: bool = True) -> bool:
        """Whether one more step (in the phase with ``mask_ratio``) stays within every limit (the
        time limit too, unless ``clock`` is False: ranks decide that one together)."""
        u = used or self.used
        lim = self.limits
        if lim.steps is not None and u.steps + 1 > lim.steps:
            return False
        if lim.samples is not None and u.samples + self.batch_size > lim.samples:
            return False
        if lim.gflops is not None and u.gflops + self.step_cost(mask_ratio) > lim.gflops * (1 + 1e-12):
            return False
        if clock and lim.seconds is not None and u.seconds >= lim.seconds:
            return False
        return True

    def add_step(self, mask_ratio: float, seconds: float) -> None:
        self.used.steps += 1
        self.used.samples += self.batch_size
        self.used.gflops += self.step_cost(mask_ratio)
        self.used.seconds += seconds

    def plan(self) -> Optional[int]:
        """Steps the deterministic limits allow (None with a time limit alone)."""
        lim = self.limits
        if lim.gflops is None and lim.samples is None and lim.steps is None:
            return None
        u = BudgetUsed()
        # Walk phase by phase: within a phase every step costs the same, so count them in bulk.
        while True:
            ratio = self.mask_ratio_at(self.progress(u, clock=False))
            if not self.fits(ratio, u, clock=False):
                return u.steps
            n = self._steps_left_in_phase(ratio, u)
            u.steps += n
            u.samples += n * self.batch_size
            u.gflops += n * self.step_cost(ratio)

    def _steps_left_in_phase(self, ratio: float, u: BudgetUsed) -> int:
        """Steps that fit before the phase ends or a limit is reached (at least one: fits() holds)."""
        end = next((e for e, r in self.phases if self.progress(u, clock=False) < e), 1.0)
        best = math.inf
        lim, c = self.limits, self.step_cost(ratio)
        for used, per, limit in ((u.steps, 1, lim.steps), (u.samples, self.batch_size, lim.samples),
                                 (u.gflops, c, lim.gflops)):
            if limit is None:
                continue
            fit = math.floor((limit * (1 + 1e-12) - used) / per)          # steps within the limit
            to_end = math.ceil((end * limit - used) / per - 1e-9)           # steps until progress >= end
            best = min(best, fit, max(1, to_end) if end < 1.0 else fit)
        return max(1, int(best))

    def state_dict(self) -> dict:
        return {"used": self.used.as_dict(), "planned_steps": self.planned_steps}

    def load_state_dict(self, state: dict) -> None:
        self.used = BudgetUsed(**state["used"])


def lr_at(cfg: OptimConfig, step: int, planned_steps: Optional[int], clock: Optional[float] = None,
          warmup_end_clock: Optional[float] = None) -> float:
    """Learning rate for optimiser step ``step`` (0-based).

    Warm-up: linear from lr / warmup_steps to lr over ``warmup`` steps (a fraction of the planned
    steps when < 1).  Then ``cosine`` (to ``min_lr`` at the end of the budget), ``const-cooldown``
    (constant, then linear to ``min_lr`` over the last ``cooldown`` of the budget), or ``const``.
    The decay runs over the planned steps after the warm-up (open_clip's step-based cosine); with
    a time limit (``clock`` = elapsed / limit) it runs over whichever ends first, the planned
    steps or the clock (``warmup_end_clock``: the clock fraction when the warm-up ended).
    """
    warmup = cfg.warmup
    if warmup < 1:
        warmup_steps = int(round(warmup * planned_steps)) if planned_steps else 0
    else:
        warmup_steps = int(warmup)
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    if cfg.schedule == "const":
        return cfg.lr
    q = 0.0
    if planned_steps:
        q = (step - warmup_steps) / max(1, planned_steps - warmup_steps)
    if clock is not None:
        c0 = warmup_end_clock or 0.0
        q = max(q, (clock - c0) / max(1e-12, 1 - c0))
    q = min(1.0, max(0.0, q))
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * q))
    start = 1.0 - cfg.cooldown
    if q < start or cfg.cooldown == 0:
        return cfg.lr
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - q) / cfg.cooldown
