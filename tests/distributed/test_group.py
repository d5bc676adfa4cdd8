"""fastclip.distributed.group: ranks, layouts, the collective device, the group/device checks."""
import pytest
import torch

from fastclip.distributed import Layout, group_rank_and_size


pytestmark = pytest.mark.distributed
TASKS = "tests.distributed._tasks"


def test_layout_rows_and_offsets():
    lay = Layout(rank=1, counts=(3, 0, 5))
    assert (lay.world, lay.total) == (3, 8)
    assert [lay.offset(q) for q in range(3)] == [0, 3, 3]
    assert [lay.rows(q) for q in range(3)] == [slice(0, 3), slice(3, 3), slice(3, 8)]


def test_uninitialised_is_refused_with_the_reason():
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        group_rank_and_size()


def test_two_ranks_know_who_they_are(pool):
    facts = pool.run(f"{TASKS}:group_facts")
    assert [f["rank"] for f in facts] == [0, 1]
    assert {f["size"] for f in facts} == {2}
    assert all("gloo" in f["backend"] and f["device"] == "cpu" and f["global_of_1"] == 1 for f in facts)
    assert "this process is rank 0 of a group of 2" in facts[0]["expect_error"]
    assert "world_size=3" in facts[1]["expect_error"]


def test_gloo_refuses_non_cpu_features_naming_the_device():
    from fastclip.distributed import check_group_device
    from fastclip.distributed import group as G

    class FakeDevice:
        type = "cuda"

        def __str__(self):
            return "cuda:0"

    class Fake:
        device = FakeDevice()

    orig_rs, orig_bn = G.group_rank_and_size, G.backend_name
    G.group_rank_and_size, G.backend_name = (lambda group=None: (0, 2)), (lambda group=None: "gloo")
    try:
        with pytest.raises(ValueError, match="a gloo process group needs CPU features, got them on cuda:0"):
            check_group_device(Fake(), None)
        G.backend_name = lambda group=None: "nccl"
        with pytest.raises(ValueError, match="an NCCL process group needs CUDA features"):
            check_group_device(torch.zeros(1), None)
    finally:
        G.group_rank_and_size, G.backend_name = orig_rs, orig_bn
