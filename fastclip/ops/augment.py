"""The augmentation op ``augment``: per-sample flip, blur, colour jitter, grayscale and normalisation.

    images uint8 [B, H, W, 3] (cropped and resized; any strides)  ->  out [B, 3, H, W] in ``dtype``

For sample b, with x its pixels on the 0..255 scale, the op is, in this order:

    x  -> flip_b(x)                  horizontal mirror when drawn
       -> blur_b(x)                  separable Gaussian, sigma_b, reflect padding (none: sigma_b = 0)
       -> u = x / 255
       -> A_b u + k_b m(u) 1         colour: brightness, contrast, saturation, hue, then grayscale
       -> clamp to [0, 1]            only when jitter is on (the only step that can leave [0, 1])
       -> (. - mean) / std           normalisation (per channel)

m(u) is the mean luma (w = (0.299, 0.587, 0.114), w . 1 = 1) of the blurred image.  The colour
steps are per-sample affine maps of the RGB vector, applied in a fixed order (as DALI's
``color_twist``, not torchvision's random order): brightness b scales, u -> b u; contrast c
around the mean luma, u -> c u + (1 - c) m 1 (the mean of b u is b m); saturation s,
S = s I + (1 - s) 1 w^T; hue h (in turns) rotates the chroma plane of YIQ, H = T^-1 R(2 pi h) T.
S and H map the gray vector 1 to itself (w . 1 = 1; T 1 = (1, 0, 0), which R keeps), so

    colour(u) = H S (c b u + (1 - c) b m 1) = A u + k m 1,   A = c b H S,  k = (1 - c) b,

and grayscale G = 1 w^T (G 1 = 1) turns A into G A with k unchanged.  Folding /255 and the
normalisation in, every backend evaluates per pixel

    y = (A / std / 255) x + k m_x / (std 255) - mean / std,   clamped to [-mean / std, (1 - mean) / std]

(m_x the mean luma on the 0..255 scale; std > 0, so the clamp commutes with the normalisation).
The flip commutes with every later step (symmetric taps, reflect padding, a mean that ignores
order), so a backend may apply it anywhere; the blur does not commute with the mean or the
clamp, so it runs first.  Values are clamped once, after the colour map (DALI skips the
intermediate clamps too).

Parameters.  The op consumes the photometric knobs and the normalisation, nothing else:
:class:`AugmentOpConfig` holds them (with their validation), :func:`draw_params` turns it into
per-sample draws (a dict of CPU tensors [B], see :func:`draw_params`), and the backends run the
draws.  ``fastclip.data.augment.AugmentConfig`` (presets, crop geometry) extends
:class:`AugmentOpConfig`, so a preset is passed to the op as it is and the op never sees crop
boxes or preset names; the layering stays data -> ops.  (Taking the draws and mean/std as loose
arguments instead would split one set of knobs over two signatures and leave the data layer with
wrappers of the same names and other signatures.)

Backends (``backend=`` > ``FASTCLIP_AUGMENT_BACKEND`` > automatic, in this order):

    native     fastclip's C++ kernel ``csrc/augment_cpu.cpp`` in the extension ``fastclip._C``
               (built by setup.py when the package is built; loaded by ``fastclip.extension``),
               one call per batch with the GIL released: CPU, one pass per image; writes
               float32, float16 or bfloat16.  Without ``_C``, automatic selection picks torch.
    torch      batched tensor operations; CPU or CUDA, any float dtype (float64 too)
    reference  :func:`augment_batch_reference`, op by op in float64 (the test oracle); only on
               request, never picked automatically

Determinism: :func:`draw_params` draws from a CPU ``torch.Generator`` in a fixed order, so the
same seed gives the same draws on every device; given the draws, the output does not depend on
how the batch is split (:func:`slice_params`), and the backends agree to float32 rounding.

Layers in this file: the knobs (:class:`AugmentOpConfig`) and their draws (:func:`draw_params`,
:func:`slice_params`, :func:`check_params`) -> reference twin (:func:`augment_batch_reference`,
:func:`gaussian_blur_reference`) -> shared maths (blur taps, colour matrices, the folded map) ->
backends (torch, native, reference) and their registration -> functional API
(:func:`augment_batch`, :func:`gaussian_blur`).  The presets and the crop geometry are
``fastclip.data.augment``.
"""
from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import extension
from . import dispatch
from ._checks import FLOATS

