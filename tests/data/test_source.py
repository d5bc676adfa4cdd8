"""ShardSource: skipping with reasons, the split across ranks and workers, shuffling, resampling
and resuming inside a stream."""
import itertools

import pytest

from fastclip.data.source import ShardSource
from fastclip.data.stats import DataStats
from fastclip.distributed.slots import split_slots

from ._build import bad_set as _bad_set
from ._build import write_good_shards, write_tar


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
