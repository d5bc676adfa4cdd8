"""The loader on both backends: output contract, bad input, ranks/workers, determinism, selection."""
import subprocess
import sys
import warnings

import pytest
import torch

import fastclip
from fastclip.data import ClipLoader, backend_reasons, select_backend
from fastclip.data.augment import CLIP_MEAN, CLIP_STD
from fastclip.ops import dispatch

from ._build import (
    ODD_MODES,
    bad_set,
    dali_available,
    good_sample,
    odd_mode_images,
    write_good_shards,
    write_tar,
)

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable (pip install "
                                                            "nvidia-dali-cuda130, the `dali` extra)")
BACKENDS = ["pil", pytest.param("dali", marks=needs_dali)]


@pytest.fixture(scope="module")
def tokenizer():
    return fastclip.get_tokenizer("ViT-B-32")


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _keys(batches):
    return [k for b in batches for k in b[-1]["keys"]]


def _unnormalise(x):
    return x.float() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_output_contract(tmp_path, backend, dtype, tokenizer):
    paths = write_good_shards(tmp_path, 2, 9)
    loader = ClipLoader(paths, 4, image_size=16, augment="clip_aug", backend=backend, dtype=dtype,
                        tokenizer=tokenizer, return_meta=True, with_labels=True)
    assert loader.backend_name == backend
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 4, 4, 2]  # full batches, then the rest
    for images, tokens, labels, meta in batches:
        assert images.shape[1:] == (3, 16, 16) and images.dtype == dtype
        assert tokens.dtype == torch.long and tokens.shape == (images.shape[0], 77)
        assert torch.equal(tokens, tokenizer(meta["captions"]))
        assert labels.tolist() == [int(k) % 7 for k in meta["keys"]]
        assert torch.isfinite(images.float()).all()
    assert sorted(_keys(batches)) == [f"{i:06d}" for i in range(18)]
    assert loader.epoch_stats.delivered == 18 and not loader.epoch_stats.skipped
    unit = _unnormalise(torch.cat([b[0] for b in batches]))
    assert unit.min() > -0.02 and unit.max() < 1.02  # CLIP normalisation undone = [0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_skipped_counted_and_every_good_sample_once(tmp_path, backend, tokenizer):
    pattern, good, reasons = bad_set(tmp_path, decoder_corrupt=True)
    loader = ClipLoader(pattern, 4, image_size=16, backend=backend, tokenizer=tokenizer, return_meta=True,
                        shuffle=5)
    with pytest.warns(UserWarning) as record:
        batches = list(loader)
    keys = _keys(batches)
    assert sorted(keys) == sorted(good)  # each good sample exactly once
    assert dict(loader.epoch_stats.skipped) == reasons
    assert loader.epoch_stats.delivered == len(good)
    text = " ".join(str(w.message) for w in record)
    assert "skipping missing shard" in text and "skipping truncated tar" in text and "delivered 12" in text
    if backend == "dali":  # the undecodable image made DALI fail its batch; PIL decoded the rest of it
        assert loader.epoch_stats.notes["dali_batch_fallback"] >= 1
    # full batches, except the last one (and, on DALI, the batch the undecodable image was in)
    sizes = [b[0].shape[0] for b in batches]
    assert sizes[:-1].count(4) >= len(sizes) - (2 if backend == "dali" else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_image_modes_become_rgb(tmp_path, backend, tokenizer):
    cases = odd_mode_images()
    write_tar(tmp_path / "modes.tar",
              [(name, {ext: data, "txt": name}) for name, (data, ext, _) in cases.items()])
    loader = ClipLoader(str(tmp_path / "modes.tar"), 16, image_size=8, train=False, backend=backend,
                        tokenizer=tokenizer, return_meta=True, wrong_modes="convert")
    (images, _, meta), = list(loader)
    assert sorted(meta["keys"]) == sorted(cases)  # nothing skipped
    unit = _unnormalise(images) * 255
    for row, key in enumerate(meta["keys"]):
        want = torch.tensor(cases[key][2], dtype=torch.float32)
        got = unit[row, :, 4, 4]
        assert (got - want).abs().max() < 14, f"{key}: got {got.tolist()}, want {want.tolist()}"
    converted = {f"converted:{m}": 1 for m in ODD_MODES.values() if m != "RGB"}
    converted["converted:RGBA"] = 2  # the RGBA PNG and the WebP with alpha
    assert dict(loader.epoch_stats.notes) == converted and not loader.epoch_stats.skipped


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_mode_images_are_skipped_and_counted_by_default(tmp_path, backend, tokenizer):
    cases = odd_mode_images()
    good = [good_sample(i) for i in range(5)]
    odd = [(name, {ext: data, "txt": name}) for name, (data, ext, _) in cases.items()]
    write_tar(tmp_path / "mixed.tar", good[:2] + odd[:5] + good[2:] + odd[5:])
    loader = ClipLoader(str(tmp_path / "mixed.tar"), 4, image_size=8, backend=backend, tokenizer=tokenizer,
                        return_meta=True)
    with pytest.warns(UserWarning) as record:
        keys = _keys(list(loader))
    text = " ".join(str(w.message) for w in record)
    assert "skipping wrong mode:L" in text and "'wrong_mode:CMYK': 1" in text
    delivered = {"palette_png", "webp"}  # colour images: a palette PNG converts losslessly
    assert sorted(keys) == sorted([k for k, _ in good] + list(delivered))
    wrong = {}
    for name, mode in ODD_MODES.items():
        if name not in delivered:
            wrong[f"wrong_mode:{mode}"] = wrong.get(f"wrong_mode:{mode}", 0) + 1
    assert dict(loader.epoch_stats.skipped) == wrong
    assert loader.epoch_stats.as_dict()["skipped/wrong_mode:CMYK"] == 1
    with pytest.raises(ValueError, match="wrong_modes must be"):
        ClipLoader(str(tmp_path / "mixed.tar"), 4, wrong_modes="drop", tokenizer=tokenizer)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,workers", [(2, 2), (3, 1)])
def test_ranks_and_workers_partition_the_data(tmp_path, backend, world, workers, tokenizer, quiet):
    pattern, good, reasons = bad_set(tmp_path)
    seen, skipped = [], {}
    for rank in range(world):
        for worker in range(workers):
            loader = ClipLoader(pattern, 3, image_size=8, backend=backend, tokenizer=tokenizer,
                                return_meta=True, rank=rank, world_size=world, worker=worker,
                                num_workers=workers, seed=1)
            loader.set_epoch(2)
            seen += _keys(loader)
            for k, v in loader.epoch_stats.skipped.items():
                skipped[k] = skipped.get(k, 0) + v
    assert len(seen) == len(set(seen)) and set(seen) == good
    assert skipped == reasons


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_under_a_seed(tmp_path, backend, tokenizer):
    paths = write_good_shards(tmp_path, 3, 6)

    def run(seed, epoch=0):
        loader = ClipLoader(paths, 4, image_size=16, augment="clip_aug", backend=backend, tokenizer=tokenizer,
                            shuffle=8, seed=seed, return_meta=True)
        loader.set_epoch(epoch)
        batches = list(loader)
        return _keys(batches), torch.cat([b[0] for b in batches])
    k1, x1 = run(0)
    k2, x2 = run(0)
    k3, x3 = run(1)
    k4, _ = run(0, epoch=1)
    assert k1 == k2 and torch.equal(x1, x2)
    assert k1 != k3 and k1 != k4 and sorted(k1) == sorted(k3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_augment_backends_give_the_same_batches(tmp_path, backend, tokenizer, monkeypatch):
    """The loader's colour work through the C++ kernel and through torch's operations: same draws,
    same images to float32 rounding."""
    from fastclip import extension
    if extension.reason():
        pytest.skip(f"native augment kernel unavailable: {extension.reason()}")
    paths = write_good_shards(tmp_path, 2, 5)

    def run(augment_backend):
        monkeypatch.setenv("FASTCLIP_AUGMENT_BACKEND", augment_backend)
        loader = ClipLoader(paths, 4, image_size=16, augment="clip_aug", backend=backend, tokenizer=tokenizer,
                            shuffle=0, seed=3, blur_p=1.0)
        return torch.cat([b[0] for b in loader])
    with pytest.raises(ValueError, match="not a backend of augment"):  # the loader does read the choice
        run("no-such-backend")
    native, torch_ops = run("native"), run("torch")
    assert native.shape == (10, 3, 16, 16)
    assert torch.allclose(native, torch_ops, rtol=0, atol=1e-5), float((native - torch_ops).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_simclr_views(tmp_path, backend, tokenizer):
    paths = write_good_shards(tmp_path, 1, 5)
    loader = ClipLoader(paths, 5, image_size=16, augment="simclr", backend=backend, tokenizer=tokenizer)
    (images, tokens, v1, v2), = list(loader)
    assert images.shape == v1.shape == v2.shape == (5, 3, 16, 16)
    assert not torch.equal(v1, v2) and not torch.equal(images, v1)


@needs_dali
def test_dali_and_pil_agree_on_the_eval_transform(tmp_path, tokenizer):
    from PIL import Image, ImageDraw

    from ._build import encode
    samples = []
    for i in range(6):  # smooth images with edges, non-square, larger than the output
        img = Image.new("RGB", (80 + 8 * i, 60), (30 * i, 120, 200 - 20 * i))
        ImageDraw.Draw(img).ellipse((10, 10, 50, 50), fill=(250, 240, 10))
        samples.append((f"{i:03d}", {"jpg": encode(img, "JPEG", quality=95), "txt": f"image {i}"}))
    write_tar(tmp_path / "a.tar", samples)
    out = {}
    for backend in ("pil", "dali"):
        loader = ClipLoader(str(tmp_path / "a.tar"), 6, image_size=32, train=False, backend=backend,
                            tokenizer=tokenizer)
        out[backend] = next(iter(loader))[0]
    diff = (out["pil"] - out["dali"]).abs()
    assert diff.mean() < 0.05, f"mean |pil - dali| = {diff.mean():.4f} (normalised units)"


def test_backend_selection_and_refusals(monkeypatch):
    monkeypatch.delenv("FASTCLIP_DATA_BACKEND", raising=False)
    monkeypatch.setenv("FASTCLIP_BACKEND", "chunked")  # a kernel backend name must not confuse the loader
    expected = "dali" if dali_available() else "pil"
    assert select_backend().name == expected
    assert select_backend("pil").name == "pil"
    monkeypatch.setenv("FASTCLIP_DATA_BACKEND", "pil")
    assert select_backend().name == "pil"
    monkeypatch.delenv("FASTCLIP_DATA_BACKEND")
    with pytest.raises(ValueError, match="not a backend of data_loader"):
        select_backend("opencv")
    reasons = backend_reasons("cpu")
    assert reasons["pil"] == [] and set(reasons) == {"dali", "pil"}
    if dali_available() and not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in backend_reasons("cuda")["dali"][0]
        with pytest.raises(dispatch.BackendError, match="torch.cuda.is_available"):
            select_backend("dali", device="cuda")
    real = dispatch.package_status

    def no_dali(name):
        return "cannot import nvidia.dali: ModuleNotFoundError: no" if name == "nvidia.dali" else real(name)
    monkeypatch.setattr(dispatch, "package_status", no_dali)
    assert select_backend().name == "pil"
    with pytest.raises(dispatch.BackendError, match="cannot import nvidia.dali"):
        select_backend("dali")
    monkeypatch.setattr(dispatch, "package_status", lambda name: f"cannot import {name}: test")
    with pytest.raises(dispatch.BackendError,
                       match=r"dali: cannot import nvidia.dali.*\n.*pil: cannot import PIL"):
        select_backend()


def test_argument_errors(tmp_path, tokenizer):
    paths = write_good_shards(tmp_path, 1, 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ClipLoader(paths, 0, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ClipLoader(paths, 2, dtype=torch.int8, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="split must be"):
        ClipLoader(paths, 2, split="rows", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="dali_ops must be 'auto', 'all' or 'decode', got 'some'"):
        ClipLoader(paths, 2, dali_ops="some", tokenizer=tokenizer)
    bad_tok = ClipLoader(paths, 2, tokenizer=lambda texts: [[1, 2]] * len(texts), backend="pil")
    with pytest.raises(ValueError, match=r"tokenizer must return a tensor \[B, context_length\]"):
        list(bad_tok)


@needs_dali
@pytest.mark.parametrize("preset", ["clip_aug", "simclr"])
def test_dali_operators_on_cpu_when_asked(tmp_path, preset, tokenizer):
    """dali_ops="all": DALI's own CPU operators augment (what a GPU runs by default); same contract,
    every good sample once, bad ones skipped and counted as on the default path."""
    paths, good_keys, expected = bad_set(tmp_path, decoder_corrupt=True)  # DALI fails a batch too
    loader = ClipLoader(paths, 4, image_size=16, augment=preset, backend="dali", dali_ops="all",
                        tokenizer=tokenizer, shuffle=0, return_meta=True, warn=False)
    batches = list(loader)
    assert sorted(_keys(batches)) == sorted(good_keys)
    assert dict(loader.epoch_stats.skipped) == expected
    assert loader.epoch_stats.notes.get("dali_batch_fallback", 0) >= 1
    for b in batches:
        views = [b[0], *b[2:-1]]
        assert len(views) == (3 if preset == "simclr" else 1)
        for x in views:
            assert x.shape == (len(b[-1]["keys"]), 3, 16, 16) and x.dtype == torch.float32
            unit = _unnormalise(x)
            assert unit.min() > -0.02 and unit.max() < 1.02
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="dali_ops='decode' runs on CPU only"):
            ClipLoader(paths, 4, backend="dali", dali_ops="decode", device="cuda", tokenizer=tokenizer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_early_exit_and_next_epoch(tmp_path, backend, tokenizer):
    paths = write_good_shards(tmp_path, 2, 20)
    loader = ClipLoader(paths, 4, image_size=8, backend=backend, tokenizer=tokenizer, prefetch=1)
    for i, _ in enumerate(loader):
        if i == 1:
            break  # the producer thread must stop, not hang
    assert loader.epoch == 1
    assert sum(b[0].shape[0] for b in loader) == 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_resampled_epochs(tmp_path, backend, tokenizer):
    paths = write_good_shards(tmp_path, 2, 5)
    loader = ClipLoader(paths, 4, image_size=8, backend=backend, tokenizer=tokenizer, resampled=True,
                        samples=22, drop_last=True)
    assert [b[0].shape[0] for b in loader] == [4] * 5


def test_torch_dataloader_workers(tmp_path, tokenizer):
    paths = write_good_shards(tmp_path, 4, 5)
    loader = ClipLoader(paths, 3, image_size=8, backend="pil", tokenizer=tokenizer, return_meta=True,
                        num_threads=1)
    dl = torch.utils.data.DataLoader(loader, batch_size=None, num_workers=2,
                                     multiprocessing_context="fork" if sys.platform == "linux" else None)
    keys = _keys(list(dl))
    assert sorted(keys) == [f"{i:06d}" for i in range(20)]


def test_import_does_not_load_pil_or_dali():
    code = ("import sys, fastclip.data; "
            "print(sorted(m for m in ('PIL', 'nvidia.dali', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.gpu
@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dali_mixed_gpu_path(tmp_path, tokenizer):
    paths = write_good_shards(tmp_path, 1, 8)
    loader = ClipLoader(paths, 4, image_size=16, augment="clip_aug", backend="dali", device="cuda",
                        dtype=torch.bfloat16, tokenizer=tokenizer)
    batches = list(loader)
    assert all(b[0].is_cuda and b[1].is_cuda and b[0].dtype == torch.bfloat16 for b in batches)
    assert sum(b[0].shape[0] for b in batches) == 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_errors_reach_the_caller(tmp_path, backend, tokenizer):
    empty = tmp_path / "empty.tar"
    write_tar(empty, [("x", {"txt": "no image"})])
    loader = ClipLoader(str(empty), 2, image_size=8, backend=backend, tokenizer=tokenizer, resampled=True, warn=False)
    with pytest.raises(RuntimeError, match="found no good sample"):
        list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_feed_the_model(tmp_path, backend, tokenizer):
    paths = write_good_shards(tmp_path, 1, 4)
    model = fastclip.create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1, text_width=64,
                                  text_heads=2)
    loader = ClipLoader(paths, 4, image_size=32, augment="clip_aug", backend=backend, tokenizer=tokenizer)
    images, tokens = next(iter(loader))
    out = model(images, tokens)
    assert out["image_features"].shape[0] == out["text_features"].shape[0] == 4
    assert torch.isfinite(out["image_features"]).all() and torch.isfinite(out["text_features"]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_batches_are_never_overwritten(tmp_path, backend, tokenizer):
    """Batch memory is recycled only once released: keeping every batch gives the same values as
    copying each one and dropping it (which lets the loader reuse its memory)."""
    paths = write_good_shards(tmp_path, 2, 10)

    def run(keep):
        loader = ClipLoader(paths, 4, image_size=16, augment="clip_aug", backend=backend, tokenizer=tokenizer,
                            seed=3, prefetch=1)
        out, ptrs = [], set()
        for images, _ in loader:
            ptrs.add(images.data_ptr())
            out.append(images if keep else images.clone())
            del images
        return out, ptrs, loader
    (kept, _, _), (copied, ptrs, loader) = run(True), run(False)
    assert len(kept) == len(copied) == 5
    assert len({b.data_ptr() for b in kept}) == 5
    assert len(ptrs) < 5  # the second run did reuse memory
    for a, b in zip(kept, copied):
        assert torch.equal(a, b)
    pool = loader._buffers
    assert sum(map(len, pool._free.values())) + len(pool._lent) >= 2  # memory kept after the epoch...
    loader.release_memory()  # ...until given back: only what the caller still holds stays tracked
    assert not any(pool._free.values()) and all(ref() is not None for ref, _, _ in pool._lent)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_leaves_torch_threads_alone(tmp_path, backend):
    """The pool threads run torch single-threaded, without changing the thread count of the caller
    or of threads started later (a fresh process: its main thread has not touched torch threads)."""
    paths = write_good_shards(tmp_path, 1, 6)
    code = f"""
import ctypes, os, sys, threading, torch
if sys.argv[1] == "set":  # a training script's own setting, which per-thread start-up copies
    torch.set_num_threads(2)
from fastclip.data import ClipLoader
from fastclip.data.threads import single_threaded_torch
from tests.data._build import fake_tokenizer
loader = ClipLoader({paths!r}, 4, image_size=16, backend={backend!r}, tokenizer=fake_tokenizer)
assert sum(len(b[0]) for b in loader) == 6
try:
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    mkl = ctypes.CDLL(lib).MKL_Get_Max_Threads
except (OSError, AttributeError):
    mkl = lambda: 1
later = []
t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
t.start(); t.join()
inside = []
def pool_thread():
    single_threaded_torch()
    inside.append((torch.get_num_threads(), mkl()))
t = threading.Thread(target=pool_thread)
t.start(); t.join()
print(torch.get_num_threads(), later[0], *inside[0])
"""
    root = str(__import__("pathlib").Path(__file__).parents[2])
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    for mode, want in (("default", default), ("set", "2")):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                             cwd=root).stdout.split()
        assert out[:2] == [want, want], mode  # the caller's and later threads' counts are untouched
        assert out[2:] == ["1", "1"], mode  # a pool thread: OpenMP and MKL single-threaded


@needs_dali
@pytest.mark.parametrize("preset", ["eval", "clip_aug", "simclr"])
def test_dali_all_operator_pipeline_on_cpu(tmp_path, preset):
    """The all-DALI pipeline (what the loader runs with a GPU, ``device="mixed"``) built with DALI's
    CPU operators: outputs in contract, and its evaluation transform agrees with the CPU path's."""
    import numpy as np

    from fastclip.data import _dali
    from fastclip.data.augment import AugmentConfig
    from fastclip.data.source import ShardSource
    from fastclip.data.stats import DataStats
    paths = write_good_shards(tmp_path, 1, 6)
    samples = list(ShardSource(paths, shuffle=0).iter(0, 0, 1, DataStats(warn=False)))
    name = "clip" if preset == "eval" else preset
    cfg = AugmentConfig.from_name(name, image_size=16, train=preset != "eval")
    batches = iter([[np.frombuffer(s.image, dtype=np.uint8) for s in samples]])
    pipe = _dali.build_pipeline(cfg, lambda: next(batches), 6, 1, seed=0, ops="all")
    outs = _dali.outputs_to_torch(pipe.run(), torch.float32, torch.device("cpu"))
    assert len(outs) == 1 + cfg.extra_views
    for x in outs:
        assert x.shape == (6, 3, 16, 16) and torch.isfinite(x).all()
        unit = _unnormalise(x)
        assert unit.min() > -0.02 and unit.max() < 1.02
    if preset == "eval":
        loader = ClipLoader(paths, 6, image_size=16, train=False, backend="dali",
                            tokenizer=fastclip.get_tokenizer())
        mine = next(iter(loader))[0]
        diff = (outs[0] - mine).abs()
        assert diff.mean() < 0.05, f"mean |all-DALI - CPU path| = {diff.mean():.4f}"
    with pytest.raises(ValueError, match="ops must be"):
        _dali.build_pipeline(cfg, lambda: None, 6, 1, seed=0, ops="some")


@pytest.mark.parametrize("backend", BACKENDS)
def test_spawned_dataloader_workers(tmp_path, backend):
    """The loader pickles (spawn/forkserver worker processes, macOS's default) and each worker
    delivers its slot: together every sample once."""
    paths = write_good_shards(tmp_path, 2, 5)
    from ._build import fake_tokenizer
    loader = ClipLoader(paths, 3, image_size=8, backend=backend, tokenizer=fake_tokenizer, return_meta=True)
    dl = torch.utils.data.DataLoader(loader, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    keys = _keys(list(dl))
    assert sorted(keys) == [f"{i:06d}" for i in range(10)]
    clone = __import__("pickle").loads(__import__("pickle").dumps(loader))
    assert clone.backend_name == backend and sorted(_keys(list(clone))) == sorted(keys)
