"""The backend contract: stream chunks, and the Batch records both backends yield."""
import pytest

from fastclip.data import ClipLoader
from fastclip.data.batches import Batch, chunks
from fastclip.data.dali_batches import dali_batches
from fastclip.data.pil_batches import pil_batches
from fastclip.data.stats import DataStats

from ._build import bad_set, dali_available, fake_tokenizer

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable (pip install "
                                                            "nvidia-dali-cuda130, the `dali` extra)")


def test_chunks_carry_the_stream_index_of_their_first_sample():
    assert list(chunks(iter(range(7)), 3, start=10)) == [(10, [0, 1, 2]), (13, [3, 4, 5]), (16, [6])]
    assert list(chunks(iter(range(6)), 3, start=0)) == [(0, [0, 1, 2]), (3, [3, 4, 5])]  # no empty tail
    assert list(chunks(iter([]), 3, start=5)) == []


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_backend_batches_follow_the_contract(tmp_path, backend):
    """Batches in stream order; positions grow to the end of the stream; batch indices count on from
    ``index``; the deltas add up to the decoding-side counts of the epoch's stats."""
    pattern, good, _ = bad_set(tmp_path, decoder_corrupt=True)
    loader = ClipLoader(pattern, 3, image_size=16, backend=backend, tokenizer=fake_tokenizer, shuffle=0,
                        return_meta=True, warn=False)
    fn = {"pil": pil_batches, "dali": dali_batches}[backend]
    assert loader.backend.fn is fn
    reader = DataStats(warn=False)
    stream = list(loader.source.iter(0, 0, 1, reader))
    stats = DataStats(warn=False)
    batches = list(fn(loader, iter(stream), 0, 0, stats, 0, 5))
    assert all(isinstance(b, Batch) for b in batches)
    assert [b.index for b in batches] == list(range(6, 6 + len(batches)))
    positions = [b.position for b in batches]
    assert positions == sorted(set(positions)) and positions[-1] == len(stream)
    keys = [k for b in batches for k in b.out[-1]["keys"]]
    assert keys == [s.key for s in stream if s.key != "undecodable"] and set(keys) == good
    deltas = DataStats(warn=False)
    for b in batches:
        deltas.merge(b.delta)
    assert deltas.delivered == stats.delivered == len(good)
    assert dict(deltas.skipped) == dict(stats.skipped) == {"corrupt_image": 1}  # the decoder's skip only
