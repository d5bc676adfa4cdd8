"""Reading an image's integrity, mode and size from its bytes, without decoding."""
from fastclip.data.sniff import check_image_bytes, image_dimensions, image_mode

from ._build import jpeg, png


def test_structural_image_check():
    good = jpeg(1)
    assert check_image_bytes(good, "jpg") is None
    assert check_image_bytes(good + b"\0\0", "jpg") is None  # padding after EOI is fine
    assert check_image_bytes(good[: len(good) // 2], "jpg") == "truncated_image"
    assert check_image_bytes(b"not an image at all", "jpg") == "corrupt_image"
    assert check_image_bytes(b"", "png") == "corrupt_image"
    good_png = png()
    assert check_image_bytes(good_png, "jpg") is None  # the extension may lie; the magic decides
    assert check_image_bytes(good_png[:-20], "png") == "truncated_image"


def test_image_mode_from_the_header():
    from PIL import Image

    from ._build import ODD_MODES, encode, odd_mode_images
    # what Pillow opens them as: the same, except 16-bit colour PNGs (Pillow reads them as 8-bit)
    pillow = {**ODD_MODES, "rgb16_png": "RGB"}
    for name, (data, _, _) in odd_mode_images().items():
        assert image_mode(data) == ODD_MODES[name], name
        assert Image.open(__import__("io").BytesIO(data)).mode == pillow[name], name
    gray = encode(Image.new("L", (9, 7), 100), "JPEG")
    stray = gray[:20] + b"\x00\x00" + gray[20:]  # two stray bytes after APP0: decoders skip them
    assert Image.open(__import__("io").BytesIO(stray)).mode == "L" and image_mode(stray) == "L"
    rgb = Image.new("RGB", (9, 7), (1, 2, 3))
    assert image_mode(encode(rgb, "JPEG")) == "RGB"
    assert image_mode(encode(rgb, "JPEG", progressive=True)) == "RGB"
    assert image_mode(encode(rgb, "PNG")) == "RGB"
    assert image_mode(encode(rgb, "WEBP", lossless=True)) == "RGB"
    assert image_mode(b"\xff\xd8\xff\xe0" + bytes(range(256)) + b"\xff\xd9") is None  # no frame header
    assert image_mode(b"not an image") is None
    assert image_mode(encode(rgb, "JPEG")[:20]) is None  # cut before the frame header


def test_image_dimensions_from_the_header():
    import io

    import numpy as np
    from PIL import Image

    from ._build import encode, odd_mode_images
    for name, (data, _, _) in odd_mode_images().items():  # JPEG (L, CMYK), PNG (all kinds), WebP (VP8L)
        assert image_dimensions(data) == Image.open(io.BytesIO(data)).size == (24, 20), name
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    for fmt, kw in [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("WEBP", {"quality": 80}),
                    ("WEBP", {"lossless": True}), ("WEBP", {"exif": b"Exif\0\0II*\0"})]:
        data = encode(img, fmt, **kw)
        assert image_dimensions(data) == (53, 37), (fmt, kw)
    assert image_dimensions(encode(img, "WEBP", exif=b"Exif\0\0II*\0"))[0] == 53  # the VP8X canvas
    gray = encode(Image.new("L", (9, 7), 100), "JPEG")
    assert image_dimensions(gray[:20] + b"\x00\x00" + gray[20:]) == (9, 7)  # stray bytes skipped
    assert image_dimensions(b"\xff\xd8\xff\xe0" + bytes(range(256)) + b"\xff\xd9") is None
    assert image_dimensions(b"not an image") is None
    assert image_dimensions(gray[:20]) is None  # cut before the frame header
    zero = bytearray(encode(img, "PNG"))
    zero[16:20] = b"\0\0\0\0"
    assert image_dimensions(bytes(zero)) is None  # a size of 0 is no size
