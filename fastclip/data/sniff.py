"""What an image's bytes say without decoding them: is it whole, what mode, what size.

All three read a few header bytes only, never the pixels, and decide by the magic number of the
actual format (a member's extension may lie):

* :func:`check_image_bytes`: ``corrupt_image`` when the bytes are no JPEG/PNG/WebP at all,
  ``truncated_image`` when the format's end marker (JPEG EOI, PNG IEND, the WebP RIFF size) is
  missing, else None.  Damage inside the data is left to the decoders, which count it.
* :func:`image_mode`: the mode the header declares (Pillow's names), or None when it does not say.
  Modes outside :data:`RGB_MODES` (grayscale ``L``/``1``, ``LA``, ``RGBA``, ``CMYK``, 16-bit
  ``I;16``/``RGB;16``/...) are skipped as ``wrong_mode:<mode>`` by the reader, or converted to RGB
  by the decoders when the loader is told to convert them.  A palette image (``P``) is a colour
  image stored compactly: it is delivered converted to RGB (noted as ``converted:P``; a palette
  transparency, if any, is dropped as alpha is by the decoders' RGB conversion).
* :func:`image_dimensions`: ``(width, height)`` as stored (EXIF orientation not applied, as
  neither Pillow's ``open`` nor the loader's DALI decoder applies it), or None.  The DALI path
  computes each sample's crop window from it before decoding.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["check_image_bytes", "image_mode", "image_dimensions", "RGB_MODES"]

# Image modes (Pillow's names) delivered as they are; the others are skipped as "wrong_mode:<mode>"
# unless the loader is told to convert them (see the module docstring for P).
RGB_MODES = ("RGB", "P")


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
