"""Shard lists: what a ``shards`` argument names, as a list of paths.

:func:`expand_shards` takes webdataset's spellings: a brace pattern (``data/{00000..00127}.tar``,
``{a,b}``; several groups multiply out, the first varying slowest; a numeric range keeps the
width of a zero-padded or equal-width lower bound and may count down), a ``::``-separated list, a
directory (its ``*.tar`` files, sorted by name), or a list of any of these.  The order of the
result is the order of the spelling, which the reader's shard permutation and slot split start
from.  Paths are not checked: a missing shard is counted by the reader (``missing_shard``), not
refused here.
"""
from __future__ import annotations

import os
import re
from typing import Sequence, Union

__all__ = ["expand_shards"]

_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [s for item in items for s in _expand_braces(head + item + tail)]


def expand_shards(shards: Union[str, os.PathLike, Sequence]) -> list[str]:
    """Shard paths from a brace pattern (``data/{00000..00127}.tar``, ``{a,b}``), a ``::``-separated
    list (webdataset's convention), a directory (its ``*.tar``, sorted) or a list of any of these.

    Missing files are kept in the list: the reader counts them (``missing_shard``) and goes on.
    Raises ValueError when nothing is named.
    """
    if isinstance(shards, (str, os.PathLike)):
        shards = [os.fspath(shards)]
    out: list[str] = []
    for item in shards:
        item = os.fspath(item)
        for part in item.split("::"):
            if not part:
                continue
            if os.path.isdir(part):
                out.extend(sorted(os.path.join(part, f) for f in os.listdir(part) if f.endswith(".tar")))
            else:
                out.extend(_expand_braces(part))
    if not out:
        raise ValueError(f"shards must name at least one shard, got {shards!r}")
    return out
