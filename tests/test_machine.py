"""fastclip.machine: the matmul-rate record, peak memory of one call, argument checks.

Nothing here decides anything from a timing beyond "positive and finite": timings on shared
machines are noisy.
"""
import math

import pytest
import torch

from fastclip import machine, testing
from fastclip.machine import (
    MATMUL_EFFORTS,
    MATMUL_RECORD_FIELDS,
    default_matmul_dtype,
    measure_matmul_rate,
    peak_memory,
)

MiB = 2 ** 20


def _positive_finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_matmul_record_fields_and_values():
    rec = measure_matmul_rate("cpu", effort="brief")
    assert tuple(rec) == MATMUL_RECORD_FIELDS  # the shape benchmarks/results/*.json and report.py read
    for k in ("gflops", "gflops_timed_best", "gflops_median", "warmup_first_gflops", "warmup_best_gflops"):
        assert _positive_finite(rec[k]), (k, rec[k])
    # the rate is the best call of the whole measurement
    assert rec["gflops"] >= max(rec["gflops_timed_best"], rec["warmup_best_gflops"]) * (1 - 1e-12)
    assert rec["gflops_timed_best"] >= rec["gflops_median"] * (1 - 1e-12)
    m = MATMUL_EFFORTS["brief"]["cpu"].m
    assert rec["shape"] == f"({m} x 512) @ (512 x {m})"
    assert (rec["device"], rec["dtype"], rec["inner"], rec["reps"]) == ("cpu", "float32", 512, 3)
    assert rec["warmup_calls"] >= 1 and rec["warmup_s"] >= 0


def test_matmul_dtype_and_inner_are_recorded():
    rec = measure_matmul_rate(torch.device("cpu"), torch.float64, inner=64, effort="brief")
    assert (rec["dtype"], rec["inner"]) == ("float64", 64) and "@ (64 x" in rec["shape"]
    assert _positive_finite(rec["gflops"])


def test_measurement_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    measure_matmul_rate("cpu", effort="brief")
    assert torch.equal(torch.get_rng_state(), state)


def test_efforts_and_default_dtypes():
    for effort in ("full", "quick", "brief"):
        assert set(MATMUL_EFFORTS[effort]) == {"cpu", "cuda"}
    assert MATMUL_EFFORTS["full"]["cpu"].m == 4096 and MATMUL_EFFORTS["quick"]["cpu"].m == 1024
    brief = MATMUL_EFFORTS["brief"]["cpu"]
    assert brief.max_s < 0.5  # the trainer's start-up measurement stays well under a second
    assert default_matmul_dtype("cpu") == torch.float32
    assert default_matmul_dtype(torch.device("cuda", 0)) == torch.bfloat16


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(device="tpu"), ValueError, "device must be"),
    (dict(device="meta"), ValueError, "device must be"),
    (dict(dtype=torch.int32), ValueError, "dtype must be a floating torch.dtype, got torch.int32"),
    (dict(dtype="float32"), ValueError, "dtype must be a floating torch.dtype"),
    (dict(inner=0), ValueError, "inner must be a positive integer, got 0"),
    (dict(inner=True), ValueError, "inner must be a positive integer, got True"),
    (dict(inner=64.0), ValueError, "inner must be a positive integer, got 64.0"),
    (dict(effort="slow"), ValueError, r"effort must be one of \['brief', 'full', 'quick'\], got 'slow'"),
])
def test_matmul_bad_arguments_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        measure_matmul_rate(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_cuda_without_a_device_is_refused():
    with pytest.raises(ValueError, match=r"device='cuda' but torch.cuda.is_available\(\) is False"):
        measure_matmul_rate("cuda")
    with pytest.raises(ValueError, match="device='cuda'"):
        peak_memory(lambda: None, "cuda")


def _cpu_peak_or_skip(fn):
    peak, out = peak_memory(fn, "cpu")
    if peak is None:
        pytest.skip("/proc/self/clear_refs is not usable here: no CPU peak-memory measurement")
    return peak, out


def test_peak_memory_sees_a_known_allocation_on_cpu():
    size = 200 * MiB

    def allocate():
        x = torch.ones(size // 4)  # allocated and touched (every page written)
        return float(x[::4096].sum())

    peak, out = _cpu_peak_or_skip(allocate)
    assert out == size // 4 / 4096  # fn's result comes back
    # At least the allocation, less a little: the resident set also holds file-backed pages (shared
    # libraries) that the kernel may evict while the call runs on a busy machine (measured: up to
    # 0.2 MiB short of 200 MiB).
    assert peak >= 0.95 * size, f"peak {peak / MiB:.1f} MiB, the call allocated {size / MiB:.0f} MiB"


def test_peak_memory_returns_the_result_and_default_device():
    peak, out = peak_memory(lambda: "done")
    assert out == "done" and (peak is None or isinstance(peak, int))


def test_peak_memory_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="fn must be a callable taking no arguments, got str"):
        peak_memory("not a function")
    with pytest.raises(ValueError, match="device must be"):
        peak_memory(lambda: None, "meta")


def test_testing_keeps_the_older_name():
    assert testing.peak_extra_memory is machine.peak_memory


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rate_and_peak_memory():
    rec = measure_matmul_rate("cuda", effort="brief")
    assert rec["dtype"] == "bfloat16" and _positive_finite(rec["gflops"])
    size = 256 * MiB
    peak, _ = peak_memory(lambda: torch.empty(size, dtype=torch.uint8, device="cuda"), "cuda")
    assert peak >= size
