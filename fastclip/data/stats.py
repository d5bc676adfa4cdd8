"""What the data path delivered and what it skipped, per reason.

Bad input never crashes the reader and never loses a good sample: everything skipped is counted
in a :class:`DataStats` under one of the reasons below, and the first occurrence of each reason
may warn once.  Shard-level reasons (:data:`SHARD_REASONS`) count shards; the others
(:data:`SAMPLE_REASONS`) count samples, so ``delivered + total_skipped`` is the number of samples
read.  ``notes`` hold informational counts that are not skips (``converted:<mode>``,
``dali_batch_fallback``).  Counters merge (summed over slots they equal the dataset's) and
round-trip through plain dicts (:meth:`DataStats.state_dict`), which is what checkpoints store.
"""
from __future__ import annotations

import threading
import warnings
from collections import Counter

__all__ = ["DataStats", "SHARD_REASONS", "SAMPLE_REASONS"]

# Reasons a sample or shard is skipped.  Shard-level ones count shards, the rest samples.
SHARD_REASONS = ("missing_shard", "unreadable_shard", "truncated_tar")
SAMPLE_REASONS = ("missing_image", "missing_caption", "empty_caption", "bad_caption", "corrupt_image",
                  "truncated_image", "truncated_sample", "wrong_mode:<mode>")


class DataStats:
    """Thread-safe counters: ``delivered`` samples and ``skipped`` ones per reason.

    ``warn`` issues one ``UserWarning`` per reason (the first occurrence, with an example); the
    counters are what a trainer logs (``as_dict()``).  Informational counts that are not skips
    (e.g. ``converted:CMYK``) are kept in ``notes``.
    """

    def __init__(self, warn: bool = True):
        self._lock = threading.Lock()
        self.delivered = 0
        self.skipped: Counter = Counter()
        self.notes: Counter = Counter()
        self.examples: dict[str, str] = {}
        self._warn = warn

    def skip(self, reason: str, where: str = "", n: int = 1) -> None:
        with self._lock:
            self.skipped[reason] += n
            first = reason not in self.examples
            if first:
                self.examples[reason] = where
        if first and self._warn:
            warnings.warn(f"fastclip.data: skipping {reason.replace('_', ' ')} ({where}); further ones are "
                          f"counted in the loader's stats without a warning", UserWarning, stacklevel=3)

    def note(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.notes[what] += n

    def add_delivered(self, n: int) -> None:
        with self._lock:
            self.delivered += n

    def merge(self, other: "DataStats") -> "DataStats":
        with self._lock:
            self.delivered += other.delivered
            self.skipped.update(other.skipped)
            self.notes.update(other.notes)
            for k, v in other.examples.items():
                self.examples.setdefault(k, v)
        return self

    @property
    def total_skipped(self) -> int:
        """Skipped samples (shard-level reasons count shards and are not included)."""
        return sum(v for k, v in self.skipped.items() if k not in SHARD_REASONS)

    def as_dict(self) -> dict:
        """Flat counters for logging: ``{"delivered": n, "skipped/<reason>": n, "note/<what>": n}``."""
        with self._lock:
            out = {"delivered": self.delivered}
            out.update({f"skipped/{k}": v for k, v in sorted(self.skipped.items())})
            out.update({f"note/{k}": v for k, v in sorted(self.notes.items())})
        return out

    def state_dict(self) -> dict:
        """The counters as plain dicts (picklable; what a checkpoint stores)."""
        with self._lock:
            return {"delivered": self.delivered, "skipped": dict(self.skipped), "notes": dict(self.notes),
                    "examples": dict(self.examples)}

    def load_state_dict(self, state: dict) -> "DataStats":
        """Replace the counters with those of :meth:`state_dict`."""
        with self._lock:
            self.delivered = int(state["delivered"])
            self.skipped = Counter(state.get("skipped", {}))
            self.notes = Counter(state.get("notes", {}))
            self.examples = dict(state.get("examples", {}))
        return self

    @classmethod
    def from_state(cls, state: dict, warn: bool = False) -> "DataStats":
        return cls(warn=warn).load_state_dict(state)

    def summary(self) -> str:
        d = self.as_dict()
        return ", ".join(f"{k}={v}" for k, v in d.items())

    def __repr__(self) -> str:
        return f"DataStats({self.summary()})"
