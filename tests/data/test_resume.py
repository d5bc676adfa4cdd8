"""Resuming the loader inside an epoch (``state_dict`` / ``load_state_dict``), and the per-sample crops
that make it exact: a resumed run delivers bit for bit the batches of an uninterrupted one."""
import io
import json
import pickle
import time

import pytest
import torch

from fastclip.data import AugmentConfig, ClipLoader, ShardSource

from ._build import bad_set, dali_available, fake_tokenizer, write_good_shards, write_tar

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable (pip install "
                                                            "nvidia-dali-cuda130, the `dali` extra)")
BACKENDS = ["pil", pytest.param("dali", marks=needs_dali)]


def _loader(shards, backend, preset="clip_aug", batch_size=4, **kw):
    args = dict(image_size=16, augment=preset, backend=backend, tokenizer=fake_tokenizer, seed=5, prefetch=3,
                num_threads=2, with_labels=True, return_meta=True, warn=False)
    return ClipLoader(shards, batch_size, **{**args, **kw})


def _assert_same_batches(got, want, what):
    assert len(got) == len(want), f"{what}: {len(got)} batches, want {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert len(a) == len(b)
        for j, (x, y) in enumerate(zip(a, b)):
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), \
                    f"{what}: batch {i} item {j} differs (max |diff| {(x.float() - y.float()).abs().max()})"
            else:
                assert x["uids"] == y["uids"] and x["keys"] == y["keys"], f"{what}: batch {i} samples differ"


def _round_trip(state, how):
    if how == "torch":
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        return torch.load(buf)  # weights_only: plain Python values load
    if how == "json":
        return json.loads(json.dumps(state))
    return pickle.loads(pickle.dumps(state))


def _check_resume(make, k, how="torch", wait=0.0):
    """Uninterrupted: epochs 0 and 1.  Interrupted: ``k`` batches of epoch 0 (the producer is
    ahead: prefetch 3), state saved; a new loader loads it and must deliver the rest of epoch 0
    and epoch 1 bitwise, with the same counters."""
    full = make()
    epoch0, stats0 = list(full), full.epoch_stats.as_dict()
    assert full.state_dict()["epoch"] == 1 and full.state_dict()["position"] == 0  # the next epoch's start
    epoch1, stats01 = list(full), full.stats.as_dict()
    assert 0 < k < len(epoch0)

    cut = make()
    it = iter(cut)
    head = [next(it) for _ in range(k)]
    time.sleep(wait)  # let the producer get ahead
    state = cut.state_dict()  # saved while the loop is inside the epoch
    _assert_same_batches(head, epoch0[:k], "before the interruption")
    it.close()  # the run is killed: its producer had prepared more than it delivered
    assert cut.state_dict() == state
    assert (state["epoch"], state["batch"]) == (0, k)
    assert state["epoch_stats"]["delivered"] == sum(len(b[1]) for b in head)
    state = _round_trip(state, how)

    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    rest = list(resumed)
    _assert_same_batches(rest, epoch0[k:], "the rest of the epoch")
    assert resumed.epoch_stats.as_dict() == stats0
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["position"] == 0
    _assert_same_batches(list(resumed), epoch1, "the next epoch")
    assert resumed.stats.as_dict() == stats01
    return state, epoch0


def _bad_and_good(tmp_path):
    """Every skip reason (missing, unreadable and truncated shards, corrupt and truncated images, an
    image only a decoder finds bad, which makes DALI fail its batch) among good samples."""
    pattern, good, _ = bad_set(tmp_path, decoder_corrupt=True)
    return [pattern, *write_good_shards(tmp_path, 2, 5, start=100)], len(good) + 10


