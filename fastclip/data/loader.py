"""The image-text loader: shards -> ``(images [B,3,H,W], tokens long [B,77])`` batches.

Two backends with one output contract, chosen like every fastclip op (``fastclip.ops.dispatch``,
op ``data_loader``): ``backend=`` > ``FASTCLIP_DATA_BACKEND`` > automatic (DALI when importable,
else PIL).  An explicit choice that cannot run raises with the reason; automatic selection lists
every backend's reason when none can run.

``dali``  fastclip's tar reader feeds encoded bytes to a DALI pipeline (``fn.external_source`` ->
          ``fn.decoders.image``).  With a CUDA ``device`` it decodes with ``device="mixed"`` and
          crops, resizes, colour-jitters, blurs, flips and normalises with DALI's GPU operators.
          On CPU, DALI decodes (a random-resized crop fused into the decoder) in ``num_threads``
          C++ threads, and ``num_threads`` Python threads resize with torch's uint8 kernels, then
          run the flip, blur, colour knobs and normalisation (``augment_batch``: fastclip's C
          kernel, or torch tensor operations without a C compiler), each thread on its part of
          the batch; DALI's own CPU resize and colour operators are several times slower than
          these (figures in ``_dali.py``).
``pil``   ``num_threads`` Python threads decode with PIL (the GIL is released while decoding and
          resizing; JPEGs decode at reduced scale when the crop allows) and resize (torch's uint8
          kernels from 96 px, Pillow's below: ``decode.py``), then the same ``augment_batch``:
          on CPU in the same threads, each on its part of the batch; on a GPU ``device`` there
          (torch tensor operations).

Torch runs single-threaded in those Python threads (see ``_single_threaded_torch``).  Both run
in a background thread that keeps ``prefetch`` batches ready, so decoding overlaps the training
step.  Tokenisation is one batched call per batch.  On CPU, batch memory is recycled once the
caller no longer holds any tensor, view or array of a batch (``_recycle.py``), which saves the
kernel's page-fault work on every new batch; batches the caller keeps are never reused.  The
loader keeps a few idle batches' memory between epochs (``release_memory()`` gives it back).
"""
from __future__ import annotations

import queue
import random
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..ops import dispatch
from ._recycle import BufferPool
from .augment import AugmentConfig, augment_batch, crop_box, draw_params, int_box, resize_crop, slice_params
from .shards import DataStats, Sample, ShardSource, split_slots

__all__ = ["ClipLoader", "make_loader", "select_backend", "backend_reasons", "default_tokenizer"]

_OP = "data_loader"
_ENV = "FASTCLIP_DATA_BACKEND"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
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


def _single_threaded_torch() -> None:
    """Make torch single-threaded in the calling thread only (the loader's pool threads: several
    of them each running torch's own threads would oversubscribe the cores).

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


def _dali_check(device=None, dtype=None, **_) -> list:
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        return ["device is CUDA but torch.cuda.is_available() is False"]
    return []


def _register() -> None:
    if _OP in dispatch.all_ops():  # a reload of this module
        return
    dispatch.register(_OP, dispatch.Backend(
        "dali", fn=lambda loader, *a: loader._dali_batches(*a), devices=("cpu", "cuda"), dtypes=_FLOAT_DTYPES,
        packages=("nvidia.dali",), check=_dali_check,
        doc="NVIDIA DALI decode + augment in C++ threads (cpu; mixed GPU decode when device is CUDA)"))
    dispatch.register(_OP, dispatch.Backend(
        "pil", fn=lambda loader, *a: loader._pil_batches(*a), devices=("cpu", "cuda"), dtypes=_FLOAT_DTYPES,
        packages=("PIL",), doc="PIL decode in threads + the augment op"))


_register()


def select_backend(backend: Optional[str] = "auto", device=None, dtype: torch.dtype = torch.float32):
    """The data-loader backend: ``backend`` > ``FASTCLIP_DATA_BACKEND`` > first usable (dali, pil).

    A separate variable from ``FASTCLIP_BACKEND`` (which names kernel backends such as
    ``chunked``, meaningless here).  Raises ``BackendError`` with every backend's reason.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    return dispatch.select(_OP, backend, device=device, dtype=dtype, env=_ENV)


def backend_reasons(device="cpu", dtype: torch.dtype = torch.float32) -> dict:
    """``{backend: [reasons it cannot run]}`` (empty list: usable); for ``fastclip.info``."""
    device = torch.device(device)
    return {b.name: b.reasons(device=device, dtype=dtype) for b in dispatch.backends(_OP)}


