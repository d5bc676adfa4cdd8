"""Functional ops.

Each op lives in ``ops/<op>.py``: its reference twin (the test oracle), its PyTorch backends, the
autograd Function, the backend records and the functional API.  Its Triton kernels, if any, are in
``ops/_<op>_triton.py``, imported lazily.  What several ops share is in ``dispatch`` (backend
selection), ``_checks`` (input validation), ``tiles`` (the losses' chunked engine) and
``_triton_utils`` (the kernels' launch helpers).  ``ops/README.md`` says how to add an op.
"""
from .attention import attention, attention_reference
from .augment import AugmentOpConfig, augment_batch, augment_batch_reference, gaussian_blur, gaussian_blur_reference
from .clip_loss import clip_loss, clip_loss_reference
from .distributed_loss import DistributedInputError, distributed_clip_loss, distributed_siglip_loss
from .patch_mask import patch_mask, patch_mask_reference
from .siglip_loss import siglip_loss, siglip_loss_reference
from .simclr_loss import simclr_loss, simclr_loss_reference

__all__ = ["clip_loss", "clip_loss_reference", "siglip_loss", "siglip_loss_reference",
           "simclr_loss", "simclr_loss_reference",
           "distributed_clip_loss", "distributed_siglip_loss", "DistributedInputError",
           "attention", "attention_reference", "patch_mask", "patch_mask_reference",
           "augment_batch", "augment_batch_reference", "AugmentOpConfig", "gaussian_blur", "gaussian_blur_reference"]
