"""The DALI pipeline of the ``dali`` data backend (``dali_batches.py``); ``nvidia.dali`` itself is
imported only when a pipeline is built or its outputs are read, never at import.

Encoded bytes come from fastclip's own tar reader through ``fn.external_source`` (not
``fn.readers.webdataset``, which stops the whole pipeline on a damaged tar or a missing caption
and needs index files), so skipping and counting stay in Python, where every reason is known.

Two forms, chosen by the loader:

``ops="all"``     DALI does everything: decoding (``fn.decoders.image``; a random-resized crop is
                  fused into the decoder, ``fn.decoders.image_random_crop``, so a JPEG is decoded
                  only inside its window), resize, colour twist, blur, flip and normalisation.
                  Used with ``device="mixed"`` (GPU), where those operators are fast kernels, and
                  on CPU when asked for (``ClipLoader(dali_ops="all")``).  DALI's random operators
                  draw from one generator per pipeline, so the crops and colours depend on where a
                  pipeline started: a resumed epoch delivers the same samples in the same batches,
                  but not bitwise the same images.
``ops="decode"``  DALI decodes and hands over uint8 HWC images; resizing runs on torch's uint8
                  kernels (``augment.resize_crop``) and the colour operations in fastclip's
                  ``augment.augment_batch`` (its C kernel where a C compiler is found, else torch
                  operations).  Used on CPU.  With one view, the loader computes every sample's
                  crop window in Python (``augment.crop_box`` with the sample's own
                  ``augment.crop_rng``, on the width and height read from the image header by
                  ``sniff.image_dimensions``) and feeds it with the bytes through the same
                  ``external_source`` to ``fn.decoders.image_slice`` (integer anchor and shape
                  inputs: absolute pixels, "WH" order), DALI's region-of-interest decoder: a JPEG
                  is still decoded only inside its window, and the crop is the one the PIL backend
                  draws for that sample, whatever the batching (bitwise resumable).  With extra
                  views (simclr) DALI decodes whole images and the views' boxes are drawn in
                  Python the same way.  EXIF orientation is not applied here (as Pillow's ``open``
                  does not), so header sizes, windows and both backends agree.  (Why this split
                  on CPU: DALI's CPU resize and colour operators are the slow part there, its
                  decoder is not; the figures are in ``benchmarks/RESULTS.md``.)

A sample that passes the structural check but still fails in DALI's decoder (or a window that does
not fit the decoded image) makes DALI fail its whole batch; the loader then decodes that batch with
PIL (see ``dali_batches.py``), so no good sample is lost.  The pipeline keeps running after such an error
(checked in tests).  A sample whose size the header does not give is fed with a 1x1 window and
decoded by PIL instead.
"""
from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np
import torch

from .augment import AugmentConfig

__all__ = ["build_pipeline", "roi_decode", "outputs_to_torch", "decoded_arrays", "encoded_batch",
           "window_batch"]


def _interp(types, name: str):
    return types.INTERP_CUBIC if name == "bicubic" else types.INTERP_LINEAR


def _geometry(fn, types, encoded, decoded, cfg: AugmentConfig, decoder: str):
    """Decoded + cropped + resized uint8 HWC images of size S x S (centre crop deferred to the
    normalise step, which crops for free).  Returns (images, crop or None)."""
    s = cfg.image_size
    interp = _interp(types, cfg.interpolation)
    if decoded is None:  # one view: a random crop is fused into the decoder (see _decode_only)
        decoded = _decode_only(fn, types, encoded, cfg, decoder)
        if cfg.random_crop:
            return fn.resize(decoded, resize_x=s, resize_y=s, interp_type=interp, antialias=True), None
    elif cfg.random_crop:
        return fn.random_resized_crop(decoded, size=[s, s], random_area=list(cfg.scale),
                                      random_aspect_ratio=list(cfg.ratio), num_attempts=10,
                                      interp_type=interp, antialias=True), None
    return fn.resize(decoded, resize_shorter=s, interp_type=interp, antialias=True), (s, s)


def _maybe_blur(fn, images, cfg: AugmentConfig):
    # A per-sample DALI conditional (the pipeline is built with enable_conditionals): only the
    # samples drawn for blurring go through the blur, rather than blurring every sample and the
    # undrawn ones with a negligible sigma.
    if fn.random.coin_flip(probability=cfg.blur_p):
        out = fn.gaussian_blur(images, sigma=fn.random.uniform(range=list(cfg.blur_sigma)))
    else:
        out = images
    return out


def _colour_and_normalise(fn, types, images, crop, cfg: AugmentConfig):
    one = 1.0
    if cfg.jitter_p > 0 or cfg.grayscale_p > 0:
        on = fn.random.coin_flip(probability=cfg.jitter_p) if cfg.jitter_p > 0 else 0

        def factor(strength):
            if cfg.jitter_p == 0 or strength == 0:
                return one
            u = fn.random.uniform(range=[max(0.0, 1 - strength), 1 + strength])
            return one + on * (u - one)
        brightness, contrast = factor(cfg.brightness), factor(cfg.contrast)
        saturation = factor(cfg.saturation)
        hue = 0.0
        if cfg.jitter_p > 0 and cfg.hue > 0:
            hue = on * fn.random.uniform(range=[-cfg.hue * 360.0, cfg.hue * 360.0])  # DALI: degrees
        if cfg.grayscale_p > 0:
            saturation = saturation * (one - fn.random.coin_flip(probability=cfg.grayscale_p))
        images = fn.color_twist(images, brightness=brightness, contrast=contrast, saturation=saturation,
                                hue=hue)
    if cfg.blur_p > 0:
        images = _maybe_blur(fn, images, cfg)
    mirror = fn.random.coin_flip(probability=cfg.flip_p) if cfg.flip_p > 0 else 0
    kw = dict(crop=list(crop), crop_pos_x=0.5, crop_pos_y=0.5) if crop else {}
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                    mean=[255.0 * m for m in cfg.mean], std=[255.0 * s for s in cfg.std],
                                    **kw)


