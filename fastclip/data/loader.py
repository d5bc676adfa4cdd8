"""The image-text loader: shards -> ``(images [B,3,H,W], tokens long [B,77])`` batches.

Two backends with one output contract, chosen like every fastclip op (``fastclip.ops.dispatch``,
op ``data_loader``): ``backend=`` > ``FASTCLIP_DATA_BACKEND`` > automatic (DALI when importable,
else PIL).  An explicit choice that cannot run raises with the reason; automatic selection lists
every backend's reason when none can run.

``dali``  (``dali_batches.py``) fastclip's tar reader feeds encoded bytes to a DALI pipeline
          (``fn.external_source`` -> DALI's decoders).  With a CUDA ``device`` it decodes with
          ``device="mixed"`` and crops, resizes, colour-jitters, blurs, flips and normalises
          with DALI's GPU operators.  On CPU, DALI decodes every sample's crop window (computed
          in Python and fed beside the bytes to the region-of-interest decoder
          ``fn.decoders.image_slice``: a JPEG is decoded only inside it) in ``num_threads`` C++
          threads, and ``num_threads`` Python threads resize with torch's uint8 kernels, then
          run the flip, blur, colour knobs and normalisation (``augment_batch``: fastclip's C
          kernel, or torch tensor operations without a C compiler), each thread on its part of
          the batch (DALI's own CPU operators for these are slower: ``benchmarks/RESULTS.md``).
``pil``   (``pil_batches.py``) ``num_threads`` Python threads decode with PIL (the GIL is
          released while decoding and resizing; JPEGs decode at reduced scale when the crop
          allows) and resize (torch's uint8 kernels from 96 px, Pillow's below: ``decode.py``),
          then the same ``augment_batch``: on CPU in the same threads, each on its part of the
          batch; on a GPU ``device`` there (torch tensor operations).

A backend is a function of the loader (the contract is in ``batches.py``); what it needs of the
loader it reaches through the public methods of :class:`ClipLoader` (``crop_rng``,
``colour_generator``, ``rng_seed``, ``alloc``, ``augment_views``, ``finish_batch``) and its
attributes.  Torch runs single-threaded in the pool threads (``threads.py``).  Both run in a
background thread that keeps ``prefetch`` batches ready, so decoding overlaps the training
step.  Tokenisation is one batched call per batch.  On CPU, batch memory is recycled once the
caller no longer holds any tensor, view or array of a batch (``_recycle.py``), which saves the
kernel's page-fault work on every new batch; batches the caller keeps are never reused.  The
loader keeps a few idle batches' memory between epochs (``release_memory()`` gives it back).

Randomness: the sample stream (shard order, shuffle buffer) follows (seed, epoch, slot); every
sample's crop follows (seed, epoch, sample uid) only (``augment.crop_rng``), so it does not depend
on batching, decode chunks, threads, the number of slots or the backend (PIL and DALI on CPU crop
a sample the same way; their decoders' and resizers' pixels differ slightly); colour, grayscale,
blur and flip draws follow (seed, epoch, slot, batch index).  DALI's GPU path (``dali_ops="all"``)
uses DALI's own random operators instead.

Resuming: ``state_dict()`` says where the caller is (the epoch, how many samples of that epoch's
stream the delivered batches used up, the next batch index, the counters), as of the batches
handed to the caller, not those the background thread prepared ahead; ``load_state_dict()`` on a
new loader with the same arguments makes the next ``iter()`` continue that epoch: the stream's
first samples are read from the tars but not decoded, batch indices go on, and on CPU the batches
are bitwise those of an uninterrupted run (see :meth:`ClipLoader.state_dict`).
"""
from __future__ import annotations

import copy
import hashlib
import queue
import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from ..distributed.slots import split_slots
from ..ops import dispatch
from ._recycle import BufferPool
from .augment import AugmentConfig, augment_batch, crop_rng, draw_params, slice_params
from .dali_batches import dali_batches
from .pil_batches import pil_batches
from .samples import Sample
from .source import ShardSource
from .stats import DataStats
from .threads import run_in_parts

__all__ = ["ClipLoader", "make_loader", "select_backend", "backend_reasons", "default_tokenizer"]

_OP = "data_loader"
_ENV = "FASTCLIP_DATA_BACKEND"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_VERSION = 1
_MISSING = object()


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
def _dali_check(device=None, dtype=None, **_) -> list:
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        return ["device is CUDA but torch.cuda.is_available() is False"]
    return []


