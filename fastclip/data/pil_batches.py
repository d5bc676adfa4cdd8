"""The ``pil`` loader backend: PIL decoding in a thread pool, then the augment op.

:func:`pil_batches` follows the backend contract of :mod:`fastclip.data.batches`.  The stream is
cut into chunks of up to 32 samples, decoded by the ``loader.num_threads`` threads of one pool
(:func:`decode_chunk`: each sample's crop drawn from ``loader.crop_rng(epoch, sample)``, so it does
not depend on chunks, threads or batches).  Batches are the next ``batch_size`` samples that
decode, in stream order; a batch's position is the stream index of its last sample + 1, and the
decoder skips before that position go with it (its ``delta``).  The last batch of a one-pass
epoch may be short, unless ``loader.drop_last``.  Stacking, augmentation and counting are
:func:`pil_batch`, which the DALI backend also uses for a batch its decoder failed.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import torch

from . import decode
from .batches import Batch, chunks
from .samples import Sample
from .stats import DataStats
from .threads import thread_pool

__all__ = ["pil_batches", "decode_chunk", "pil_batch"]


def decode_chunk(loader, chunk: Sequence[Sample], first: int, epoch: int) -> tuple[list, list]:
    """PIL-decode ``chunk``, whose first sample has stream index ``first``: ``([(sample, [uint8
    view tensors [3, S, S]], stream index)] for the samples that decode, [(stream index,
    "corrupt_image", where)] for the others)``."""
    out, failed = [], []
    for i, s in enumerate(chunk, first):
        try:
            views = decode.decode_views(s.image, loader.cfg, loader.crop_rng(epoch, s))
        except decode.DecodeError as exc:
            failed.append((i, "corrupt_image", f"{s.shard}:{s.key}: {exc}"))
            continue
        out.append((s, views, i))
    return out, failed


def _stacked_views(loader, decoded: list) -> list:
    """The decoded ``[3, S, S]`` views stacked into uint8 batches, one per view, seen as
    ``[B, S, S, 3]`` (channels-first memory, what ``augment_batch`` converts fastest)."""
    out = []
    for v in range(1 + loader.cfg.extra_views):
        first = decoded[0][1][v]
        batch = loader.alloc((len(decoded), *first.shape), torch.uint8)
        torch.stack([item[1][v] for item in decoded], out=batch)
        out.append(batch.permute(0, 2, 3, 1))
    return out


def pil_batch(loader, decoded: list, epoch: int, slot: int, index: int, stats: DataStats,
              pool: ThreadPoolExecutor, position: int, delta: DataStats) -> Batch:
    """Batch ``index`` from ``decoded`` (items of :func:`decode_chunk`): stacked, augmented with
    the colour draws of ``(epoch, slot, index)`` in the threads of ``pool``, tokenised and counted
    in ``stats`` and ``delta``; ``position`` is the stream position after it."""
    views = loader.augment_views(_stacked_views(loader, decoded), loader.colour_generator(epoch, slot, index),
                                 pool)
    out = loader.finish_batch(views, [item[0] for item in decoded], stats, delta)
    return Batch(out, position, index + 1, delta)


def pil_batches(loader, samples: Iterator[Sample], epoch: int, slot: int, stats: DataStats,
                start: int, index: int) -> Iterator[Batch]:
    """The next ``batch_size`` samples that decode, in stream order; a batch's position is the
    stream index of its last sample + 1, and the decoder skips before it go with it."""
    batch_size = loader.batch_size
    chunk_size = max(1, min(batch_size, 32))
    depth = loader.num_threads * 2 + (batch_size + chunk_size - 1) // chunk_size
    # One pool for decoding and augmenting: a batch's augmentation waits behind the decode chunks
    # queued ahead of it (latency), but a second pool's threads would compete with the decoders'
    # for the same cores.
    pool = thread_pool(loader.num_threads, "fastclip-decode")
    pending: deque = deque()
    ready: list = []
    failed: deque = deque()  # decoder skips not yet handed over with a batch

    def emit(decoded: list) -> Batch:
        position = decoded[-1][2] + 1
        delta = DataStats(warn=False)
        while failed and failed[0][0] < position:
            _, reason, where = failed.popleft()
            delta.skip(reason, where)
        return pil_batch(loader, decoded, epoch, slot, index, stats, pool, position, delta)

    try:
        stream = chunks(samples, chunk_size, start)
        exhausted = False
        while True:
            while not exhausted and len(pending) < depth:
                try:
                    first, chunk = next(stream)
                except StopIteration:
                    exhausted = True
                    break
                pending.append(pool.submit(decode_chunk, loader, chunk, first, epoch))
            if not pending:
                break
            decoded, failures = pending.popleft().result()
            for _, reason, where in failures:
                stats.skip(reason, where)
            failed.extend(failures)
            ready.extend(decoded)
            while len(ready) >= batch_size:
                batch, ready = ready[:batch_size], ready[batch_size:]
                yield emit(batch)
                index += 1
        if ready and not loader.drop_last:
            yield emit(ready)
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
