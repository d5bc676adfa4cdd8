"""fastclip.eval.filter: scoring pairs, top-k selection, rewritten shards, histogram, `fastclip filter`."""
import csv
import json
import os
import sys

import pytest
import torch

import fastclip
from fastclip.cli import main as cli_main
from fastclip.data import ShardSource, make_shapes_dataset
from fastclip.data.shards import DataStats
from fastclip.eval import filter_shards


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return fastclip.create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1, text_width=64,
                                 text_heads=2).eval()


def _read(pattern):
    return list(ShardSource(pattern, keep_members=True).iter(0, 0, 1, DataStats(warn=False)))


@pytest.mark.parametrize("keep", [0.2, 0.6])
def test_keeps_the_top_fraction_byte_for_byte(tmp_path, small_model, keep):
    src = make_shapes_dataset(str(tmp_path / "src"), 50, 32, seed=0, caption_noise=0.5, samples_per_shard=20)
    report = filter_shards(str(tmp_path / "src" / src["shards"]), str(tmp_path / "out"), keep=keep,
                           model=small_model, image_size=32, batch_size=16, samples_per_shard=8)
    assert report["scored"] == 50 and report["kept"] == round(keep * 50)
    with open(tmp_path / "out" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50
    kept = [float(r["score"]) for r in rows if r["kept"] == "True"]
    dropped = [float(r["score"]) for r in rows if r["kept"] == "False"]
    assert min(kept) == pytest.approx(report["threshold"]) and max(dropped) <= min(kept)
    original = {s.key: s for s in _read(str(tmp_path / "src" / src["shards"]))}
    out = _read(report["shards"])
    assert len(out) == report["kept"] and len(os.listdir(tmp_path / "out")) >= 4
    for s in out:
        o = original[s.key]
        assert s.image == o.image and s.caption == o.caption and s.members["cls"] == o.members["cls"]
        meta = json.loads(s.members["json"])
        assert meta["fastclip_score"] >= report["threshold"] and meta["caption"] == o.caption
    assert os.path.getsize(report["histogram"]) > 1000
    with open(tmp_path / "out" / "meta.json") as f:
        meta = json.load(f)
    assert meta["num_samples"] == report["kept"] and meta["filtered"]["keep"] == keep and meta["classnames"]


def test_scores_agree_with_the_model(tmp_path, small_model):
    from fastclip.data import ClipLoader
    src = make_shapes_dataset(str(tmp_path / "src"), 12, 32, seed=1)
    pattern = str(tmp_path / "src" / src["shards"])
    filter_shards(pattern, str(tmp_path / "out"), keep=1.0, model=small_model, image_size=32, histogram=False)
    with open(tmp_path / "out" / "scores.csv") as f:
        scores = {r["key"]: float(r["score"]) for r in csv.DictReader(f)}
    loader = ClipLoader(pattern, 12, image_size=32, train=False, backend="pil", return_meta=True,
                        tokenizer=fastclip.get_tokenizer("ViT-Ti-16"))
    images, tokens, meta = next(iter(loader))
    with torch.no_grad():
        fi = small_model.encode_image(images, normalize=True)
        want = (fi * small_model.encode_text(tokens, normalize=True)).sum(-1)
    for key, w in zip(meta["keys"], want.tolist()):
        assert scores[key] == pytest.approx(w, abs=2e-3)  # DALI may have decoded the scored images


def test_without_matplotlib_a_clear_message(tmp_path, small_model, monkeypatch):
    src = make_shapes_dataset(str(tmp_path / "src"), 10, 32, seed=2)
    import fastclip.eval.filter as filter_mod
    monkeypatch.setattr(filter_mod, "plotting",
                        lambda: (None, "cannot import matplotlib: ImportError: import of matplotlib halted"))
    with pytest.warns(UserWarning, match="no histogram.*pip install matplotlib"):
        report = filter_shards(str(tmp_path / "src" / src["shards"]), str(tmp_path / "out"), keep=0.5,
                               model=small_model, image_size=32)
    assert report["histogram"] is None and "pip install matplotlib" in report["histogram_error"]
    assert report["kept"] == 5


def test_bad_keep(tmp_path, small_model):
    with pytest.raises(ValueError, match=r"keep must be a fraction in \(0, 1\], got 40"):
        filter_shards("x.tar", str(tmp_path), keep=40, model=small_model)


def test_cli_make_dataset_then_filter(tmp_path, capsys):
    assert cli_main(["make-dataset", str(tmp_path / "d"), "--samples", "24", "--image-size", "32",
                     "--caption-noise", "0.5", "--samples-per-shard", "10"]) == 0
    assert "wrote 24 samples" in capsys.readouterr().out
    assert cli_main(["filter", str(tmp_path / "d" / "shard-{00000..00002}.tar"), "--out", str(tmp_path / "f"),
                     "--top", "25", "--image-size", "32", "--batch-size", "12"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scored"] == 24 and report["kept"] == 6 and report["model"] == "ViT-Ti-16"
    assert os.path.exists(tmp_path / "f" / "score_histogram.png")
    with pytest.raises(SystemExit):
        cli_main(["filter", "x.tar", "--out", str(tmp_path / "g"), "--top", "0"])


@pytest.mark.parametrize("wrong_modes", ["convert", "skip"])
def test_wrong_mode_images_are_scored_unless_asked_to_skip(tmp_path, small_model, wrong_modes):
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from data._build import good_sample, odd_mode_images, write_tar
    odd = odd_mode_images()
    samples = [good_sample(i) for i in range(4)] + [(name, {odd[name][1]: odd[name][0], "txt": name})
                                                      for name in ("grayscale_jpeg", "cmyk_jpeg")]
    write_tar(tmp_path / "in.tar", samples)
    import contextlib
    skipping = wrong_modes == "skip"
    expect = pytest.warns(UserWarning, match=r"wrong[ _]mode") if skipping else contextlib.nullcontext()
    with expect:
        report = filter_shards(str(tmp_path / "in.tar"), str(tmp_path / "out"), keep=1.0, model=small_model,
                               image_size=32, histogram=False, wrong_modes=wrong_modes)
    kept = {s.key for s in _read(report["shards"])}
    if wrong_modes == "convert":
        assert report["scored"] == 6 and {"grayscale_jpeg", "cmyk_jpeg"} <= kept and not report["skipped"]
    else:
        assert report["scored"] == 4 and not kept & {"grayscale_jpeg", "cmyk_jpeg"}
        assert report["skipped"] == {"wrong_mode:L": 1, "wrong_mode:CMYK": 1}


@pytest.mark.parametrize("argv,message", [
    (["make-dataset", "OUT", "--samples", "0"], "num_samples must be >= 1"),
    (["make-dataset", "OUT", "--samples", "4", "--samples-per-shard", "0"], "samples_per_shard must be >= 1"),
    (["make-dataset", "OUT", "--samples", "4", "--caption-noise", "1.5"], "caption_noise must be a fraction"),
    (["filter", "IN", "--out", "OUT", "--top", "0"], "--top must be a percentage"),
    (["filter", "IN", "--out", "OUT", "--threads", "0"], "num_threads must be >= 1"),
])
def test_cli_bad_arguments_are_usage_errors(tmp_path, capsys, argv, message):
    src = make_shapes_dataset(str(tmp_path / "src"), 4, 16, seed=0)
    argv = [str(tmp_path / "out") if a == "OUT" else str(tmp_path / "src" / src["shards"]) if a == "IN" else a
            for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