__all__ = [
    "AugmentOpConfig",
    "CLIP_MEAN",
    "CLIP_STD",
    "augment_batch",
    "augment_batch_reference",
    "gaussian_blur",
    "gaussian_blur_reference",
    "blur_taps",
    "draw_params",
    "slice_params",
    "check_params",
    "OP",
    "ENV",
]

OP = "augment"
ENV = "FASTCLIP_AUGMENT_BACKEND"  # the backend override of this op (FASTCLIP_BACKEND is the others')

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_LUMA = (0.299, 0.587, 0.114)
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


# ----------------------------------------------------------------------------------------------
# Parameters: the op's knobs and their per-sample draws
# ----------------------------------------------------------------------------------------------
@dataclass
class AugmentOpConfig:
    """The knobs of the ``augment`` op: what is drawn per sample, and the normalisation.

    Each photometric knob is a probability (``*_p``) and a strength: ``flip_p`` (horizontal
    flip); ``jitter_p`` with ``brightness``, ``contrast``, ``saturation`` (factors uniform in
    [max(0, 1 - v), 1 + v]) and ``hue`` (a shift uniform in [-hue, hue] turns, hue <= 0.5);
    ``grayscale_p``; ``blur_p`` with sigma uniform in ``blur_sigma`` (pixels).  ``mean``/``std``:
    the per-channel normalisation of [0, 1] values (CLIP's by default).
    ``fastclip.data.augment.AugmentConfig`` extends this with presets and crop geometry.
    """

    flip_p: float = 0.0
    jitter_p: float = 0.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __post_init__(self):
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0 (factors are drawn in [max(0, 1 - {name}), "
                                 f"1 + {name}]), got {v}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (a fraction of the hue circle), got {self.hue}")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) != 3 or not all(isinstance(c, numbers.Real) for c in v):
                raise ValueError(f"{name} must be 3 numbers (R, G, B), got {v!r}")
        if not all(s > 0 for s in self.std):  # also what lets the clamp move past the normalisation
            raise ValueError(f"std must be > 0 in every channel, got {self.std!r}")

    @property
    def has_color(self) -> bool:
        """Whether a draw can change a pixel (beyond the normalisation every image gets)."""
        return self.jitter_p > 0 or self.grayscale_p > 0 or self.blur_p > 0 or self.flip_p > 0


def _check_config(cfg) -> None:
    if not isinstance(cfg, AugmentOpConfig):
        raise TypeError(f"cfg must be an AugmentOpConfig (e.g. fastclip.data.AugmentConfig), "
                        f"got {type(cfg).__name__}")


def draw_params(n: int, cfg: AugmentOpConfig, generator: torch.Generator) -> dict:
    """Per-sample random draws for ``n`` images from ``cfg``, on the CPU ``generator``.

    Returns ``{"jitter": None or {"on": bool [n], "brightness", "contrast", "saturation", "hue":
    float64 [n]}, "gray": None or bool [n], "sigma": None or float64 [n] (0 = no blur), "flip":
    None or bool [n]}``; an entry is None when its probability is 0 (nothing drawn).  Samples
    whose coin is off get the identity (factor 1, hue 0, sigma 0).  The draws come in a fixed
    order (jitter coin and factors, grayscale, blur coin and sigma, flip), so a seed fixes them.
    """
    _check_config(cfg)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    n, g = int(n), generator
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


def slice_params(params: dict, lo: int, hi: int) -> dict:
    """The draws of :func:`draw_params` for samples ``lo:hi`` (to augment a batch in parts)."""
    def cut(v):
        if v is None:
            return None
        return {k: cut(x) for k, x in v.items()} if isinstance(v, dict) else v[lo:hi]
    return cut(params)


_PARAM_KEYS = {"jitter": ("brightness", "contrast", "saturation", "hue"), "gray": None, "sigma": None,
               "flip": None}


