"""Thread pools for the loader's backends, whose threads run torch single-threaded.

The backends decode, resize and augment a batch in ``num_threads`` Python threads, each on its own
part of the batch (:func:`run_in_parts`).  If each of those threads also ran torch's own intra-op
threads, they would oversubscribe the cores; so every pool thread makes torch single-threaded for
itself only (:func:`single_threaded_torch`), leaving the caller's thread count, and that of
threads started later, as they were.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

__all__ = ["thread_pool", "run_in_parts", "single_threaded_torch"]

_THREAD_SETTERS: list = []


def _thread_setters() -> list:
    """C entry points that set the calling thread's own thread count: OpenMP's (torch's parallel
    loops) and MKL's (torch's CPU matmuls); those not found are left out."""
    if not _THREAD_SETTERS:
        import ctypes
        import os
        found = []
        libs = [None, os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")]
        for name in ("omp_set_num_threads", "MKL_Set_Num_Threads_Local"):
            for lib in libs:
                try:
                    fn = getattr(ctypes.CDLL(lib), name)
                except Exception:  # no such library or symbol; CDLL(None) is a TypeError on Windows
                    continue
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int if name.startswith("MKL") else None
                found.append(fn)
                break
        _THREAD_SETTERS.append(found)
    return _THREAD_SETTERS[0]


def single_threaded_torch() -> None:
    """Make torch single-threaded in the calling thread only.

    ``torch.set_num_threads`` would not do: besides this thread it sets the process-wide default
    that every thread starting later inherits.  OpenMP's ``omp_set_num_threads`` and MKL's
    ``MKL_Set_Num_Threads_Local`` set only the calling thread's counts, which torch's parallel
    loops and matmuls follow; they are called after torch has initialised this thread's
    threading state (which would otherwise override them).  Where they cannot be reached
    (another platform or threading backend), nothing is changed: slower, not wrong.
    """
    setters = _thread_setters()
    if setters:
        torch.get_num_threads()  # torch's lazy per-thread initialisation first
        for fn in setters:
            fn(1)


def thread_pool(num_threads: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``num_threads`` threads named ``name``, each running torch single-threaded."""
    return ThreadPoolExecutor(num_threads, thread_name_prefix=name, initializer=single_threaded_torch)


def run_in_parts(pool: ThreadPoolExecutor, n: int, parts: int, work: Callable[[int, int], None]) -> None:
    """``work(lo, hi)`` over ``range(n)`` cut into at most ``parts`` contiguous parts, one task of
    ``pool`` each; returns when all are done and raises the first part's error, if any."""
    if n <= 0:
        return
    step = -(-n // max(1, parts))
    for f in [pool.submit(work, lo, min(n, lo + step)) for lo in range(0, n, step)]:
        f.result()
