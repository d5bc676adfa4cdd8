"""DataStats: counting, warning once per reason, merging, and the state round trip."""
import warnings

import pytest

from fastclip.data.stats import SAMPLE_REASONS, SHARD_REASONS, DataStats


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


def test_warns_once_per_reason_and_merges_sums():
    stats = DataStats(warn=True)
    with pytest.warns(UserWarning, match="skipping corrupt image .a:1.") as record:
        stats.skip("corrupt_image", "a:1")
        stats.skip("corrupt_image", "a:2")
        stats.skip("missing_caption", "b:1")
    assert len(record) == 2  # one per reason, with the first example
    assert stats.examples == {"corrupt_image": "a:1", "missing_caption": "b:1"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataStats(warn=False).skip("corrupt_image", "quiet")
    other = DataStats(warn=False)
    other.skip("corrupt_image", "c:1", n=3)
    other.skip("truncated_tar", "d")
    other.add_delivered(5)
    other.note("converted:L")
    stats.merge(other)
    assert stats.as_dict() == {"delivered": 5, "skipped/corrupt_image": 5, "skipped/missing_caption": 1,
                               "skipped/truncated_tar": 1, "note/converted:L": 1}
    assert stats.examples["corrupt_image"] == "a:1" and stats.examples["truncated_tar"] == "d"
    assert stats.total_skipped == 6  # truncated_tar counts a shard, not samples
    assert set(SHARD_REASONS).isdisjoint(SAMPLE_REASONS)
