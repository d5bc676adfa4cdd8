"""Thread pools of the loader backends: work cut in parts, torch single-threaded in pool threads."""
import threading

import pytest
import torch

from fastclip.data.threads import run_in_parts, thread_pool


def test_run_in_parts_covers_every_index_once_in_at_most_parts_parts():
    with thread_pool(3, "fastclip-test") as pool:
        for n, parts, want in [(10, 3, [(0, 4), (4, 8), (8, 10)]), (2, 4, [(0, 1), (1, 2)]), (5, 1, [(0, 5)]),
                               (0, 3, [])]:
            seen, lock = [], threading.Lock()

            def work(lo, hi, seen=seen, lock=lock):
                with lock:
                    seen.append((lo, hi))

            run_in_parts(pool, n, parts, work)
            assert sorted(seen) == want, (n, parts)


def test_errors_reach_the_caller_and_pool_threads_run_torch_single_threaded():
    def work(lo, hi):
        if lo > 0:
            raise RuntimeError(f"part {lo}:{hi} failed")

    before = torch.get_num_threads()
    with thread_pool(2, "fastclip-test") as pool:
        with pytest.raises(RuntimeError, match="part 3:6 failed"):
            run_in_parts(pool, 6, 2, work)
        names = {pool.submit(lambda: threading.current_thread().name).result() for _ in range(4)}
        assert all(name.startswith("fastclip-test") for name in names)
        assert pool.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == before  # the caller's own count is not touched
