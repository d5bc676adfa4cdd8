"""fastclip.atomic: a target is the old file or the whole new one, never a torn mix."""
import os

import pytest
import torch

from fastclip import atomic


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.bin"
    atomic.atomic_write_bytes(target, b"old")
    atomic.atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert os.listdir(target.parent) == ["state.bin"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.bin"]


def test_torch_save_round_trips(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    path = atomic.atomic_torch_save(obj, tmp_path / "x.pt")
    back = torch.load(path, weights_only=True)
    assert torch.equal(back["w"], obj["w"]) and back["step"] == 7
    atomic.fsync_dir(str(tmp_path / "missing-dir"))  # a directory that cannot be opened: no error
