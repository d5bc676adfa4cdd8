"""Augmentation presets and crop geometry; the per-pixel work is the op ``fastclip.ops.augment``.

Presets (``AugmentConfig.from_name``):

``clip``      training: mild random-resized crop, scale (0.9, 1) (open_clip's training transform);
              evaluation (``train=False``): resize the shorter side + centre crop.
``clip_aug``  strong: random-resized crop, scale (0.08, 1); colour jitter (p 0.8: brightness,
              contrast, saturation 0.4, hue 0.1); grayscale (p 0.2); Gaussian blur (p 0.5, sigma
              0.1-2); horizontal flip (p 0.5).  Every knob can be overridden.
``simclr``    the ``clip`` view plus ``extra_views=2`` independently augmented ``clip_aug`` views of
              the same image (SLIP's self-supervised branch).

:class:`AugmentConfig` extends the op's :class:`~fastclip.ops.augment.AugmentOpConfig` (flip,
jitter, grayscale, blur, normalisation) with the preset name and the crop geometry, so a preset
is handed to :func:`augment_batch` as it is.

Every preset is evaluated with the same meaning in three places: as DALI operators on the DALI
GPU path (``fastclip.data._dali``, ``ops="all"``); on the DALI CPU path as a per-sample crop box
(:func:`crop_box`) that DALI's region-of-interest decoder decodes (only that window of a JPEG),
then :func:`resize_crop` and :func:`augment_batch`; and on the PIL path as the same per-sample crop
box applied by the decoder (so that a JPEG is decoded at reduced scale when the crop allows), then
the same :func:`augment_batch` (CPU or GPU).  The op's backends, its reference twin and the
derivation of its colour map are in ``fastclip.ops.augment``; this module re-exports its public
names (:func:`augment_batch`, :func:`augment_batch_reference`, :func:`draw_params`,
:func:`slice_params`, :func:`gaussian_blur`, :func:`gaussian_blur_reference`, ``CLIP_MEAN``,
``CLIP_STD``) for the loaders.

Determinism: a sample's crop boxes come from its own ``random.Random`` (:func:`crop_rng`, seeded
by the loader's seed, the epoch and the sample's uid only, so a crop does not depend on batching,
chunking, threads, slots or where an interrupted epoch resumed); the op's draws (colour,
grayscale, blur, flip) from a ``torch.Generator`` per batch, seeded by (seed, epoch, slot, batch
index).
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.augment import (
    CLIP_MEAN,
    CLIP_STD,
    AugmentOpConfig,
    augment_batch,
    augment_batch_reference,
    draw_params,
    gaussian_blur,
    gaussian_blur_reference,
    slice_params,
)

__all__ = ["AugmentConfig", "PRESETS", "CLIP_MEAN", "CLIP_STD", "crop_rng", "crop_box", "int_box",
           "resize_crop", "draw_params", "slice_params", "augment_batch", "augment_batch_reference",
           "gaussian_blur", "gaussian_blur_reference"]

PRESETS = ("clip", "clip_aug", "simclr")


@dataclass
class AugmentConfig(AugmentOpConfig):
    """What happens to an image between decoding and the model: a preset's crop geometry plus the
    op's knobs (inherited from :class:`~fastclip.ops.augment.AugmentOpConfig`: ``flip_p``,
    ``jitter_p``, ``brightness``, ``contrast``, ``saturation``, ``hue``, ``grayscale_p``,
    ``blur_p``, ``blur_sigma``, ``mean``, ``std``).

    Geometry: ``random_crop`` False = resize the shorter side to ``image_size`` and centre crop;
    True = random-resized crop with area fraction in ``scale`` and aspect ratio in ``ratio``
    (log-uniform), torchvision's algorithm; resized with ``interpolation``.  ``extra_views`` > 0
    adds that many views augmented with ``view`` (simclr).
    """

    preset: str = "clip"
    image_size: int = 224
    random_crop: bool = False
    scale: tuple = (0.9, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    extra_views: int = 0
    view: Optional["AugmentConfig"] = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()  # the op's knobs
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")
        if self.extra_views < 0:
            raise ValueError(f"extra_views must be >= 0, got {self.extra_views}")
        if self.extra_views and self.view is None:
            self.view = AugmentConfig.from_name("clip_aug", image_size=self.image_size)

    @classmethod
    def from_name(cls, name, image_size: Optional[int] = None, train: bool = True,
                  **overrides) -> "AugmentConfig":
        """A preset (``clip``, ``clip_aug``, ``simclr``) or an AugmentConfig, with knobs overridden.

        ``image_size``: None keeps the instance's size (224 for a preset name).  ``train=False``
        gives the evaluation transform (resize + centre crop, no colour) of any preset or config,
        keeping its interpolation and normalisation.
        """
        if isinstance(name, AugmentConfig):
            if image_size is not None:
                overrides["image_size"] = image_size
            cfg = dataclasses.replace(name, **overrides) if overrides else name
            if not train:
                cfg = cls(preset=cfg.preset, image_size=cfg.image_size, interpolation=cfg.interpolation,
                          mean=cfg.mean, std=cfg.std)
            return cfg
        image_size = 224 if image_size is None else image_size
        if name not in PRESETS:
            raise ValueError(f"augment preset must be one of {PRESETS}, got {name!r}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown augmentation knob(s) {sorted(unknown)}; known: "
                            f"{[f.name for f in dataclasses.fields(cls)]}")
        if not train:
            return cls(preset=name, image_size=image_size, **overrides)
        if name == "clip":
            base = dict(random_crop=True, scale=(0.9, 1.0))
        elif name == "clip_aug":
            base = dict(random_crop=True, scale=(0.08, 1.0), flip_p=0.5, jitter_p=0.8, grayscale_p=0.2,
                        blur_p=0.5)
        else:  # simclr
            base = dict(random_crop=True, scale=(0.9, 1.0), extra_views=2,
                        view=cls.from_name("clip_aug", image_size=image_size))
        base.update(overrides)
        return cls(preset=name, image_size=image_size, **base)


# ----------------------------------------------------------------------------------------------
# Geometry (per sample; applied by the decoder)
# ----------------------------------------------------------------------------------------------
def crop_rng(seed: int, epoch: int, uid: tuple) -> random.Random:
    """The random source of one sample's crop boxes: a function of (seed, epoch, uid) only.

    ``random.Random`` seeded from a string (it hashes the string with SHA-512): one hash per
    sample, small beside decoding an image.  With ``resampled=True`` a sample drawn twice in one
    epoch is cropped the same way both times (its colour draws still differ: they follow the batch).
    """
    return random.Random(f"fastclip-crop-{seed}-{epoch}-{uid[0]}-{uid[1]}")


def crop_box(width: int, height: int, cfg: AugmentConfig, rng: Optional[random.Random]) -> tuple:
    """(left, top, right, bottom) in source pixels of the region that becomes the output square.

    Centre: the largest centred square (= resize shorter side, then centre crop).  Random:
    torchvision's RandomResizedCrop.get_params (10 tries, then a centre crop clamped to ``ratio``).
    """
    if not cfg.random_crop or rng is None:
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side)
    area = width * height
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*cfg.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return (left, top, left + w, top + h)
    in_ratio = width / height
    if in_ratio < cfg.ratio[0]:
        w, h = width, int(round(width / cfg.ratio[0]))
    elif in_ratio > cfg.ratio[1]:
        h, w = height, int(round(height * cfg.ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def int_box(box: tuple, width: int, height: int) -> tuple:
    """``box`` rounded to whole pixels inside a ``width`` x ``height`` image, at least 1 px each way."""
    left = min(max(0, int(round(box[0]))), width - 1)
    top = min(max(0, int(round(box[1]))), height - 1)
    right = min(width, max(left + 1, int(round(box[2]))))
    bottom = min(height, max(top + 1, int(round(box[3]))))
    return left, top, right, bottom


def resize_crop(image: torch.Tensor, box: Optional[tuple], size: int, interpolation: str,
                out: torch.Tensor) -> None:
    """Crop uint8 ``image`` [H, W, 3] to ``box`` (whole pixels; None = all of it) and resize it to
    ``size`` x ``size`` into ``out`` (uint8 [3, size, size]).

    Crop, then resize (torchvision's order: the filter does not reach outside the box), with
    antialiased bilinear/bicubic as Pillow's ``crop(box).resize`` (its reference in the tests,
    within 2 levels), through torch's uint8 channels-last kernels, which release the GIL, so a
    pool of threads scales.
    """
    if box is not None:
        left, top, right, bottom = box
        image = image[top:bottom, left:right]
    x = image.permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w] with channels-last strides
    if x.shape[-2:] == (size, size):
        out.copy_(x[0])
        return
    out.copy_(F.interpolate(x, size=(size, size), mode=interpolation, antialias=True)[0])
