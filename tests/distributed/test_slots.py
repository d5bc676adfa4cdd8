"""fastclip.distributed.slots: a reader's share of the stream among every rank's workers."""
import pytest

from fastclip.distributed import split_slots


def test_slot_arguments_are_checked():
    assert split_slots(1, 2, 1, 3) == (4, 6)
    with pytest.raises(ValueError, match="rank must be in"):
        split_slots(2, 2, 0, 1)
    with pytest.raises(ValueError, match="worker must be in"):
        split_slots(0, 1, 3, 2)


def test_one_process_outside_a_dataloader_is_the_only_slot():
    assert split_slots() == (0, 1)
    assert split_slots(rank=0, world_size=4) == (0, 4)


def test_slots_cover_every_reader_once():
    seen = {split_slots(r, 3, w, 2) for r in range(3) for w in range(2)}
    assert seen == {(k, 6) for k in range(6)}
