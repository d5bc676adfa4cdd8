"""Webdataset shards: brace-expanded shard lists, a tolerant tar reader, per-reason counters,
the split across ranks and workers, the shuffle buffer, and a shard writer.

A shard is a plain tar (what img2dataset writes for LAION, DataComp, CC3M/CC12M).  Members that
share a key (the path up to the first dot of the file name) form one sample::

    00000123.jpg   00000123.txt   00000123.json

Images: ``jpg``/``jpeg``/``png``/``webp``.  Caption: ``txt``, else the ``caption``/``text`` field
of ``json``.  Label (optional, for zero-shot evaluation): ``cls``, else ``json["label"]``.

Bad input never crashes the reader and never loses a good sample.  Everything skipped is counted
per reason in :class:`DataStats` (missing/unreadable/truncated shards; samples with no image, no
or empty caption, an image that fails the cheap structural check, an image of the wrong mode).
Images are checked here from their bytes without decoding: magic bytes and the end marker (a
truncated JPEG/PNG/WebP is caught), and the mode in the header (grayscale, RGBA, CMYK, 16-bit:
skipped as ``wrong_mode:<mode>``, or converted when asked); the decoders count what fails to
decode.

Epochs: with ``resampled=False`` an epoch is one pass in which every good sample is delivered
exactly once over all ranks and workers ("slots").  ``split="shard"`` gives each slot whole shards
(``shards[slot::slots]`` of an epoch-seeded permutation; I/O is not duplicated, slots may get
unequal counts); ``split="sample"`` lets every slot read every shard and keep good sample ``i``
iff ``i % slots == slot`` (counts differ by at most one; I/O is multiplied by the number of
slots).  ``split="auto"`` takes ``shard`` when there are at least as many shards as slots.  With
``resampled=True`` each slot draws shards with replacement, forever (or ``samples`` per slot).

Resuming: a slot's sample stream for an epoch is a function of (seed, epoch, slot, slots) and the
shard list, so ``ShardSource.iter(..., start=n)`` gives the same stream without its first ``n``
samples, which are read from the tars (skips along the way are counted again) but not decoded:
the loader resumes inside an epoch this way (``ClipLoader.load_state_dict``).  A sample's ``uid``
(shard index, ordinal in the shard) names it independently of slots and batching; the loader
draws each sample's crop from (seed, epoch, uid).  :func:`image_dimensions` reads an image's width
and height from its header, without decoding, for the DALI path's region-of-interest decode.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import tarfile
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence, Union

from ..distributed.slots import split_slots

__all__ = [
    "IMAGE_EXTS", "DataStats", "Sample", "expand_shards", "read_tar", "iter_shard",
    "ShardSource", "ShardWriter", "check_image_bytes", "image_mode", "image_dimensions", "RGB_MODES",
    "split_slots",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "text", "txt")

# Reasons a sample or shard is skipped.  Shard-level ones count shards, the rest samples.
SHARD_REASONS = ("missing_shard", "unreadable_shard", "truncated_tar")
SAMPLE_REASONS = ("missing_image", "missing_caption", "empty_caption", "bad_caption", "corrupt_image",
                  "truncated_image", "truncated_sample", "wrong_mode:<mode>")
# Image modes (Pillow's names) delivered as they are; the others are skipped as "wrong_mode:<mode>"
# (grayscale L/1, LA, RGBA, CMYK, 16-bit I;16/RGB;16/...) unless the loader is told to convert them.
# A palette PNG is a colour image stored compactly: it is delivered converted to RGB (noted as
# ``converted:P``; a palette transparency, if any, is dropped as alpha is for the decoders' RGB).
RGB_MODES = ("RGB", "P")


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


@dataclass
class Sample:
    """One raw sample: encoded image bytes and the caption; ``uid`` = (shard index, ordinal)."""

    key: str
    image: bytes
    image_ext: str
    caption: str
    label: int = -1
    shard: str = ""
    uid: tuple = (0, 0)
    members: dict = field(default_factory=dict)  # every member's bytes, by extension (for rewriting)
    mode: Optional[str] = None  # the image's mode from its header (None: not checked, or unknown)


# ----------------------------------------------------------------------------------------------
# Shard lists
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Tar reading
# ----------------------------------------------------------------------------------------------
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
    """(name, data) of every regular file in a tar stream, in order.

    A small reader of its own rather than ``tarfile`` so that a truncated or damaged archive yields
    every complete member before the damage, then raises :class:`TarTruncated` (``tarfile``
    streaming mode loses the position of the damage and is ~3x slower per member).  Supports
    ustar prefixes, GNU long names and pax ``path`` records.
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
                               name if kind in (b"0", b"\0", b"7") else None)
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
        if kind not in (b"0", b"\0", b"7"):
            continue  # directories, links, devices: not sample members
        yield name, data


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: the key is everything up to the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def check_image_bytes(data: bytes, ext: str) -> Optional[str]:
    """A reason (``corrupt_image``/``truncated_image``) if ``data`` is structurally not an image, else None.

    Cheap (a few byte comparisons): the magic number of the actual format (the extension may lie),
    and the format's end marker, which catches truncation.  Damage inside the data is left to the
    decoders, which count it.
    """
    if len(data) < 12:
        return "corrupt_image"
    if data[:3] == b"\xff\xd8\xff":
        end = data.rstrip(b"\0\r\n ")  # some writers pad after EOI
        return None if end[-2:] == b"\xff\xd9" else "truncated_image"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return None if data.rstrip(b"\0")[-8:] == b"IEND\xaeB`\x82" else "truncated_image"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = int.from_bytes(data[4:8], "little") + 8
        return None if len(data) >= size else "truncated_image"
    return "corrupt_image"


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT/JPG/DAC)
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
_PNG_16 = {"L": "I;16", "RGB": "RGB;16", "LA": "LA;16", "RGBA": "RGBA;16"}


