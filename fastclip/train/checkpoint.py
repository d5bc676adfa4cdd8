"""Training checkpoints: written atomically, checked when read, the last ``keep`` kept.

A checkpoint is one ``torch.save`` file (``checkpoints/step-00000420.pt``) holding a dict:
``state_dict`` (the model, open_clip's layout: ``fastclip.models.load_checkpoint`` and open_clip's
loaders read it directly), ``modules`` (strategy heads), ``optimizer``, ``scaler``, ``schedule``,
``budget`` (what was used), ``rng`` (Python, NumPy, torch CPU and CUDA generators), ``data`` (every
rank's loader position inside its epoch), ``config``, ``model_config``, ``fastclip_version``,
``step`` and ``checksum``.

Writing: to a temporary file in the same directory, flushed and fsync'ed, then renamed over the
final name (atomic on POSIX) and the directory fsync'ed, so a crash at any moment leaves either the
previous checkpoint set or the new one, never a partial file under a checkpoint's name.  Reading:
a file that does not unpickle (truncated, damaged) or whose ``checksum`` (SHA-256 over every
tensor's bytes and every other value) does not match is refused with :class:`CheckpointError`,
which names the newest older checkpoint that is intact.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch

from ..atomic import TRAIN_CHECKPOINT_FORMAT as FORMAT
from ..atomic import atomic_torch_save, checksum

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "list_checkpoints", "CheckpointManager",
           "checksum"]

_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, damaged, or from another model or config."""


def save_checkpoint(path: str, payload: dict) -> str:
    """Write ``payload`` (with its checksum) to ``path`` atomically; returns ``path``."""
    payload = dict(payload)
    payload["format"] = FORMAT
    payload["checksum"] = checksum(payload)
    atomic_torch_save(payload, path)
    return path


def _read(path: str) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, damaged pickle, not a torch file
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastclip training checkpoint (no '{FORMAT}' format entry)")
    if payload.get("checksum") != checksum(payload):
        raise CheckpointError(f"checkpoint {path} is damaged: its checksum does not match its content")
    return payload


def list_checkpoints(directory: str) -> list:
    """``[(step, path)]`` of the checkpoint files in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(out)


def load_checkpoint(path: str) -> dict:
    """Read and check a checkpoint; on failure the error names the newest older intact one."""
    try:
        return _read(path)
    except CheckpointError as exc:
        directory = os.path.dirname(os.path.abspath(path))
        m = _NAME.match(os.path.basename(path))
        older = [p for s, p in list_checkpoints(directory) if m is None or s < int(m.group(1))]
        good = None
        for candidate in reversed(older):
            try:
                _read(candidate)
                good = candidate
                break
            except CheckpointError:
                continue
        hint = (f"; the newest intact checkpoint before it is {good} (resume with --resume {good})" if good
                else "; no intact older checkpoint was found")
        raise CheckpointError(f"{exc}{hint}") from None


class CheckpointManager:
    """``dir/step-XXXXXXXX.pt`` files: save (atomic) and keep the last ``keep``."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = directory
        self.keep = keep

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:08d}.pt")

    def save(self, step: int, payload: dict) -> str:
        path = save_checkpoint(self.path(step), payload)
        for _, old in list_checkpoints(self.directory)[:-self.keep]:
            try:
                os.unlink(old)
            except OSError:
                pass
        return path

    def latest(self) -> Optional[str]:
        found = list_checkpoints(self.directory)
        return found[-1][1] if found else None
