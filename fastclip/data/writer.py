"""Writing shards: :class:`ShardWriter`.

Samples go into numbered plain tars (``pattern % index``), a new one every ``max_samples``
samples, each sample's members as ``<key>.<ext>`` in the order given, so that the reader
(:func:`fastclip.data.samples.iter_shard`) reads back the same samples in the same order.  The
bytes are a function of the samples alone (ustar format, mtime 0, mode 0644, no owner): writing
the same samples twice gives identical shards.
"""
from __future__ import annotations

import io
import os
import tarfile

__all__ = ["ShardWriter"]


class ShardWriter:
    """Writes samples into numbered tar shards: ``pattern % index`` (e.g. ``out/shard-%05d.tar``),
    a new shard every ``max_samples`` samples.  Deterministic bytes (fixed mtime, no owner)."""

    def __init__(self, pattern: str, max_samples: int = 1000, start: int = 0):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.pattern, self.max_samples, self.index = pattern, max_samples, start
        self.count, self.total, self._tar, self.paths = 0, 0, None, []
        os.makedirs(os.path.dirname(os.path.abspath(pattern % start)), exist_ok=True)

    def write(self, key: str, members: dict) -> None:
        """Add one sample: ``members`` maps extension -> bytes (str is encoded as UTF-8)."""
        if self._tar is None or self.count >= self.max_samples:
            self._next()
        for ext, data in members.items():
            if isinstance(data, str):
                data = data.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.total += 1

    def _next(self) -> None:
        self.close()
        path = self.pattern % self.index
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.paths.append(path)
        self.index += 1
        self.count = 0

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
