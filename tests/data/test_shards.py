"""Shard lists, the tar reader, skipping with reasons, and the split across ranks and workers."""
import itertools
import json
import os
import tarfile

import pytest

from fastclip.data.shards import (
    DataStats,
    ShardSource,
    ShardWriter,
    check_image_bytes,
    image_dimensions,
    image_mode,
    expand_shards,
    iter_shard,
    read_tar,
    split_slots,
)

from ._build import bad_set as _bad_set
from ._build import good_sample, jpeg, write_good_shards, write_tar


# ----------------------------------------------------------------------------------------------
# Shard lists
# ----------------------------------------------------------------------------------------------
def test_expand_braces_ranges_lists_and_directories(tmp_path):
    assert expand_shards("data/{00000..00003}.tar") == [f"data/0000{i}.tar" for i in range(4)]
    assert expand_shards("d/{8..11}.tar") == ["d/8.tar", "d/9.tar", "d/10.tar", "d/11.tar"]
    assert expand_shards("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_shards("x.tar::y/{1..2}.tar") == ["x.tar", "y/1.tar", "y/2.tar"]
    assert expand_shards(["p.tar", "q.tar"]) == ["p.tar", "q.tar"]
    for name in ("b.tar", "a.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shards(tmp_path) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(ValueError, match="at least one shard"):
        expand_shards([])


def test_reader_handles_long_names_and_pax(tmp_path):
    long_key = "dir/" + "k" * 150
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"long-{fmt}.tar"
        write_tar(path, [(long_key, {"jpg": jpeg(0), "txt": "long"}), good_sample(1)], fmt=fmt)
        with open(path, "rb") as f:
            names = [n for n, _ in read_tar(f)]
        assert names == [f"{long_key}.jpg", f"{long_key}.txt", "000001.jpg", "000001.txt"]
        got = [s for s, why, _ in iter_shard(str(path))]
        assert [s.key for s in got] == [long_key, "000001"] and got[0].caption == "long"


def test_key_is_up_to_the_first_dot_and_json_captions(tmp_path):
    path = tmp_path / "s.tar"
    meta = json.dumps({"caption": " from json ", "label": 3})
    write_tar(path, [("a/b.c/x1", {"seg.jpg": jpeg(0), "json": meta}),
                     ("x2", {"png": _png(), "json": json.dumps({"text": "t"}), "cls": "5"})])
    samples = [s for s, _, _ in iter_shard(str(path))]
    assert samples[0] is None  # "x1.seg.jpg" has extension "seg.jpg": not an image member
    path2 = tmp_path / "t.tar"
    write_tar(path2, [("x1", {"jpg": jpeg(0), "json": json.dumps({"caption": " from json ", "label": 3})}),
                      ("x2", {"png": _png(), "json": json.dumps({"text": "t"}), "cls": "5"})])
    s1, s2 = [s for s, _, _ in iter_shard(str(path2))]
    assert (s1.caption, s1.label, s1.image_ext) == ("from json", 3, "jpg")
    assert (s2.caption, s2.label, s2.image_ext) == ("t", 5, "png")


def _png():
    from ._build import encode, rgb_image
    return encode(rgb_image(3), "PNG")


def test_structural_image_check():
    good = jpeg(1)
    assert check_image_bytes(good, "jpg") is None
    assert check_image_bytes(good + b"\0\0", "jpg") is None  # padding after EOI is fine
    assert check_image_bytes(good[: len(good) // 2], "jpg") == "truncated_image"
    assert check_image_bytes(b"not an image at all", "jpg") == "corrupt_image"
    assert check_image_bytes(b"", "png") == "corrupt_image"
    png = _png()
    assert check_image_bytes(png, "jpg") is None  # the extension may lie; the magic decides
    assert check_image_bytes(png[:-20], "png") == "truncated_image"


# ----------------------------------------------------------------------------------------------
# Skipping: each reason, built here
# ----------------------------------------------------------------------------------------------
def test_every_reason_counted_and_good_samples_kept(tmp_path):
    pattern, good, reasons = _bad_set(tmp_path)
    stats = DataStats()
    with pytest.warns(UserWarning, match="skipping"):
        keys = [s.key for s in ShardSource(pattern).iter(0, 0, 1, stats)]
    assert sorted(keys) == sorted(good)
    assert dict(stats.skipped) == reasons
    flat = stats.as_dict()
    assert flat["skipped/missing_shard"] == 1 and flat["skipped/corrupt_image"] == 2
    assert stats.total_skipped == 9  # samples only (shard reasons count shards)


@pytest.mark.parametrize("split", ["shard", "sample"])
@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_union_over_ranks_and_workers_is_every_good_sample_once(tmp_path, split, world, workers):
    pattern, good, reasons = _bad_set(tmp_path)
    source = ShardSource(pattern, shuffle=7, seed=3, split=split)
    seen, total = [], DataStats(warn=False)
    for rank, worker in itertools.product(range(world), range(workers)):
        slot, slots = split_slots(rank, world, worker, workers)
        stats = DataStats(warn=False)
        seen += [s.key for s in source.iter(epoch=1, slot=slot, slots=slots, stats=stats)]
        total.merge(stats)
    assert len(seen) == len(set(seen)) and set(seen) == good
    assert dict(total.skipped) == reasons  # counters summed over slots = the dataset's


def test_sample_split_balances_slots(tmp_path):
    paths = write_good_shards(tmp_path, 2, 11)
    source = ShardSource(paths, split="sample")
    counts = [len(list(source.iter(0, slot, 4))) for slot in range(4)]
    assert sorted(counts) == [5, 5, 6, 6]
    assert source.split_mode(4) == "sample" and ShardSource(paths).split_mode(2) == "shard"


def test_shuffle_is_deterministic_per_epoch(tmp_path):
    paths = write_good_shards(tmp_path, 4, 10)
    src = ShardSource(paths, shuffle=16, seed=1)
    order = lambda e, source=src: [s.key for s in source.iter(e, 0, 1)]  # noqa: E731
    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))
    assert order(0) != [s.key for s in ShardSource(paths, shuffle=16, seed=2).iter(0, 0, 1)]
    assert [s.key for s in ShardSource(paths).iter(0, 0, 1)] == sorted(order(0))  # no shuffle: file order


def test_resampled_draws_good_samples_forever(tmp_path):
    pattern, good, _ = _bad_set(tmp_path)
    src = ShardSource(pattern, resampled=True, seed=0)
    with pytest.warns(UserWarning):
        keys = [s.key for s in itertools.islice(src.iter(0, 0, 1), 100)]
    assert len(keys) == 100 and set(keys) <= good
    capped = ShardSource(pattern, resampled=True, samples=30).iter(0, 0, 1, DataStats(warn=False))
    assert len(list(capped)) == 30
    empty = tmp_path / "empty.tar"
    write_tar(empty, [("x", {"txt": "no image"})])
    with pytest.raises(RuntimeError, match="no good sample"):
        list(ShardSource(str(empty), resampled=True).iter(0, 0, 1, DataStats(warn=False)))


def test_slot_arguments_are_checked():
    assert split_slots(1, 2, 1, 3) == (4, 6)
    with pytest.raises(ValueError, match="rank must be in"):
        split_slots(2, 2, 0, 1)
    with pytest.raises(ValueError, match="worker must be in"):
        split_slots(0, 1, 3, 2)


def test_writer_round_trip(tmp_path):
    with ShardWriter(str(tmp_path / "w-%03d.tar"), max_samples=3) as w:
        for i in range(7):
            w.write(f"{i:04d}", {"jpg": jpeg(i), "txt": f"t{i}"})
    assert sorted(os.listdir(tmp_path)) == ["w-000.tar", "w-001.tar", "w-002.tar"]
    got = list(ShardSource(str(tmp_path / "w-{000..002}.tar")).iter(0, 0, 1))
    assert [s.caption for s in got] == [f"t{i}" for i in range(7)]
    assert got[4].image == jpeg(4)


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


@pytest.mark.parametrize("shuffle,resampled", [(0, False), (7, False), (5, True)])
def test_start_leaves_out_the_head_of_the_same_stream(tmp_path, shuffle, resampled):
    pattern, _, _ = _bad_set(tmp_path)
    src = ShardSource(pattern, shuffle=shuffle, seed=2, resampled=resampled,
                      samples=20 if resampled else None)
    whole, rest = DataStats(warn=False), DataStats(warn=False)
    keys = [s.uid for s in src.iter(1, 0, 1, whole)]
    assert [s.uid for s in src.iter(1, 0, 1, rest, start=5)] == keys[5:]
    assert rest.as_dict() == whole.as_dict()  # the head is read again, its skips counted again
    assert list(src.iter(1, 0, 1, DataStats(warn=False), start=len(keys) + 3)) == []
    with pytest.raises(ValueError, match="start must be >= 0, got -1"):
        src.iter(1, 0, 1, start=-1)


def test_stats_state_round_trip():
    import pickle
    stats = DataStats(warn=False)
    stats.add_delivered(7)
    stats.skip("corrupt_image", "a:1")
    stats.skip("missing_shard", "b")
    stats.note("converted:P", 2)
    state = pickle.loads(pickle.dumps(stats.state_dict()))
    again = DataStats.from_state(state)
    assert again.as_dict() == stats.as_dict() and again.examples == stats.examples
    assert again.total_skipped == 1
