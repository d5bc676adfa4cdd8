"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``.

Same constructor arguments, same ``forward`` signature, same return types: an open_clip trainer
swaps ``from open_clip.loss import ClipLoss`` for ``from fastclip import ClipLoss`` and nothing
else changes.  fastclip's own options (``backend``, ``chunk_size``, ``label_smoothing``) are
keyword-only extras with defaults.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.clip_loss import clip_loss
from ..ops.siglip_loss import siglip_loss

__all__ = ["ClipLoss", "SigLipLoss"]


def _check_dist_args(rank, world_size):
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not (0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


class ClipLoss(nn.Module):
    """Symmetric InfoNCE loss, O(N) memory (see :func:`fastclip.ops.clip_loss`).

    Args (open_clip's): local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod.
    Args (fastclip's, keyword-only): backend, chunk_size, label_smoothing.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto",
                 chunk_size: Optional[int] = None, label_smoothing: float = 0.0):
        super().__init__()
        _check_dist_args(rank, world_size)
        if use_horovod:
            raise NotImplementedError("use_horovod=True is not supported by fastclip; use torch.distributed")
        if world_size > 1:
            raise NotImplementedError(
                "fastclip.ClipLoss with world_size > 1 arrives with the distributed loss; "
                "use world_size=1 (one process) for now")
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
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                         chunk_size=self.chunk_size, label_smoothing=self.label_smoothing)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """Sigmoid loss, O(N) memory (see :func:`fastclip.ops.siglip_loss`).

    Args (open_clip's, old and new releases): cache_labels, rank, world_size, bidir, use_horovod,
    dist_impl.  Args (fastclip's, keyword-only): backend, chunk_size.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, bidir: bool = True,
                 use_horovod: bool = False, dist_impl: Optional[str] = None, *, backend: str = "auto",
                 chunk_size: Optional[int] = None):
        super().__init__()
        _check_dist_args(rank, world_size)
        if use_horovod:
            raise NotImplementedError("use_horovod=True is not supported by fastclip; use torch.distributed")
        if world_size > 1:
            raise NotImplementedError(
                "fastclip.SigLipLoss with world_size > 1 arrives with the distributed loss; "
                "use world_size=1 (one process) for now")
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
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                           chunk_size=self.chunk_size)
        return {"contrastive_loss": loss} if output_dict else loss
