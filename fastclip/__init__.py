"""fastclip: fast kernels and thin modules for training CLIP-style image-text models.

Importing fastclip imports torch and nothing heavier: Triton, CUDA, flash-attn, xformers and DALI
are loaded on first use; ``python -m fastclip.info`` reports which backends can run and why not.
"""
__version__ = "0.1.0"

from . import ops
from .nn import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss", "ops", "__version__"]
