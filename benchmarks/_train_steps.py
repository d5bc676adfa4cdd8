"""Training steps as the trainer runs them, for the benchmarks that time them (test_train_bench.py,
test_budget_bench.py): one strategy's model, modules, step runner and optimiser, and the batches.

Not a test module: the benchmark files import it (pytest puts this folder on ``sys.path``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import random

import torch
from torch import nn

from fastclip.data import AugmentConfig
from fastclip.data.synthetic import describe, sample_scene
from fastclip.flops import text_flops
from fastclip.models import CLIPConfig, create_model
from fastclip.train import OptimConfig, StrategyConfig, build_strategy
from fastclip.train.step import StepRunner, TrainModule, build_optimizer, optimizer_step
from fastclip.train.strategies import LossContext

__all__ = ["STRATEGIES", "FastclipRun", "sync", "autocast_dtype", "autocast_factory", "captions", "memory_batch",
           "tokens_run"]

STRATEGIES = {  # label -> StrategyConfig fields
    "clip": {"name": "clip"},
    "flip0.5": {"name": "flip", "mask_ratio": 0.5},
    "flip0.75": {"name": "flip", "mask_ratio": 0.75},
    "slip": {"name": "slip"},
    "clip_aug": {"name": "clip_aug"},
}

def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def autocast_dtype(dev: torch.device):
    # The trainer's optim.precision="auto": bf16 autocast on CUDA, fp32 on CPU.
    return torch.bfloat16 if dev.type == "cuda" else None


def autocast_factory(dev: torch.device):
    dtype = autocast_dtype(dev)

    def autocast():
        return contextlib.nullcontext() if dtype is None else torch.autocast(dev.type, dtype=dtype)
    return autocast


class FastclipRun:
    """One strategy's model, modules, step runner and optimiser, and its optimiser step."""

    def __init__(self, model_name: str, image_size: int, strategy_label: str, dev: torch.device, seed: int = 0,
                 overrides: dict | None = None):
        # ``overrides``: config fields over the named model's (the demo's DEMO_MODEL["overrides"]); the
        # strategy's own overrides apply last, as in the trainer.
        self.label, self.dev = strategy_label, dev
        self.strategy = build_strategy(StrategyConfig(**STRATEGIES[strategy_label]))
        self.config = CLIPConfig.from_name(model_name, image_size=image_size,
                                           **{**(overrides or {}), **self.strategy.model_overrides()})
        torch.manual_seed(seed)
        self.model = create_model(dataclasses.replace(self.config), device=dev).train()
        self.modules = nn.ModuleDict(self.strategy.build_modules(self.model)).to(dev)
        self.ctx = LossContext(self.model, self.modules)
        self.runner = StepRunner(TrainModule(self.model, self.strategy, self.ctx), self.strategy, self.ctx, 1,
                                 autocast_factory(dev), lambda loss: loss, dev)
        params = list(self.model.named_parameters()) + [(f"modules.{n}", p)
                                                        for n, p in self.modules.named_parameters()]
        self.optimizer = build_optimizer(params, OptimConfig(), dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=False)  # the trainer's, outside fp16
        self.params = [p for _, p in params]
        self.mask_ratio = self.strategy.phases()[0][1]  # the first phase's
        if hasattr(self.model.visual, "mask_ratio"):
            self.model.set_mask_ratio(self.mask_ratio)
        self.augment = self.strategy.augment(AugmentConfig.from_name("clip", image_size=image_size))
        self.nonfinite_steps = 0

    def step(self, batch: dict) -> None:
        loss, _ = self.runner.run(batch)
        if loss is None:  # the trainer's on_nan=skip; counted and recorded (random data, fixed lr)
            self.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            optimizer_step(self.optimizer, self.scaler, self.params, self.model)
        sync(self.dev)

    def train_gflops(self, tokens_run: int) -> tuple:
        """(the strategy's training GFLOPs per sample, those actually run).  The strategy counts the
        text tower at 77 tokens; every strategy here encodes the captions once, so the difference
        is 3x the text tower's forward at 77 tokens minus at ``tokens_run``."""
        counted = self.strategy.flops(self.config, self.mask_ratio)
        t = self.config.text_cfg
        if not getattr(self.model, "trim_padding", True):
            tokens_run = t.context_length
        cut = 3 * (text_flops(t, self.config.embed_dim) - text_flops(t, self.config.embed_dim, tokens=tokens_run)) / 1e9
        return counted, counted - cut


def captions(n: int) -> list:
    rng = random.Random("fastclip-train-bench")
    return [describe(sample_scene(rng)) for _ in range(n)]


def memory_batch(run: FastclipRun, batch: int, image_size: int, tokenizer) -> dict:
    g = torch.Generator().manual_seed(0)

    def images():
        return torch.randn(batch, 3, image_size, image_size, generator=g).to(run.dev)
    return {"images": images(), "tokens": tokenizer(captions(batch)).to(run.dev),
            "views": [images() for _ in range(run.augment.extra_views)]}


def tokens_run(tokens: torch.Tensor) -> int:
    return int(tokens.argmax(-1).max()) + 1  # the end token has the largest id
