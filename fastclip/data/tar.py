"""A tolerant tar reader: every complete member before the damage, then where it is.

A shard is a plain tar (what img2dataset writes for LAION, DataComp, CC3M/CC12M).
:func:`read_tar` yields ``(name, bytes)`` for every regular file, in archive order; a truncated or
damaged archive yields every member that is complete before the damage and then raises
:class:`TarTruncated`, whose ``name`` is the member cut short when its header was intact (so the
caller can tell a lost member from a clean cut at a member boundary).  A stream that simply ends
without the end-of-archive blocks is accepted as complete.  Headers are verified by their
checksum; ustar prefixes, GNU long names and pax ``path`` records are honoured; directories,
links and devices are passed over.
"""
from __future__ import annotations

from typing import Iterator, Optional

__all__ = ["read_tar", "TarTruncated"]

_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


class TarTruncated(Exception):
    """The tar ended inside a header or a member (``name``: the member cut, if its header was intact)."""

    def __init__(self, message: str, name: Optional[str] = None):
        super().__init__(message)
        self.name = name


def _nts(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


def _octal(b: bytes) -> int:
    b = b.strip(b"\0 ")
    if not b:
        return 0
    if b[0] & 0x80:  # GNU base-256 for large members
        return int.from_bytes(b[1:], "big")
    return int(b, 8)


def read_tar(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in the binary stream ``f``, in order.

    A small reader of its own rather than ``tarfile``, because ``tarfile``'s streaming mode loses
    the position of the damage: here a truncated or damaged archive yields every complete member
    before the damage, then raises :class:`TarTruncated`.  Supports ustar prefixes, GNU long names
    and pax ``path`` records.
    """
    long_name: Optional[str] = None
    while True:
        header = f.read(512)
        if len(header) == 0:
            return  # no end-of-archive blocks: accepted (some writers omit them)
        if len(header) < 512:
            raise TarTruncated("archive ends inside a header")
        if header == b"\0" * 512:
            return
        try:
            stored = _octal(header[148:156])
            size = _octal(header[124:136])
        except ValueError:
            stored = size = -1
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise TarTruncated("damaged header (checksum mismatch)")
        kind = header[156:157]
        name = long_name
        if name is None:
            name = _nts(header[0:100])
            if header[257:262] == b"ustar":
                prefix = _nts(header[345:500])
                if prefix:
                    name = prefix + "/" + name
        padded = (size + 511) & ~511
        data = f.read(padded)
        if len(data) < size:
            raise TarTruncated(f"archive ends inside member {name!r} ({len(data)} of {size} bytes)",
                               name if kind in _REGULAR else None)
        data = data[:size]
        if kind == b"L":  # GNU long name for the next member
            long_name = _nts(data)
            continue
        if kind in (b"x", b"g"):  # pax records: "len key=value\n"
            if kind == b"x":
                for rec in data.decode("utf-8", "replace").split("\n"):
                    key, _, value = rec.partition(" ")[2].partition("=")
                    if key == "path":
                        long_name = value
            continue
        long_name = None
        if kind not in _REGULAR:
            continue  # directories, links, devices: not sample members
        yield name, data
