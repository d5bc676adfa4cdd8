"""Input validation shared by the ops, and the dtypes and devices plain-PyTorch backends declare.

Every error names the argument, what was expected and what was given.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

Scalar = Union[float, int, torch.Tensor]

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Devices a plain-PyTorch backend (reference, sdpa, gather) declares: it runs wherever torch does.
ANY_DEVICE = ("cpu", "cuda", "mps", "xpu")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_float_tensor(name: str, t, layout: str) -> None:
    """``t`` is a floating tensor with as many dims as ``layout`` names, e.g. "[B, H, L, head_dim]"."""
    ndim = layout.count(",") + 1
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {_shape(t)}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {t.dtype}")


def check_features(image_features, text_features, *, same_rows: bool = True) -> None:
    """Both feature tensors: 2-D, floating, same device and dtype, same D (and N if same_rows)."""
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        check_float_tensor(name, t, "[N, D]")
    a, b = image_features, text_features
    if a.device != b.device:
        raise ValueError(f"image_features and text_features must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"image_features and text_features must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[1] or (same_rows and a.shape[0] != b.shape[0]):
        raise ValueError(f"image_features and text_features must have the same shape, got {_shape(a)} and {_shape(b)}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"image_features and text_features need at least one row (N >= 1), got {_shape(a)} and {_shape(b)}")
    if a.shape[1] == 0:
        raise ValueError(f"feature dimension D must be >= 1, got shapes {_shape(a)} and {_shape(b)}")


def as_scalar_tensor(value: Optional[Scalar], name: str, like: torch.Tensor, *, required: bool,
                     check_finite: bool = True) -> Optional[torch.Tensor]:
    """``value`` as a 0-dim tensor on ``like``'s device in the accumulation precision (float64 for
    float64 features, else float32), keeping its autograd graph.

    Accepts Python numbers and tensors with one element (0-dim or shape [1], as some trainers store
    logit_scale).  Non-finite values raise: they would silently turn the loss into NaN.
    """
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    if value is None:
        if required:
            raise TypeError(f"{name} is required, got None")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must have exactly one element, got shape {_shape(value)}")
        if value.dtype not in FLOATS:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.device != like.device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        if check_finite and not bool(torch.isfinite(value.detach()).all()):
            raise ValueError(f"{name} must be finite, got {value.detach().reshape(-1)[0].item()}")
        return value.reshape(()).to(device=like.device, dtype=acc)
    if check_finite and not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.tensor(float(value), device=like.device, dtype=acc)


def check_chunk_size(chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def check_label_smoothing(label_smoothing) -> float:
    ls = float(label_smoothing)
    if not (0.0 <= ls <= 1.0) or not math.isfinite(ls):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return ls
