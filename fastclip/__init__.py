"""fastclip: fast kernels and thin modules for training CLIP-style image-text models.

Importing fastclip imports torch and nothing heavier: Triton, CUDA, flash-attn, xformers and DALI
are loaded on first use; ``python -m fastclip.info`` reports which backends can run and why not.
"""
__version__ = "0.1.0"

from . import data, eval, flops, machine, ops
from .models import CLIP, CLIPConfig, create_model, list_models
from .nn import ClipLoss, SigLipLoss
from .tokenizer import get_tokenizer

__all__ = ["ClipLoss", "SigLipLoss", "CLIP", "CLIPConfig", "create_model", "list_models", "get_tokenizer",
           "ops", "flops", "data", "eval", "__version__"]
