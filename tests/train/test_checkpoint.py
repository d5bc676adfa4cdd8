"""Checkpoints: atomic writes, last k kept, damaged or truncated files refused naming a good one."""
import os

import pytest
import torch

from fastclip.train import CheckpointError, CheckpointManager, list_checkpoints, load_checkpoint, save_checkpoint
from fastclip.train.checkpoint import checksum


def _payload(step):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "state_dict": {"w": torch.randn(64, 64, generator=g), "b": torch.zeros(3)},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(5, generator=g)}}}, "config": {"lr": 1e-3},
            "rng": [torch.get_rng_state()], "data": [{"epoch": 1, "position": step}]}


def test_round_trip_and_keep_last(tmp_path):
    m = CheckpointManager(str(tmp_path / "ckpt"), keep=2)
    for step in (10, 20, 30):
        m.save(step, _payload(step))
    assert [s for s, _ in list_checkpoints(m.directory)] == [20, 30]
    got = load_checkpoint(m.latest())
    assert got["step"] == 30 and torch.equal(got["state_dict"]["w"], _payload(30)["state_dict"]["w"])
    assert not [f for f in os.listdir(m.directory) if f.startswith(".tmp")]
    # open_clip-style loaders find the weights under "state_dict"
    from fastclip.models import clean_state_dict
    assert set(clean_state_dict(torch.load(m.latest(), weights_only=False))) == {"w", "b"}


def test_truncated_checkpoint_is_refused_and_the_previous_one_named(tmp_path):
    m = CheckpointManager(str(tmp_path), keep=3)
    for step in (1, 2, 3):
        m.save(step, _payload(step))
    path = m.path(3)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"damaged or truncated.*step-00000002\.pt"):
        load_checkpoint(path)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    m = CheckpointManager(str(tmp_path), keep=3)
    m.save(1, _payload(1))
    m.save(2, _payload(2))
    payload = torch.load(m.path(2), weights_only=False)
    payload["state_dict"]["w"][3, 3] += 1e-3  # silent corruption of a tensor, file still unpickles
    torch.save(payload, m.path(2))
    with pytest.raises(CheckpointError, match=r"checksum does not match.*step-00000001\.pt"):
        load_checkpoint(m.path(2))


def test_no_intact_predecessor_is_said(tmp_path):
    path = str(tmp_path / "step-00000005.pt")
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no intact older checkpoint"):
        load_checkpoint(path)


def test_foreign_file_is_refused(tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a fastclip training checkpoint"):
        load_checkpoint(path)


def test_checksum_sees_every_value():
    a = _payload(1)
    b = _payload(1)
    assert checksum(a) == checksum(b)
    b["data"][0]["position"] += 1
    assert checksum(a) != checksum(b)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    save_checkpoint(str(tmp_path / "step-00000001.pt"), _payload(1))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path / "step-00000002.pt"), _payload(2))
    assert sorted(os.listdir(tmp_path)) == ["step-00000001.pt"]
