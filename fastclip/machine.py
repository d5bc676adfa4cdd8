"""Measurements of the machine, in one place: the dense matmul rate and the peak extra memory of a call.

    from fastclip.machine import measure_matmul_rate, peak_memory
    rate = measure_matmul_rate("cpu")                        # a dict; rate["gflops"] is the rate
    peak_bytes, out = peak_memory(lambda: model(x), "cpu")   # bytes above the state before the call

The benchmarks (``benchmarks/conftest.py``), ``fastclip loss-demo`` and the trainer's MFU
(``log.mfu``, through :func:`fastclip.flops.mfu`) all use these two functions, so a "floor" or a
"peak" means the same thing wherever fastclip prints one.

Dense matmul rate (:func:`measure_matmul_rate`)
    What is timed: ``torch.mm(a, b.T, out=c)`` with ``a`` and ``b`` of shape (M x inner), i.e. an
    (M x inner) @ (inner x M) GEMM of 2 M² inner FLOPs, ``inner_iters`` of them per timed call (on
    CUDA, where one GEMM is too short for the host clock).  The inputs are random normal values from
    a private generator (the global RNG is left alone); the output is allocated before any timing,
    so the page faults of a fresh result are not timed.
    Warm-up: calls run for at least ``warmup_s`` seconds and then until the best call has not
    improved by more than 2% for ``settle_s`` seconds, ``max_s`` seconds at most (a cold CPU runs
    its first GEMMs at about half speed for a few seconds: clock ramp, thread-pool start, a shared
    host).  Then ``reps`` timed calls.
    The rate, ``gflops``, is the best call of the whole measurement, warm-up included: interference
    only ever slows a GEMM down, so the fastest call is the best estimate of what the machine can
    do.  The record also holds the best and median of the timed calls alone, the first and best
    warm-up calls, the shape and how long the warm-up took (:data:`MATMUL_RECORD_FIELDS`).
    Synchronisation: on CUDA, ``torch.cuda.synchronize`` before the clock starts and before it
    stops, for every timed call, so the host clock measures the kernels, not their launches.
    dtype: by default float32 on CPU and bfloat16 on CUDA (:func:`default_matmul_dtype`: what
    training runs its matmuls in, fp32 on CPU and bf16 autocast on CUDA); any floating dtype can be
    asked for.  float32 on CUDA follows ``torch.backends.cuda.matmul.allow_tf32``, as training does.
    Effort (:data:`MATMUL_EFFORTS`): ``"full"`` for benchmark records (CPU M = 4096, at least 5 s
    of warm-up, 30 s at most), ``"quick"`` for smoke runs (CPU M = 1024, 0.3 to 2 s) and
    ``"brief"`` for the trainer (CPU M = 1024, about 0.3 s).  Limits: it is the rate one GEMM shape
    reaches through torch's BLAS, not the hardware's datasheet peak; a brief measurement can catch
    a cold CPU and understate the rate (overstating an MFU computed against it); smaller or
    thinner matrices (a head dim of 64, a batch of 8) run below it.

Peak extra memory of one call (:func:`peak_memory`)
    ``(peak bytes, fn's result)``: the most memory the call held at once beyond what was held before
    it, counting everything it touches (workspace, saved tensors, outputs such as gradients).
    CPU: torch's allocations are invisible to tracemalloc, so the resident set's high-water mark is
    used: ``gc.collect()`` and glibc's ``malloc_trim(0)`` first (memory that glibc kept after
    earlier frees would be reused unseen), then VmHWM is reset by writing 5 to
    ``/proc/self/clear_refs``, and the peak is VmHWM after the call minus VmRSS before it.  Limits:
    Linux only, and a sandbox may forbid ``clear_refs`` (then the bytes are None, never a wrong
    number); it counts the whole process (another thread allocating at the same time counts too,
    and file-backed pages such as shared libraries that the kernel evicts during the call are
    subtracted: on a busy machine the peak can read slightly below an allocation); memory
    allocated but never touched is not resident and is not counted; kB granularity.
    CUDA: the caching allocator's statistics: synchronise, ``reset_peak_memory_stats``, note
    ``memory_allocated``, call, synchronise, ``max_memory_allocated`` minus the noted value.
    Limits: only memory that goes through PyTorch's caching allocator on that device (not NCCL's or
    another library's own buffers); the peak statistics are per device and process, so two
    measurements must not overlap.
"""
from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

__all__ = ["MatmulEffort", "MATMUL_EFFORTS", "MATMUL_RECORD_FIELDS", "CPU_PEAK_METHOD", "CUDA_PEAK_METHOD",
           "default_matmul_dtype", "measure_matmul_rate", "peak_memory", "synchronize"]

DeviceLike = Union[str, torch.device]


@dataclass(frozen=True)
class MatmulEffort:
    """How long :func:`measure_matmul_rate` measures: the GEMM's M, the timed calls, the GEMMs per
    call, and the warm-up's minimum, settling time and maximum (seconds)."""

    m: int
    reps: int
    inner_iters: int
    warmup_s: float
    settle_s: float
    max_s: float


