"""Data-pipeline benchmarks: images/s of decode + augment + tokenise (DALI vs the PIL fallback), tokeniser.

Run on a quiet machine (the numbers are throughputs of CPU threads: anything else on the cores
lowers them), then turn the JSON into tables:

    pytest benchmarks/test_data_bench.py --benchmark-json=benchmarks/results/data-cpu.json
    python benchmarks/report.py benchmarks/results/data-cpu.json

Quick check that everything runs (tiny sets, timings meaningless, well under a minute):

    pytest benchmarks/test_data_bench.py --bench-quick

What is measured
    loader: one epoch over N images through ``fastclip.data.ClipLoader`` (tar reading, decoding,
    crop/resize, the preset's colour ops, normalisation, batched tokenisation, hand-over to the
    caller), batch 256, 2 worker threads, no shuffle; one untimed warm-up epoch, then the timed
    rounds.  ``first_batch_s``: the median time from ``iter(loader)`` to the first batch (the
    per-epoch start-up: threads, and for DALI building its pipeline), which the images/s include.
    Providers: ``dali`` (DALI CPU pipeline, ``device_id=None``: DALI decodes, torch resizes,
    fastclip's ``augment`` op does the rest), ``dali-all`` (DALI's own CPU operators for
    everything, ``dali_ops="all"``: the evidence for that split), ``pil`` (the fallback: PIL
    decoding in 2 threads + the same resize and ``augment`` op), ``dali-mixed`` (DALI with GPU
    decoding and operators, marked ``gpu``).  Presets ``clip`` (mild random-resized crop) and ``clip_aug`` (strong: crop,
    jitter, grayscale, blur, flip).  Sets: ``photo256`` (N 256 px JPEGs with texture, what
    img2dataset writes by default, out at 224 px) and ``shapes64`` (the built-in dataset, 64 px).
    ``extra_info``: ``images_per_s`` (from the median round) and, for DALI, ``x_pil``: the ratio
    to the PIL fallback on the same case in the same session (target >= 1.5).
    augment: images/s of the op ``augment`` alone (``fastclip.data.augment.augment_batch``) on one
    thread, 224 px, batch 64, per backend (``native`` C kernel, ``torch`` tensor operations) and
    the ``floor`` (the uint8 -> float32 copy every backend must do); ``x_floor``, ``x_torch``.
    tokenizer: captions/s of ``fastclip.get_tokenizer`` and of open_clip's ``SimpleTokenizer``
    (its ``tokenizer.py`` loaded on its own: ``import open_clip`` needs torchvision) on M web-like
    captions (about 5% non-ASCII), both warm (one pass first, filling SimpleTokenizer's BPE cache);
    the ids are checked identical.  ``x_open_clip`` on fastclip's case (target >= 10).

Nothing here asserts on speed.
"""
from __future__ import annotations

import functools
import io
import os
import random
import statistics
import time

import numpy as np
import pytest
import torch

from fastclip.testing import load_open_clip_file

SUITE = "data"  # every record's extra_info["suite"] (conftest); data_report.py renders them
LOADER_PROVIDERS = ("pil", "dali", "dali-all", "dali-mixed")
PRESETS = ("clip", "clip_aug")
SETS = {"photo256": (256, 224), "shapes64": (64, 64)}  # source px, output px
N_IMAGES, QUICK_IMAGES = 4096, 96  # 16 batches an epoch: the per-epoch start-up is reported apart
N_CAPTIONS, QUICK_CAPTIONS = 8192, 512
BATCH, QUICK_BATCH = 256, 32
THREADS = 2
AUGMENT_PROVIDERS = ("floor", "torch", "native")  # floor: the uint8 -> float32 copy alone
AUGMENT_BATCH, AUGMENT_PX, QUICK_AUGMENT_PX = 64, 224, 32

_RESULTS: dict = {}  # (set, preset, provider) -> images/s, for the ratios


