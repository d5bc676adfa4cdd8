"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``.

Same constructor arguments, same ``forward`` signature, same return types: an open_clip trainer
swaps ``from open_clip.loss import ClipLoss`` for ``from fastclip import ClipLoss`` and nothing
else changes.  fastclip's own options (``backend``, ``chunk_size``, ``label_smoothing``,
``dist_mode``, ``group``) are keyword-only extras with defaults.

With ``world_size > 1`` the losses run over the ranks of a torch.distributed group
(:mod:`fastclip.ops.distributed_loss`): by default in fastclip's memory-lean mode, which returns
the exact global-batch loss on every rank and, after DDP's gradient average, the single-process
gradients; ``dist_mode="open_clip"`` reproduces open_clip's ``local_loss``/``gather_with_grad``
modes exactly (values and gradients), without materialising logits.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.clip_loss import clip_loss
from ..ops.distributed_loss import distributed_clip_loss, distributed_siglip_loss
from ..ops.siglip_loss import siglip_loss
from ..ops.simclr_loss import check_temperature, check_views, simclr_loss

__all__ = ["ClipLoss", "SigLipLoss", "SimCLRLoss"]

_DIST_MODES = ("lean", "open_clip")
_SIGLIP_DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")


def _check_dist_args(rank, world_size):
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not (0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def _check_dist_mode(dist_mode):
    if dist_mode not in _DIST_MODES:
        raise ValueError(f"dist_mode must be one of {_DIST_MODES}, got {dist_mode!r}")


class ClipLoss(nn.Module):
    """Symmetric InfoNCE loss, O(N) memory (see :func:`fastclip.ops.clip_loss`).

    Args (open_clip's): local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod.
    Args (fastclip's, keyword-only): backend, chunk_size, label_smoothing, and for world_size > 1:

    * ``dist_mode="lean"`` (default): :func:`fastclip.ops.distributed_clip_loss`'s lean mode.  Every
      rank returns the global-batch loss (open_clip's ``local_loss=False`` value); the gradients
      after DDP's average are the single-process ones, i.e. open_clip's ``gather_with_grad=True``
      gradients, whatever ``local_loss``/``gather_with_grad`` say (they are kept as attributes).
    * ``dist_mode="open_clip"``: open_clip's own modes, ``local_loss`` and ``gather_with_grad``
      with open_clip's meaning (per-rank values and gradients identical to open_clip's).
    * ``group``: the torch.distributed process group (None: the default group); ``rank`` and
      ``world_size`` must be this process's rank in it and its size (checked on every call).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto",
                 chunk_size: Optional[int] = None, label_smoothing: float = 0.0, dist_mode: str = "lean",
                 group=None):
        super().__init__()
        _check_dist_args(rank, world_size)
        if use_horovod:
            raise NotImplementedError("use_horovod=True is not supported by fastclip; use torch.distributed")
        _check_dist_mode(dist_mode)
        self.dist_mode = dist_mode
        self.group = group
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: fastclip builds no label tensor
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.chunk_size = chunk_size
        self.label_smoothing = label_smoothing

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        if self.world_size > 1:
            open_clip = self.dist_mode == "open_clip"
            mode = ("local" if self.local_loss else "gather") if open_clip else "lean"
            loss = distributed_clip_loss(
                image_features, text_features, logit_scale, logit_bias, group=self.group, mode=mode,
                gather_with_grad=bool(self.gather_with_grad) and open_clip, backend=self.backend,
                chunk_size=self.chunk_size, label_smoothing=self.label_smoothing,
                expect=(self.rank, self.world_size))
        else:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                             chunk_size=self.chunk_size, label_smoothing=self.label_smoothing)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """Sigmoid loss, O(N) memory (see :func:`fastclip.ops.siglip_loss`).

    Args (open_clip's, old and new releases): cache_labels, rank, world_size, bidir, use_horovod,
    dist_impl.  Args (fastclip's, keyword-only): backend, chunk_size, group.

    With world_size > 1 every ``dist_impl`` (open_clip's "bidir", "shift", "reduce", "gather")
    runs :func:`fastclip.ops.distributed_siglip_loss`: the same loss open_clip's exchanges compute,
    returned as the global-batch value on every rank, with the single-process gradients after
    DDP's average.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, bidir: bool = True,
                 use_horovod: bool = False, dist_impl: Optional[str] = None, *, backend: str = "auto",
                 chunk_size: Optional[int] = None, group=None):
        super().__init__()
        _check_dist_args(rank, world_size)
        if use_horovod:
            raise NotImplementedError("use_horovod=True is not supported by fastclip; use torch.distributed")
        if dist_impl not in _SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {_SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
        self.group = group
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.bidir = bidir
        self.use_horovod = use_horovod
        self.dist_impl = dist_impl
        self.backend = backend
        self.chunk_size = chunk_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        if self.world_size > 1:
            loss = distributed_siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                           group=self.group, backend=self.backend, chunk_size=self.chunk_size,
                                           expect=(self.rank, self.world_size))
        else:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                               chunk_size=self.chunk_size)
        return {"contrastive_loss": loss} if output_dict else loss


class SimCLRLoss(nn.Module):
    """SLIP's SimCLR (NT-Xent) term over two augmented views, O(N) memory (see
    :func:`fastclip.ops.simclr_loss`).

    ``forward(view1, view2)`` takes the raw [N, D] embeddings of the two views, L2-normalises each
    row and returns the 0-dim loss; ``temperature`` (default 0.1, as SLIP) is fixed.  Single
    process: a multi-rank trainer gathers the views across ranks before calling it.
    """

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto",
                 chunk_size: Optional[int] = None):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.backend = backend
        self.chunk_size = chunk_size

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        check_views(view1, view2)  # before F.normalize, whose errors would not name the argument
        return simclr_loss(F.normalize(view1, dim=-1), F.normalize(view2, dim=-1), self.temperature,
                           backend=self.backend, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}, chunk_size={self.chunk_size}"
