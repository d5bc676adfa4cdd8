"""Files that are either the old version or the whole new one, never a torn mix, and that say
when they were damaged since.

State that must survive a crash (training checkpoints, cached evaluation features, result files
read by later runs) is written to a temporary file in the same directory, flushed and fsynced,
renamed over the target (``os.replace`` is atomic on POSIX and Windows within one file system),
and the directory entry is fsynced, so that a reader sees the previous file or the complete new
one, including after a power cut.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Union

__all__ = ["atomic_write_bytes", "atomic_torch_save", "fsync_dir", "checksum", "TRAIN_CHECKPOINT_FORMAT"]

# The ``format`` entry of a fastclip training checkpoint (a checksummed payload): written by
# fastclip.train.checkpoint, recognised by fastclip.eval, which never imports train.
TRAIN_CHECKPOINT_FORMAT = "fastclip-train-checkpoint"


def fsync_dir(path: str) -> None:
    """Make a rename inside directory ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Union[str, os.PathLike], data: Union[bytes, bytearray, memoryview],
                       suffix: str = ".tmp") -> str:
    """Write ``data`` to ``path`` atomically (parent directories are created); returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)
    return path


def atomic_torch_save(obj, path: Union[str, os.PathLike]) -> str:
    """``torch.save(obj)`` to ``path`` atomically; returns the path."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getbuffer(), suffix=".pt")


def _feed(h, obj) -> None:
    import torch
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            h.update(repr(k).encode())
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"B" + bytes(obj))
    else:
        h.update(repr(obj).encode())


def checksum(payload: dict) -> str:
    """SHA-256 over everything in ``payload`` except its ``checksum`` entry: tensors by dtype, shape
    and bytes, containers by structure, anything else by ``repr``.  A file that stores it beside
    its content detects a damaged or hand-edited payload when it is read back."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "checksum"})
    return h.hexdigest()
