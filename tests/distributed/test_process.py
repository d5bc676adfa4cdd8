"""fastclip.distributed.process: one process without torchrun; rank 0 decides for all ranks."""
import pytest
import torch

from fastclip.distributed import DistInfo, barrier, gather_objects, init_distributed, rank0_decisions, shutdown


pytestmark = pytest.mark.distributed
TASKS = "tests.distributed._tasks"


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed(torch.device("cpu"))
    assert (info.rank, info.world_size, info.is_main, info.owned) == (0, 1, True, False)
    assert rank0_decisions([True, False], info) == [True, False]
    assert gather_objects({"a": 1}, info) == [{"a": 1}]
    barrier(info)
    shutdown(info)  # not owned: nothing to destroy


def test_rank0_decides_and_objects_are_gathered(pool):
    res = pool.run(f"{TASKS}:process_helpers")
    assert [r["decisions"] for r in res] == [[True, False], [True, False]]
    assert all(r["objects"] == [{"rank": 0}, {"rank": 1}] for r in res)
    assert DistInfo(rank=1).is_main is False
