"""Helpers shared by the evaluation loops (:mod:`fastclip.eval.zero_shot`,
:mod:`fastclip.eval.retrieval`, :mod:`fastclip.eval.linear_probe`): the plumbing around running a
model over an evaluation set.

* :func:`eval_mode` -- ``model.eval()`` for a block, every submodule's training flag restored
  afterwards (so a trainer can evaluate between steps);
* :func:`model_device`, :func:`model_dtype` -- where the model lives and what dtype its inputs
  should have;
* :func:`autocast_context` -- ``torch.autocast`` for float16 / bfloat16, a no-op for None,
  anything else refused;
* :func:`iterate_batches` -- the first ``max_batches`` batches, an optional tqdm bar, and the
  loader closed on exit (no batch beyond ``max_batches`` is read);
* :func:`images_and_labels`, :func:`encode_labelled_images` -- a labelled batch taken apart, and
  the loop that runs ``encode_image`` over every batch of a labelled set (zero-shot, linear probe);
* :func:`is_integer_tensor`, :func:`check_index_vector`, :func:`check_features` -- argument checks
  whose errors name the argument.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Iterator, Optional

import torch

from ..lazy import optional_module

__all__ = ["eval_mode", "model_device", "model_dtype", "autocast_context", "iterate_batches", "is_integer_tensor",
           "check_index_vector", "check_features", "images_and_labels", "encode_labelled_images"]

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


def check_features(name: str, x, layout: str = "[N, D]") -> torch.Tensor:
    """``x`` is a 2-D floating-point tensor of finite values, else a TypeError/ValueError naming
    ``name``; returns ``x``.  Emptiness is the caller's to judge."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor {layout}, got {x.dtype} {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf (a diverged model?)")
    return x


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


def images_and_labels(batch, index: int, name: str = "batches"):
    """``(images, labels)`` of a labelled batch: ``(images, labels)`` or ``(images, tokens, labels,
    ...)``, as ``ClipLoader(with_labels=True)`` yields; images are the first item, labels the last
    1-D integer tensor with one entry per image.  Errors name ``name`` and the batch ``index``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        what = f"of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise ValueError(f"{name} must yield tuples (images, labels) or (images, tokens, labels); batch "
                         f"{index} is a {type(batch).__name__} {what}".rstrip())
    images = batch[0]
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: batch {index}: the first item must be the images tensor, "
                        f"got {type(images).__name__}")
    for item in reversed(batch[1:]):
        if isinstance(item, torch.Tensor) and item.dim() == 1 and is_integer_tensor(item):
            if item.shape[0] != images.shape[0]:
                raise ValueError(f"{name}: batch {index}: {item.shape[0]} labels for "
                                 f"{images.shape[0]} images")
            return images, item
    kinds = ", ".join(type(x).__name__ if not isinstance(x, torch.Tensor) else f"Tensor{tuple(x.shape)}"
                      for x in batch)
    raise ValueError(f"{name}: batch {index} has no labels (a 1-D integer tensor after the images): got "
                     f"({kinds}); build the loader with with_labels=True")


def encode_labelled_images(model: torch.nn.Module, batches: Iterable, *, device=None,
                           autocast_dtype: Optional[torch.dtype] = None, max_batches: Optional[int] = None,
                           progress: bool = False, desc: str = "", name: str = "batches", out_device=None,
                           on_start: Optional[Callable[[], None]] = None) -> tuple:
    """``model.encode_image(images, normalize=True)`` over every labelled batch:
    ``(features [N, D] float32, labels [N] int64)``.

    Runs in eval mode (training flags restored) under ``torch.no_grad()``.  Images go to ``device``
    (default the model's); without ``autocast_dtype`` floating images are cast to the model's
    dtype, with it (float16 / bfloat16) the tower runs under ``torch.autocast``.  Each batch's
    features and labels are moved to ``out_device`` (default: stay on ``device``; ``"cpu"``
    keeps a large set off the accelerator).  ``on_start`` runs once inside the no-grad, eval-mode
    block after the loader has been started and before the first batch is read (work that
    overlaps with the loader's prefetch, e.g. building a text classifier).  Labels are returned
    as they come (-1 included): what a bad label means is the caller's to say.

    Raises ValueError naming ``name`` when a batch is malformed or the set is empty.
    """
    device = model_device(model, device)
    autocast_context(device, autocast_dtype)  # validates autocast_dtype before any batch is read
    out_device = device if out_device is None else torch.device(out_device)
    dtype = model_dtype(model)
    feats, labels = [], []
    batches_in = iterate_batches(batches, max_batches, progress, desc)
    with eval_mode(model), torch.no_grad(), batches_in as source:
        if on_start is not None:
            on_start()
        for index, batch in enumerate(source):
            images, y = images_and_labels(batch, index, name)
            images = images.to(device, non_blocking=True)
            if autocast_dtype is None and images.is_floating_point() and dtype is not None:
                images = images.to(dtype)
            with autocast_context(device, autocast_dtype):
                f = model.encode_image(images, normalize=True)
            feats.append(f.float().to(out_device))
            labels.append(y.to(out_device, torch.long))
    if not feats or sum(f.shape[0] for f in feats) == 0:
        raise ValueError(f"{name}: the evaluation set is empty (no batches, or only empty ones)")
    return torch.cat(feats), torch.cat(labels)