def _jpeg_frame(data: bytes) -> Optional[int]:
    """Offset of the JPEG's start-of-frame marker (with its fields complete), or None."""
    n = len(data)
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:  # stray bytes between segments: decoders skip them, so do we
            i = data.find(b"\xff", i)
            if i < 0 or i + 4 > n:
                return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if marker in _JPEG_SOF:
            return i if i + 10 <= n else None
        if marker == 0xDA:  # scan data before any frame header: not a valid JPEG
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def image_mode(data: bytes) -> Optional[str]:
    """The image's mode, read from its header without decoding, or None when the header does not
    say (the decoders then decide).  Names are Pillow's, except that 16-bit colour PNGs (which
    Pillow opens as 8-bit ``RGB``/``RGBA``/``LA``) are told apart as ``RGB;16``/``RGBA;16``/``LA;16``.

    JPEG: the frame's component count (1 ``L``, 3 ``RGB``, 4 ``CMYK``, which includes YCCK).
    PNG: IHDR's colour type and bit depth (``L``, ``1``, ``RGB``, ``P``, ``LA``, ``RGBA``; 16-bit
    grayscale ``I;16``).  WebP: ``RGBA`` when it declares alpha, else ``RGB``.
    """
    n = len(data)
    if data[:3] == b"\xff\xd8\xff":
        i = _jpeg_frame(data)
        return None if i is None else {1: "L", 3: "RGB", 4: "CMYK"}.get(data[i + 9])
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and n >= 26:
        depth, colour = data[24], data[25]
        mode = _PNG_MODES.get(colour)
        if mode is None:
            return None
        if depth == 16:
            return _PNG_16.get(mode)
        if mode == "L" and depth == 1:
            return "1"
        return mode
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and n >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return "RGBA" if data[20] & 0x10 else "RGB"
        if chunk == b"VP8L":
            return "RGBA" if (int.from_bytes(data[21:25], "little") >> 28) & 1 else "RGB"
        if chunk == b"VP8 ":
            return "RGB"
    return None


def image_dimensions(data: bytes) -> Optional[tuple[int, int]]:
    """``(width, height)`` of the image, read from its header without decoding, or None when the
    header does not say (an unknown format, a damaged header, or a size of 0).

    JPEG: the start-of-frame segment (as stored: an EXIF orientation is not applied, as neither
    Pillow's ``open`` nor the loader's DALI decoder applies it).  PNG: IHDR.  WebP: the ``VP8 ``
    key frame header (lossy), the ``VP8L`` header (lossless) or the ``VP8X`` canvas (extended).
    """
    n = len(data)
    w = h = 0
    if data[:3] == b"\xff\xd8\xff":
        i = _jpeg_frame(data)
        if i is None:
            return None
        h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
    elif data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and n >= 24:
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP" and n >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":  # frame tag (3 bytes, bit 0 clear on a key frame), start code, sizes
            if data[20] & 1 or data[23:26] != b"\x9d\x01\x2a":
                return None
            w = int.from_bytes(data[26:28], "little") & 0x3FFF
            h = int.from_bytes(data[28:30], "little") & 0x3FFF
        elif chunk == b"VP8L":  # signature 0x2f, then 14 bits width - 1, 14 bits height - 1
            if data[20] != 0x2F:
                return None
            bits = int.from_bytes(data[21:25], "little")
            w, h = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif chunk == b"VP8X":  # canvas width - 1, height - 1: 24 bits each
            w, h = int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if w <= 0 or h <= 0:
        return None
    return w, h


