"""Thin nn.Modules over fastclip.ops."""
from .attention import MultiheadSelfAttention
from .encoders import TextTransformer, VisionTransformer
from .loss import ClipLoss, SigLipLoss, SimCLRLoss
from .patch_mask import PatchMasking
from .resnet import ModifiedResNet

__all__ = ["ClipLoss", "SigLipLoss", "SimCLRLoss", "MultiheadSelfAttention", "PatchMasking",
           "VisionTransformer", "TextTransformer", "ModifiedResNet"]