@pytest.mark.parametrize("preset", ["clip", "clip_aug", "simclr"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_inside_an_epoch_is_bitwise(tmp_path, backend, preset):
    shards, n = _bad_and_good(tmp_path)
    make = lambda: _loader(shards, backend, preset, shuffle=6)  # noqa: E731
    state, epoch0 = _check_resume(make, k=2)
    assert sum(len(b[1]) for b in epoch0) == n
    assert state["position"] == 8 and not state["epoch_stats"]["skipped"]
    # Later: past the image only a decoder finds bad (and, on DALI, the batch PIL decoded instead)
    state, _ = _check_resume(make, k=4, how="pickle")
    assert state["epoch_stats"]["skipped"] == {"corrupt_image": 1}
    if backend == "dali":
        assert state["epoch_stats"]["notes"] == {"dali_batch_fallback": 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_clean_data_no_shuffle_and_resampled(tmp_path, backend):
    paths = write_good_shards(tmp_path, 3, 5)
    state, _ = _check_resume(lambda: _loader(paths, backend, shuffle=0), k=3, how="pickle", wait=0.3)
    assert state["position"] == 12  # what was delivered, not what the producer had prepared
    _check_resume(lambda: _loader(paths, backend, shuffle=4, resampled=True, samples=19), k=2, how="json")
    two_slots = dict(shuffle=4, rank=1, world_size=2, split="sample")
    state, _ = _check_resume(lambda: _loader(paths, backend, **two_slots), k=1)
    assert (state["identity"]["slot"], state["identity"]["slots"]) == (1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_samples_are_not_decoded_on_resume(tmp_path, backend, monkeypatch):
    from fastclip.data import _dali, decode
    paths = write_good_shards(tmp_path, 2, 10)
    seen = []
    if backend == "pil":
        real = decode.decode_views
        monkeypatch.setattr(decode, "decode_views", lambda data, *a: seen.append(data) or real(data, *a))
    else:
        real = _dali.encoded_batch
        monkeypatch.setattr(_dali, "encoded_batch",
                            lambda chunk: seen.extend(s.image for s in chunk) or real(chunk))
    cut = _loader(paths, backend, shuffle=0)
    it = iter(cut)
    next(it), next(it)
    state = cut.state_dict()
    it.close()
    assert state["position"] == 8
    resumed = _loader(paths, backend, shuffle=0)
    resumed.load_state_dict(state)
    seen.clear()
    keys = [k for b in resumed for k in b[-1]["keys"]]
    assert keys == [f"{i:06d}" for i in range(8, 20)]
    from ._build import jpeg
    assert sorted(seen) == sorted(jpeg(i) for i in range(8, 20))  # each remaining sample once, no other


def test_state_after_the_last_batch_and_set_epoch(tmp_path):
    paths = write_good_shards(tmp_path, 1, 10)
    make = lambda: _loader(paths, "pil", shuffle=0)  # noqa: E731
    full = make()
    epoch0, epoch1 = list(full), list(full)
    cut = make()
    it = iter(cut)
    for _ in range(len(epoch0)):
        next(it)
    state = cut.state_dict()  # after the last batch, before the loop saw the epoch end
    assert (state["epoch"], state["position"]) == (0, 10)
    resumed = make()
    resumed.load_state_dict(state)
    assert list(resumed) == []  # the rest of epoch 0 is empty
    _assert_same_batches(list(resumed), epoch1, "the next epoch")
    again = make()
    again.load_state_dict(state)
    again.set_epoch(1)  # another epoch: the loaded position is dropped
    assert again.state_dict()["epoch"] == 1 and again.state_dict()["position"] == 0
    _assert_same_batches(list(again), epoch1, "epoch 1 after set_epoch")


def test_a_mismatched_state_is_refused(tmp_path):
    paths = write_good_shards(tmp_path, 2, 3)
    state = _loader(paths, "pil").state_dict()
    assert state["identity"]["slots"] == 1 and state["version"] == 1
    with pytest.raises(ValueError, match=r"seed: this loader has 6, the state has 5.*batch_size: this loader "
                                         r"has 3, the state has 4"):
        _loader(paths, "pil", seed=6, batch_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"shards: this loader has '[0-9a-f]+', the state has .*num_shards"):
        _loader(paths[:1], "pil").load_state_dict(state)
    with pytest.raises(ValueError, match=r"slot: this loader has 1, the state has 0; slots: this loader has 2,"):
        _loader(paths, "pil", rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"shuffle: this loader has 3, the state has 2000"):
        _loader(paths, "pil", shuffle=3).load_state_dict(state)
    with pytest.raises(ValueError, match="state must be a dict from ClipLoader.state_dict"):
        _loader(paths, "pil").load_state_dict([1, 2])
    with pytest.raises(ValueError, match=r"state\['position'\] must be an int >= 0, got -1"):
        _loader(paths, "pil").load_state_dict({**state, "position": -1})


def _structured_images(tmp_path, n=8):
    """JPEGs with edges and gradients (a different crop gives a clearly different image)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from ._build import encode
    samples = []
    for i in range(n):
        y, x = np.mgrid[0:48, 0:64 + 4 * i]
        arr = np.stack([x * 3 % 256, y * 5 % 256, (x + y) * 2 % 256], -1).astype(np.uint8)
        img = Image.fromarray(arr)
        ImageDraw.Draw(img).ellipse((8 + i, 6, 40 + i, 30), fill=(250, 240, 10))
        samples.append((f"{i:03d}", {"jpg": encode(img, "JPEG", quality=95), "txt": f"image {i}"}))
    write_tar(tmp_path / "a.tar", samples[: n // 2])
    write_tar(tmp_path / "b.tar", samples[n // 2:])
    return [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]


def _by_uid(loader, view=0):
    out = {}
    for b in loader:
        images = b[0] if view == 0 else b[1 + view]
        out.update({uid: images[i] for i, uid in enumerate(b[-1]["uids"])})
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_samples_crop_depends_on_neither_slots_nor_batch_size(tmp_path, backend):
    shards = _structured_images(tmp_path)
    kw = dict(image_size=32, augment="clip", scale=(0.2, 1.0), shuffle=0, seed=3, return_meta=True,
              warn=False, backend=backend, tokenizer=fake_tokenizer)
    one = _by_uid(ClipLoader(shards, 4, **kw))
    split = {}
    for rank in range(2):
        split.update(_by_uid(ClipLoader(shards, 3, rank=rank, world_size=2, split="sample", **kw)))
    assert sorted(one) == sorted(split) and len(one) == 8
    for uid in one:
        assert torch.equal(one[uid], split[uid]), uid
    other_seed = _by_uid(ClipLoader(shards, 4, **{**kw, "seed": 4}))
    assert sum(not torch.equal(one[u], other_seed[u]) for u in one) >= 6  # the crops are random


@needs_dali
@pytest.mark.parametrize("preset", ["clip", "simclr"])
def test_pil_and_dali_crop_a_sample_the_same_way(tmp_path, preset):
    shards = _structured_images(tmp_path)
    kw = dict(image_size=32, augment=preset, scale=(0.2, 1.0), shuffle=0, seed=3, return_meta=True,
              warn=False, tokenizer=fake_tokenizer)
    if preset == "simclr":
        kw.update(view=AugmentConfig(image_size=32, random_crop=True, scale=(0.2, 1.0)))  # crops only
    for view in range(3 if preset == "simclr" else 1):
        pil = _by_uid(ClipLoader(shards, 4, backend="pil", **kw), view)
        dali = _by_uid(ClipLoader(shards, 4, backend="dali", **kw), view)
        other = _by_uid(ClipLoader(shards, 4, backend="pil", **{**kw, "seed": 4}), view)
        assert sorted(pil) == sorted(dali) == sorted(other) and len(pil) == 8
        for uid in pil:
            # Pillow's resize (outputs below 96 px) against torch's, on the same decoded pixels
            diff = (pil[uid] - dali[uid]).abs()
            assert diff.mean() < 0.005 and diff.max() < 0.2, (f"view {view}, {uid}: |pil - dali| mean "
                                                              f"{diff.mean():.4f}, max {diff.max():.3f}")
            crop_changed = (pil[uid] - other[uid]).abs().mean()  # another seed: another crop
            assert crop_changed > 0.1, (view, uid, float(crop_changed))


@needs_dali
def test_dali_decodes_with_pil_a_sample_whose_size_is_not_in_its_header(tmp_path, monkeypatch):
    from fastclip.data import dali_batches as backend_module
    shards = _structured_images(tmp_path)
    kw = dict(image_size=32, augment="clip", scale=(0.2, 1.0), shuffle=0, seed=3, return_meta=True,
              warn=False, tokenizer=fake_tokenizer)
    pil = _by_uid(ClipLoader(shards, 4, backend="pil", **kw))
    hidden = {s.image: s.uid for s in list(ShardSource(shards).iter())[::3]}  # 3 of the 8 samples
    real = backend_module.image_dimensions
    monkeypatch.setattr(backend_module, "image_dimensions",
                        lambda data: None if data in hidden else real(data))
    dali = _by_uid(ClipLoader(shards, 4, backend="dali", **kw))
    assert sorted(dali) == sorted(pil)
    for uid in hidden.values():  # decoded by PIL: the PIL backend's image, bit for bit
        assert torch.equal(dali[uid], pil[uid]), uid