def default_tokenizer(model: str = "ViT-B-32") -> Callable:
    """``fastclip.get_tokenizer(model)``: texts -> LongTensor [B, 77]."""
    from ..tokenizer import get_tokenizer
    return get_tokenizer(model)


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------
class _End:
    pass


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class ClipLoader(torch.utils.data.IterableDataset):
    """Batches of ``(images, tokens)`` from webdataset shards.

    Args:
        shards: a brace pattern (``data/{00000..00127}.tar``), a directory, or a list.
        batch_size: samples per batch.  Every batch is full except, in one-pass mode, the last
            (unless ``drop_last``, which gives up on delivering those samples).
        image_size, augment, train, **augment_overrides: the preset (``clip``, ``clip_aug``,
            ``simclr``) and knobs, see :class:`fastclip.data.AugmentConfig`.
        tokenizer: texts -> LongTensor ``[B, context_length]``; default ``fastclip.get_tokenizer(model)``.
        backend: ``"auto"``, ``"dali"`` or ``"pil"``.
        device, dtype: where and in what float type images come out (float32, float16, bfloat16).
        num_threads: decoding threads (DALI's or the PIL pool), and as many Python threads for
            resizing and the colour operations (the PIL pool's own on the PIL backend).
        shuffle: shuffle buffer size (default 2000 when ``train`` else 0); shard order is shuffled too.
        seed: everything random (shard order, buffer, crops, colour) follows (seed, epoch, slot).
        resampled, samples: draw shards with replacement forever / stop after ``samples`` per slot.
        rank, world_size, worker, num_workers: the slot; default from torch.distributed and the
            torch DataLoader worker info.  ``split``: "auto" | "shard" | "sample" (see ``shards``).
        with_labels: append the class label (LongTensor [B], -1 if none) to every batch.
        return_meta: append a dict (``keys``, ``uids``, ``captions``) to every batch.
        wrong_modes: "skip" (default): grayscale, RGBA/LA, CMYK and 16-bit images are skipped and
            counted as ``wrong_mode:<mode>``; "convert": they are delivered as RGB (as DALI's and
            Pillow's RGB conversions make them) and counted in ``stats.notes`` as ``converted:<mode>``.
            Palette images are colour images and are delivered either way (``converted:P``).
        dali_ops: what DALI does on the ``dali`` backend.  "auto" (default): everything (decode,
            resize, colour, blur, flip, normalise, as DALI operators) with a CUDA ``device``;
            on CPU only the decoding (with the random crop fused), the rest as torch's resize and
            fastclip's ``augment`` op, which measured faster there (``benchmarks/RESULTS.md``).
            "all": DALI's operators on CPU too.  "decode": the CPU split (CPU only).

    Yields ``(images, tokens)``; the simclr preset adds its extra views: ``(images, tokens, view1,
    view2)``; then ``labels`` and ``meta`` when asked for.  ``stats`` (cumulative) and
    ``epoch_stats`` (last epoch) count what was delivered and what was skipped, per reason.
    Each ``iter()`` is one epoch; call ``set_epoch`` first, or epochs count up from 0.

    It is also a torch ``IterableDataset`` of whole batches: ``DataLoader(loader, batch_size=None,
    num_workers=k)`` gives every worker process its own slot (counters then live in the workers).
    """

    def __init__(self, shards, batch_size: int, *, image_size: int = 224,
                 augment: Union[str, AugmentConfig] = "clip",
                 train: bool = True, tokenizer: Optional[Callable] = None, model: str = "ViT-B-32",
                 backend: Optional[str] = "auto", device=None, dtype: torch.dtype = torch.float32,
                 num_threads: int = 2, shuffle: Optional[int] = None, seed: int = 0, resampled: bool = False,
                 samples: Optional[int] = None, split: str = "auto", rank: Optional[int] = None,
                 world_size: Optional[int] = None, worker: Optional[int] = None,
                 num_workers: Optional[int] = None, drop_last: bool = False, prefetch: int = 2,
                 with_labels: bool = False, return_meta: bool = False, wrong_modes: str = "skip",
                 dali_ops: str = "auto", warn: bool = True, **augment_overrides):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        if dali_ops not in ("auto", "all", "decode"):
            raise ValueError(f"dali_ops must be 'auto', 'all' or 'decode', got {dali_ops!r}")
        self.dali_ops = dali_ops
        self.cfg = AugmentConfig.from_name(augment, image_size=image_size, train=train, **augment_overrides)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.backend = select_backend(backend, self.device, dtype)
        if dali_ops == "decode" and self.device.type != "cpu":
            raise ValueError(f"dali_ops='decode' runs on CPU only, got device {self.device} (use 'auto' or 'all')")
        self.batch_size, self.num_threads, self.prefetch = batch_size, num_threads, prefetch
        self.seed, self.drop_last, self.warn = seed, drop_last, warn
        self.with_labels, self.return_meta = with_labels, return_meta
        if shuffle is None:
            shuffle = 2000 if train else 0
        self.source = ShardSource(shards, shuffle=shuffle, seed=seed, resampled=resampled, samples=samples,
                                  split=split, check_images=True, wrong_modes=wrong_modes)
        self._slot_args = (rank, world_size, worker, num_workers)
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(model)
        self.epoch = 0
        self.stats = DataStats(warn=False)
        self.epoch_stats: Optional[DataStats] = None
        self._buffers = BufferPool()

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __getstate__(self) -> dict:
        # Pickled for spawn/forkserver DataLoader workers: the backend goes by name, the counters
        # and the batch memory start afresh in the worker.
        state = dict(self.__dict__)
        state["backend"] = self.backend.name
        state["stats"] = state["epoch_stats"] = state["_buffers"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.backend = select_backend(state["backend"], self.device, self.dtype)
        self.stats = DataStats(warn=False)
        self._buffers = BufferPool()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def release_memory(self) -> None:
        """Give back the batch memory kept for reuse (CPU; about ``prefetch`` + 2 batches' worth
        stays with the loader between epochs, which spares the next epoch the page faults of
        fresh memory).  Batches the caller still holds are not affected."""
        self._buffers.release()

    def __iter__(self) -> Iterator[tuple]:
        epoch = self.epoch
        self.epoch += 1
        slot, slots = split_slots(*self._slot_args)
        stats = DataStats(warn=self.warn)
        samples = self.source.iter(epoch, slot, slots, stats)
        batches = self.backend.fn(self, samples, epoch, slot, stats)
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for item in batches:
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.05)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(_End())
            except BaseException as exc:  # handed to the consumer, raised there
                q.put(_Failed(exc))
            finally:
                batches.close()

        thread = threading.Thread(target=produce, name=f"fastclip-data-{slot}", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                item = q.get()
                if isinstance(item, _End):
                    finished = True
                    break
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()
            self.epoch_stats = stats
            self.stats.merge(stats)
            if finished and stats.skipped and self.warn:
                warnings.warn(f"fastclip.data: epoch {epoch} (slot {slot}/{slots}): delivered "
                              f"{stats.delivered}, skipped {dict(stats.skipped)}", UserWarning, stacklevel=2)

    # ------------------------------------------------------------------------------------------
    # Shared pieces
    # ------------------------------------------------------------------------------------------
    def _rng_seed(self, kind: str, epoch: int, slot: int, index: int) -> str:
        return f"fastclip-{kind}-{self.seed}-{epoch}-{slot}-{index}"

    def _generator(self, epoch: int, slot: int, index: int) -> torch.Generator:
        s = random.Random(self._rng_seed("colour", epoch, slot, index)).getrandbits(63)
        return torch.Generator().manual_seed(s)

    def _finish(self, views: list, samples: Sequence[Sample], stats: DataStats) -> tuple:
        """Images (and views) ready; add tokens, labels, meta."""
        tokens = self.tokenizer([s.caption for s in samples])
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != len(samples):
            raise ValueError(f"tokenizer must return a tensor [B, context_length] for B={len(samples)} "
                             f"texts, got {type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}")
        tokens = tokens.long()
        if self.device.type != "cpu":
            tokens = tokens.to(self.device, non_blocking=True)
        out = [views[0], tokens, *views[1:]]
        if self.with_labels:
            out.append(torch.tensor([s.label for s in samples], dtype=torch.long, device=self.device))
        if self.return_meta:
            out.append({"keys": [s.key for s in samples], "uids": [s.uid for s in samples],
                        "captions": [s.caption for s in samples], "shards": [s.shard for s in samples]})
        for s in samples:
            if s.mode is not None and s.mode != "RGB":  # converted: palette, or wrong_modes="convert"
                stats.note(f"converted:{s.mode}")
        stats.add_delivered(len(samples))
        return tuple(out)

    def _decode_chunk(self, chunk: Sequence[Sample], rng_seed: str, stats: DataStats) -> list:
        """PIL: [(sample, [view arrays])] for the samples that decode; the others are counted."""
        from .decode import DecodeError, decode_views
        rng = random.Random(rng_seed)
        out = []
        for s in chunk:
            try:
                views = decode_views(s.image, self.cfg, rng)
            except DecodeError as exc:
                stats.skip("corrupt_image", f"{s.shard}:{s.key}: {exc}")
                continue
            out.append((s, views))
        return out

    def _stacked_views(self, decoded: list) -> list:
        """PIL: the decoded ``[3, S, S]`` views stacked into uint8 batches, one per view, seen as
        ``[B, S, S, 3]`` (channels-first memory, what :func:`augment_batch` converts fastest)."""
        out = []
        for v in range(1 + self.cfg.extra_views):
            first = decoded[0][1][v]
            batch = self._buffers.empty((len(decoded), *first.shape), torch.uint8)
            torch.stack([views[v] for _, views in decoded], out=batch)
            out.append(batch.permute(0, 2, 3, 1))
        return out

    def _resized_views(self, images: list, rng_seed: str, generator: torch.Generator,
                       pool: ThreadPoolExecutor) -> list:
        """DALI CPU path: uint8 HWC ``images`` (a fused random crop already applied by the decoder
        unless there are extra views) -> cropped and resized by the threads of ``pool``, each on
        its part of the batch, then augmented the same way (:meth:`_augment_views`)."""
        cfgs = [self.cfg] + [self.cfg.view] * self.cfg.extra_views
        size, n = self.cfg.image_size, len(images)
        rng = random.Random(rng_seed)
        boxes = []
        for img in images:
            h, w = int(img.shape[0]), int(img.shape[1])
            if self.cfg.extra_views:
                boxes.append([int_box(crop_box(w, h, c, rng), w, h) for c in cfgs])
            elif self.cfg.random_crop:
                boxes.append([None])
            else:
                boxes.append([int_box(crop_box(w, h, self.cfg, None), w, h)])
        resized = self._buffers.empty((len(cfgs), n, 3, size, size), torch.uint8)

        def work(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                for v, c in enumerate(cfgs):
                    resize_crop(images[i], boxes[i][v], size, c.interpolation, resized[v, i])

        self._in_pool(pool, n, work)
        return self._augment_views([r.permute(0, 2, 3, 1) for r in resized], generator, pool)

    def _pool(self, name: str) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.num_threads, thread_name_prefix=name,
                                  initializer=_single_threaded_torch)

    def _in_pool(self, pool: ThreadPoolExecutor, n: int, work: Callable[[int, int], None]) -> None:
        """``work(lo, hi)`` over ``range(n)`` cut into one part per thread of ``pool``."""
        step = -(-n // self.num_threads)
        for f in [pool.submit(work, lo, min(n, lo + step)) for lo in range(0, n, step)]:
            f.result()

    def _augment_views(self, views: list, generator: torch.Generator, pool: ThreadPoolExecutor) -> list:
        """uint8 ``[B, H, W, 3]`` views (CPU) -> augmented, normalised ``[B, 3, H, W]`` on the device.

        On CPU each thread of ``pool`` (torch single-threaded there) augments its part of the
        batch; torch's own threads would compete with the decoding threads for the same cores.
        """
        cfgs = [self.cfg] + [self.cfg.view] * self.cfg.extra_views
        if self.device.type != "cpu":
            return [augment_batch(v.pin_memory().to(self.device, non_blocking=True), c, generator, self.dtype)
                    for v, c in zip(views, cfgs)]
        n, h, w, _ = views[0].shape
        params = [draw_params(n, c, generator) for c in cfgs]
        out = [self._buffers.empty((n, 3, h, w), self.dtype) for _ in cfgs]

        def work(lo: int, hi: int) -> None:
            for v, c in enumerate(cfgs):
                augment_batch(views[v][lo:hi], c, dtype=self.dtype, params=slice_params(params[v], lo, hi),
                              out=out[v][lo:hi])

        self._in_pool(pool, n, work)
        return out

    def _chunks(self, samples: Iterator[Sample], size: int) -> Iterator[list]:
        chunk = []
        for s in samples:
            chunk.append(s)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    # ------------------------------------------------------------------------------------------
    # PIL backend
    # ------------------------------------------------------------------------------------------
    def _pil_batches(self, samples: Iterator[Sample], epoch: int, slot: int,
                     stats: DataStats) -> Iterator[tuple]:
        chunk_size = max(1, min(self.batch_size, 32))
        depth = self.num_threads * 2 + (self.batch_size + chunk_size - 1) // chunk_size
        # One pool for decoding and augmenting: a batch's augmentation waits behind the decode
        # chunks queued ahead of it (latency), but a second pool measured ~7% fewer images/s at
        # 224 px on 2 cores (its threads compete with the decoders').
        pool = self._pool("fastclip-decode")
        pending: deque = deque()
        ready: list = []
        batch_index = 0
        try:
            chunks = enumerate(self._chunks(samples, chunk_size))
            exhausted = False
            while True:
                while not exhausted and len(pending) < depth:
                    try:
                        i, chunk = next(chunks)
                    except StopIteration:
                        exhausted = True
                        break
                    seed = self._rng_seed("crop", epoch, slot, i)
                    pending.append(pool.submit(self._decode_chunk, chunk, seed, stats))
                if not pending:
                    break
                ready.extend(pending.popleft().result())
                while len(ready) >= self.batch_size:
                    batch, ready = ready[:self.batch_size], ready[self.batch_size:]
                    yield self._pil_emit(batch, epoch, slot, batch_index, stats, pool)
                    batch_index += 1
            if ready and not self.drop_last:
                yield self._pil_emit(ready, epoch, slot, batch_index, stats, pool)
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)

    def _pil_emit(self, decoded: list, epoch: int, slot: int, index: int, stats: DataStats,
                  pool: ThreadPoolExecutor) -> tuple:
        views = self._augment_views(self._stacked_views(decoded), self._generator(epoch, slot, index), pool)
        return self._finish(views, [s for s, _ in decoded], stats)

    # ------------------------------------------------------------------------------------------
    # DALI backend
    # ------------------------------------------------------------------------------------------
    def _dali_batches(self, samples: Iterator[Sample], epoch: int, slot: int,
                      stats: DataStats) -> Iterator[tuple]:
        from . import _dali
        chunks = self._chunks(samples, self.batch_size)
        fed: deque = deque()
        source_error: list = []

        def source():
            try:
                chunk = next(chunks)  # StopIteration ends DALI's epoch
            except StopIteration:
                raise
            except Exception as exc:  # the reader's own error: end DALI's epoch, raise it below
                source_error.append(exc)
                raise StopIteration from exc
            fed.append(chunk)
            return _dali.encoded_batch(chunk)

        device_id = None
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        seed = random.Random(self._rng_seed("dali", epoch, slot, 0)).getrandbits(31)
        ops = self.dali_ops if self.dali_ops != "auto" else ("all" if device_id is not None else "decode")
        pipe = _dali.build_pipeline(self.cfg, source, self.batch_size, self.num_threads, seed, device_id,
                                    prefetch=self.prefetch, ops=ops)
        pool = self._pool("fastclip-resize")
        index = unexplained = 0
        try:
            while True:
                try:
                    outputs = pipe.run()
                except StopIteration:
                    break
                except RuntimeError as exc:
                    # One image that passed the structural check failed in DALI's decoder, which
                    # fails the batch: decode this batch with PIL instead (counting what fails there).
                    if source_error or not fed:
                        raise
                    chunk = fed.popleft()
                    stats.note("dali_batch_fallback")
                    before = stats.total_skipped
                    decoded = self._decode_chunk(chunk, self._rng_seed("crop", epoch, slot, index), stats)
                    # Guard against a pipeline that fails for reasons other than the data.
                    unexplained = unexplained + 1 if stats.total_skipped == before else 0
                    if unexplained >= 3:
                        raise RuntimeError("DALI failed 3 batches in a row in which PIL found no bad image; "
                                           f"the pipeline itself seems broken: {exc}") from exc
                    if decoded and not (self.drop_last and len(decoded) < self.batch_size):
                        yield self._pil_emit(decoded, epoch, slot, index, stats, pool)
                    index += 1
                    if not decoded:
                        warnings.warn(f"fastclip.data: DALI failed a batch and PIL decoded none of it: {exc}")
                    continue
                chunk = fed.popleft()
                if self.drop_last and len(chunk) < self.batch_size:
                    break
                unexplained = 0
                if ops == "all":
                    views = _dali.outputs_to_torch(outputs, self.dtype, self.device)
                else:  # done with DALI's buffers before the next run()
                    views = self._resized_views(_dali.decoded_arrays(outputs[0]),
                                                self._rng_seed("crop", epoch, slot, index),
                                                self._generator(epoch, slot, index), pool)
                yield self._finish(views, chunk, stats)
                index += 1
            if source_error:
                raise source_error[0]
        finally:
            del pipe
            pool.shutdown(wait=True)


def make_loader(shards, batch_size: int, **kwargs) -> ClipLoader:
    """:class:`ClipLoader` (the functional spelling)."""
    return ClipLoader(shards, batch_size, **kwargs)
