"""Functional ops.  Each op lives in one file with its reference twin, kernels and autograd Function."""
from .clip_loss import clip_loss, clip_loss_reference
from .siglip_loss import siglip_loss, siglip_loss_reference

__all__ = ["clip_loss", "clip_loss_reference", "siglip_loss", "siglip_loss_reference"]