def _csv(value):
    return [s.strip() for s in str(value).split(",") if s.strip()] if value else None


def _quick(config) -> bool:
    return bool(config.getoption("--bench-quick"))


def _rounds(config) -> int:
    override = config.getoption("--bench-rounds")
    return max(1, int(override)) if override else (1 if _quick(config) else 3)


def _dali_reason():
    from fastclip.ops import dispatch
    return dispatch.package_status("nvidia.dali")


def pytest_generate_tests(metafunc):
    name = metafunc.definition.originalname
    wanted = _csv(metafunc.config.getoption("--bench-providers"))
    if name == "test_loader":
        cases = []
        for set_name in SETS:
            for preset in PRESETS:
                for provider in LOADER_PROVIDERS:
                    if wanted and provider not in wanted:
                        continue
                    marks = [pytest.mark.gpu] if provider == "dali-mixed" else []
                    cases.append(pytest.param(set_name, preset, provider, marks=marks,
                                              id=f"{set_name}-{preset}-{provider}"))
        metafunc.parametrize("set_name,preset,provider", cases)
    elif name == "test_tokenizer":
        providers = [p for p in ("open_clip", "fastclip") if not wanted or p in wanted]
        metafunc.parametrize("provider", providers)
    elif name == "test_augment":
        cases = [pytest.param(preset, provider, id=f"{preset}-{provider}") for preset in PRESETS
                 for provider in AUGMENT_PROVIDERS if not wanted or provider in wanted]
        metafunc.parametrize("preset,provider", cases)


# ----------------------------------------------------------------------------------------------
# Data, built once per session
# ----------------------------------------------------------------------------------------------
def _photo_like(i: int, size: int) -> bytes:
    """A 256 px JPEG with a scene, a gradient and texture: decodes like a photo, not like a flat image."""
    from PIL import Image

    from fastclip.data.synthetic import render_scene, sample_scene
    rng = random.Random(i)
    base = np.asarray(render_scene(sample_scene(rng), size, rng), dtype=np.float32)
    g = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base += 40 * (np.sin(6 * xx + g.uniform(0, 6)) * np.cos(5 * yy))[..., None] * g.uniform(0.5, 1.5, 3)
    base += g.normal(0, 8, base.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="session")
def datasets(tmp_path_factory, pytestconfig):
    """{set name: (shard pattern, number of images)}."""
    from fastclip.data import ShardWriter, make_shapes_dataset
    from fastclip.data.synthetic import describe, sample_scene
    n = QUICK_IMAGES if _quick(pytestconfig) else N_IMAGES
    root = tmp_path_factory.mktemp("data-bench")
    out = {}
    with ShardWriter(str(root / "photo256-%03d.tar"), 256) as w:
        for i in range(n):
            caption = describe(sample_scene(random.Random(-i)))
            w.write(f"{i:08d}", {"jpg": _photo_like(i, 256), "txt": caption})
        shards = w.index
    out["photo256"] = (str(root / f"photo256-{{000..{shards - 1:03d}}}.tar"), n)
    meta = make_shapes_dataset(str(root / "shapes64"), n, 64, seed=0, caption_noise=0.2,
                               samples_per_shard=256)
    out["shapes64"] = (meta["shards_path"], n)
    return out


_SYLLABLES = ("ka", "lo", "mi", "ten", "ar", "ve", "sun", "dor", "pi", "qua", "rel", "sto", "ni", "bel",
              "tra", "o")
_WORDS = ("a", "the", "of", "on", "with", "and", "in", "for", "photo", "red", "blue", "dog", "cat", "house",
          "man", "woman", "city", "street", "car", "tree", "vintage", "2019", "new", "best", "free", "HD",
          "wallpaper")
_UNICODE = ("café", "naïve", "Zürich", "東京", "smörgåsbord", "🙂", "São Paulo", "über", "façade", "ñandú")