def check_params(params, n: int) -> None:
    """``params`` has the layout :func:`draw_params` returns, for ``n`` samples (else ValueError)."""
    if not isinstance(params, dict) or set(params) != set(_PARAM_KEYS):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params must be a dict with keys {sorted(_PARAM_KEYS)} (from draw_params), "
                         f"got {got}")
    for key, inner in _PARAM_KEYS.items():
        v = params[key]
        if v is None:
            continue
        if inner is None:
            items = [(key, v)]
        else:
            items = [(f"{key}[{k!r}]", v.get(k) if isinstance(v, dict) else None) for k in inner]
        for name, t in items:
            if not isinstance(t, torch.Tensor) or t.shape != (n,):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"params {name} must be a tensor of shape ({n},) (one entry per image), "
                                 f"got {shape}")


# ----------------------------------------------------------------------------------------------
# Reference twin: op by op on the whole batch in float64 (test oracle and slowest backend)
# ----------------------------------------------------------------------------------------------
def gaussian_blur_reference(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """One grouped 2-D convolution per axis (the slow, obvious form): test oracle of :func:`gaussian_blur`."""
    b, c, h, w = x.shape
    radius, k = blur_taps(sigma, h, w)
    if k is None:
        return x
    weight = k.to(device=x.device, dtype=x.dtype).repeat_interleave(c, 0)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), weight.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), weight.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def _reference(images: torch.Tensor, params: dict, mean, std) -> torch.Tensor:
    """float64 [B, 3, H, W]: the steps of the module notes one by one, on ``images``' device."""
    n, dev, f64 = images.shape[0], images.device, torch.float64
    x = images.permute(0, 3, 1, 2).to(f64) / 255.0
    if params["sigma"] is not None:
        x = gaussian_blur_reference(x, params["sigma"])
    w = torch.tensor(_LUMA, dtype=f64, device=dev).view(1, 3, 1, 1)

    def per(v):
        return v.to(dev).view(n, 1, 1, 1)
    j = params["jitter"]
    if j is not None:
        mean_luma = (x * w).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = x * per(j["brightness"])
        x = x * per(j["contrast"]) + per(1 - j["contrast"]) * per(j["brightness"]) * mean_luma
        gray = (x * w).sum(1, keepdim=True)
        x = x * per(j["saturation"]) + gray * per(1 - j["saturation"])
        # hue: rotate the chroma (I, Q) of YIQ
        t = torch.tensor(_YIQ, dtype=f64, device=dev)
        yiq = torch.einsum("ij,bjhw->bihw", t, x)
        cos, sin = per(torch.cos(2 * math.pi * j["hue"]))[:, 0], per(torch.sin(2 * math.pi * j["hue"]))[:, 0]
        i2 = yiq[:, 1] * cos - yiq[:, 2] * sin
        q2 = yiq[:, 1] * sin + yiq[:, 2] * cos
        x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(t), torch.stack((yiq[:, 0], i2, q2), 1))
    if params["gray"] is not None:
        x = torch.where(per(params["gray"]), (x * w).sum(1, keepdim=True).expand_as(x), x)
    if j is not None:
        x = x.clamp(0, 1)
    if params["flip"] is not None:
        x = torch.where(per(params["flip"]), x.flip(-1), x)
    mean = torch.tensor(mean, dtype=f64, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=f64, device=dev).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_batch_reference(images: torch.Tensor, cfg: AugmentOpConfig, params: dict,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The map of :func:`augment_batch` step by step on the whole batch, in float64 (slow, clear),
    then cast to ``dtype``: its test oracle.  ``params``: the draws (:func:`draw_params`)."""
    _check_config(cfg)
    return _reference(images, params, cfg.mean, cfg.std).to(dtype)


# ----------------------------------------------------------------------------------------------
# Shared maths: blur taps, colour matrices, the folded per-pixel map
# ----------------------------------------------------------------------------------------------
def _blur_radius(sigma: float, h: int, w: int) -> int:
    """ceil(3 sigma), at least 1, capped below the image size (0: an image under 3 px is not blurred)."""
    return max(0, min(max(1, int(math.ceil(3 * sigma))), (min(h, w) - 1) // 2))


def _radii(sigma: torch.Tensor, h: int, w: int) -> list:
    return [_blur_radius(s, h, w) if s > 0 else 0 for s in sigma.tolist()]


def blur_taps(sigma: torch.Tensor, h: int, w: int):
    """(radius, normalised Gaussian taps [B, 2*radius+1] in float64) for per-sample ``sigma``, or
    (0, None) when no sample is blurred.  Each sample's window is 2*ceil(3*sigma)+1 taps, capped
    below the image size (reflect padding needs radius <= size - 1; its taps are zero outside the
    window); ``radius`` is the largest.  A sample with sigma <= 0 gets the identity tap."""
    if sigma.numel() == 0 or float(sigma.max()) <= 0:
        return 0, None
    radii = _radii(sigma, h, w)
    radius = max(radii)
    pos = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (pos / sigma.to(torch.float64).cpu().clamp_min(1e-6).view(-1, 1)) ** 2)
    k = torch.where(pos.abs() <= torch.tensor(radii, dtype=torch.float64).view(-1, 1), k, 0.0)
    identity = (pos == 0).to(torch.float64).expand_as(k)
    return radius, torch.where(sigma.cpu().view(-1, 1) > 0, k / k.sum(1, keepdim=True), identity)


def _colour_matrices(params: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [n,3,3], k [n]) in float64: colour(u) = A u + k * luma_mean(u) * 1 (module notes)."""
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


def _pixel_map(params: dict, mean, std, n: int) -> dict:
    """The folded per-pixel map of the module notes, float32 on the CPU: ``a`` [n, 3, 3] (A / std
    / 255), ``off`` [3] (-mean / std), ``k`` [n, 3] (k / std / 255, None without jitter) and the
    clamp bounds ``lo``, ``hi`` [3] (the images of 0 and 1)."""
    a, k = _colour_matrices(params, n)
    mean = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1)
    std = torch.tensor(std, dtype=torch.float64).view(1, 3, 1)
    return {
        "a": (a / std / 255.0).to(torch.float32),
        "off": (-mean / std).view(3).to(torch.float32),
        "k": (None if params["jitter"] is None
              else (k.view(n, 1, 1) / std / 255.0).view(n, 3).to(torch.float32)),
        "lo": (-mean / std).view(3).to(torch.float32),
        "hi": ((1 - mean) / std).view(3).to(torch.float32),
    }


