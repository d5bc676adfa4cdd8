"""Helpers shared by the evaluation loops (:mod:`fastclip.eval.zero_shot`,
:mod:`fastclip.eval.retrieval`): the plumbing around running a model over an evaluation set.

* :func:`eval_mode` -- ``model.eval()`` for a block, every submodule's training flag restored
  afterwards (so a trainer can evaluate between steps);
* :func:`model_device`, :func:`model_dtype` -- where the model lives and what dtype its inputs
  should have;
* :func:`autocast_context` -- ``torch.autocast`` for float16 / bfloat16, a no-op for None,
  anything else refused;
* :func:`iterate_batches` -- the first ``max_batches`` batches, an optional tqdm bar, and the
  loader closed on exit (no batch beyond ``max_batches`` is read).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterable, Iterator, Optional

import torch

from ..lazy import optional_module

__all__ = ["eval_mode", "model_device", "model_dtype", "autocast_context", "iterate_batches", "is_integer_tensor",
           "check_index_vector"]

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


def is_integer_tensor(x: torch.Tensor) -> bool:
    """An integer dtype (bool, floating and complex tensors are not indices)."""
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def check_index_vector(name: str, t, layout: str, length: int, entries: str, per: str, others: str) -> None:
    """``t`` is a 1-D integer tensor with one entry per ``per`` (``length`` of them), else a
    TypeError/ValueError naming ``name``: e.g. "labels must have one entry per image, got 3 labels
    and 4 image_features".  Range checks stay with the caller (what a bad value means differs)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or not is_integer_tensor(t):
        raise ValueError(f"{name} must be an integer tensor {layout}, got {t.dtype} {tuple(t.shape)}")
    if t.shape[0] != length:
        raise ValueError(f"{name} must have one entry per {per}, got {t.shape[0]} {entries} and {length} {others}")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` inside the block; afterwards every submodule gets its own previous
    ``training`` flag back (not just the top-level one: a frozen tower kept in eval mode stays so)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def model_device(model: torch.nn.Module, device=None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter or buffer (CPU if it
    has neither)."""
    if device is not None:
        return torch.device(device)
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter (None if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def autocast_context(device: torch.device, autocast_dtype: Optional[torch.dtype]):
    """``torch.autocast(device.type, autocast_dtype)``, or a no-op context for ``None``."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    if autocast_dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, "
                         f"got {autocast_dtype!r}")
    return torch.autocast(device.type, dtype=autocast_dtype)


@contextlib.contextmanager
def iterate_batches(batches: Iterable, max_batches: Optional[int] = None, progress: bool = False,
                    desc: str = "") -> Iterator[Iterable]:
    """The first ``max_batches`` items of ``batches`` (all if None), through a tqdm bar when
    ``progress`` and tqdm is installed.  On exit the bar and the underlying iterator are closed:
    a ``ClipLoader`` epoch left early stops its producer thread at once, and no batch beyond
    ``max_batches`` is read."""
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be None or a positive int, got {max_batches!r}")
    try:
        total = len(batches) if max_batches is None else min(len(batches), max_batches)
    except TypeError:  # no len(): an IterableDataset, a generator
        total = max_batches
    it = iter(batches)
    source = it if max_batches is None else itertools.islice(it, max_batches)
    bar = None
    if progress:
        tqdm_auto, _ = optional_module("tqdm.auto")  # an optional nicety: no bar rather than an error
        if tqdm_auto is not None:
            source = bar = tqdm_auto.tqdm(source, total=total, desc=desc, leave=False)
    try:
        yield source
    finally:
        if bar is not None:
            bar.close()
        close = getattr(it, "close", None)
        if close is not None:
            close()
