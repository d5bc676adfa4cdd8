"""What the loader's backends yield, and how they cut the sample stream into chunks.

A backend (``fastclip.data.pil_batches.pil_batches``, ``fastclip.data.dali_batches.dali_batches``,
registered with the dispatcher as op ``data_loader``) is a function::

    fn(loader, samples, epoch, slot, stats, start, index) -> Iterator[Batch]

``samples``: the slot's sample stream for ``epoch`` from stream index ``start`` on; ``index``: the
index of the first batch (it seeds the colour draws); ``stats``: the epoch's counters, in which the
backend counts what it delivers and what its decoders skip.  Each :class:`Batch` carries the output
tuple, the stream position after it (the number of stream samples its delivery used up: resuming
there continues the stream with the next batch), the next batch index, and ``delta``: the
decoding-side counts that go with it (the part of ``stats`` that a state saved after this batch
takes over).  Batches come in stream order.
"""
from __future__ import annotations

from typing import Iterator

from .samples import Sample
from .stats import DataStats

__all__ = ["Batch", "chunks"]


class Batch:
    """A batch on its way to the consumer, with the epoch's stream position after it, the next
    batch index and the decoding-side counts that go with it (what the loader's state takes over)."""

    __slots__ = ("out", "position", "index", "delta")

    def __init__(self, out: tuple, position: int, index: int, delta: DataStats):
        self.out, self.position, self.index, self.delta = out, position, index, delta


def chunks(samples: Iterator[Sample], size: int, start: int) -> Iterator[tuple[int, list]]:
    """``(stream index of the chunk's first sample, chunk)``: ``samples`` (which begin at stream
    index ``start``) cut into lists of ``size``, the last one shorter when the stream ends."""
    chunk = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield start, chunk
            start += size
            chunk = []
    if chunk:
        yield start, chunk