# ----------------------------------------------------------------------------------------------
# torch backend: batched tensor operations
#
# The colour map is one batched matmul (baddbmm) per chunk.  On CPU the batch goes in chunks of
# 2**20 values (4 MB of float32) through per-thread scratch buffers: a chunk that small stays in
# cache between the passes, and reusing the buffers avoids page-faulting a fresh batch-sized
# tensor (which the allocator returns to the OS when freed) on every call.
# ----------------------------------------------------------------------------------------------
_SCRATCH = threading.local()
_CHUNK_VALUES = 1 << 20
# Below this many pixels an image's per-op overhead dominates: blur such images together.
_PER_IMAGE_MIN_PIXELS = 96 * 96


def _scratch(device: torch.device, shape: tuple, slot: int,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A per-thread reusable CPU buffer of ``shape`` (``slot`` tells apart the buffers a call
    holds at once); elsewhere a fresh tensor."""
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


def _blur(x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`gaussian_blur` of ``x`` into ``out`` (which is ``x`` or a copy of it)."""
    _, _, h, w = x.shape
    radius, k = blur_taps(sigma, h, w)
    if k is None:
        return
    if x.device.type != "cpu" or h * w < _PER_IMAGE_MIN_PIXELS:
        # the blurred samples together, one operation per tap (with the largest window)
        sel = (sigma.cpu() > 0).nonzero().view(-1)
        idx = sel.to(x.device)
        out[idx] = _blur_batch(x[idx], k[sel].to(device=x.device, dtype=x.dtype), radius)
        return
    # one image at a time with its own window: it stays in cache across the passes, and a small
    # sigma costs few taps
    for i, s in enumerate(sigma.tolist()):
        if s <= 0:
            continue
        r = _blur_radius(s, h, w)
        _blur_image(x[i], k[i, radius - r:radius + r + 1].tolist(), out[i])


def _augment_torch(images: torch.Tensor, params: dict, mean, std, out: torch.Tensor) -> None:
    n, h, w, _ = images.shape
    dev, dtype = images.device, out.dtype
    maps = _pixel_map(params, mean, std, n)
    a_n = maps["a"].to(dev)
    off_n = maps["off"].view(1, 3, 1).expand(n, 3, 1).to(dev)
    k_n = maps["k"].view(n, 3, 1).to(dev) if maps["k"] is not None else None
    lo, hi = maps["lo"].view(1, 3, 1).to(dev), maps["hi"].view(1, 3, 1).to(dev)
    luma = torch.tensor(_LUMA, dtype=torch.float32, device=dev).view(1, 3)
    sigma, flip = params["sigma"], params["flip"]
    step = n if dev.type != "cpu" else max(1, _CHUNK_VALUES // (3 * h * w))
    for i in range(0, n, step):
        j = min(n, i + step)
        c = j - i
        x = _scratch(dev, (c, 3, h, w), 0)
        # uint8 HWC -> float CHW, 0..255, one pass (a plain copy when ``images`` is a channels-first
        # batch viewed as [B, H, W, 3], which is what the loaders hand over)
        src = images[i:j].permute(0, 3, 1, 2)
        x.copy_(src)
        if flip is not None and bool(flip[i:j].any()):
            # flipped at the input (the flip commutes with every later step)
            sel = flip[i:j].nonzero().view(-1)
            if dev.type == "cpu":  # per image: no batch-sized temporaries
                for row in sel.tolist():
                    x[row].copy_(src[row].flip(-1))
            else:
                sel = sel.to(dev)
                x[sel] = x[sel].flip(-1)
        if sigma is not None and bool((sigma[i:j] > 0).any()):
            _blur(x, sigma[i:j], x)
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


# ----------------------------------------------------------------------------------------------
# native backend: csrc/augment_cpu.cpp through fastclip._C (csrc/bindings.cpp checks the arguments)
# ----------------------------------------------------------------------------------------------
def _native_check(**_) -> list:
    why = extension.reason()
    return [f"the C++ extension is not available: {why}"] if why else []


def _augment_native(images: torch.Tensor, params: dict, mean, std, out: torch.Tensor) -> None:
    """One call of ``_C.augment`` per batch (the GIL released for all of it), on numpy views of
    the tensors (no copies).  float16/bfloat16 output goes through a float32 scratch chunk of
    at most 4 MB, so it is still in cache when it is cast."""
    ext, why = extension.load()
    if ext is None:  # it loaded when the backend was chosen; extension.reset() in between can refuse it
        raise dispatch.BackendError(f"{OP}: backend 'native' cannot run: the C++ extension is not "
                                    f"available: {why}")
    n, h, w, _ = images.shape
    maps = _pixel_map(params, mean, std, n)
    sigma, flip = params["sigma"], params["flip"]
    taps = radii = None
    if sigma is not None:
        taps = blur_taps(sigma, h, w)[1]
        if taps is not None:
            taps = taps.to(torch.float32).contiguous().numpy()
            radii = torch.tensor(_radii(sigma, h, w), dtype=torch.int64).numpy()
    flips = flip.cpu().contiguous().numpy() if flip is not None else None
    a = maps["a"].contiguous().numpy()
    kl = maps["k"].contiguous().numpy() if maps["k"] is not None else None
    clamp = {"lo": maps["lo"].numpy(), "hi": maps["hi"].numpy()} if kl is not None else {}
    fixed = (maps["off"].numpy(), torch.tensor(_LUMA, dtype=torch.float32).numpy())
    src = images.detach().numpy()

    def run(lo: int, hi: int, dst) -> None:
        def part(v):
            return None if v is None else v[lo:hi]
        ext.augment(src[lo:hi], dst, a[lo:hi], *fixed, flip=part(flips), taps=part(taps), radii=part(radii),
                    kl=part(kl), **clamp)

    if out.dtype == torch.float32:
        run(0, n, out.detach().numpy())
        return
    step = max(1, _CHUNK_VALUES // (3 * h * w))
    for i in range(0, n, step):
        j = min(n, i + step)
        tmp = _scratch(images.device, (j - i, 3, h, w), 5)
        run(i, j, tmp.numpy())
        out[i:j].copy_(tmp)


def _augment_reference(images: torch.Tensor, params: dict, mean, std, out: torch.Tensor) -> None:
    out.copy_(_reference(images, params, mean, std))


# Backends in priority order: fn(images, params, mean, std, out) writes the augmented batch to out.
dispatch.register(OP, dispatch.Backend(
    "native", fn=_augment_native, devices=("cpu",), check=_native_check,
    doc="fastclip's C++ kernel in fastclip._C, one pass per image"))
dispatch.register(OP, dispatch.Backend(
    "torch", fn=_augment_torch, dtypes=FLOATS, doc="batched torch tensor operations"))
dispatch.register(OP, dispatch.Backend(
    "reference", fn=_augment_reference, dtypes=FLOATS, auto_devices=(),
    doc="op by op in float64 (the test oracle)"))


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Separable Gaussian blur of float ``x`` [B, C, H, W] with a per-sample ``sigma`` [B] (<= 0:
    that sample unchanged).

    Reflect padding; each sample's window is 2*ceil(3*sigma)+1 taps, capped below the image size
    (:func:`blur_taps`), and each axis is a sum over the taps of shifted views.  On CPU, images of
    96x96 pixels and more go one at a time with their own window; smaller images, and any on
    another device, go together with the largest window (zero taps outside each sample's own).
    ``inplace`` writes the blurred images back into ``x`` and returns it.  Agrees with
    :func:`gaussian_blur_reference` to rounding.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(sigma, torch.Tensor):
        raise TypeError(f"x and sigma must be tensors, got {type(x).__name__} and {type(sigma).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must have shape ({x.shape[0]},) (one per image of x), "
                         f"got {tuple(sigma.shape)}")
    out = x if inplace else x.clone()
    _blur(x, sigma, out)
    return out


def augment_batch(images: torch.Tensor, cfg: AugmentOpConfig, generator: Optional[torch.Generator] = None,
                  dtype: torch.dtype = torch.float32, params: Optional[dict] = None,
                  out: Optional[torch.Tensor] = None, backend: Optional[str] = "auto") -> torch.Tensor:
    """Augment and normalise a batch: uint8 ``images`` [B, H, W, 3] -> ``[B, 3, H, W]`` in ``dtype``.

    Args:
        images: uint8 [B, H, W, 3], already cropped and resized, on any device and with any
            strides (a channels-first batch viewed as [B, H, W, 3] is read without a copy).
        cfg: the knobs (:class:`AugmentOpConfig`, or a preset ``fastclip.data.AugmentConfig``).
        generator: CPU ``torch.Generator`` for the draws (None: a generator seeded with 0).
        dtype: output dtype (float32, float16, bfloat16; float64 with the torch backend).
        params: the draws to use instead (:func:`draw_params`, :func:`slice_params`); then
            ``generator`` is not used and only ``cfg``'s ``mean``/``std`` are read.
        out: contiguous [B, 3, H, W] tensor of ``dtype`` on ``images``' device to write into.
        backend: "auto", "native", "torch" or "reference" (else ``FASTCLIP_AUGMENT_BACKEND``).

    Returns:
        ``out`` (or a new tensor): the map of the module notes applied per sample.  Every backend
        agrees with :func:`augment_batch_reference` to float32 rounding.

    Raises:
        ValueError on malformed ``images``, ``out`` or ``params``; TypeError for ``images`` that
        are not a tensor or a ``cfg`` that is not an :class:`AugmentOpConfig`;
        ``dispatch.BackendError`` (with every backend's reason) when the requested backend, or
        none, can run the inputs.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a uint8 tensor [B, H, W, 3], got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    n, h, w, _ = images.shape
    if h == 0 or w == 0:
        raise ValueError(f"images must be at least 1x1 pixels, got {tuple(images.shape)}")
    _check_config(cfg)
    dev = images.device
    if out is not None and (out.shape != (n, 3, h, w) or out.dtype != dtype or out.device != dev
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor {(n, 3, h, w)} on {dev}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    chosen = dispatch.select(OP, backend, device=dev, dtype=dtype, env=ENV, shapes=(tuple(images.shape),))
    if params is None:
        params = draw_params(n, cfg, generator if generator is not None else torch.Generator().manual_seed(0))
    else:
        check_params(params, n)
    if out is None:
        out = torch.empty(n, 3, h, w, dtype=dtype, device=dev)
    chosen.fn(images, params, cfg.mean, cfg.std, out)
    return out
