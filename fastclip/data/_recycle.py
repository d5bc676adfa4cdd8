"""Reused CPU memory for the batches the loader hands over.

Every batch is a new tensor (the caller may keep it), and on CPU a fresh 150 MB tensor
(256 x 3 x 224 x 224 fp32) makes the kernel fault in each of its pages the first time it is
written: work on every batch that reused memory does not need.  So batch memory is recycled,
but only once nothing can see it any more: each
batch tensor is made with ``torch.from_numpy`` over a fresh ndarray view of a pooled buffer, the
tensor's storage owns that view, and the pool holds only a weak reference to it.  The weak
reference dies exactly when the last tensor, view, ``.numpy()`` array or DLPack capsule made
from the batch is gone; only then is the buffer reused.  A caller who keeps batches keeps their
memory; at most ``keep`` idle buffers per size are held, the rest go back to the allocator.
``release`` gives back the idle ones (the loader's ``release_memory``): not done at every epoch's
end, since the next epoch would then fault in fresh memory again.
"""
from __future__ import annotations

import math
import threading
import weakref

import numpy as np
import torch

__all__ = ["BufferPool"]


class BufferPool:
    """``empty(shape, dtype)``: an uninitialised contiguous CPU tensor, on recycled memory when
    some earlier one is no longer referenced.  Thread-safe."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._free: dict = {}   # nbytes -> [np.ndarray (uint8) buffer]
        self._lent: list = []   # (weakref to the view the tensor owns, nbytes, buffer)
        self._lock = threading.Lock()

    def _reclaim(self) -> None:
        alive = []
        for ref, nbytes, buf in self._lent:
            if ref() is not None:
                alive.append((ref, nbytes, buf))
                continue
            free = self._free.setdefault(nbytes, [])
            if len(free) < self.keep:
                free.append(buf)
        self._lent = alive

    def release(self) -> None:
        """Forget the idle buffers (the allocator gets their memory back); batches still held by
        the caller keep theirs until they are dropped."""
        with self._lock:
            self._reclaim()
            self._free.clear()

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            self._reclaim()
            free = self._free.get(nbytes)
            buf = free.pop() if free else np.empty(max(nbytes, 1), dtype=np.uint8)
            view = buf[:nbytes]  # a new ndarray object: the tensor's storage owns it
            self._lent.append((weakref.ref(view), nbytes, buf))
        return torch.from_numpy(view).view(dtype).view(shape)
