"""``create_model`` and checkpoint loading (open_clip and OpenAI CLIP state dicts)."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch

from .clip import CLIP
from .config import CLIPConfig

__all__ = ["create_model", "load_checkpoint", "read_checkpoint", "clean_state_dict"]

# Keys OpenAI's checkpoints carry as metadata (not parameters); open_clip drops them too.
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def create_model(name: Union[str, CLIPConfig], *, pretrained: Optional[Union[str, Mapping]] = None,
                 device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None,
                 **overrides) -> CLIP:
    """Build the CLIP model ``name`` (see :func:`fastclip.list_models`), in training mode.

    Args:
        name: a built-in name ("ViT-B-32", "RN50", ... with an optional "-quickgelu" suffix) or a
            :class:`CLIPConfig`.
        pretrained: optional path to (or a loaded) open_clip / OpenAI state dict, loaded strictly.
            OpenAI's released weights were trained with QuickGELU: use the "-quickgelu" names.
        device: where to build the parameters (``"meta"`` builds without allocating).
        dtype: parameter dtype after building (e.g. torch.bfloat16 for pure-bf16 training).
        **overrides: config overrides, e.g. ``image_size=64``, ``mask_ratio=0.5``,
            ``vision_layers=6``, ``text_width=256`` (see :meth:`CLIPConfig.from_name`).

    Returns:
        :class:`fastclip.models.CLIP`.
    """
    if isinstance(name, CLIPConfig):
        import dataclasses
        config = dataclasses.replace(name, vision_cfg=dataclasses.replace(name.vision_cfg),
                                     text_cfg=dataclasses.replace(name.text_cfg)).apply_overrides(**overrides)
    else:
        config = CLIPConfig.from_name(name, **overrides)
    if device is not None:
        with torch.device(device):
            model = CLIP(config)
    else:
        model = CLIP(config)
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        model = model.to(dtype)
    if pretrained is not None:
        load_checkpoint(model, pretrained, strict=True)
    return model


def clean_state_dict(state_dict: Mapping) -> dict:
    """An open_clip / OpenAI checkpoint's state dict in fastclip's (= open_clip's) key layout.

    Accepts a bare state dict or a training checkpoint holding one under ``"state_dict"``; strips a
    DDP ``module.`` prefix and OpenAI's metadata entries; a 1-element ``logit_scale`` (open_clip's
    ``nonscalar_logit_scale``) becomes 0-d.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key in _OPENAI_METADATA:
            continue
        if key in ("logit_scale", "logit_bias") and isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.reshape(())
        out[key] = value
    return out


def read_checkpoint(path: Union[str, os.PathLike]):
    """What a checkpoint file holds (a state dict, a training checkpoint's dict), on the CPU.

    ``torch.load(weights_only=True)``, or safetensors' ``load_file`` for ``.safetensors`` files
    (the optional safetensors package).  FileNotFoundError for a missing file; ValueError naming
    the file when it cannot be read: damaged, not a torch file, or a TorchScript archive (OpenAI's
    original ``.pt`` files: load them with ``torch.jit.load(path).state_dict()`` first).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from ..lazy import optional_module
        st, why = optional_module("safetensors.torch")
        if st is None:
            raise ValueError(f"checkpoint {path!r} is a .safetensors file, which needs the optional package "
                             f"safetensors ({why}); pip install safetensors")
        try:
            return st.load_file(path, device="cpu")
        except Exception as exc:  # a damaged or foreign file: whatever the reader raises
            raise ValueError(f"checkpoint {path!r} cannot be read by safetensors ({type(exc).__name__}: "
                             f"{exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a pickle of other objects, not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"checkpoint {path!r} cannot be read as a state dict with "
                         f"torch.load(weights_only=True) ({type(exc).__name__}: {first}); if it is not a "
                         "plain state dict but a TorchScript archive (OpenAI's original .pt files), pass "
                         "torch.jit.load(path).state_dict() instead") from None


def load_checkpoint(model: CLIP, checkpoint: Union[str, os.PathLike, Mapping], strict: bool = True):
    """Load an open_clip / OpenAI CLIP state dict (a path :func:`read_checkpoint` reads, or a
    mapping) into ``model``.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a state dict mapping, got {type(checkpoint).__name__}")
    return model.load_state_dict(clean_state_dict(checkpoint), strict=strict)
