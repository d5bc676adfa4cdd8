"""Budgets: planning per phase, never exceeding a limit, and the learning-rate schedule."""
import math

import pytest

from fastclip.flops import model_flops
from fastclip.train import Budget, ConfigError, lr_at
from fastclip.train.config import BudgetConfig, OptimConfig, StrategyConfig
from fastclip.train.strategies import build_strategy
from fastclip.models import CLIPConfig


def _budget(limits, phases=((1.0, 0.0),), cost=lambda r: 1.0 - r / 2, batch=4):
    return Budget(BudgetConfig(**limits), list(phases), cost, batch)


def _simulate(b):
    steps = 0
    while True:
        r = b.mask_ratio_at(b.progress(clock=False))
        if not b.fits(r, clock=False):
            return steps
        b.add_step(r, 0.0)
        steps += 1


@pytest.mark.parametrize("limits", [{"steps": 7}, {"samples": 30}, {"gflops": 33.0}, {"gflops": 33.0, "steps": 5}])
@pytest.mark.parametrize("phases", [((1.0, 0.0),), ((0.8, 0.5), (1.0, 0.0)), ((0.5, 0.75), (1.0, 0.0))])
def test_plan_matches_a_step_by_step_run_and_limits_hold(limits, phases):
    b = _budget(limits, phases)
    planned = b.planned_steps
    assert _simulate(b) == planned
    lim = b.limits
    assert lim.steps is None or b.used.steps <= lim.steps
    assert lim.samples is None or b.used.samples <= lim.samples
    assert lim.gflops is None or b.used.gflops <= lim.gflops * (1 + 1e-12)


def test_flip_phases_switch_at_the_budget_fraction():
    b = _budget({"gflops": 100.0}, ((0.9, 0.5), (1.0, 0.0)), cost=lambda r: 1.0 - r / 2, batch=1)
    ratios = []
    while True:
        r = b.mask_ratio_at(b.progress(clock=False))
        if not b.fits(r, clock=False):
            break
        ratios.append(r)
        b.add_step(r, 0.0)
    # 90 GFLOPs at 0.75 GFLOP per masked step, then 10 at 1 GFLOP per unmasked step
    assert ratios.count(0.5) == 120 and ratios.count(0.0) == 10
    assert b.used.gflops == pytest.approx(100.0)


def test_too_small_budgets_are_refused_before_work():
    with pytest.raises(ConfigError, match="smaller than one step"):
        _budget({"gflops": 3.0})  # one step costs 4
    with pytest.raises(ConfigError, match="budget.samples=3 is smaller than one step"):
        _budget({"samples": 3})


def test_time_budget_has_no_plan():
    b = _budget({"seconds": 1.0})
    assert b.planned_steps is None
    b.add_step(0.0, 0.6)
    assert b.fits(0.0) and b.progress() == pytest.approx(0.6)
    b.add_step(0.0, 0.6)
    assert not b.fits(0.0) and b.fits(0.0, clock=False)


def test_strategy_costs_follow_fastclip_flops():
    cfg = CLIPConfig.from_name("ViT-B-16")
    flip = build_strategy(StrategyConfig(name="flip", mask_ratio=0.5))
    assert flip.flops(cfg, 0.5) == pytest.approx(3 * model_flops("ViT-B-16", mask_ratio=0.5).total)
    slip = build_strategy(StrategyConfig(name="slip"))
    import torch
    with torch.device("meta"):
        from fastclip.models import CLIP
        model = CLIP(CLIPConfig.from_name("ViT-B-16"))
    head = slip.build_modules(model)["slip_head"]
    assert head.dims == slip.parts[1].head_dims(cfg) == (768, 4096, 256)  # SLIP's head at ViT-B width
    head_gflops = 2 * (768 * 4096 + 4096 * 4096 + 4096 * 256) / 1e9
    extra = 2 * 3 * (model_flops("ViT-B-16").image + head_gflops)
    assert slip.flops(cfg, 0.0) == pytest.approx(3 * model_flops("ViT-B-16").total + extra)


def test_cosine_schedule():
    o = OptimConfig(lr=1.0, warmup=10, schedule="cosine", min_lr=0.0)
    assert lr_at(o, 0, 110) == pytest.approx(0.1)
    assert lr_at(o, 9, 110) == pytest.approx(1.0)
    assert lr_at(o, 10, 110) == pytest.approx(1.0)
    assert lr_at(o, 60, 110) == pytest.approx(0.5)
    assert lr_at(o, 110, 110) == pytest.approx(0.0, abs=1e-12)
    frac = OptimConfig(lr=1.0, warmup=0.1)
    assert lr_at(frac, 0, 100) == pytest.approx(0.1)  # 10 warm-up steps


def test_const_cooldown_and_time_schedules():
    o = OptimConfig(lr=2.0, warmup=0, schedule="const-cooldown", cooldown=0.25)
    assert lr_at(o, 0, 100) == 2.0 and lr_at(o, 74, 100) == 2.0
    assert lr_at(o, 87, 100) == pytest.approx(2.0 * 13 / 25, rel=1e-6)
    c = OptimConfig(lr=1.0, warmup=0, schedule="cosine")
    assert lr_at(c, 5, None, clock=0.5) == pytest.approx(0.5)
    assert lr_at(c, 5, 1000, clock=0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(OptimConfig(lr=3.0, schedule="const", warmup=0), 50, 100) == 3.0
