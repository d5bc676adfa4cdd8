"""fastclip.distributed.agreement: every rank raises the same error, or all agree, before data moves."""
import pytest


pytestmark = pytest.mark.distributed
TASKS = "tests.distributed._tasks"



def test_agreeing_ranks_get_every_rank_row_count(pool):
    got = pool.run(f"{TASKS}:agreement", [3, 5], [(8, 2.0, 0), (8, 2.0 + 1e-9, 0)])
    assert got == [(3, 5), (3, 5)]


def test_a_local_error_raises_on_every_rank_with_its_text(pool):
    got = pool.run(f"{TASKS}:agreement", [3, 5], [(8, 2.0, 0), (8, 2.0, 0)], 1)
    for msg in got:
        assert msg.startswith("DistributedInputError: test_op: invalid inputs on rank 1 of 2")
        assert "rank 1: ValueError: image_features must be 2-D, got rank 1's 3-D" in msg
    # the group is still usable afterwards
    assert pool.run(f"{TASKS}:agreement", [1, 1], [(4, 1.0, 1), (4, 1.0, 1)]) == [(1, 1), (1, 1)]


@pytest.mark.parametrize("values, field, shown", [
    ([(8, 2.0, 0), (16, 2.0, 0)], "feature dimension D", "rank 0: 8, rank 1: 16"),
    ([(8, 2.0, 0), (8, 2.5, 0)], "logit_scale", "rank 0: 2, rank 1: 2.5"),
    ([(8, 2.0, 0), (8, 2.0, 1)], "dtype", "rank 0: float32, rank 1: float16"),
])
def test_disagreement_names_the_field_and_each_rank_value(pool, values, field, shown):
    got = pool.run(f"{TASKS}:agreement", [2, 2], values)
    for msg in got:
        assert f"{field} must be the same on every rank of the group, got {shown}" in msg