def _captions(n: int) -> list:
    """Web-like captions: common words, invented words (a large vocabulary, so the BPE cache does
    not hold everything), numbers, punctuation, case; about 5% with non-ASCII text."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(4, 18)):
            r = rng.random()
            if r < 0.6:
                words.append(rng.choice(_WORDS))
            elif r < 0.9:
                words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
            else:
                words.append(str(rng.randint(0, 5000)) + rng.choice(("", ",", ".", "!", "'s", " -")))
        if rng.random() < 0.05:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_UNICODE))
        text = " ".join(words)
        out.append(text.capitalize() if rng.random() < 0.5 else text)
    return out


@functools.lru_cache(maxsize=None)
def _open_clip_tokenizer():
    """open_clip's SimpleTokenizer from its tokenizer.py loaded standalone; (tokenizer, reason)."""
    mod, why = load_open_clip_file("tokenizer")
    return (mod.SimpleTokenizer(), None) if mod is not None else (None, why)

# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------
def _machine_line() -> str:
    return f"{os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} torch threads"


def test_loader(benchmark, pytestconfig, datasets, set_name, preset, provider):
    import fastclip
    from fastclip.data import ClipLoader
    if provider.startswith("dali") and _dali_reason():
        pytest.skip(f"DALI not usable: {_dali_reason()}")
    if provider == "dali-mixed" and not torch.cuda.is_available():
        pytest.skip("dali-mixed needs a CUDA device")
    pattern, n = datasets[set_name]
    _, out_px = SETS[set_name]
    batch = QUICK_BATCH if _quick(pytestconfig) else BATCH
    device = "cuda" if provider == "dali-mixed" else "cpu"
    loader = ClipLoader(pattern, batch, image_size=out_px, augment=preset, backend=provider.split("-")[0],
                        device=device, tokenizer=fastclip.get_tokenizer("ViT-B-32"), num_threads=THREADS,
                        shuffle=0, warn=False, dali_ops="all" if provider == "dali-all" else "auto")

    first = []

    def epoch():
        delivered = 0
        start = time.perf_counter()
        for images, tokens in loader:
            if not delivered:
                first.append(time.perf_counter() - start)
            delivered += images.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return delivered

    assert epoch() == n  # warm-up, and the count is right
    rounds = _rounds(pytestconfig)
    times = []

    def timed():
        t = time.perf_counter()
        got = epoch()
        times.append(time.perf_counter() - t)
        return got

    assert benchmark.pedantic(timed, rounds=rounds, iterations=1) == n
    rate = n / statistics.median(times)
    _RESULTS[(set_name, preset, provider)] = rate
    info = benchmark.extra_info
    info.update(kind="loader", set=set_name, preset=preset, provider=provider, images=n, batch=batch,
                threads=THREADS, out_px=out_px, images_per_s=round(rate, 1),
                first_batch_s=round(statistics.median(first[1:]), 3), machine=_machine_line(),
                quick=_quick(pytestconfig))
    base = _RESULTS.get((set_name, preset, "pil"))
    if provider != "pil" and base:
        info["x_pil"] = round(rate / base, 2)
    print(f"\n{set_name} {preset} {provider}: {rate:.0f} images/s"
          + (f" ({info['x_pil']:.2f}x pil)" if "x_pil" in info else ""))


