"""Augmentation presets and their implementations (op ``augment``: a C kernel, torch tensor operations).

Presets (``AugmentConfig.from_name``):

``clip``      training: mild random-resized crop, scale (0.9, 1) (open_clip's training transform);
              evaluation (``train=False``): resize the shorter side + centre crop.
``clip_aug``  strong: random-resized crop, scale (0.08, 1); colour jitter (p 0.8: brightness,
              contrast, saturation 0.4, hue 0.1); grayscale (p 0.2); Gaussian blur (p 0.5, sigma
              0.1-2); horizontal flip (p 0.5).  Every knob can be overridden.
``simclr``    the ``clip`` view plus ``extra_views=2`` independently augmented ``clip_aug`` views of
              the same image (SLIP's self-supervised branch).

Every preset is evaluated with the same meaning in three places: as DALI operators on the DALI
GPU path (``fastclip.data._dali``, ``ops="all"``); on the DALI CPU path as a per-sample crop box
(:func:`crop_box`) that DALI's region-of-interest decoder decodes (only that window of a JPEG),
then :func:`resize_crop` and :func:`augment_batch`; and on the PIL path as the same per-sample crop
box applied by the decoder (so that a JPEG is decoded at reduced scale when the crop allows), then
the same :func:`augment_batch` (CPU or GPU).  :func:`augment_batch` has two backends: ``native``,
a C kernel that does a CPU image in one pass (``fastclip/csrc``), and ``torch``, batched tensor
operations; :func:`augment_batch_reference` is their test oracle.  The
colour operations run in a fixed order (brightness, contrast, saturation, hue), as DALI's
``color_twist`` does, not in torchvision's random order.

Determinism: a sample's crop boxes come from its own ``random.Random`` (:func:`crop_rng`, seeded
by the loader's seed, the epoch and the sample's uid only, so a crop does not depend on batching,
chunking, threads, slots or where an interrupted epoch resumed); the tensor operations (colour,
grayscale, blur, flip) from a ``torch.Generator`` per batch, seeded by (seed, epoch, slot, batch
index).
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import random
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops import dispatch

__all__ = ["AugmentConfig", "PRESETS", "CLIP_MEAN", "CLIP_STD", "crop_rng", "crop_box", "int_box",
           "resize_crop", "draw_params", "slice_params", "augment_batch", "augment_batch_reference",
           "gaussian_blur", "gaussian_blur_reference"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRESETS = ("clip", "clip_aug", "simclr")


@dataclass
class AugmentConfig:
    """What happens to an image between decoding and the model.

    Geometry: ``random_crop`` False = resize the shorter side to ``image_size`` and centre crop;
    True = random-resized crop with area fraction in ``scale`` and aspect ratio in ``ratio``
    (log-uniform), torchvision's algorithm.  Colour: each knob is a probability (``*_p``) and a
    strength.  ``extra_views`` > 0 adds that many views augmented with ``view`` (simclr).
    """

    preset: str = "clip"
    image_size: int = 224
    random_crop: bool = False
    scale: tuple = (0.9, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.0
    jitter_p: float = 0.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    interpolation: str = "bicubic"
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    extra_views: int = 0
    view: Optional["AugmentConfig"] = field(default=None, repr=False)

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.blur_sigma[0] <= 0 or self.blur_sigma[0] > self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")
        if self.hue < 0 or self.hue > 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (a fraction of the hue circle), got {self.hue}")
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

    @property
    def has_color(self) -> bool:
        return self.jitter_p > 0 or self.grayscale_p > 0 or self.blur_p > 0 or self.flip_p > 0


# ----------------------------------------------------------------------------------------------
# Geometry (per sample; applied by the decoder)
# ----------------------------------------------------------------------------------------------
def crop_rng(seed: int, epoch: int, uid: tuple) -> random.Random:
    """The random source of one sample's crop boxes: a function of (seed, epoch, uid) only.

    Seeding a ``random.Random`` from a string (SHA-512 of it) costs ~5 us, small beside decoding
    an image.  Note that with ``resampled=True`` a sample drawn twice in one epoch is cropped the
    same way both times (its colour draws still differ: they follow the batch).
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
    antialiased bilinear/bicubic as Pillow's ``crop(box).resize`` (its reference in the tests),
    through torch's uint8 channels-last kernels: on this project's CPU about 4x as fast as
    Pillow's resize and 6x DALI's CPU ``fn.resize`` (bicubic, 256 px -> 224 px), and they
    release the GIL, so a pool of threads scales.
    """
    if box is not None:
        left, top, right, bottom = box
        image = image[top:bottom, left:right]
    x = image.permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w] with channels-last strides
    if x.shape[-2:] == (size, size):
        out.copy_(x[0])
        return
    out.copy_(F.interpolate(x, size=(size, size), mode=interpolation, antialias=True)[0])


# ----------------------------------------------------------------------------------------------
# Batched tensor operations
#
# Colour jitter, grayscale and normalisation are all per-sample affine maps of the RGB vector, so
# they are composed into one 3x3 matrix and offset per image (as DALI's color_twist does) and
# applied with one batched matmul (the torch backend) or one loop (the native backend); blur
# (linear, weights summing to 1) commutes with them and runs first.  The torch backend processes a
# CPU batch in chunks of about 4 MB through per-thread scratch buffers:
# a fresh 150 MB tensor costs ~90 ms of page faults on a small VM, more than the arithmetic on it,
# and at 4 MB the chunk stays in cache between the passes (2x faster than 16 MB chunks there).
# ----------------------------------------------------------------------------------------------
_LUMA = (0.299, 0.587, 0.114)
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def draw_params(n: int, cfg: AugmentConfig, generator: torch.Generator) -> dict:
    """Per-sample random draws [n] (CPU): jitter factors, grayscale, blur sigma (0 = none), flip."""
    g = generator
    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    def coin(p):
        return torch.rand(n, generator=g, dtype=torch.float64) < p
    out = {"jitter": None, "gray": None, "sigma": None, "flip": None}
    if cfg.jitter_p > 0:
        on = coin(cfg.jitter_p)
        out["jitter"] = {
            "on": on,
            "brightness": torch.where(on, uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness), one),
            "contrast": torch.where(on, uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast), one),
            "saturation": torch.where(on, uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation), one),
            "hue": torch.where(on, uniform(-cfg.hue, cfg.hue), zero),
        }
    if cfg.grayscale_p > 0:
        out["gray"] = coin(cfg.grayscale_p)
    if cfg.blur_p > 0:
        out["sigma"] = torch.where(coin(cfg.blur_p), uniform(*cfg.blur_sigma), zero)
    if cfg.flip_p > 0:
        out["flip"] = coin(cfg.flip_p)
    return out


def _colour_matrices(params: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [n,3,3], k [n]) in float64: colour(x) = A x + k * luma_mean(x) * 1 for x in [0, 1].

    brightness b, contrast c (around the image's mean luma m), saturation s, hue h (turns):
    x -> H S (c b x + (1 - c) b m 1); S and H leave the gray vector 1 unchanged, so the offset is
    (1 - c) b m 1.  Grayscale multiplies by 1 w^T (w = luma weights), which also keeps 1.
    """
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    w = torch.tensor(_LUMA, dtype=torch.float64)
    gray_proj = torch.ones(3, 1, dtype=torch.float64) @ w.view(1, 3)  # 1 w^T
    a, k = eye.clone(), torch.zeros(n, dtype=torch.float64)
    j = params.get("jitter")
    if j is not None:
        b, c, s, h = j["brightness"], j["contrast"], j["saturation"], j["hue"]
        sat = s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * gray_proj
        t = torch.tensor(_YIQ, dtype=torch.float64)
        theta = 2 * math.pi * h
        rot = eye.clone()
        rot[:, 1, 1], rot[:, 1, 2] = torch.cos(theta), -torch.sin(theta)
        rot[:, 2, 1], rot[:, 2, 2] = torch.sin(theta), torch.cos(theta)
        hue = torch.linalg.inv(t) @ rot @ t
        a = hue @ sat * (c * b).view(n, 1, 1)
        k = (1 - c) * b
    gray = params.get("gray")
    if gray is not None:
        a = torch.where(gray.view(n, 1, 1), gray_proj @ a, a)
    return a, k


