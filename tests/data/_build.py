"""Builders of tiny shards, good and bad, for the data tests (everything is made in tmp_path)."""
from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import torch

from fastclip.data.tar import read_tar

COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (230, 210, 40), (120, 40, 160), (240, 140, 20)]


def rgb_image(i: int, size=(24, 20)):
    """A distinct, mostly flat RGB image for sample i (PIL)."""
    from PIL import Image
    rng = np.random.default_rng(i)
    base = np.array(COLOURS[i % len(COLOURS)], dtype=np.int16)
    arr = np.clip(base + rng.integers(-12, 12, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encode(img, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(i: int, size=(24, 20)) -> bytes:
    return encode(rgb_image(i, size), "JPEG", quality=95)


def png(i: int = 3, size=(24, 20)) -> bytes:
    return encode(rgb_image(i, size), "PNG")


def png16_rgb(h: int, w: int, rgb16=(50000, 1000, 1000)) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    row = np.tile(np.array(rgb16, dtype=">u2"), (w, 1)).tobytes()
    raw = b"".join(b"\x00" + row for _ in range(h))

    def chunk(tag, data):
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# name -> the mode the header declares (fastclip.data.sniff.image_mode) for odd_mode_images()
ODD_MODES = {"grayscale_jpeg": "L", "cmyk_jpeg": "CMYK", "rgba_png": "RGBA", "palette_png": "P",
             "la_png": "LA", "gray16_png": "I;16", "rgb16_png": "RGB;16", "webp": "RGB", "webp_alpha": "RGBA",
             "bilevel_png": "1"}


def _with_clear_corner(img):
    """RGBA with a transparent top-left corner (an all-opaque alpha would be dropped by the encoder)."""
    rgba = img.convert("RGBA")
    for x in range(3):
        for y in range(3):
            rgba.putpixel((x, y), (0, 0, 0, 0))
    return rgba


def odd_mode_images() -> dict:
    """name -> (bytes, extension, expected RGB of pixel (0, 0) within a JPEG tolerance)."""
    from PIL import Image
    flat = Image.new("RGB", (24, 20), (200, 30, 30))
    gray_value = round(0.299 * 200 + 0.587 * 30 + 0.114 * 30)
    gray16 = Image.fromarray(np.full((20, 24), 40000, dtype=np.uint16))
    return {
        "grayscale_jpeg": (encode(flat.convert("L"), "JPEG", quality=95), "jpg", (gray_value,) * 3),
        "cmyk_jpeg": (encode(flat.convert("CMYK"), "JPEG", quality=95), "jpg", (200, 30, 30)),
        "rgba_png": (encode(flat.convert("RGBA"), "PNG"), "png", (200, 30, 30)),
        "palette_png": (encode(flat.convert("P"), "PNG"), "png", (200, 30, 30)),
        "la_png": (encode(flat.convert("LA"), "PNG"), "png", (gray_value,) * 3),
        "gray16_png": (encode(gray16, "PNG"), "png", (40000 >> 8,) * 3),
        "rgb16_png": (png16_rgb(20, 24), "png", (50000 >> 8, 1000 >> 8, 1000 >> 8)),
        "webp": (encode(flat, "WEBP", quality=95), "webp", (200, 30, 30)),
        "webp_alpha": (encode(_with_clear_corner(flat), "WEBP", lossless=True), "webp", (200, 30, 30)),
        "bilevel_png": (encode(Image.new("1", (24, 20), 1), "PNG"), "png", (255, 255, 255)),
    }


def write_tar(path, samples, fmt=tarfile.USTAR_FORMAT) -> None:
    """samples: list of (key, {ext: bytes or str})."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for key, members in samples:
            for ext, data in members.items():
                if isinstance(data, str):
                    data = data.encode("utf-8")
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def good_sample(i: int, label=None) -> tuple:
    members = {"jpg": jpeg(i), "txt": f"caption {i}"}
    if label is not None:
        members["cls"] = str(label)
    return f"{i:06d}", members


def write_good_shards(root, n_shards: int, per_shard: int, start: int = 0) -> list:
    paths, i = [], start
    for s in range(n_shards):
        path = root / f"good-{s:03d}.tar"
        write_tar(path, [good_sample(i + k, label=(i + k) % 7) for k in range(per_shard)])
        paths.append(str(path))
        i += per_shard
    return paths


def fake_tokenizer(texts):
    """Stand-in with the contract (list of str -> LongTensor [B, 77]); ids are not CLIP's."""
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    for r, t in enumerate(texts):
        ids = [49406] + [sum(map(ord, w)) % 40000 + 1 for w in t.split()][:75] + [49407]
        out[r, :len(ids)] = torch.tensor(ids)
    return out


def bad_set(tmp_path, decoder_corrupt: bool = False):
    """Shards with one case of every skip reason among good samples; returns (pattern, good keys, reasons).

    ``decoder_corrupt`` adds an image that passes the structural check (JPEG magic and end marker)
    but does not decode: only a decoder can count it.
    """
    d = tmp_path / "bad"
    d.mkdir()
    img = jpeg(99)
    write_tar(d / "s-0.tar", [
        good_sample(0), good_sample(1),
        ("corrupt", {"jpg": bytes(range(7, 250)), "txt": "c"}),
        ("notimage", {"jpg": b"<html>404 not found</html>", "txt": "c"}),
        ("truncimg", {"jpg": img[: len(img) // 2], "txt": "c"}),
        ("nocap", {"jpg": jpeg(5)}),
        ("emptycap", {"jpg": jpeg(6), "txt": "   \n"}),
        ("badjson", {"jpg": jpeg(7), "json": "{not json"}),
        ("badutf8", {"jpg": jpeg(8), "txt": b"\xff\xfe\xfa"}),
        ("noimage", {"txt": "only text"}),
        good_sample(2),
    ])
    s1 = [good_sample(i) for i in range(3, 8)]
    if decoder_corrupt:
        fake = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2 + b"\xff\xd9"  # JPEG markers around garbage
        s1.insert(2, ("undecodable", {"jpg": fake, "txt": "u"}))
    write_tar(d / "s-1.tar", s1)
    # s-2: truncated in the middle of sample 10's image: 8 and 9 survive, 10 is cut
    full = d / "full.tar"
    write_tar(full, [good_sample(i) for i in range(8, 12)])
    data = full.read_bytes()
    with open(full, "rb") as f:
        offsets = {}
        pos = 0
        for name, member in read_tar(f):
            offsets[name] = pos
            pos += 512 + (len(member) + 511) // 512 * 512
    (d / "s-2.tar").write_bytes(data[: offsets["000010.jpg"] + 600])
    full.unlink()
    (d / "s-3.tar").write_bytes(b"this is not a tar file" * 40)  # unreadable
    write_tar(d / "s-5.tar", [good_sample(i) for i in range(12, 14)])  # s-4 is missing
    good = {f"{i:06d}" for i in list(range(10)) + [12, 13]}
    reasons = {"corrupt_image": 2, "truncated_image": 1, "missing_caption": 1, "empty_caption": 1,
               "bad_caption": 2, "missing_image": 1, "truncated_sample": 1, "truncated_tar": 1,
               "unreadable_shard": 1, "missing_shard": 1}
    if decoder_corrupt:
        reasons["corrupt_image"] += 1
    return str(d / "s-{0..5}.tar"), good, reasons


def dali_available() -> bool:
    from fastclip.ops import dispatch
    return dispatch.package_status("nvidia.dali") is None