# effort -> device type -> settings.  "full" and "quick" are the benchmarks' (their records were
# made with them); "brief" keeps the trainer's start-up measurement well under a second on a CPU.
MATMUL_EFFORTS = {
    "full": {"cpu": MatmulEffort(4096, 7, 1, 5.0, 2.0, 30.0),
             "cuda": MatmulEffort(16384, 5, 10, 1.0, 0.5, 10.0)},
    "quick": {"cpu": MatmulEffort(1024, 3, 1, 0.3, 0.2, 2.0),
              "cuda": MatmulEffort(8192, 5, 3, 0.2, 0.1, 1.0)},
    "brief": {"cpu": MatmulEffort(1024, 3, 1, 0.1, 0.05, 0.25),
              "cuda": MatmulEffort(8192, 3, 3, 0.1, 0.05, 0.5)},
}

# The record's fields, in order (benchmarks/results/*.json hold records of this shape).
MATMUL_RECORD_FIELDS = ("gflops", "gflops_timed_best", "gflops_median", "shape", "reps", "warmup_s",
                        "warmup_calls", "warmup_first_gflops", "warmup_best_gflops", "device", "dtype",
                        "inner")

CPU_PEAK_METHOD = ("VmHWM - VmRSS_before (/proc/self/status; VmHWM reset by writing 5 to "
                   "/proc/self/clear_refs)")
CUDA_PEAK_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"


def _device(device: DeviceLike, name: str = "device") -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {device!r} ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={device!r} but torch.cuda.is_available() is False")
    return dev


def synchronize(device: DeviceLike) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing to wait for on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def default_matmul_dtype(device: DeviceLike) -> torch.dtype:
    """The dtype training runs its matmuls in on ``device``: float32 on CPU, bfloat16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def measure_matmul_rate(device: DeviceLike = "cpu", dtype: Optional[torch.dtype] = None, inner: int = 512,
                        effort: str = "full") -> dict:
    """The dense matmul rate of ``device``: best of repeated (M x inner) @ (inner x M) GEMMs.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: a floating dtype (default :func:`default_matmul_dtype`).
        inner: the GEMM's inner dimension (the feature dim of the work it is a floor for).
        effort: ``"full"``, ``"quick"`` or ``"brief"`` (:data:`MATMUL_EFFORTS`; the module docstring
            says what each costs).

    Returns:
        A plain dict with :data:`MATMUL_RECORD_FIELDS`: ``gflops`` (the rate, GFLOP/s: the best call
        of the whole measurement), ``gflops_timed_best`` and ``gflops_median`` (the timed calls
        alone), ``shape``, ``reps``, ``warmup_s``, ``warmup_calls``, ``warmup_first_gflops``,
        ``warmup_best_gflops``, ``device``, ``dtype`` (e.g. ``"float32"``) and ``inner``.
    """
    dev = _device(device)
    if dtype is None:
        dtype = default_matmul_dtype(dev)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(inner, bool) or not isinstance(inner, int) or inner < 1:
        raise ValueError(f"inner must be a positive integer, got {inner!r}")
    if effort not in MATMUL_EFFORTS:
        raise ValueError(f"effort must be one of {sorted(MATMUL_EFFORTS)}, got {effort!r}")
    e = MATMUL_EFFORTS[effort][dev.type]
    m = e.m
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, inner, generator=gen).to(device=dev, dtype=dtype)
    b = torch.randn(m, inner, generator=gen).to(device=dev, dtype=dtype)
    c = torch.empty(m, m, device=dev, dtype=dtype)
    flops = 2.0 * m * m * inner * e.inner_iters

    def once() -> float:
        synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(e.inner_iters):
            torch.mm(a, b.T, out=c)
        synchronize(dev)
        return time.perf_counter() - t0

    t_start = time.perf_counter()
    warm, best, best_at = [], math.inf, 0.0
    while True:
        t = once()
        warm.append(t)
        now = time.perf_counter() - t_start
        if t < best / 1.02:
            best_at = now
        best = min(best, t)
        if now >= e.max_s or (now >= e.warmup_s and now - best_at >= e.settle_s):
            break
    times = [once() for _ in range(e.reps)]
    return {
        "gflops": flops / min(times + warm) / 1e9,
        "gflops_timed_best": flops / min(times) / 1e9,
        "gflops_median": flops / statistics.median(times) / 1e9,
        "shape": f"({m} x {inner}) @ ({inner} x {m})" + (f" x{e.inner_iters}" if e.inner_iters > 1 else ""),
        "reps": e.reps,
        "warmup_s": round(time.perf_counter() - t_start - sum(times), 2),
        "warmup_calls": len(warm),
        "warmup_first_gflops": flops / warm[0] / 1e9,
        "warmup_best_gflops": flops / best / 1e9,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "inner": inner,
    }


def _proc_status_kb() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if line.startswith("Vm"))}


def peak_memory(fn: Callable[[], Any], device: Optional[DeviceLike] = None) -> tuple[Optional[int], Any]:
    """``(peak extra bytes, fn's result)`` of one call ``fn()`` on ``device`` (default CPU).

    The bytes are the most held at once during the call beyond what was held before it (the module
    docstring says how, per device, and the limits); None on a CPU where ``/proc`` cannot be used
    (not Linux, or a sandbox that forbids ``/proc/self/clear_refs``): the call still runs.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no arguments, got {type(fn).__name__}")
    dev = _device("cpu" if device is None else device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - before, out
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_kb()["VmRSS"]
    except (OSError, KeyError):
        return None, fn()
    out = fn()
    return (_proc_status_kb()["VmHWM"] - before) * 1024, out