def _blur_radius(sigma: float, h: int, w: int) -> int:
    """ceil(3 sigma), at least 1, capped below the image size (0: an image under 3 px is not blurred)."""
    return max(0, min(max(1, int(math.ceil(3 * sigma))), (min(h, w) - 1) // 2))


def _radii(sigma: torch.Tensor, h: int, w: int) -> list:
    return [_blur_radius(s, h, w) if s > 0 else 0 for s in sigma.tolist()]


def blur_taps(sigma: torch.Tensor, h: int, w: int):
    """(radius, normalised Gaussian taps [B, 2*radius+1] in float64) for per-sample ``sigma``, or
    (0, None) when no sample is blurred.  Each sample's window is 2*ceil(3*sigma)+1 taps, capped
    below the image size (its taps are zero outside it); ``radius`` is the largest.  A sample
    with sigma <= 0 gets the identity tap."""
    if sigma.numel() == 0 or float(sigma.max()) <= 0:
        return 0, None
    radii = _radii(sigma, h, w)
    radius = max(radii)
    pos = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (pos / sigma.to(torch.float64).clamp_min(1e-6).view(-1, 1)) ** 2)
    k = torch.where(pos.abs() <= torch.tensor(radii, dtype=torch.float64).view(-1, 1), k, 0.0)
    identity = (pos == 0).to(torch.float64).expand_as(k)
    return radius, torch.where(sigma.view(-1, 1) > 0, k / k.sum(1, keepdim=True), identity)


def _blur_image(src: torch.Tensor, taps: list, dst: torch.Tensor) -> None:
    """One CPU image ``[C, H, W]`` blurred with the symmetric ``taps`` (Python floats) along W,
    then H, into ``dst`` (which may be ``src``), reflect-padded in per-thread scratch buffers."""
    c, h, w = src.shape
    r = len(taps) // 2
    xp = _scratch(src.device, (c, h, w + 2 * r), 2, src.dtype)
    xp[..., r:r + w].copy_(src)
    xp[..., :r].copy_(src[..., 1:r + 1].flip(-1))  # reflect: column -k is column k
    xp[..., r + w:].copy_(src[..., w - r - 1:w - 1].flip(-1))
    yp = _scratch(src.device, (c, h + 2 * r, w), 3, src.dtype)
    y = yp[:, r:r + h]
    torch.mul(xp[..., 0:w], taps[0], out=y)
    for t in range(1, 2 * r + 1):
        y.add_(xp[..., t:t + w], alpha=taps[t])
    yp[:, :r].copy_(y[:, 1:r + 1].flip(-2))
    yp[:, r + h:].copy_(y[:, h - r - 1:h - 1].flip(-2))
    torch.mul(yp[:, 0:h], taps[0], out=dst)
    for t in range(1, 2 * r + 1):
        dst.add_(yp[:, t:t + h], alpha=taps[t])


_PER_IMAGE_MIN_PIXELS = 96 * 96


def _blur_batch(x: torch.Tensor, k: torch.Tensor, radius: int) -> torch.Tensor:
    """``[n, C, H, W]`` blurred with per-sample taps ``k`` [n, 2*radius+1] (zero outside each
    sample's own window), one broadcast multiply-add per tap and axis."""
    n, _, h, w = x.shape
    xp = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = xp[..., 0:w] * k[:, 0].view(n, 1, 1, 1)
    for t in range(1, 2 * radius + 1):
        y.addcmul_(xp[..., t:t + w], k[:, t].view(n, 1, 1, 1))
    yp = F.pad(y, (0, 0, radius, radius), mode="reflect")
    out = yp[:, :, 0:h] * k[:, 0].view(n, 1, 1, 1)
    for t in range(1, 2 * radius + 1):
        out.addcmul_(yp[:, :, t:t + h], k[:, t].view(n, 1, 1, 1))
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with a per-sample ``sigma`` [B] (<= 0: unchanged).

    Reflect padding; each sample's window is 2*ceil(3*sigma)+1 taps, capped below the image size
    (:func:`blur_taps`).  Each axis is a sum over the taps of shifted views.  On CPU, images of
    96x96 and more go one at a time with their own taps: the image stays in cache across the
    passes and a small sigma costs few taps (~3x faster at 224 px, sigma 2, than the whole batch
    with the largest window, and ~20x faster than a grouped convolution); smaller images, and
    any on a GPU, go together.  ``inplace`` writes the blurred images back into ``x``.
    """
    b, c, h, w = x.shape
    radius, k = blur_taps(sigma, h, w)
    out = x if inplace else x.clone()
    if k is None:
        return out
    if x.device.type != "cpu" or h * w < _PER_IMAGE_MIN_PIXELS:
        # a GPU, or small images (where per-op overhead would dominate): the blurred samples
        # together, one operation per tap
        sel = (sigma > 0).nonzero().view(-1)
        idx = sel.to(x.device)
        out[idx] = _blur_batch(x[idx], k[sel].to(device=x.device, dtype=x.dtype), radius)
        return out
    for i, s in enumerate(sigma.tolist()):
        if s <= 0:
            continue
        r = _blur_radius(s, h, w)
        _blur_image(x[i], k[i, radius - r:radius + r + 1].tolist(), out[i])
    return out


def gaussian_blur_reference(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """One grouped 2-D convolution per axis (the slow, obvious form): test oracle of :func:`gaussian_blur`."""
    b, c, h, w = x.shape
    radius, k = blur_taps(sigma, h, w)
    if k is None:
        return x
    weight = k.to(x.dtype).repeat_interleave(c, 0)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), weight.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), weight.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


_SCRATCH = threading.local()


def _scratch(device: torch.device, shape: tuple, slot: int,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A per-thread reusable buffer: fresh large CPU tensors cost more in page faults than the
    arithmetic done on them, and the allocator returns them to the OS when freed."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    cache = getattr(_SCRATCH, "bufs", None)
    if cache is None:
        cache = _SCRATCH.bufs = {}
    numel = math.prod(shape)
    buf = cache.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = cache[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def slice_params(params: dict, lo: int, hi: int) -> dict:
    """The draws of :func:`draw_params` for samples ``lo:hi`` (to augment a batch in parts)."""
    def cut(v):
        if v is None:
            return None
        return {k: cut(x) for k, x in v.items()} if isinstance(v, dict) else v[lo:hi]
    return cut(params)


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, generator: Optional[torch.Generator] = None,
                  dtype: torch.dtype = torch.float32, params: Optional[dict] = None,
                  out: Optional[torch.Tensor] = None, backend: Optional[str] = "auto") -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (already cropped and resized) -> normalised ``[B, 3, H, W]`` in ``dtype``.

    Applies ``cfg``'s blur, colour jitter, grayscale and flip with per-sample draws from
    ``generator`` (a CPU generator; ``images`` may live on any device), or from ``params``
    (:func:`draw_params`, :func:`slice_params`), then CLIP normalisation, into ``out`` when given
    (contiguous ``[B, 3, H, W]`` of ``dtype``).  Values are clamped to the valid range once,
    after the colour map (DALI's color_twist also skips the intermediate clamps).

    ``backend`` (op ``augment``; else ``FASTCLIP_AUGMENT_BACKEND``, else automatic): ``native``,
    fastclip's C kernel (``csrc/augment_cpu.c``, CPU, compiled on first use: ``fastclip._native``),
    one pass per image, 2.1-2.5x the torch backend's images/s for ``clip_aug`` at 224 px on one
    thread (``benchmarks/RESULTS.md``); ``torch``, batched tensor operations, on any device, and
    the only one that writes float64.  Both agree with :func:`augment_batch_reference` to float32
    rounding.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    n, h, w, _ = images.shape
    if h == 0 or w == 0:
        raise ValueError(f"images must be at least 1x1 pixels, got {tuple(images.shape)}")
    dev = images.device
    if out is not None and (out.shape != (n, 3, h, w) or out.dtype != dtype or out.device != dev
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor {(n, 3, h, w)} on {dev}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    chosen = dispatch.select(_OP, backend, device=dev, dtype=dtype, env=_ENV)
    if params is None:
        params = draw_params(n, cfg, generator if generator is not None else torch.Generator().manual_seed(0))
    a, k = _colour_matrices(params, n)
    mean = torch.tensor(cfg.mean, dtype=torch.float64).view(1, 3, 1)
    std = torch.tensor(cfg.std, dtype=torch.float64).view(1, 3, 1)
    # Fold /255 and the normalisation in: y = (A x/255 + k m/255 1 - mean) / std, m the mean luma
    # (0..255 scale); clamped to [lo, hi] (= [0, 1] before normalising) when jitter can leave it.
    maps = {
        "a": (a / std / 255.0).to(torch.float32),
        "off": (-mean / std).view(3).to(torch.float32),
        "k": (None if params["jitter"] is None
              else (k.view(n, 1, 1) / std / 255.0).view(n, 3).to(torch.float32)),
        "lo": (-mean / std).view(3).to(torch.float32),
        "hi": ((1 - mean) / std).view(3).to(torch.float32),
    }
    if out is None:
        out = torch.empty(n, 3, h, w, dtype=dtype, device=dev)
    chosen.fn(images, params, maps, out)
    return out


def _augment_torch(images: torch.Tensor, params: dict, maps: dict, out: torch.Tensor) -> None:
    n, h, w, _ = images.shape
    dev, dtype = images.device, out.dtype
    a_n = maps["a"].to(dev)
    off_n = maps["off"].view(1, 3, 1).expand(n, 3, 1).to(dev)
    k_n = maps["k"].view(n, 3, 1).to(dev) if maps["k"] is not None else None
    lo, hi = maps["lo"].view(1, 3, 1).to(dev), maps["hi"].view(1, 3, 1).to(dev)
    luma = torch.tensor(_LUMA, dtype=torch.float32, device=dev).view(1, 3)
    sigma, flip = params["sigma"], params["flip"]
    step = n if dev.type != "cpu" else max(1, (1 << 20) // (3 * h * w))
    for i in range(0, n, step):
        j = min(n, i + step)
        c = j - i
        x = _scratch(dev, (c, 3, h, w), 0)
        # uint8 HWC -> float CHW, 0..255, one pass (a plain copy when ``images`` is a channels-first
        # batch viewed as [B, H, W, 3], which is what the loaders hand over)
        src = images[i:j].permute(0, 3, 1, 2)
        x.copy_(src)
        if flip is not None and bool(flip[i:j].any()):
            # flipped at the input: blur (symmetric taps, reflect padding), the colour map and the
            # normalisation all commute with a horizontal flip
            sel = flip[i:j].nonzero().view(-1)
            if dev.type == "cpu":  # per image: no batch-sized temporaries
                for row in sel.tolist():
                    x[row].copy_(src[row].flip(-1))
            else:
                sel = sel.to(dev)
                x[sel] = x[sel].flip(-1)
        if sigma is not None and bool((sigma[i:j] > 0).any()):
            gaussian_blur(x, sigma[i:j], inplace=True)
        xv = x.view(c, 3, h * w)
        off = off_n[i:j]
        if k_n is not None:
            m = (luma @ xv.mean(2).T).view(c, 1, 1)  # mean luma per image, 0..255
            off = off + k_n[i:j] * m
        target = out[i:j].view(c, 3, h * w)
        y = target if dtype == torch.float32 else _scratch(dev, (c, 3, h * w), 1)
        torch.baddbmm(off, a_n[i:j], xv, out=y)
        if k_n is not None:
            torch.maximum(y, lo, out=y)
            torch.minimum(y, hi, out=y)
        if dtype != torch.float32:
            target.copy_(y)


_NATIVE_FN: list = []


def _native_kernel():
    """``fc_augment_image`` of ``csrc/augment_cpu.c`` with its ctypes signature, or None."""
    if not _NATIVE_FN:
        from .. import _native
        lib = _native.library("augment_cpu")
        if lib is None:
            return None
        fn = lib.fc_augment_image
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, i64, i64, i64, ctypes.c_int32, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr,
                       ptr, ptr]
        fn.restype = None
        _NATIVE_FN.append(fn)
    return _NATIVE_FN[0]


def _native_reasons(**_) -> list:
    from .. import _native
    why = _native.reason("augment_cpu")
    return [f"the C kernel is not available: {why}"] if why else []


def _augment_native(images: torch.Tensor, params: dict, maps: dict, out: torch.Tensor) -> None:
    """One C call per image (ctypes releases the GIL: the loader's threads run in parallel)."""
    fn = _native_kernel()
    n, h, w, _ = images.shape
    sb, sh, sw, sc = images.stride()
    base = images.data_ptr()
    sigma, flip = params["sigma"], params["flip"]
    radius, taps, radii = 0, None, [0] * n
    if sigma is not None:
        radius, taps = blur_taps(sigma, h, w)
        if taps is not None:
            radii = _radii(sigma, h, w)
            taps = taps.to(torch.float32).contiguous()
    flips = flip.tolist() if flip is not None else [False] * n
    a = maps["a"].contiguous()
    kl = maps["k"].contiguous() if maps["k"] is not None else None
    luma = torch.tensor(_LUMA, dtype=torch.float32)
    lo, hi = maps["lo"].contiguous(), maps["hi"].contiguous()
    off = maps["off"].contiguous()
    clamp = kl is not None
    scratch = _scratch(images.device, (4 * h * w + w + 2 * radius,), 4)
    direct = out.dtype == torch.float32
    tmp = None if direct else _scratch(images.device, (3, h, w), 5)
    f32, row = 4, 2 * radius + 1
    taps_p = taps.data_ptr() + radius * f32 if taps is not None else 0  # image i's centre tap: + i * row
    a_p, kl_p = a.data_ptr(), kl.data_ptr() if clamp else 0
    consts = (off.data_ptr(), luma.data_ptr(), lo.data_ptr() if clamp else None, hi.data_ptr())
    scratch_p, dst_p = scratch.data_ptr(), None if direct else tmp.data_ptr()
    out_p, out_step = out.data_ptr(), 3 * h * w * f32
    for i in range(n):
        r = radii[i]
        fn(base + i * sb, sc, sh, sw, h, w, int(flips[i]), taps_p + i * row * f32 if r else None, r,
           a_p + i * 9 * f32, consts[0], kl_p + i * 3 * f32 if clamp else None, *consts[1:],
           out_p + i * out_step if direct else dst_p, scratch_p)
        if not direct:
            out[i].copy_(tmp)


_OP = "augment"
_ENV = "FASTCLIP_AUGMENT_BACKEND"
if _OP not in dispatch.all_ops():  # not again on a reload of this module
    dispatch.register(_OP, dispatch.Backend(
        "native", fn=_augment_native, devices=("cpu",), check=_native_reasons,
        doc="fastclip's C kernel, one pass per image (compiled on first use)"))
    dispatch.register(_OP, dispatch.Backend(
        "torch", fn=_augment_torch, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
        doc="batched torch tensor operations"))


def augment_batch_reference(images: torch.Tensor, cfg: AugmentConfig, params: dict,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same map op by op on the whole batch (slow, clear): the test oracle of :func:`augment_batch`."""
    n = images.shape[0]
    x = images.permute(0, 3, 1, 2).double() / 255.0
    if params["sigma"] is not None:
        x = gaussian_blur_reference(x, params["sigma"])
    w = torch.tensor(_LUMA, dtype=torch.float64).view(1, 3, 1, 1)
    j = params["jitter"]
    if j is not None:
        def per(v):
            return v.view(n, 1, 1, 1)
        mean_luma = (x * w).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = x * per(j["brightness"])
        x = x * per(j["contrast"]) + per(1 - j["contrast"]) * per(j["brightness"]) * mean_luma
        gray = (x * w).sum(1, keepdim=True)
        x = x * per(j["saturation"]) + gray * per(1 - j["saturation"])
        # hue: rotate the chroma (I, Q) of YIQ
        t = torch.tensor(_YIQ, dtype=torch.float64)
        yiq = torch.einsum("ij,bjhw->bihw", t, x)
        theta = 2 * math.pi * j["hue"]
        i2 = yiq[:, 1] * per(torch.cos(theta))[:, 0] - yiq[:, 2] * per(torch.sin(theta))[:, 0]
        q2 = yiq[:, 1] * per(torch.sin(theta))[:, 0] + yiq[:, 2] * per(torch.cos(theta))[:, 0]
        x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(t), torch.stack((yiq[:, 0], i2, q2), 1))
    if params["gray"] is not None:
        x = torch.where(params["gray"].view(n, 1, 1, 1), (x * w).sum(1, keepdim=True).expand_as(x), x)
    if j is not None:
        x = x.clamp(0, 1)
    if params["flip"] is not None:
        x = torch.where(params["flip"].view(n, 1, 1, 1), x.flip(-1), x)
    mean = torch.tensor(cfg.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)