def test_augment(benchmark, pytestconfig, preset, provider):
    """The augment op alone on one thread: a batch of resized uint8 images -> normalised float32,
    with the preset's draws.  ``floor`` is the least any backend must do (read the uint8 batch,
    write it as float32): ``x_floor`` = a backend's time over the floor's."""
    from fastclip.data.augment import AugmentConfig, augment_batch, draw_params
    if provider == "native":
        from fastclip import extension
        if extension.reason():
            pytest.skip(f"native augment kernel unavailable: {extension.reason()}")
    px = QUICK_AUGMENT_PX if _quick(pytestconfig) else AUGMENT_PX
    n = AUGMENT_BATCH
    g = torch.Generator().manual_seed(0)
    # channels-first memory seen as [B, H, W, 3]: what both loaders hand over
    images = torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g).permute(0, 2, 3, 1)
    cfg = AugmentConfig.from_name(preset, px)
    params = draw_params(n, cfg, g)
    out = torch.empty(n, 3, px, px)
    if provider == "floor":
        def run():
            out.copy_(images.permute(0, 3, 1, 2))
    else:
        def run():
            augment_batch(images, cfg, params=params, out=out, backend=provider)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the loader's threads
    try:
        run()
        times = []

        def timed():
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        benchmark.pedantic(timed, rounds=_rounds(pytestconfig) + 4, iterations=1)
    finally:
        torch.set_num_threads(threads)
    rate = n / statistics.median(times)
    _RESULTS[("augment", preset, provider)] = rate
    info = benchmark.extra_info
    info.update(kind="augment", preset=preset, provider=provider, images=n, px=px, threads=1,
                images_per_s=round(rate, 1), machine=_machine_line(), quick=_quick(pytestconfig))
    floor, base = _RESULTS.get(("augment", preset, "floor")), _RESULTS.get(("augment", preset, "torch"))
    if provider != "floor" and floor:
        info["x_floor"] = round(floor / rate, 2)
    if provider == "native" and base:
        info["x_torch"] = round(rate / base, 2)
    print(f"\naugment {preset} {provider}: {rate:.0f} images/s")


def test_tokenizer(benchmark, pytestconfig, provider):
    import fastclip
    captions = _captions(QUICK_CAPTIONS if _quick(pytestconfig) else N_CAPTIONS)
    fast = fastclip.get_tokenizer("ViT-B-32")
    if provider == "open_clip":
        tok, why = _open_clip_tokenizer()
        if tok is None:
            pytest.skip(why)
    else:
        tok = fast
    first = tok(captions)  # warm: fills SimpleTokenizer's BPE cache, fastclip's word cache
    ref, why = _open_clip_tokenizer() if provider == "fastclip" else (None, "open_clip is the reference itself")
    if ref is not None:
        want = ref(captions)
        same = torch.equal(first, want)
        mismatched = [c for c, a, b in zip(captions, first, want) if not torch.equal(a, b)]
        assert same, f"{len(mismatched)} captions tokenise differently, e.g. {mismatched[:3]}"
    times = []

    def timed():
        t = time.perf_counter()
        out = tok(captions)
        times.append(time.perf_counter() - t)
        return out

    benchmark.pedantic(timed, rounds=_rounds(pytestconfig) + 2, iterations=1)
    rate = len(captions) / statistics.median(times)
    _RESULTS[("tokenizer", provider)] = rate
    info = benchmark.extra_info
    info.update(kind="tokenizer", provider=provider, captions=len(captions), captions_per_s=round(rate, 1),
                ids_identical_to_open_clip=ref is not None, machine=_machine_line(),
                quick=_quick(pytestconfig))
    base = _RESULTS.get(("tokenizer", "open_clip"))
    if provider == "fastclip" and base:
        info["x_open_clip"] = round(rate / base, 2)
    print(f"\ntokenizer {provider}: {rate:.0f} captions/s"
          + (f" ({info['x_open_clip']:.1f}x open_clip)" if "x_open_clip" in info else ""))


def test_make_dataset_10k_at_64px(benchmark, tmp_path_factory):
    """Built-in dataset generation: 10k samples at 64 px (target: under a minute)."""
    from fastclip.data import make_shapes_dataset

    def run():
        out = tmp_path_factory.mktemp("shapes10k")
        return make_shapes_dataset(str(out), 10000, 64, seed=0, caption_noise=0.2)

    meta = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(samples=meta["num_samples"], image_size=64, target_s=60.0,
                                seconds=meta["seconds"], machine=_machine_line())