def _caption_of(members: dict) -> tuple[Optional[str], Optional[str], Optional[dict]]:
    """(caption, reason if none, parsed json or None)."""
    meta = None
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                meta = None
        except (UnicodeDecodeError, ValueError):
            meta = None
    if "txt" in members:
        try:
            text = members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_caption", meta
    elif meta is not None and any(isinstance(meta.get(k), str) for k in CAPTION_KEYS):
        text = next(meta[k] for k in CAPTION_KEYS if isinstance(meta.get(k), str))
    elif "json" in members and meta is None:
        return None, "bad_caption", meta
    else:
        return None, "missing_caption", meta
    text = text.strip()
    if not text:
        return None, "empty_caption", meta
    return text, None, meta


def _label_of(members: dict, meta: Optional[dict]) -> int:
    if "cls" in members:
        try:
            return int(members["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            pass
    if meta is not None and isinstance(meta.get("label"), int):
        return meta["label"]
    return -1


def _make_sample(key: str, members: dict, shard: str, uid: tuple, check_images: bool,
                 keep_members: bool, skip_modes: bool = False) -> tuple[Optional[Sample], Optional[str]]:
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        return None, "missing_image"
    caption, why, meta = _caption_of(members)
    if why:
        return None, why
    data = members[image_ext]
    if check_images:
        why = check_image_bytes(data, image_ext)
        if why:
            return None, why
        mode = image_mode(data)
        if skip_modes and mode is not None and mode not in RGB_MODES:
            return None, f"wrong_mode:{mode}"
    else:
        mode = None
    return Sample(key=key, image=data, image_ext=image_ext, caption=caption, label=_label_of(members, meta),
                  shard=shard, uid=uid, members=dict(members) if keep_members else {}, mode=mode), None


def iter_shard(path: str, shard_index: int = 0, stats: Optional[DataStats] = None, check_images: bool = True,
               keep_members: bool = False,
               skip_modes: bool = False) -> Iterator[tuple[Optional[Sample], Optional[str], str]]:
    """Every sample of one shard as ``(sample, None, where)`` or ``(None, reason, where)``.

    ``check_images``: the structural check, and with ``skip_modes`` the mode check (see
    :data:`RGB_MODES`), both from the bytes without decoding.

    Shard-level problems (missing, unreadable, truncated) are counted in ``stats`` here; sample
    reasons are returned so that the caller decides which slot counts them.
    """
    stats = stats if stats is not None else DataStats(warn=False)
    try:
        f = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        stats.skip("missing_shard", path)
        return
    except OSError as exc:
        stats.skip("unreadable_shard", f"{path}: {exc}")
        return
    ordinal = 0
    with f:
        key, members = None, {}
        it = read_tar(f)
        try:
            for name, data in it:
                k, ext = _split_name(name)
                if k != key and key is not None:
                    sample, why = _make_sample(key, members, path, (shard_index, ordinal), check_images,
                                               keep_members, skip_modes)
                    yield sample, why, f"{path}:{key}"
                    ordinal += 1
                    members = {}
                key = k
                if ext:
                    members[ext] = data
        except TarTruncated as exc:
            if ordinal == 0 and key is None and exc.name is None:
                stats.skip("unreadable_shard", f"{path}: {exc}")
                return
            stats.skip("truncated_tar", f"{path}: {exc}")
            cut = _split_name(exc.name)[0] if exc.name is not None else None
            if key is not None:
                if cut == key:  # the damage cut into this sample: a member is lost
                    yield None, "truncated_sample", f"{path}:{key}"
                    return
                # The damage is at or after a member boundary: this sample's members are intact.
                sample, why = _make_sample(key, members, path, (shard_index, ordinal), check_images,
                                           keep_members, skip_modes)
                yield sample, why, f"{path}:{key}"
                ordinal += 1
            if cut is not None:
                yield None, "truncated_sample", f"{path}:{cut}"
            return
        except OSError as exc:
            stats.skip("unreadable_shard", f"{path}: {exc}")
            return
        if key is not None:
            sample, why = _make_sample(key, members, path, (shard_index, ordinal), check_images, keep_members,
                                       skip_modes)
            yield sample, why, f"{path}:{key}"


# ----------------------------------------------------------------------------------------------
# Ranks, workers, shuffling
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
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
