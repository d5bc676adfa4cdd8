"""Exact gradient accumulation: k micro-batches give the one-batch gradient (fp32, 1e-5)."""
import contextlib
import copy

import pytest
import torch
from torch import nn

from fastclip.models import create_model
from fastclip.train.config import StrategyConfig
from fastclip.train.step import StepRunner, TrainModule, split_batch
from fastclip.train.strategies import LossContext, build_strategy

from ._tiny import TINY, random_batch


def _grads(strategy_name, k, batch, loss="clip", seed=0, dtype=torch.float32, **scfg):
    cfg = StrategyConfig(name=strategy_name, loss=loss, **scfg)
    strategy = build_strategy(cfg)
    torch.manual_seed(seed)
    model = create_model("ViT-Ti-16", image_size=32, **TINY, **strategy.model_overrides())
    modules = nn.ModuleDict(strategy.build_modules(model))
    model.to(dtype)
    modules.to(dtype)
    batch = {k_: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
                  [x.to(dtype) for x in v] if isinstance(v, list) else v) for k_, v in batch.items()}
    if strategy.phases()[0][1] > 0:
        model.set_mask_ratio(strategy.phases()[0][1])
    ctx = LossContext(model, modules)
    runner = StepRunner(TrainModule(model, strategy, ctx), strategy, ctx, k, contextlib.nullcontext,
                        lambda x: x, torch.device("cpu"))
    torch.manual_seed(123)  # the masks' draws
    loss, terms = runner.run(batch)
    params = dict(model.named_parameters())
    params.update({f"modules.{n}": p for n, p in modules.named_parameters()})
    return loss, {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}, modules


@pytest.mark.parametrize("strategy,loss,extra", [
    ("clip", "clip", 0), ("clip", "siglip", 0), ("flip", "clip", 0), ("slip", "clip", 2), ("clip_aug", "clip", 0),
])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulated_gradient_equals_one_batch(strategy, loss, extra, k, dtype):
    """fp32: every gradient tensor within 1e-5 of its largest entry (the scalar logit scale and bias,
    sums with cancellation over the whole batch, within 1e-5 of the largest gradient entry of the
    model); fp64: 1e-10, which shows that the only difference is the order of summation."""
    batch = random_batch(8, views=extra, seed=1)
    loss1, g1, mods1 = _grads(strategy, 1, batch, loss=loss, dtype=dtype)
    lossk, gk, modsk = _grads(strategy, k, batch, loss=loss, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(lossk, loss1, rtol=tol, atol=tol)
    assert g1.keys() == gk.keys()
    assert "logit_scale" in g1
    largest = max(g.abs().max().item() for g in g1.values())
    for name in g1:
        scale = largest if g1[name].dim() == 0 else g1[name].abs().max().item() + 1e-30
        err = (gk[name] - g1[name]).abs().max().item()
        assert err <= tol * scale, f"{strategy}/{loss} k={k}: {name} differs by {err:.3g} (scale {scale:.3g})"
    if strategy == "slip":  # BatchNorm statistics updated once, on the whole batch, in both
        for (n, b1), (_, bk) in zip(mods1.named_buffers(), modsk.named_buffers()):
            torch.testing.assert_close(bk, b1, rtol=tol, atol=tol)


def test_split_batch_keeps_rows_and_views():
    batch = random_batch(8, views=2)
    parts = split_batch(batch, 4)
    assert len(parts) == 4
    assert torch.equal(torch.cat([p["images"] for p in parts]), batch["images"])
    assert torch.equal(torch.cat([p["views"][1] for p in parts]), batch["views"][1])


def test_non_finite_loss_does_not_backpropagate():
    batch = random_batch(4)
    batch["images"][0, 0, 0, 0] = float("nan")
    strategy = build_strategy(StrategyConfig(name="clip"))
    torch.manual_seed(0)
    model = create_model("ViT-Ti-16", image_size=32, **TINY)
    ctx = LossContext(model, nn.ModuleDict())
    for k in (1, 2):
        runner = StepRunner(TrainModule(model, strategy, ctx), strategy, ctx, k, contextlib.nullcontext,
                            lambda x: x, torch.device("cpu"))
        loss, terms = runner.run(batch)
        assert loss is None and not torch.isfinite(terms["contrastive"])
        assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# The optimizer: torch's fused AdamW on CPU, the same updates as the per-tensor loop
# ----------------------------------------------------------------------------------------------
def _adamw_pair():
    from fastclip.train.config import OptimConfig
    from fastclip.train.step import build_optimizer, param_groups

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4))
    twin = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4))
    twin.load_state_dict(net.state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(net.named_parameters(), cfg, torch.device("cpu"))
    loop = torch.optim.AdamW(param_groups(twin.named_parameters(), cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    return net, twin, opt, loop


def _steps(pairs, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 12, generator=g)
        for net, opt in pairs:
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()


def test_build_optimizer_is_fused_adamw_on_cpu_with_the_loops_updates():
    from fastclip.train.step import FUSED_DEVICES

    net, twin, opt, loop = _adamw_pair()
    assert "cpu" in FUSED_DEVICES
    assert all(g["fused"] is True and not g["foreach"] for g in opt.param_groups)
    _steps([(net, opt), (twin, loop)], 30)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_restore_optimizer_keeps_the_built_implementation_and_the_saved_moments():
    """A state written by a per-tensor-loop AdamW (an older fastclip, another device) resumes on
    the fused kernel with its moments, and goes on as the loop does."""
    from fastclip.train.step import restore_optimizer

    net, twin, opt, loop = _adamw_pair()
    _steps([(twin, loop)], 5)
    net.load_state_dict(twin.state_dict())
    saved = copy.deepcopy(loop.state_dict())  # as a checkpoint holds it: not the loop's own tensors
    assert saved["param_groups"][0]["fused"] is None
    restore_optimizer(opt, saved)
    assert all(g["fused"] is True for g in opt.param_groups)
    assert opt.param_groups[0]["lr"] == loop.param_groups[0]["lr"]
    first = next(iter(opt.state.values()))
    assert int(first["step"]) == 5
    _steps([(net, opt), (twin, loop)], 5, seed=2)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
