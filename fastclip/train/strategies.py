"""Training strategies: small classes with the hooks the trainer calls, composed by name.

    strategy = build_strategy("flip+clip_aug", StrategyConfig(mask_ratio=0.75, unmasked_fraction=0.1))

The trainer never asks which strategy it runs.  It calls, in this order:

* ``model_overrides()``           ``create_model`` overrides (SigLIP's initial scale and bias);
* ``augment(cfg)``                the loader's augmentation (``clip``; ``clip_aug`` for strong
                                  augmentation; two extra ``clip_aug`` views for SLIP);
* ``build_modules(model)``        extra trained modules (SLIP's projection head);
* ``phases()``                    ``[(end_progress, mask_ratio), ...]``: FLIP masks patches for the
                                  first ``1 - unmasked_fraction`` of the budget, then tunes unmasked;
* ``flops(config, mask_ratio)``   training GFLOPs per sample (3 x the forward) in a phase;
* ``encode(ctx, batch, out)``     per-sample features of one (micro-)batch, into ``out``;
* ``losses(ctx, feats, out)``     loss terms from the features of the whole local batch, into ``out``.

``encode`` and ``losses`` are split so that gradient accumulation can cache features: ``encode``
runs per micro-batch, ``losses`` once on all of them (every negative of the accumulated batch).
Every feature tensor has one row per sample of the batch it came from.

Strategies (``STRATEGIES``): ``clip`` (the contrastive loss on the two towers, ``loss: clip`` or
``siglip``), ``flip`` (patch masking, then optional unmasked tuning in the same run), ``slip``
(CLIP + ``ssl_scale`` x SimCLR on two strongly augmented views through SLIP's MLP head with
BatchNorm), ``clip_aug`` (CLIP with the ``clip_aug`` preset).  Combine them with ``+``; the
contrastive part is always there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import AugmentConfig
from ..flops import model_flops
from ..nn.loss import ClipLoss, SigLipLoss, SimCLRLoss
from .config import ConfigError, StrategyConfig

__all__ = ["Strategy", "Contrastive", "Flip", "Slip", "StrongAugment", "StrategyStack", "SlipHead",
           "STRATEGIES", "build_strategy", "LossContext"]


@dataclass
class LossContext:
    """What the hooks see: the unwrapped model, the strategy's modules, the process group."""

    model: nn.Module
    modules: nn.ModuleDict
    rank: int = 0
    world_size: int = 1
    group: object = None


class Strategy:
    """One strategy's hooks; each default does nothing."""

    name = "base"

    def model_overrides(self) -> dict:
        return {}

    def augment(self, cfg: AugmentConfig) -> AugmentConfig:
        return cfg

    def build_modules(self, model: nn.Module) -> dict:
        return {}

    def phases(self) -> Optional[list]:
        return None

    def flops(self, config, mask_ratio: float) -> float:
        return 0.0

    def encode(self, ctx: LossContext, batch: dict, out: dict) -> None:
        pass

    def losses(self, ctx: LossContext, feats: dict, out: dict) -> None:
        pass

    def describe(self) -> str:
        return self.name


class Contrastive(Strategy):
    """CLIP's two towers and fastclip's contrastive loss (InfoNCE or SigLIP), across ranks when
    there are several (the global-batch loss, exact gradients after DDP's average)."""

    name = "clip"

    def __init__(self, cfg: StrategyConfig):
        self.loss_name = cfg.loss
        self.label_smoothing = cfg.label_smoothing
        self._loss_fn = None

    def model_overrides(self) -> dict:
        # SigLIP's initialisation (its paper's t' = log 10, b = -10).
        return {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0} if self.loss_name == "siglip" else {}

    def flops(self, config, mask_ratio: float) -> float:
        return model_flops(config, mask_ratio=mask_ratio).train

    def encode(self, ctx, batch, out):
        model = ctx.model
        out["image"] = F.normalize(model.encode_image(batch["images"]), dim=-1)
        out["text"] = F.normalize(model.encode_text(batch["tokens"]), dim=-1)

    def _loss(self, ctx):
        if self._loss_fn is None:
            kw = dict(rank=ctx.rank, world_size=ctx.world_size, group=ctx.group)
            self._loss_fn = (SigLipLoss(**kw) if self.loss_name == "siglip"
                             else ClipLoss(label_smoothing=self.label_smoothing, **kw))
        return self._loss_fn

    def losses(self, ctx, feats, out):
        model = ctx.model
        scale = model.logit_scale.exp()
        img, txt = feats["image"], feats["text"]
        if img.dtype != txt.dtype:
            img, txt = img.float(), txt.float()
        if self.loss_name == "siglip":
            if model.logit_bias is None:
                raise ConfigError("strategy.loss=siglip needs a model with a logit bias (init_logit_bias)")
            out["contrastive"] = self._loss(ctx)(img, txt, scale, model.logit_bias)
        else:
            out["contrastive"] = self._loss(ctx)(img, txt, scale)

    def describe(self):
        return f"clip(loss={self.loss_name})"


