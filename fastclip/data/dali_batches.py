"""The ``dali`` loader backend: fastclip's reader feeds encoded bytes to a DALI pipeline.

:func:`dali_batches` follows the backend contract of :mod:`fastclip.data.batches`.  The stream is
cut into chunks of ``batch_size`` samples, one DALI batch each, fed through
``fn.external_source`` (the pipeline is :func:`fastclip.data._dali.build_pipeline`); a batch's
position is the end of its chunk.  ``loader.dali_ops`` picks the pipeline: ``"all"`` (the default
with a CUDA device) runs DALI's operators for everything; ``"decode"`` (the default on CPU) has
DALI decode only, each sample's crop window (:func:`crop_window`, the box the PIL backend draws
for that sample) when there is one view, and resizes and augments in ``loader.num_threads``
Python threads, so that a sample's crop is the PIL backend's and resuming is bitwise.

A sample whose size its header does not give, or whose decoded window is not the size asked
for, is decoded by PIL instead (cropped the same way).  When DALI's decoder fails a whole batch
(an image that passed the structural check but does not decode), that chunk is decoded by PIL
(:func:`fastclip.data.pil_batches.decode_chunk`) and counted as the note
``dali_batch_fallback``, so no good sample is lost; three such failures in a row in which PIL
finds no bad image raise, as the pipeline itself is then broken.  DALI is imported only when a
pipeline is built, never at import.
"""
from __future__ import annotations

import random
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import torch

from . import _dali, decode
from .augment import crop_box, int_box, resize_crop
from .batches import Batch, chunks
from .pil_batches import decode_chunk, pil_batch
from .samples import Sample
from .sniff import image_dimensions
from .stats import DataStats
from .threads import run_in_parts, thread_pool

__all__ = ["dali_batches", "crop_window"]


def crop_window(loader, sample: Sample, epoch: int) -> Optional[tuple]:
    """The sample's crop window ``(left, top, right, bottom)`` in whole pixels (the box the PIL
    backend draws for it with one view), from the image size in its header; None when the header
    does not give the size."""
    dims = image_dimensions(sample.image)
    if dims is None:
        return None
    w, h = dims
    return int_box(crop_box(w, h, loader.cfg, loader.crop_rng(epoch, sample)), w, h)


def _cpu_views(loader, images: list, chunk: list, windows: Optional[list], epoch: int,
               generator: torch.Generator, pool: ThreadPoolExecutor, stats: DataStats,
               delta: DataStats) -> tuple[list, list]:
    """``dali_ops="decode"``: uint8 HWC ``images`` (the decoded windows when ``windows`` is given,
    else whole images cropped here by each sample's own boxes) -> resized by the threads of
    ``pool``, each on its part of the batch, then augmented (``loader.augment_views``).

    A sample without a window (its size unread) or whose decoded window is not the size asked
    for is decoded by PIL instead (cropped the same way); one PIL cannot decode either is left
    out and counted.  Returns (the samples kept, their views).
    """
    cfg = loader.cfg
    cfgs = [cfg] + [cfg.view] * cfg.extra_views
    size = cfg.image_size
    kept, boxes, ready = [], [], {}
    for i, (s, img) in enumerate(zip(chunk, images)):
        if windows is not None:
            box = windows[i]
            if box is None or tuple(img.shape[:2]) != (box[3] - box[1], box[2] - box[0]):
                try:
                    ready[len(kept)] = decode.decode_views(s.image, cfg, loader.crop_rng(epoch, s))
                except decode.DecodeError as exc:
                    for counter in (stats, delta):
                        counter.skip("corrupt_image", f"{s.shard}:{s.key}: {exc}")
                    continue
            boxes.append([None])  # the decoder cut the window: resize all of it
        else:
            h, w = int(img.shape[0]), int(img.shape[1])
            rng = loader.crop_rng(epoch, s)
            boxes.append([int_box(crop_box(w, h, c, rng), w, h) for c in cfgs])
        kept.append(i)
    n = len(kept)
    if n == 0:
        return [], []
    resized = loader.alloc((len(cfgs), n, 3, size, size), torch.uint8)

    def work(lo: int, hi: int) -> None:
        for j in range(lo, hi):
            for v, c in enumerate(cfgs):
                if j in ready:
                    resized[v, j].copy_(ready[j][v])
                else:
                    resize_crop(images[kept[j]], boxes[j][v], size, c.interpolation, resized[v, j])

    run_in_parts(pool, n, loader.num_threads, work)
    views = loader.augment_views([r.permute(0, 2, 3, 1) for r in resized], generator, pool)
    return [chunk[i] for i in kept], views


