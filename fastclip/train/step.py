"""One optimiser step's forward and backward, with exact gradient accumulation.

``accum_steps = 1``: encode the batch, compute the loss terms, backward.

``accum_steps = k > 1`` (GradCache, as open_clip's ``accum_freq``, with the loss computed once):

1. encode the k micro-batches without gradients, keeping the features and the RNG state each
   started from (patch masking draws from it);
2. compute the loss on the concatenated features (every negative of the accumulated batch) and
   backpropagate it to the features (and to the parameters the loss itself uses: the logit scale
   and bias, SLIP's head);
3. re-encode each micro-batch with gradients from its saved RNG state (so the same patches are
   dropped) and backpropagate the cached feature gradients into the towers.

The result is the gradient of the one-batch loss (up to floating-point summation order), at the
price of one more forward pass.  Under DDP the re-encodes of micro-batches 1..k-1 run in
``no_sync``; the last one all-reduces the accumulated gradients.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from .strategies import LossContext, StrategyStack

__all__ = ["TrainModule", "StepRunner", "split_batch", "batch_dict", "rng_state", "set_rng_state", "param_groups",
           "build_optimizer", "restore_optimizer", "optimizer_step", "FUSED_DEVICES"]


class TrainModule(nn.Module):
    """The module DDP wraps: ``forward(batch)`` runs the strategy's ``encode`` on the CLIP model."""

    def __init__(self, model: nn.Module, strategy: StrategyStack, ctx: LossContext):
        super().__init__()
        self.model = model
        self._strategy = strategy
        self._ctx = ctx

    def forward(self, batch: dict) -> dict:
        out: dict = {}
        self._strategy.encode(self._ctx, batch, out)
        return out


def batch_dict(batch: tuple, extra_views: int) -> dict:
    """A loader batch ``(images, tokens, *views, ...)`` as the dict the strategies read."""
    return {"images": batch[0], "tokens": batch[1], "views": list(batch[2:2 + extra_views])}


def param_groups(named_params, weight_decay: float) -> list:
    """AdamW groups: weight decay on matrices (ndim >= 2), none on gains, biases and the logit
    scale and bias (open_clip's rule)."""
    named_params = list(named_params)
    decay = [p for n, p in named_params if p.ndim >= 2 and "logit" not in n]
    no_decay = [p for n, p in named_params if not (p.ndim >= 2 and "logit" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel runs


def _implementation(device: torch.device) -> dict:
    """AdamW's fused kernel on CPU and CUDA (one pass over each parameter; on CPU several times
    the per-tensor loop and the ``foreach`` path: benchmarks/RESULTS.md), ``foreach`` elsewhere."""
    if device.type in FUSED_DEVICES:
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": True}


def build_optimizer(named_params, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` with ``cfg`` (an :class:`~fastclip.train.config.OptimConfig`)."""
    return torch.optim.AdamW(param_groups(named_params, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **_implementation(device))


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the implementation it was built with: a saved
    state carries its writer's ``fused``/``foreach`` flags (another device, an older fastclip),
    which would otherwise replace them.  The moments and hyper-parameters come from ``state``."""
    kept = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for g, flags in zip(optimizer.param_groups, kept):
        g.update(flags)


def optimizer_step(optimizer, scaler, params: list, model: nn.Module, grad_clip=None,
                   max_logit_scale: float = 100.0):
    """What follows a step's backward: unscale and clip (when ``grad_clip``), the AdamW step through
    the grad scaler, zeroed gradients, the logit scale clamped to [1, max_logit_scale] (as a
    temperature; the parameter is its log).  Returns the gradient norm before clipping, or None."""
    norm = None
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_logit_scale))
    return norm


def split_batch(batch: dict, k: int) -> list:
    """k micro-batches of a batch dict (tensors split along dim 0, lists of tensors likewise)."""
    def part(v, i):
        if isinstance(v, torch.Tensor):
            n = v.shape[0] // k
            return v[i * n:(i + 1) * n]
        if isinstance(v, (list, tuple)):
            return type(v)(part(x, i) for x in v)
        return v
    return [{key: part(v, i) for key, v in batch.items()} for i in range(k)]


def rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _dot(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum(x * g) at fp32 or better: its gradient with respect to x is g."""
    acc = torch.promote_types(torch.promote_types(x.dtype, g.dtype), torch.float32)
    return (x.to(acc) * g.to(acc)).sum()


class StepRunner:
    """Forward + backward of one step; returns the loss terms (detached) or None where the loss is
    not finite (nothing is backpropagated then)."""

    def __init__(self, module: nn.Module, strategy: StrategyStack, ctx: LossContext, accum_steps: int,
                 autocast: Callable[[], contextlib.AbstractContextManager], scale_loss: Callable,
                 device: torch.device):
        self.module = module
        self.strategy = strategy
        self.ctx = ctx
        self.k = accum_steps
        self.autocast = autocast
        self.scale_loss = scale_loss
        self.device = device

    def _loss(self, feats: dict) -> tuple:
        terms: dict = {}
        self.strategy.losses(self.ctx, feats, terms)
        total = sum(terms.values())
        return total, terms

    def run(self, batch: dict):
        if self.k == 1:
            with self.autocast():
                feats = self.module(batch)
            total, terms = self._loss(feats)
            if not bool(torch.isfinite(total.detach())):
                return None, terms
            self.scale_loss(total).backward()
            return total.detach(), {k: v.detach() for k, v in terms.items()}
        micro = split_batch(batch, self.k)
        states, cached = [], []
        with torch.no_grad():
            for m in micro:
                states.append(rng_state(self.device))
                with self.autocast():
                    cached.append(self.module(m))
        after = rng_state(self.device)
        feats = {key: torch.cat([c[key] for c in cached]).detach().requires_grad_(True) for key in cached[0]}
        total, terms = self._loss(feats)
        if not bool(torch.isfinite(total.detach())):
            return None, terms
        self.scale_loss(total).backward()
        grads = {key: (f.grad if f.grad is not None else torch.zeros_like(f)) for key, f in feats.items()}
        model = self.ctx.model
        tied = [p for p in (model.logit_scale, getattr(model, "logit_bias", None)) if p is not None]
        for i, m in enumerate(micro):
            set_rng_state(states[i], self.device)
            last = i == self.k - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.module, "no_sync") else self.module.no_sync()
            with sync:
                with self.autocast():
                    out = self.module(m)
                n = next(iter(out.values())).shape[0]
                surrogate = sum(_dot(out[key], grads[key][i * n:(i + 1) * n]) for key in out)
                if last:
                    # The loss step already put d loss / d logit_scale into .grad; a zero term makes the
                    # parameters part of this backward so that DDP all-reduces their gradient too.
                    surrogate = surrogate + sum(0.0 * p.sum() for p in tied)
                surrogate.backward()
        set_rng_state(after, self.device)
        return total.detach(), {k: v.detach() for k, v in terms.items()}
