"""The sample stream of one slot (rank x worker) for one epoch: :class:`ShardSource`.

Epochs: with ``resampled=False`` an epoch is one pass in which every good sample is delivered
exactly once over all slots (:func:`fastclip.distributed.slots.split_slots` numbers them).
``split="shard"`` gives each slot whole shards (``shards[slot::slots]`` of an epoch-seeded
permutation; I/O is not duplicated, slots may get unequal counts); ``split="sample"`` lets every
slot read every shard and keep good sample ``i`` iff ``i % slots == slot`` (counts differ by at
most one; I/O is multiplied by the number of slots), and skipped sample ``j`` is counted by slot
``j % slots``, so the counters summed over slots are the dataset's.  ``split="auto"`` takes
``shard`` when there are at least as many shards as slots.  With ``resampled=True`` each slot
draws shards with replacement, forever (or ``samples`` per slot).

Shuffling: with ``shuffle > 1`` the shard order is an epoch-seeded permutation (the same on every
slot) and samples pass through webdataset's buffer shuffle of that size, drawn from
``(seed, epoch, slot, slots)``.

Resuming: a slot's stream for an epoch is a function of (seed, epoch, slot, slots) and the shard
list, so ``ShardSource.iter(..., start=n)`` gives the same stream without its first ``n``
samples, which are read from the tars (skips along the way are counted again) but not decoded:
the loader resumes inside an epoch this way (``ClipLoader.load_state_dict``).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

from .samples import Sample, iter_shard
from .shardlist import expand_shards
from .stats import DataStats

__all__ = ["ShardSource"]


def _shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """webdataset's buffer shuffle: fill ``size`` items, then emit a random one per new item."""
    if size <= 1:
        yield from items
        return
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


@dataclass
class ShardSource:
    """Raw samples of a shard set for one slot (rank x worker) and epoch.

    shards:       anything :func:`expand_shards` takes
    shuffle:      buffer size for sample shuffling (0 or 1: none; shard order is shuffled too)
    resampled:    draw shards with replacement forever (``samples``: stop after that many per slot)
    split:        "auto" | "shard" | "sample" (see the module docstring)
    check_images: the cheap structural check (needed by DALI, which fails a whole batch on a
                  truncated image); the decoders catch the rest either way
    wrong_modes:  "convert" (deliver every image; the decoders convert to RGB) or "skip" (count
                  grayscale, RGBA, CMYK, 16-bit... images as ``wrong_mode:<mode>``; needs
                  ``check_images``).  :class:`~fastclip.data.ClipLoader` skips by default.
    """

    shards: Union[str, Sequence[str]]
    shuffle: int = 0
    seed: int = 0
    resampled: bool = False
    samples: Optional[int] = None
    split: str = "auto"
    check_images: bool = True
    keep_members: bool = False
    wrong_modes: str = "convert"

    def __post_init__(self):
        self.urls = expand_shards(self.shards)
        if self.split not in ("auto", "shard", "sample"):
            raise ValueError(f"split must be 'auto', 'shard' or 'sample', got {self.split!r}")
        if self.shuffle < 0:
            raise ValueError(f"shuffle must be >= 0 (a buffer size), got {self.shuffle}")
        if self.wrong_modes not in ("skip", "convert"):
            raise ValueError(f"wrong_modes must be 'skip' or 'convert', got {self.wrong_modes!r}")
        if self.wrong_modes == "skip" and not self.check_images:
            raise ValueError("wrong_modes='skip' needs check_images=True (modes are read from the image "
                             "headers by the check)")

    def split_mode(self, slots: int) -> str:
        if self.split != "auto":
            return self.split
        return "shard" if len(self.urls) >= slots else "sample"

    def iter(self, epoch: int = 0, slot: int = 0, slots: int = 1, stats: Optional[DataStats] = None,
             start: int = 0) -> Iterator[Sample]:
        """Good samples for ``slot`` of ``slots`` in ``epoch``; skips are counted in ``stats``.

        ``start``: leave out the stream's first ``start`` samples (to resume inside an epoch).
        They are read and checked as usual (so what the reader skips among them is counted again)
        but never decoded; the samples after them are those of the whole stream, in its order.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        stats = stats if stats is not None else DataStats()
        rng = random.Random(f"fastclip-samples-{self.seed}-{epoch}-{slot}-{slots}")
        if self.resampled:
            samples = self._resampled(rng, stats)
        else:
            samples = self._one_pass(epoch, slot, slots, stats)
        if self.samples is not None:
            samples = _take(samples, self.samples)
        samples = _shuffle_buffer(samples, self.shuffle, rng)
        return itertools.islice(samples, start, None) if start else samples

    def _one_pass(self, epoch: int, slot: int, slots: int, stats: DataStats) -> Iterator[Sample]:
        order = list(range(len(self.urls)))
        if self.shuffle > 1:  # the same permutation on every slot (seeded by seed and epoch only)
            random.Random(f"fastclip-shards-{self.seed}-{epoch}").shuffle(order)
        if self.split_mode(slots) == "shard":
            for i in order[slot::slots]:
                for sample, why, where in self._shard(i, stats):
                    if why:
                        stats.skip(why, where)
                    else:
                        yield sample
            return
        # sample split: every slot reads every shard; good sample i goes to slot i % slots, and
        # skipped sample j is counted by slot j % slots (so summed counters equal the dataset's).
        good = bad = 0
        sink = DataStats(warn=False)
        for i in order:
            shard_stats = stats if i % slots == slot else sink
            for sample, why, where in self._shard(i, shard_stats):
                if why:
                    if bad % slots == slot:
                        stats.skip(why, where)
                    bad += 1
                else:
                    if good % slots == slot:
                        yield sample
                    good += 1

    def _shard(self, i: int, stats: DataStats):
        return iter_shard(self.urls[i], i, stats, self.check_images, self.keep_members,
                          self.wrong_modes == "skip")

    def _resampled(self, rng: random.Random, stats: DataStats) -> Iterator[Sample]:
        empty_draws = 0
        while True:
            i = rng.randrange(len(self.urls))
            n = 0
            for sample, why, where in self._shard(i, stats):
                if why:
                    stats.skip(why, where)
                else:
                    n += 1
                    yield sample
            empty_draws = 0 if n else empty_draws + 1
            if empty_draws > 10 * len(self.urls) + 10:
                raise RuntimeError(f"resampling {len(self.urls)} shard(s) found no good sample in "
                                   f"{empty_draws} draws; skipped so far: {dict(stats.skipped)}")


def _take(it: Iterator, n: int) -> Iterator:
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x