def _decode_only(fn, types, encoded, cfg: AugmentConfig, decoder: str):
    """``ops="all"``, one view: uint8 HWC images of any size, the random-resized crop window when
    ``cfg`` has one (DALI's own random crop fused into the decoder: a JPEG is decoded only inside
    the window), else the whole image (the caller crops)."""
    if cfg.random_crop and not cfg.extra_views:
        return fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                             random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio),
                                             num_attempts=10)
    return fn.decoders.image(encoded, device=decoder, output_type=types.RGB)


def roi_decode(cfg: AugmentConfig, ops: str) -> bool:
    """Whether the pipeline for ``cfg`` and ``ops`` decodes per-sample windows given by the source."""
    return ops == "decode" and not cfg.extra_views


def build_pipeline(cfg: AugmentConfig, source: Callable, batch_size: int, num_threads: int, seed: int,
                   device_id=None, prefetch: int = 2, ops: str = "all"):
    """A built DALI pipeline: ``source()`` returns a list of uint8 arrays (encoded images) or raises
    StopIteration; when :func:`roi_decode` it returns ``(encoded, anchors, shapes)`` instead, the
    windows as int32 ``[x, y]`` and ``[width, height]`` per sample (:func:`window_batch`).
    Outputs with ``ops="all"``: the main view, then ``cfg.extra_views`` views, each float CHW;
    with ``ops="decode"``: one output of uint8 HWC images, the windows when :func:`roi_decode`,
    else the whole images (see the module docstring)."""
    from nvidia.dali import fn, pipeline_def, types

    if ops not in ("all", "decode"):
        raise ValueError(f"ops must be 'all' or 'decode', got {ops!r}")
    decoder = "cpu" if device_id is None else "mixed"

    views = [cfg] + [cfg.view] * cfg.extra_views
    conditionals = ops == "all" and any(c.blur_p > 0 for c in views)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed & 0x7FFFFFFF, prefetch_queue_depth=prefetch, enable_conditionals=conditionals)
    def pipe():
        if roi_decode(cfg, ops):
            encoded, anchor, shape = fn.external_source(source=source, num_outputs=3, batch=True,
                                                        dtype=[types.UINT8, types.INT32, types.INT32],
                                                        ndim=[1, 1, 1])
            # Integer anchor/shape inputs are absolute pixels ("WH" order, the default axis_names).
            return fn.decoders.image_slice(encoded, anchor, shape, device=decoder, output_type=types.RGB,
                                           adjust_orientation=False)
        encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1, name="encoded")
        if ops == "decode":
            return fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False)
        decoded = None
        if cfg.extra_views:  # decode once, crop several times
            decoded = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
        outs = []
        for c in views:
            images, crop = _geometry(fn, types, encoded, decoded, c, decoder)
            outs.append(_colour_and_normalise(fn, types, images, crop, c))
        return tuple(outs)

    p = pipe()
    p.build()
    return p


def decoded_arrays(output) -> list:
    """The uint8 HWC images of an ``ops="decode"`` output as torch tensors; they view DALI's
    buffers, valid until the pipeline's next ``run()``."""
    return [torch.from_numpy(np.array(output[i], copy=False)) for i in range(len(output))]


def outputs_to_torch(outputs, dtype: torch.dtype, device: torch.device) -> list:
    """DALI TensorLists -> torch tensors (copied out of DALI's reused buffers)."""
    out = []
    for tl in outputs:
        if type(tl).__name__ == "TensorListGPU":
            from nvidia.dali.plugin.pytorch import feed_ndarray
            t = torch.empty(tl.as_tensor().shape(), dtype=torch.float32, device=device)
            feed_ndarray(tl, t, cuda_stream=torch.cuda.current_stream(device))
        else:
            dense = tl.as_tensor()
            t = torch.empty(dense.shape(), dtype=torch.float32)
            dense.copy_to_external(ctypes.c_void_p(t.data_ptr()))
            if device.type != "cpu":
                t = t.to(device, non_blocking=True)
        out.append(t.to(dtype) if dtype != torch.float32 else t)
    return out


def encoded_batch(samples) -> list:
    return [np.frombuffer(s.image, dtype=np.uint8) for s in samples]


_NO_WINDOW = (0, 0, 1, 1)


def window_batch(boxes) -> tuple:
    """``(anchors, shapes)`` for ``fn.decoders.image_slice`` from ``(left, top, right, bottom)``
    boxes in whole pixels; None (size unknown) becomes a 1x1 window the loader replaces."""
    anchors, shapes = [], []
    for box in boxes:
        left, top, right, bottom = box if box is not None else _NO_WINDOW
        anchors.append(np.array((left, top), dtype=np.int32))
        shapes.append(np.array((right - left, bottom - top), dtype=np.int32))
    return anchors, shapes
