"""The built-in shapes dataset: real shards, deterministic, caption noise as asked, fast enough."""
import json
import os

import pytest

from fastclip.data import CLASSNAMES, ShardSource, make_shapes_dataset
from fastclip.data.stats import DataStats


def _samples(meta, out):
    src = ShardSource(os.path.join(out, meta["shards"]), keep_members=True)
    return list(src.iter(0, 0, 1, DataStats(warn=False)))


def test_shards_are_deterministic_and_readable(tmp_path):
    a = make_shapes_dataset(str(tmp_path / "a"), 120, 32, seed=3, caption_noise=0.25, samples_per_shard=50)
    make_shapes_dataset(str(tmp_path / "b"), 120, 32, seed=3, caption_noise=0.25, samples_per_shard=50)
    assert a["shards"] == "shard-{00000..00002}.tar"
    for name in ("shard-00000.tar", "shard-00001.tar", "shard-00002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    make_shapes_dataset(str(tmp_path / "c"), 120, 32, seed=4, caption_noise=0.25, samples_per_shard=50)
    first = "shard-00000.tar"
    assert (tmp_path / "c" / first).read_bytes() != (tmp_path / "a" / first).read_bytes()
    samples = _samples(a, str(tmp_path / "a"))
    assert len(samples) == 120 and len({s.key for s in samples}) == 120
    with open(tmp_path / "a" / "meta.json") as f:
        assert json.load(f)["classnames"] == list(CLASSNAMES)


def test_captions_labels_and_noise(tmp_path):
    from PIL import Image
    meta = make_shapes_dataset(str(tmp_path), 400, 24, seed=0, caption_noise=0.3, samples_per_shard=400)
    samples = _samples(meta, str(tmp_path))
    bad = 0
    for s in samples:
        info = json.loads(s.members["json"])
        assert s.label == info["label"] and CLASSNAMES[s.label] == info["classname"]
        first = info["scene"]["objects"][0]
        assert info["classname"] == f"{first['color']} {first['shape']}"
        assert info["true_caption"].startswith((f"a {first['size']} {info['classname']}",
                                                 f"a {info['classname']}"))
        assert info["true_caption"].endswith((f"on a {info['scene']['background']} background",
                                               first["shape"], info["scene"]["objects"][-1]["shape"]))
        if info["caption_ok"]:
            assert s.caption == info["true_caption"]
        else:
            bad += 1
            assert s.caption != info["true_caption"] and info["corruption"] in meta["corrupted_by_kind"]
        assert Image.open(__import__("io").BytesIO(s.image)).size == (24, 24)
    assert bad == meta["num_corrupted"] and 0.22 < bad / 400 < 0.38
    clean = make_shapes_dataset(str(tmp_path / "clean"), 50, 24, seed=0, caption_noise=0.0)
    assert clean["num_corrupted"] == 0


def test_two_object_captions_are_compositional(tmp_path):
    meta = make_shapes_dataset(str(tmp_path), 60, 24, seed=1)
    caps = [s.caption for s in _samples(meta, str(tmp_path))]
    relations = (" above ", " below ", " to the left of ", " to the right of ")
    rel = [c for c in caps if any(r in c for r in relations)]
    assert 10 < len(rel) < 50  # about half the scenes have two objects
    one = make_shapes_dataset(str(tmp_path / "one"), 30, 24, seed=1, max_objects=1)
    caps1 = [s.caption for s in _samples(one, str(tmp_path / "one"))]
    assert not any(" above " in c or " below " in c for c in caps1)


def test_ten_thousand_samples_at_64px(tmp_path):
    # Its speed is measured in benchmarks/test_data_bench.py; this checks the output at that size.
    meta = make_shapes_dataset(str(tmp_path), 10000, 64, seed=0, caption_noise=0.2)
    assert meta["num_samples"] == 10000
    assert len(os.listdir(tmp_path)) == 11  # 10 shards + meta.json


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="caption_noise must be a fraction in"):
        make_shapes_dataset(str(tmp_path), 10, caption_noise=1.5)
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        make_shapes_dataset(str(tmp_path), 0)


def test_caption_detail_says_the_optional_words_and_keeps_the_images(tmp_path):
    full = make_shapes_dataset(str(tmp_path / "full"), 60, 24, seed=3, caption_detail=1.0, samples_per_shard=60)
    bare = make_shapes_dataset(str(tmp_path / "bare"), 60, 24, seed=3, caption_detail=0.0, samples_per_shard=60)
    some = make_shapes_dataset(str(tmp_path / "some"), 200, 24, seed=3, caption_detail=0.5, samples_per_shard=200)
    for f, b in zip(_samples(full, str(tmp_path / "full")), _samples(bare, str(tmp_path / "bare"))):
        assert f.image == b.image  # the optional words are drawn apart from the images
        scene = json.loads(f.members["json"])["scene"]
        assert f.caption.endswith(f"on a {scene['background']} background")
        assert all(f" {o['size']} " in f" {f.caption} " for o in scene["objects"])
        assert "background" not in b.caption and " small " not in b.caption and " large " not in b.caption
        assert all(f"{o['color']} {o['shape']}" in b.caption for o in scene["objects"])
    with_bg = sum("background" in s.caption for s in _samples(some, str(tmp_path / "some")))
    assert 0.35 < with_bg / 200 < 0.65
    with pytest.raises(ValueError, match="caption_detail"):
        make_shapes_dataset(str(tmp_path / "x"), 5, 24, caption_detail=1.5)
