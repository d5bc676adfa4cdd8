"""Tasks the ranks of a gloo DistPool run for the training tests, and their one-process oracle."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from fastclip.models import create_model
from fastclip.train.config import StrategyConfig
from fastclip.train.step import StepRunner, TrainModule
from fastclip.train.strategies import LossContext, build_strategy

from ._tiny import TINY, random_batch


def _rows(batch: dict, rows: slice) -> dict:
    return {"images": batch["images"][rows], "tokens": batch["tokens"][rows],
            "views": [v[rows] for v in batch["views"]]}


def step_grads(strategy_name: str, loss: str, n: int, views: int, accum: int, rank: int = 0, world: int = 1):
    """Gradients (model and strategy modules) of one step on this rank's rows of a fixed batch of n,
    in fp64; with world > 1 through DDP and the distributed losses (after DDP's average)."""
    strategy = build_strategy(StrategyConfig(name=strategy_name, loss=loss))
    torch.manual_seed(0)
    model = create_model("ViT-Ti-16", image_size=32, **TINY, **strategy.model_overrides()).double()
    modules = nn.ModuleDict(strategy.build_modules(model)).double()
    ctx = LossContext(model, modules, rank, world)
    module = TrainModule(model, strategy, ctx)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)
    runner = StepRunner(module, strategy, ctx, accum, contextlib.nullcontext, lambda x: x, torch.device("cpu"))
    batch = random_batch(n, views=views, seed=5)
    batch = {k: (v.double() if k == "images" else [x.double() for x in v] if k == "views" else v)
             for k, v in batch.items()}
    per = n // world
    total, _ = runner.run(_rows(batch, slice(rank * per, (rank + 1) * per)))
    params = dict(model.named_parameters())
    params.update({f"modules.{k}": p for k, p in modules.named_parameters()})
    grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    bn = {k: b.clone() for k, b in modules.named_buffers()}
    return float(total), grads, bn


def ddp_step_grads(strategy_name: str, loss: str, n: int, views: int, accum: int):
    return step_grads(strategy_name, loss, n, views, accum, dist.get_rank(), dist.get_world_size())