def dali_batches(loader, samples: Iterator[Sample], epoch: int, slot: int, stats: DataStats,
                 start: int, index: int) -> Iterator[Batch]:
    """Chunks of ``batch_size`` stream samples, one DALI batch each; a batch's position is the
    end of its chunk (also when PIL decodes a chunk DALI failed)."""
    device = loader.device
    batch_size = loader.batch_size
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    ops = loader.dali_ops if loader.dali_ops != "auto" else ("all" if device_id is not None else "decode")
    roi = _dali.roi_decode(loader.cfg, ops)
    stream = chunks(samples, batch_size, start)
    fed: deque = deque()
    source_error: list = []

    def source():
        try:
            first, chunk = next(stream)  # StopIteration ends DALI's epoch
        except StopIteration:
            raise
        except Exception as exc:  # the reader's own error: end DALI's epoch, raise it below
            source_error.append(exc)
            raise StopIteration from exc
        encoded = _dali.encoded_batch(chunk)
        if not roi:
            fed.append((first, chunk, None))
            return encoded
        windows = [crop_window(loader, s, epoch) for s in chunk]
        fed.append((first, chunk, windows))
        return (encoded, *_dali.window_batch(windows))

    # Only ops="all" draws from DALI's generator; seeded from where this run starts.
    seed = random.Random(loader.rng_seed("dali", epoch, slot, index)).getrandbits(31)
    pipe = _dali.build_pipeline(loader.cfg, source, batch_size, loader.num_threads, seed, device_id,
                                prefetch=loader.prefetch, ops=ops)
    pool = thread_pool(loader.num_threads, "fastclip-resize")
    unexplained = 0
    delta = DataStats(warn=False)  # counted since the last batch handed over
    try:
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                break
            except RuntimeError as exc:
                # One image that passed the structural check failed in DALI's decoder, which
                # fails the batch: decode this batch with PIL instead (counting what fails there).
                if source_error or not fed:
                    raise
                first, chunk, _ = fed.popleft()
                for counter in (stats, delta):
                    counter.note("dali_batch_fallback")
                decoded, failures = decode_chunk(loader, chunk, first, epoch)
                for _, reason, where in failures:
                    stats.skip(reason, where)
                    delta.skip(reason, where)
                # Guard against a pipeline that fails for reasons other than the data.
                unexplained = 0 if failures else unexplained + 1
                if unexplained >= 3:
                    raise RuntimeError("DALI failed 3 batches in a row in which PIL found no bad image; "
                                       f"the pipeline itself seems broken: {exc}") from exc
                if decoded and not (loader.drop_last and len(decoded) < batch_size):
                    yield pil_batch(loader, decoded, epoch, slot, index, stats, pool, first + len(chunk),
                                    delta)
                    delta = DataStats(warn=False)
                index += 1
                if not decoded:
                    warnings.warn(f"fastclip.data: DALI failed a batch and PIL decoded none of it: {exc}")
                continue
            first, chunk, windows = fed.popleft()
            if loader.drop_last and len(chunk) < batch_size:
                break
            unexplained = 0
            end = first + len(chunk)
            if ops == "all":
                views = _dali.outputs_to_torch(outputs, loader.dtype, device)
            else:  # done with DALI's buffers before the next run()
                images = _dali.decoded_arrays(outputs[0])
                generator = loader.colour_generator(epoch, slot, index)
                chunk, views = _cpu_views(loader, images, chunk, windows, epoch, generator, pool, stats,
                                          delta)
            if chunk:
                yield Batch(loader.finish_batch(views, chunk, stats, delta), end, index + 1, delta)
                delta = DataStats(warn=False)
            index += 1
        if source_error:
            raise source_error[0]
    finally:
        del pipe
        pool.shutdown(wait=True)
