"""The DALI backend: each sample's crop window, and batch positions at chunk ends."""
import pytest

from fastclip.data import ClipLoader
from fastclip.data.augment import crop_box, crop_rng, int_box
from fastclip.data.dali_batches import crop_window, dali_batches
from fastclip.data.samples import Sample
from fastclip.data.stats import DataStats

from ._build import dali_available, fake_tokenizer, jpeg, write_good_shards

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable (pip install "
                                                            "nvidia-dali-cuda130, the `dali` extra)")


def _loader(paths, batch_size, backend="pil", **kw):
    return ClipLoader(paths, batch_size, image_size=16, backend=backend, tokenizer=fake_tokenizer, shuffle=0,
                      return_meta=True, warn=False, seed=7, **kw)


def test_crop_window_is_the_samples_own_crop_in_whole_pixels(tmp_path):
    paths = write_good_shards(tmp_path, 1, 2)
    sample = Sample(key="k", image=jpeg(0, size=(53, 37)), image_ext="jpg", caption="c", uid=(3, 9))
    loader = _loader(paths, 4, augment="clip_aug")
    box = crop_window(loader, sample, epoch=1)
    assert box == int_box(crop_box(53, 37, loader.cfg, crop_rng(7, 1, (3, 9))), 53, 37)
    left, top, right, bottom = box
    assert 0 <= left < right <= 53 and 0 <= top < bottom <= 37
    assert crop_window(_loader(paths, 2, augment="clip_aug"), sample, epoch=1) == box  # not the batching
    assert crop_window(loader, sample, epoch=2) != box
    eval_loader = _loader(paths, 4, augment="clip", train=False)  # centre crop: no randomness
    assert crop_window(eval_loader, sample, 1) == crop_window(eval_loader, sample, 2)
    no_frame = b"\xff\xd8\xff\xe0" + bytes(64) + b"\xff\xd9"  # JPEG markers, no frame header
    headless = Sample(key="h", image=no_frame, image_ext="jpg", caption="c")
    assert crop_window(loader, headless, 1) is None  # size unknown: decoded by PIL instead


@needs_dali
def test_batches_end_at_their_chunks_end(tmp_path):
    paths = write_good_shards(tmp_path, 2, 5)
    loader = _loader(paths, 4, backend="dali")
    stream = list(loader.source.iter(0, 0, 1, DataStats(warn=False)))[3:]  # resumed at stream index 3
    batches = list(dali_batches(loader, iter(stream), 0, 0, DataStats(warn=False), 3, 2))
    assert [(b.position, b.index, len(b.out[-1]["keys"])) for b in batches] == [(7, 3, 4), (10, 4, 3)]
    assert [k for b in batches for k in b.out[-1]["keys"]] == [s.key for s in stream]