def _register() -> None:
    if _OP in dispatch.all_ops():  # a reload of this module
        return
    dispatch.register(_OP, dispatch.Backend(
        "dali", fn=dali_batches, devices=("cpu", "cuda"), dtypes=_FLOAT_DTYPES,
        packages=("nvidia.dali",), check=_dali_check,
        doc="NVIDIA DALI decode + augment in C++ threads (cpu; mixed GPU decode when device is CUDA)"))
    dispatch.register(_OP, dispatch.Backend(
        "pil", fn=pil_batches, devices=("cpu", "cuda"), dtypes=_FLOAT_DTYPES,
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
        seed: everything random follows it: shard order, buffer and colour draws with (epoch, slot,
            batch index); each sample's crop with (epoch, sample uid) only.
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
            on CPU only the decoding (of each sample's crop window), the rest as torch's resize and
            fastclip's ``augment`` op (the faster split on CPU: ``benchmarks/RESULTS.md``).
            "all": DALI's operators on CPU too (DALI's random operators: not bitwise resumable).
            "decode": the CPU split (CPU only).

    Yields ``(images, tokens)``; the simclr preset adds its extra views: ``(images, tokens, view1,
    view2)``; then ``labels`` and ``meta`` when asked for.  ``stats`` (cumulative) and
    ``epoch_stats`` (last epoch) count what was delivered and what was skipped, per reason.
    Each ``iter()`` is one epoch; call ``set_epoch`` first, or epochs count up from 0.

    ``state_dict()`` / ``load_state_dict()`` resume inside an epoch (a trainer saves the state in
    its checkpoints): one-pass, ``resampled`` and ``samples=`` modes alike, since a slot's stream
    for an epoch is fixed by the seed.  On resume the epoch's consumed head is read again from the
    tars, not decoded: that takes the time of reading those bytes.  With ``resampled=True`` a
    sample drawn twice in one epoch gets the same crop both times (other draws differ).

    It is also a torch ``IterableDataset`` of whole batches: ``DataLoader(loader, batch_size=None,
    num_workers=k)`` gives every worker process its own slot (counters then live in the workers,
    and so would the resume positions: ``state_dict`` covers a loader iterated in its own process).
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
        self._resume: Optional[dict] = None  # a loaded state, for the next iter()
        self._cursor: Optional[dict] = None  # where the caller is in the epoch being iterated

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __getstate__(self) -> dict:
        # Pickled for spawn/forkserver DataLoader workers: the backend goes by name, the counters
        # and the batch memory start afresh in the worker (a loaded state goes along: a worker
        # whose slot is not the state's refuses it).
        state = dict(self.__dict__)
        state["backend"] = self.backend.name
        state["stats"] = state["epoch_stats"] = state["_buffers"] = state["_cursor"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.backend = select_backend(state["backend"], self.device, self.dtype)
        self.stats = DataStats(warn=False)
        self._buffers = BufferPool()

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``iter()`` runs.  A state loaded for another epoch is dropped (one
        loaded for this epoch is kept: the next ``iter()`` resumes it)."""
        self.epoch = epoch
        self._cursor = None
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None

    def release_memory(self) -> None:
        """Give back the batch memory kept for reuse (CPU; about ``prefetch`` + 2 batches' worth
        stays with the loader between epochs, which spares the next epoch the page faults of
        fresh memory).  Batches the caller still holds are not affected."""
        self._buffers.release()

    # ------------------------------------------------------------------------------------------
    # Resuming
    # ------------------------------------------------------------------------------------------
    def _identity(self, slot: int, slots: int) -> dict:
        """What a state must share with this loader to be loaded: everything that defines the
        slot's sample stream, and the batch size."""
        src = self.source
        digest = hashlib.sha256("\n".join(src.urls).encode("utf-8")).hexdigest()[:32]
        return {"seed": self.seed, "batch_size": self.batch_size, "shards": digest,
                "num_shards": len(src.urls), "slot": slot, "slots": slots, "shuffle": src.shuffle,
                "resampled": src.resampled, "samples": src.samples, "split": src.split,
                "wrong_modes": src.wrong_modes}

    def state_dict(self) -> dict:
        """Where the caller is: what a checkpoint saves to resume the data exactly.

        ``{"version": 1, "identity": {seed, batch_size, shards (a hash of the shard list),
        num_shards, slot, slots, shuffle, resampled, samples, split, wrong_modes}, "epoch": e,
        "position": p, "batch": b, "stats": {...}, "epoch_stats": {...}, "backend": name}``:
        plain Python values (``torch.save``/pickle/JSON-friendly).

        ``position`` counts the samples of epoch ``e``'s stream (``ShardSource.iter`` for this
        slot, in order) that the batches handed to the caller so far have used up: on the PIL
        backend the stream index of the last sample of the last batch, plus one (later samples
        already decoded ahead are decoded again on resume); on DALI the end of the last batch's
        chunk of ``batch_size`` stream samples.  ``batch`` is the next batch index (it seeds the
        colour draws).  Batches the background thread prepared but the caller has not received
        do not count.  ``stats``: the cumulative counters before epoch ``e``; ``epoch_stats``:
        epoch ``e``'s decoding-side counters for the delivered part (delivered, decoder skips,
        notes; the reader's skips are counted again when the resumed epoch re-reads its start).

        Once an epoch's loop has ended, the state points at the start of the next epoch
        (position 0).  Saved after an epoch's last batch but before its loop ended, it points at
        that epoch's end: resuming then runs an empty rest of that epoch first.  After a loop
        left early (``break``), it stays at the last batch received until the next ``iter()``.
        """
        slot, slots = split_slots(*self._slot_args)
        if self._resume is not None:
            r = self._resume
            where = {k: r[k] for k in ("epoch", "position", "batch")}
            stats, epoch_stats = copy.deepcopy(r["stats"]), copy.deepcopy(r["epoch_stats"])
        elif self._cursor is not None:
            c = self._cursor
            where = {k: c[k] for k in ("epoch", "position", "batch")}
            stats, epoch_stats = copy.deepcopy(c["stats"]), c["epoch_stats"].state_dict()
        else:
            where = {"epoch": self.epoch, "position": 0, "batch": 0}
            stats, epoch_stats = self.stats.state_dict(), DataStats(warn=False).state_dict()
        return {"version": _STATE_VERSION, "identity": self._identity(slot, slots), **where, "stats": stats,
                "epoch_stats": epoch_stats, "backend": self.backend.name}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the next ``iter()`` runs the rest of the state's epoch
        (its stream without the first ``position`` samples, which are read but not decoded; batch
        indices go on from ``batch``), then epochs count up as usual.  On CPU the batches are
        bitwise those the saving run would have delivered next (``dali_ops="all"`` excepted: its
        DALI random operators do not resume).  ``stats`` continue from the state's.

        Raises ValueError naming every difference when the state comes from a loader with another
        seed, batch size, shard list, slot or stream definition.  A state saved on the other
        backend loads (its position is exact in samples) but the batches are cut differently.
        """
        if not isinstance(state, dict) or not isinstance(state.get("identity"), dict):
            raise ValueError(f"state must be a dict from ClipLoader.state_dict(), got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state version must be {_STATE_VERSION}, got {state.get('version')!r}")
        slot, slots = split_slots(*self._slot_args)
        mine, theirs = self._identity(slot, slots), state["identity"]
        diffs = [f"{k}: this loader has {mine[k]!r}, the state has {theirs.get(k, '<missing>')!r}"
                 for k in mine if theirs.get(k, _MISSING) != mine[k]]
        if diffs:
            raise ValueError("cannot load a ClipLoader state saved by a differently configured loader: "
                             + "; ".join(diffs))
        for k in ("epoch", "position", "batch"):
            v = state.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"state[{k!r}] must be an int >= 0, got {v!r}")
        self.stats = DataStats.from_state(state["stats"])
        DataStats.from_state(state["epoch_stats"])  # checked now rather than at iter()
        self.epoch = state["epoch"]
        self._cursor = None
        self._resume = {"epoch": state["epoch"], "position": state["position"], "batch": state["batch"],
                        "slot": slot, "slots": slots, "stats": copy.deepcopy(state["stats"]),
                        "epoch_stats": copy.deepcopy(state["epoch_stats"])}

    def __iter__(self) -> Iterator[tuple]:
        slot, slots = split_slots(*self._slot_args)
        resume, self._resume = self._resume, None
        if resume is not None:
            if (resume["slot"], resume["slots"]) != (slot, slots):
                raise ValueError(f"the loaded state is for slot {resume['slot']} of {resume['slots']}, but "
                                 f"this loader runs slot {slot} of {slots} (a state resumes the loader that "
                                 "saved it, not DataLoader worker processes)")
            epoch, start, index = resume["epoch"], resume["position"], resume["batch"]
            consumed = DataStats.from_state(resume["epoch_stats"])
        else:
            epoch, start, index = self.epoch, 0, 0
            consumed = DataStats(warn=False)
        self.epoch = epoch + 1
        # The epoch's counters start from what the delivered part of a resumed epoch counted.
        stats = DataStats(warn=self.warn).merge(consumed)
        cursor = self._cursor = {"epoch": epoch, "position": start, "batch": index,
                                 "stats": self.stats.state_dict(), "epoch_stats": consumed}
        samples = self.source.iter(epoch, slot, slots, stats, start=start)
        batches = self.backend.fn(self, samples, epoch, slot, stats, start, index)
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
                # Delivered: the state moves past this batch before the caller sees it.
                consumed.merge(item.delta)
                cursor["position"], cursor["batch"] = item.position, item.index
                yield item.out
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
            if finished and self._cursor is cursor:
                self._cursor = None  # the state is the next epoch's start
            if finished and stats.skipped and self.warn:
                warnings.warn(f"fastclip.data: epoch {epoch} (slot {slot}/{slots}): delivered "
                              f"{stats.delivered}, skipped {dict(stats.skipped)}", UserWarning, stacklevel=2)

    # ------------------------------------------------------------------------------------------
    # What the backends use (pil_batches.py, dali_batches.py)
    # ------------------------------------------------------------------------------------------
    def rng_seed(self, kind: str, epoch: int, slot: int, index: int) -> str:
        """The seed string of the ``kind`` draws for batch ``index`` of ``slot`` in ``epoch``."""
        return f"fastclip-{kind}-{self.seed}-{epoch}-{slot}-{index}"

    def colour_generator(self, epoch: int, slot: int, index: int) -> torch.Generator:
        """The generator of batch ``index``'s colour, grayscale, blur and flip draws."""
        s = random.Random(self.rng_seed("colour", epoch, slot, index)).getrandbits(63)
        return torch.Generator().manual_seed(s)

    @property
    def _random_crop(self) -> bool:
        return self.cfg.random_crop or bool(self.cfg.extra_views and self.cfg.view.random_crop)

    def crop_rng(self, epoch: int, sample: Sample) -> Optional[random.Random]:
        """The sample's own crop randomness, from (seed, epoch, sample uid) only (None when no
        view crops at random)."""
        return crop_rng(self.seed, epoch, sample.uid) if self._random_crop else None

    def alloc(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor for batch data, on the memory of an earlier batch
        that nothing references any more when there is one (``_recycle.py``)."""
        return self._buffers.empty(shape, dtype)

    def augment_views(self, views: list, generator: torch.Generator, pool: ThreadPoolExecutor) -> list:
        """uint8 ``[B, H, W, 3]`` views (CPU) -> augmented, normalised ``[B, 3, H, W]`` on the device.

        On CPU each thread of ``pool`` (``num_threads`` threads, torch single-threaded there)
        augments its part of the batch; torch's own threads would compete with the decoding
        threads for the same cores.
        """
        cfgs = [self.cfg] + [self.cfg.view] * self.cfg.extra_views
        if self.device.type != "cpu":
            return [augment_batch(v.pin_memory().to(self.device, non_blocking=True), c, generator, self.dtype)
                    for v, c in zip(views, cfgs)]
        n, h, w, _ = views[0].shape
        params = [draw_params(n, c, generator) for c in cfgs]
        out = [self.alloc((n, 3, h, w), self.dtype) for _ in cfgs]

        def work(lo: int, hi: int) -> None:
            for v, c in enumerate(cfgs):
                augment_batch(views[v][lo:hi], c, dtype=self.dtype, params=slice_params(params[v], lo, hi),
                              out=out[v][lo:hi])

        run_in_parts(pool, n, self.num_threads, work)
        return out

    def finish_batch(self, views: list, samples: Sequence[Sample], stats: DataStats,
                     delta: DataStats) -> tuple:
        """Images (and views) ready; add tokens, labels, meta: the tuple the caller receives.
        Counted in the epoch's ``stats`` and in the batch's ``delta`` (what the consumer's state
        takes over with it)."""
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
        for counter in (stats, delta):
            for s in samples:
                if s.mode is not None and s.mode != "RGB":  # converted: palette, or wrong_modes="convert"
                    counter.note(f"converted:{s.mode}")
            counter.add_delivered(len(samples))
        return tuple(out)


def make_loader(shards, batch_size: int, **kwargs) -> ClipLoader:
    """:class:`ClipLoader` (the functional spelling)."""
    return ClipLoader(shards, batch_size, **kwargs)