class Flip(Strategy):
    """FLIP: drop ``mask_ratio`` of the image patches for the first ``1 - unmasked_fraction`` of
    the budget, then train unmasked for the rest, in the same run."""

    name = "flip"

    def __init__(self, cfg: StrategyConfig):
        if not 0 < cfg.mask_ratio < 1:
            raise ConfigError(f"strategy.mask_ratio must be in (0, 1) for flip, got {cfg.mask_ratio}")
        self.mask_ratio = cfg.mask_ratio
        self.unmasked_fraction = cfg.unmasked_fraction

    def phases(self):
        if self.unmasked_fraction > 0:
            return [(1.0 - self.unmasked_fraction, self.mask_ratio), (1.0, 0.0)]
        return [(1.0, self.mask_ratio)]

    def describe(self):
        return f"flip(mask_ratio={self.mask_ratio}, unmasked_fraction={self.unmasked_fraction})"


class StrongAugment(Strategy):
    """CLIP+Aug: the ``clip_aug`` preset (random-resized crop from 8%, colour jitter, grayscale,
    blur, flip) on the contrastive view."""

    name = "clip_aug"

    def __init__(self, cfg: StrategyConfig):
        pass

    def augment(self, cfg):
        strong = AugmentConfig.from_name("clip_aug", image_size=cfg.image_size)
        return AugmentConfig.from_name(strong, extra_views=cfg.extra_views, view=cfg.view,
                                       preset=cfg.preset if cfg.extra_views else "clip_aug")


def _round_to(x: float, m: int, lo: int) -> int:
    return max(lo, int(round(x / m)) * m)


