"""PIL decoding to RGB, then the crop and resize (the fallback decoder).

A JPEG decodes at reduced scale (``draft``) when the crop allows.  Outputs of 96x96 and more are
then cropped to the box rounded to whole pixels and resized with
:func:`fastclip.data.augment.resize_crop` (torch's uint8 antialiased kernels, as on the DALI CPU
path, faster than Pillow's own resize at these sizes); smaller ones with Pillow's
``resize(box=)``, whose lower per-call overhead wins there.  Views come out as uint8
``[3, S, S]`` either way.

Modes are converted the way DALI's ``fn.decoders.image(output_type=RGB)`` converts them, so that
both paths see the same pixels: grayscale and palette to RGB, alpha dropped, CMYK (Adobe-inverted
included) to RGB, 16-bit to 8-bit by keeping the high byte.  The loader skips images of those
modes by default (``wrong_modes="skip"``, decided from the header before decoding); with
``wrong_modes="convert"`` they reach this conversion and are counted in ``DataStats.notes`` as
``converted:<mode>``.
"""
from __future__ import annotations

import io
import math
import random
from typing import Optional

import numpy as np
import torch

from .augment import AugmentConfig, crop_box, int_box, resize_crop

__all__ = ["DecodeError", "open_rgb", "decode_views"]


_TORCH_RESIZE_MIN_PIXELS = 96 * 96
_RESAMPLE = {}


def _resample(name: str):
    if not _RESAMPLE:
        from PIL import Image
        _RESAMPLE.update(bilinear=Image.Resampling.BILINEAR, bicubic=Image.Resampling.BICUBIC)
    return _RESAMPLE[name]


class DecodeError(Exception):
    """The bytes are not a decodable image (corrupt or truncated)."""


def _to_rgb(img):
    """``img`` as RGB (the conversions of the module docstring)."""
    from PIL import Image
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        else:  # 16-bit samples (PNG stores them as I;16 or I): keep the high byte, as DALI does
            arr8 = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(arr8[..., None], 3, axis=2), "RGB")
    return img.convert("RGB")


def open_rgb(data: bytes, target: Optional[int] = None, box_fn=None):
    """Open ``data``; with ``target``/``box_fn`` let a JPEG decode at reduced scale (``draft``) when
    the crop box is at least twice the target size.  Returns (RGB PIL image, box in its pixels).
    Raises :class:`DecodeError`.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        box = box_fn(w, h) if box_fn is not None else (0, 0, w, h)
        if target is not None and img.format == "JPEG":
            factor = min(box[2] - box[0], box[3] - box[1]) / target
            if factor >= 2:
                img.draft(img.mode, (math.ceil(w / factor), math.ceil(h / factor)))
                sx, sy = img.size[0] / w, img.size[1] / h
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        img.load()
        img = _to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            EOFError, IndexError) as exc:
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None
    return img, box


def decode_views(data: bytes, cfg: AugmentConfig, rng: Optional[random.Random]) -> list:
    """uint8 ``[3, S, S]`` tensors: the main view of ``cfg`` and its ``extra_views``, from one decode.

    Raises :class:`DecodeError`.  (Conversions are counted by the loader, from the mode the
    reader read in the header.)
    """
    size = cfg.image_size
    if cfg.extra_views:
        img, _ = open_rgb(data)
        w, h = img.size
        cfgs = [cfg] + [cfg.view] * cfg.extra_views
        boxes = [crop_box(w, h, c, rng) for c in cfgs]
    else:
        img, box = open_rgb(data, size, lambda w, h: crop_box(w, h, cfg, rng))
        cfgs, boxes = [cfg], [box]
    out = []
    if size * size < _TORCH_RESIZE_MIN_PIXELS:  # small outputs: Pillow's resize has less overhead
        for c, box in zip(cfgs, boxes):
            try:
                view = img.resize((size, size), _resample(c.interpolation), box=box)
            except (OSError, ValueError) as exc:
                raise DecodeError(f"{type(exc).__name__}: {exc}") from None
            out.append(torch.from_numpy(np.array(view, dtype=np.uint8)).permute(2, 0, 1))
        return out
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))
    h, w = arr.shape[:2]
    for c, box in zip(cfgs, boxes):
        view = torch.empty(3, size, size, dtype=torch.uint8)
        resize_crop(arr, int_box(box, w, h), size, c.interpolation, view)
        out.append(view)
    return out
