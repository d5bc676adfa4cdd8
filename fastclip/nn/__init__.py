"""Thin nn.Modules over fastclip.ops."""
from .loss import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
