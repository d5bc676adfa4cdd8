"""Functional ops.  Each op lives in one file with its reference twin, kernels and autograd Function."""
from .attention import attention, attention_reference
from .clip_loss import clip_loss, clip_loss_reference
from .distributed_loss import DistributedInputError, distributed_clip_loss, distributed_siglip_loss
from .patch_mask import patch_mask, patch_mask_reference
from .siglip_loss import siglip_loss, siglip_loss_reference
from .simclr_loss import simclr_loss, simclr_loss_reference

__all__ = ["clip_loss", "clip_loss_reference", "siglip_loss", "siglip_loss_reference",
           "simclr_loss", "simclr_loss_reference",
           "distributed_clip_loss", "distributed_siglip_loss", "DistributedInputError",
           "attention", "attention_reference", "patch_mask", "patch_mask_reference"]
