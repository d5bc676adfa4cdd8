"""Samples: the members of a shard that share a key, assembled and checked.

Members that share a key (webdataset's: the path up to the first dot of the file name; the rest,
lower-cased, is the extension) form one sample, in archive order::

    00000123.jpg   00000123.txt   00000123.json

Image: the first of :data:`IMAGE_EXTS` present.  Caption: ``txt``, else the first string among
the :data:`CAPTION_KEYS` fields of ``json``; stripped, and refused when empty.  Label (optional,
for zero-shot evaluation): ``cls``, else ``json["label"]``, else -1.

:func:`iter_shard` yields every sample of one shard, good or not, with the reason when not
(``missing_image``, ``missing_caption``, ``empty_caption``, ``bad_caption``, the image checks of
:mod:`fastclip.data.sniff`, ``truncated_sample``).  A sample's ``uid`` is (shard index, ordinal
of the sample in the shard, counting the bad ones too): it names the sample independently of
slots, shuffling and batching.  When the tar is damaged, the samples before the damage are
delivered; the one the damage cuts into is reported as ``truncated_sample`` (a member is lost),
and one that ends exactly at the damage is whole and delivered.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, Optional

from .sniff import RGB_MODES, check_image_bytes, image_mode
from .stats import DataStats
from .tar import TarTruncated, read_tar

__all__ = ["Sample", "iter_shard", "IMAGE_EXTS", "CAPTION_KEYS"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "text", "txt")


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


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: the key is everything up to the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


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

