"""Batch memory is reused only once nothing can see it."""
import gc

import numpy as np
import torch

from fastclip.data._recycle import BufferPool


def _fresh(pool, dtype=torch.float32):
    return pool.empty((2, 3, 4, 5), dtype)


def test_a_released_buffer_is_reused():
    pool = BufferPool()
    a = _fresh(pool)
    ptr = a.data_ptr()
    del a
    b = _fresh(pool)
    assert b.data_ptr() == ptr and b.shape == (2, 3, 4, 5) and b.is_contiguous()


def test_a_buffer_still_seen_is_not_reused():
    pool = BufferPool()
    holders = {
        "tensor": lambda t: t,
        "view": lambda t: t[1, :, 2],
        "numpy": lambda t: t.numpy(),
        "dlpack": lambda t: torch.utils.dlpack.to_dlpack(t),
        "from_dlpack": lambda t: torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t)),
    }
    for name, hold in holders.items():
        t = _fresh(pool)
        t.fill_(7.0)
        ptr = t.data_ptr()
        kept = hold(t)
        del t
        gc.collect()
        for _ in range(3):  # several new batches: none may land on the kept memory
            other = _fresh(pool)
            assert other.data_ptr() != ptr, name
            other.fill_(-1.0)
        if name in ("tensor", "view", "from_dlpack"):
            assert (kept == 7.0).all(), name
        elif name == "numpy":
            assert (np.asarray(kept) == 7.0).all()
        del kept
        gc.collect()


def test_dtypes_and_the_idle_cap():
    pool = BufferPool(keep=2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.uint8):
        t = _fresh(pool, dtype)
        assert t.dtype == dtype and t.shape == (2, 3, 4, 5)
        t.fill_(1)
        assert float(t.float().sum()) == t.numel()
    many = [_fresh(pool) for _ in range(5)]
    del many
    _fresh(pool)  # reclaims: at most `keep` idle buffers of a size stay
    assert all(len(v) <= 2 for v in pool._free.values())


def test_release_forgets_idle_buffers_only():
    pool = BufferPool()
    held, idle = _fresh(pool), _fresh(pool)
    held.fill_(3.0)
    held_ptr = held.data_ptr()
    del idle
    pool.release()
    assert not any(pool._free.values())  # the idle buffer is gone
    assert len(pool._lent) == 1  # the held one is still tracked
    fresh = _fresh(pool)
    fresh.fill_(-1.0)
    assert fresh.data_ptr() != held_ptr and (held == 3.0).all()
    del held
    pool.release()  # reclaims the dropped batch, then forgets it
    assert not any(pool._free.values()) and len(pool._lent) == 1