class SlipHead(nn.Sequential):
    """SLIP's image MLP: Linear-BN-ReLU, Linear-BN-ReLU, Linear (hidden 4096, out 256 at ViT-B
    width 768; scaled with the tower's width by default)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim))
        self.dims = (in_dim, hidden_dim, out_dim)


def _pooled_dim(config) -> int:
    """Width of the image tower's pooled features (a ResNet's attention pool projects them already)."""
    v = config.vision_cfg
    return config.embed_dim if v.is_resnet else v.width


def _pooled(model, images):
    visual = model.visual
    fn = getattr(visual, "forward_features", None)
    return fn(images) if fn is not None else visual(images)


class Slip(Strategy):
    """SLIP: the contrastive loss plus ``ssl_scale`` x SimCLR between two ``clip_aug`` views of each
    image (the image tower's pooled features -> :class:`SlipHead` -> :func:`fastclip.ops.simclr_loss`,
    temperature 0.1).  Across ranks the pooled features are gathered and the head and the loss run
    on the global batch on every rank (BatchNorm sees the global batch, as single-process training)."""

    name = "slip"

    def __init__(self, cfg: StrategyConfig):
        self.scale = cfg.ssl_scale
        self.temperature = cfg.ssl_temperature
        self.hidden_dim, self.out_dim = cfg.ssl_hidden_dim, cfg.ssl_out_dim
        self._loss = SimCLRLoss(self.temperature)

    def augment(self, cfg):
        view = AugmentConfig.from_name("clip_aug", image_size=cfg.image_size)
        return AugmentConfig.from_name(cfg, extra_views=2, view=view,
                                       preset="simclr" if cfg.preset == "clip" else cfg.preset)

    def head_dims(self, config) -> tuple:
        """(in, hidden, out) of the head for a model ``config``: the configured sizes, else SLIP's
        4096 / 256 at ViT-B width 768, scaled with the tower's width."""
        width = _pooled_dim(config)
        return (width, self.hidden_dim or _round_to(4096 * width / 768, 32, 64),
                self.out_dim or _round_to(256 * width / 768, 16, 32))

    def build_modules(self, model):
        return {"slip_head": SlipHead(*self.head_dims(model.config))}

    def flops(self, config, mask_ratio):
        i, h, o = self.head_dims(config)
        head = 2.0 * (i * h + h * h + h * o) / 1e9
        return 2 * 3.0 * (model_flops(config, mask_ratio=mask_ratio).image + head)

    def encode(self, ctx, batch, out):
        views = batch.get("views") or []
        if len(views) < 2:
            raise ValueError("slip needs two extra views per sample; the loader's augmentation must have "
                             "extra_views=2 (the trainer sets it from the strategy)")
        b = views[0].shape[0]
        pooled = _pooled(ctx.model, torch.cat([views[0], views[1]]))
        out["ssl_view1"], out["ssl_view2"] = pooled[:b], pooled[b:]

    def losses(self, ctx, feats, out):
        v1, v2 = feats["ssl_view1"], feats["ssl_view2"]
        if ctx.world_size > 1:
            from ..distributed import all_gather_with_grad
            v1, v2 = all_gather_with_grad(v1, ctx.group), all_gather_with_grad(v2, ctx.group)
        head = ctx.modules["slip_head"]
        dtype = head[0].weight.dtype  # the head runs in its parameters' precision (fp32 under autocast)
        h1, h2 = head(v1.to(dtype)), head(v2.to(dtype))
        loss = self._loss(h1, h2)
        out["ssl"] = loss * self.scale

    def describe(self):
        return f"slip(ssl_scale={self.scale}, temperature={self.temperature})"


STRATEGIES = {"clip": None, "flip": Flip, "slip": Slip, "clip_aug": StrongAugment}


class StrategyStack(Strategy):
    """Several strategies applied together; the contrastive part is always first."""

    def __init__(self, parts: list):
        self.parts = parts
        self.name = "+".join(p.name for p in parts[1:]) or "clip"

    def model_overrides(self):
        out = {}
        for p in self.parts:
            out.update(p.model_overrides())
        return out

    def augment(self, cfg):
        for p in self.parts:
            cfg = p.augment(cfg)
        return cfg

    def build_modules(self, model):
        out = {}
        for p in self.parts:
            out.update(p.build_modules(model))
        return out

    def phases(self):
        found = [ph for ph in (p.phases() for p in self.parts) if ph is not None]
        return found[0] if found else [(1.0, 0.0)]

    def flops(self, config, mask_ratio):
        return sum(p.flops(config, mask_ratio) for p in self.parts)

    def encode(self, ctx, batch, out):
        for p in self.parts:
            p.encode(ctx, batch, out)

    def losses(self, ctx, feats, out):
        for p in self.parts:
            p.losses(ctx, feats, out)

    def describe(self):
        return " + ".join(p.describe() for p in self.parts)


def build_strategy(cfg: StrategyConfig) -> StrategyStack:
    """The strategy named by ``cfg.name`` (``clip``, ``flip``, ``slip``, ``clip_aug`` or several joined by
    ``+``); unknown names are refused with the list."""
    names = [n.strip() for n in str(cfg.name).split("+") if n.strip()]
    if not names:
        raise ConfigError(f"strategy.name must name a strategy, one of {sorted(STRATEGIES)}, got {cfg.name!r}")
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategy {unknown[0]!r} in strategy.name={cfg.name!r}; known: "
                          f"{', '.join(sorted(STRATEGIES))} (combine with '+', e.g. flip+clip_aug)")
    if len(set(names)) != len(names):
        raise ConfigError(f"strategy.name={cfg.name!r} names a strategy twice")
    parts = [Contrastive(cfg)] + [STRATEGIES[n](cfg) for n in names if n != "clip"]
    return StrategyStack(parts)
