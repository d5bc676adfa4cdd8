"""The PIL backend: chunk decoding with stream indices, batch positions and their skips."""
import torch

from fastclip.data import ClipLoader
from fastclip.data.augment import crop_rng
from fastclip.data.decode import decode_views
from fastclip.data.pil_batches import decode_chunk, pil_batches
from fastclip.data.stats import DataStats

from ._build import bad_set, fake_tokenizer


def _loader(pattern, batch_size, **kw):
    return ClipLoader(pattern, batch_size, image_size=16, backend="pil", tokenizer=fake_tokenizer, shuffle=0,
                      return_meta=True, warn=False, seed=4, **kw)


def test_decode_chunk_gives_stream_indices_and_each_samples_own_crop(tmp_path):
    pattern, _, _ = bad_set(tmp_path, decoder_corrupt=True)
    loader = _loader(pattern, 4, augment="clip_aug")
    chunk = list(loader.source.iter(2, 0, 1, DataStats(warn=False)))[3:7]
    assert [s.key for s in chunk] == ["000003", "000004", "undecodable", "000005"]
    decoded, failed = decode_chunk(loader, chunk, 40, epoch=2)
    assert [(s.key, i) for s, _, i in decoded] == [("000003", 40), ("000004", 41), ("000005", 43)]
    assert [(i, why) for i, why, _ in failed] == [(42, "corrupt_image")] and "undecodable" in failed[0][2]
    s, views, _ = decoded[1]
    want = decode_views(s.image, loader.cfg, crop_rng(4, 2, s.uid))  # the crop of (seed, epoch, uid)
    assert len(views) == 1 and torch.equal(views[0], want[0])


def test_a_batch_ends_at_its_last_sample_and_carries_the_skips_before_it(tmp_path):
    pattern, good, _ = bad_set(tmp_path, decoder_corrupt=True)
    loader = _loader(pattern, 4)
    stream = list(loader.source.iter(0, 0, 1, DataStats(warn=False)))
    where = {s.key: i for i, s in enumerate(stream)}
    batches = list(pil_batches(loader, iter(stream), 0, 0, DataStats(warn=False), 0, 0))
    for b in batches:
        assert b.position == where[b.out[-1]["keys"][-1]] + 1
    bad = where["undecodable"]
    carrier = next(b for b in batches if b.position > bad)
    assert carrier.delta.skipped["corrupt_image"] == 1
    assert all(not b.delta.skipped for b in batches if b is not carrier)
    assert [len(b.out[-1]["keys"]) for b in batches] == [4, 4, 4]  # 12 good samples, full batches
    # drop_last leaves out a short last batch.
    short = list(pil_batches(_loader(pattern, 5, drop_last=True), iter(stream), 0, 0, DataStats(warn=False),
                             0, 0))
    assert [len(b.out[-1]["keys"]) for b in short] == [5, 5] and len(good) == 12
