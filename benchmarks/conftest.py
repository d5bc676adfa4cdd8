"""Shared machinery of the benchmark suites (``pytest benchmarks/``; never part of ``pytest``'s test run).

What lives here:

* command-line options (and their environment twins) that select what runs: ``--bench-quick``,
  ``--bench-sizes``, ``--bench-modes``, ``--bench-providers``, ``--bench-devices``, ``--bench-rounds``;
* ``matmul_rate``: a session fixture measuring the machine's dense matmul rate (fp32 on CPU, bf16
  and fp32 on CUDA) in the same run as the benchmarks, so that every result can be stated as a
  ratio to the FLOP floor at that rate;
* ``peak_memory``: peak extra memory of one untimed call (RSS high-water mark on CPU, the caching
  allocator's peak on CUDA), checked once per session against known allocations;
* the ``gpu`` marker (skipped with a reason without CUDA);
* the record: machine details, both matmul-rate measurements (start and end of the session), the
  memory method and its self-check, and every skipped case with its reason are written into the
  pytest-benchmark JSON (``machine_info["fastclip"]`` and ``output_json["fastclip"]``), which
  ``benchmarks/report.py`` turns into tables and plots.

Nothing here asserts on speed: timings on shared machines are noisy.
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import time

import pytest
import torch

from fastclip.testing import peak_extra_memory

MiB = 2 ** 20

_ENV = {
    "--bench-quick": "FASTCLIP_BENCH_QUICK",
    "--bench-sizes": "FASTCLIP_BENCH_SIZES",
    "--bench-modes": "FASTCLIP_BENCH_MODES",
    "--bench-providers": "FASTCLIP_BENCH_PROVIDERS",
    "--bench-devices": "FASTCLIP_BENCH_DEVICES",
    "--bench-rounds": "FASTCLIP_BENCH_ROUNDS",
}


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def pytest_addoption(parser):
    g = parser.getgroup("fastclip benchmarks")
    g.addoption("--bench-quick", action="store_true",
                default=_truthy(os.environ.get(_ENV["--bench-quick"], "")),
                help="tiny sizes and short warm-ups, to check that the suite runs "
                     "(env FASTCLIP_BENCH_QUICK=1); its timings mean nothing")
    g.addoption("--bench-sizes", default=os.environ.get(_ENV["--bench-sizes"]),
                help="comma-separated batch sizes N replacing the default sweep, e.g. 4096,16384 "
                     "(env FASTCLIP_BENCH_SIZES)")
    g.addoption("--bench-modes", default=os.environ.get(_ENV["--bench-modes"]),
                help="comma-separated subset of fwd,bwd,fwd+bwd (env FASTCLIP_BENCH_MODES)")
    g.addoption("--bench-providers", default=os.environ.get(_ENV["--bench-providers"]),
                help="comma-separated subset of chunked,reference,open_clip,triton "
                     "(env FASTCLIP_BENCH_PROVIDERS)")
    g.addoption("--bench-devices", default=os.environ.get(_ENV["--bench-devices"]),
                help="comma-separated subset of cpu,cuda (env FASTCLIP_BENCH_DEVICES); default both, CUDA "
                     "cases skip without a GPU")
    g.addoption("--bench-rounds", type=int, default=os.environ.get(_ENV["--bench-rounds"]),
                help="timed rounds for every case, replacing the per-size defaults "
                     "(env FASTCLIP_BENCH_ROUNDS)")


def pytest_configure(config):
    # pyproject.toml declares `gpu` too; declaring it here keeps this directory self-contained.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config._fastclip_bench = {"skipped": [], "rates": {}, "memory_check": None}
    out = config.getoption("benchmark_json", None)
    # so that --benchmark-json=benchmarks/results/<name>.json works on a fresh checkout (newer
    # pytest-benchmark releases hand over an already opened file, whose directory exists)
    if isinstance(out, (str, os.PathLike)):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)


# ----------------------------------------------------------------------------------------------
# GPU marker
# ----------------------------------------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    gpu_items = [it for it in items if it.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    # Only asked when GPU cases were collected, and only whether a device exists (no context is made).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for it in gpu_items:
        it.add_marker(skip)


def pytest_runtest_logreport(report):
    """Keep every skipped benchmark case, with its reason, for the JSON record."""
    if not report.skipped or report.when not in ("setup", "call"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = re.sub(r"^Skipped: ", "", reason)
    _SKIPPED.append({"nodeid": report.nodeid, "reason": reason, "params": _PARAMS.get(report.nodeid, {})})


_SKIPPED: list = []
_PARAMS: dict = {}


@pytest.hookimpl(trylast=True)
def pytest_itemcollected(item):
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        _PARAMS[item.nodeid] = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                                for k, v in callspec.params.items()}


# ----------------------------------------------------------------------------------------------
# Machine information
# ----------------------------------------------------------------------------------------------
def _cpu_model() -> dict:
    info = {"model": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        fields = {}
        for line in text.splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                fields.setdefault(k, v)
        info["model"] = fields.get("model name", info["model"])
        info["family/model/stepping"] = "/".join(fields.get(k, "?")
                                                 for k in ("cpu family", "model", "stepping"))
        flags = set(fields.get("flags", "").split())
        info["simd"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
                                if f in flags)
        info["hypervisor"] = "hypervisor" in flags
    except OSError:
        pass
    try:
        import subprocess
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for key in ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                    "L2 cache", "L3 cache"):
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", out, re.M)
            if m:
                info[key.lower()] = m.group(1).strip()
    except Exception:  # lscpu missing or odd: /proc/cpuinfo above is enough
        pass
    return info


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s+(\d+) kB", f.read())
        return round(int(m.group(1)) / 2 ** 20, 1) if m else None
    except OSError:
        return None


def machine_summary() -> dict:
    """Static facts about this machine, for the record and for every result's extra_info."""
    cpu = _cpu_model()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    out = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "torch_threads": torch.get_num_threads(),
        "ram_gb": _mem_total_gb(),
        "torch": torch.__version__,
        "blas": blas.group(1) if blas else None,
        "python": platform.python_version(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2 ** 30, 1),
                      "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                      "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    return out


@pytest.fixture(scope="session")
def machine(pytestconfig):
    """Static machine facts (dict); also copied into the JSON's machine_info."""
    m = machine_summary()
    pytestconfig._fastclip_bench["machine"] = m
    return m


# ----------------------------------------------------------------------------------------------
# Dense matmul rate, measured in the same run
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(device: str, dtype: torch.dtype, inner: int, quick: bool = False) -> dict:
    """Best of several square-ish GEMMs (M x inner) @ (inner x M), after a warm-up.

    The first GEMMs on a cold CPU run at about half speed for a few seconds (frequency ramp, thread
    pool start, a shared host), so the warm-up runs at least ``warm_s`` seconds and then until the
    best rate seen has not improved by more than 2% for ``settle_s`` seconds (at most ``max_s``).
    The output is preallocated so that page faults of a fresh 64 MB result are not timed.  Returns
    GFLOP/s (``gflops``: the best GEMM of the whole measurement; also best and median of the timed
    GEMMs alone), the shape and how the warm-up went.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        m, reps, inner_iters = (8192 if quick else 16384), 5, (3 if quick else 10)
        warm_s, settle_s, max_s = (0.2, 0.1, 1.0) if quick else (1.0, 0.5, 10.0)
    else:
        m, reps, inner_iters = (1024 if quick else 4096), (3 if quick else 7), 1
        warm_s, settle_s, max_s = (0.3, 0.2, 2.0) if quick else (5.0, 2.0, 30.0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, inner, generator=gen).to(device=dev, dtype=dtype)
    b = torch.randn(m, inner, generator=gen).to(device=dev, dtype=dtype)
    c = torch.empty(m, m, device=dev, dtype=dtype)
    flops = 2.0 * m * m * inner * inner_iters

    def once() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(inner_iters):
            torch.mm(a, b.T, out=c)
        _sync(dev)
        return time.perf_counter() - t0

    t_start = time.perf_counter()
    warm, best, best_at = [], float("inf"), 0.0
    while True:
        t = once()
        warm.append(t)
        now = time.perf_counter() - t_start
        if t < best / 1.02:
            best_at = now
        best = min(best, t)
        if now >= max_s or (now >= warm_s and now - best_at >= settle_s):
            break
    times = [once() for _ in range(reps)]
    # The rate is the best GEMM seen (warm-up included): interference only ever slows a GEMM down,
    # so the fastest one is the best estimate of what the machine can do.
    return {
        "gflops": flops / min(times + warm) / 1e9,
        "gflops_timed_best": flops / min(times) / 1e9,
        "gflops_median": flops / statistics.median(times) / 1e9,
        "shape": f"({m} x {inner}) @ ({inner} x {m})" + (f" x{inner_iters}" if inner_iters > 1 else ""),
        "reps": reps,
        "warmup_s": round(time.perf_counter() - t_start - sum(times), 2),
        "warmup_calls": len(warm),
        "warmup_first_gflops": flops / warm[0] / 1e9,
        "warmup_best_gflops": flops / best / 1e9,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "inner": inner,
    }


def _rate_key(device: str, dtype: torch.dtype, inner: int) -> str:
    return f"{device}/{str(dtype).replace('torch.', '')}/D={inner}"


@pytest.fixture(scope="session")
def matmul_rate(pytestconfig):
    """``rate(device, dtype, inner) -> dict`` with ``gflops`` (best of several GEMMs), measured once
    per session and key, lazily (a CUDA rate is only measured when a CUDA case runs)."""
    store = pytestconfig._fastclip_bench["rates"]
    quick = pytestconfig.getoption("--bench-quick")

    def rate(device: str, dtype: torch.dtype, inner: int) -> dict:
        key = _rate_key(device, dtype, inner)
        if key not in store:
            store[key] = {"start": measure_matmul_rate(device, dtype, inner, quick),
                          "args": (device, dtype, inner)}
        return store[key]["start"]

    return rate


# ----------------------------------------------------------------------------------------------
# Peak extra memory
# ----------------------------------------------------------------------------------------------
def cpu_peak_extra(fn):
    """(peak extra bytes, fn's result) of one call: fastclip.testing.peak_extra_memory on CPU."""
    peak, out = peak_extra_memory(fn, "cpu")
    if peak is None:
        raise OSError("/proc/self/clear_refs is not usable here: no CPU peak-memory measurement")
    return peak, out


def cuda_peak_extra(fn, device="cuda"):
    """(peak extra bytes, fn's result) of one call, from the caching allocator's statistics."""
    return peak_extra_memory(fn, device)


def cpu_memory_self_check() -> dict:
    """Does the RSS method see known allocations?  64 MiB (the scale of the ≤128 MB target) and 1 GiB."""
    result = {"method": "VmHWM - VmRSS_before (/proc/self/status; VmHWM reset by writing 5 "
                        "to /proc/self/clear_refs)"}
    try:
        checks = []
        for mib in (64, 1024):
            # allocated, touched (ones), freed
            peak, _ = cpu_peak_extra(lambda mib=mib: torch.ones(mib * MiB // 4).sum())
            seen = peak / MiB
            checks.append({"allocated_mib": mib, "seen_mib": round(seen, 1),
                           "ok": abs(seen - mib) <= 0.05 * mib + 4})
        result["checks"] = checks
        result["ok"] = all(c["ok"] for c in checks)
        if not result["ok"]:
            result["reason"] = "RSS high-water mark does not match known allocations"
    except OSError as exc:  # no /proc, or clear_refs not writable (some sandboxes)
        result["ok"] = False
        result["reason"] = f"{type(exc).__name__}: {exc}"
    return result


@pytest.fixture(scope="session")
def peak_memory(pytestconfig):
    """``measure(fn, device) -> (peak extra bytes or None, fn's result)``.

    On CPU the method is self-checked once; if it fails, peaks are recorded as None (the reason is
    in the JSON) rather than as wrong numbers.
    """
    state = pytestconfig._fastclip_bench
    check = state["memory_check"] = cpu_memory_self_check()  # once, before any benchmark allocates

    def measure(fn, device: str):
        if device.startswith("cuda"):
            return cuda_peak_extra(fn, device)
        if not check["ok"]:
            return None, fn()
        return cpu_peak_extra(fn)

    return measure


# ----------------------------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------------------------
def _rates_record(state) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "args"} for k, v in state["rates"].items()}


def pytest_benchmark_update_machine_info(config, machine_info):
    state = getattr(config, "_fastclip_bench", None)
    if state is None:
        return
    machine_info["fastclip"] = {
        "machine": state.get("machine") or machine_summary(),
        "matmul_rates": _rates_record(state),
        "memory_method": state["memory_check"],
        "quick": config.getoption("--bench-quick"),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Re-measure every matmul rate used (drift between start and end flags a noisy machine) and add
    the skipped cases with their reasons, so the record says what could not run instead of omitting it."""
    state = getattr(config, "_fastclip_bench", None)
    if state is None:
        return
    quick = config.getoption("--bench-quick")
    for entry in state["rates"].values():
        if "end" not in entry:
            entry["end"] = measure_matmul_rate(*entry["args"], quick=quick)
    rates = _rates_record(state)
    output_json.setdefault("machine_info", {}).setdefault("fastclip", {})["matmul_rates"] = rates
    output_json["fastclip"] = {
        "matmul_rates": rates,
        "memory_method": state["memory_check"],
        "skipped": list(_SKIPPED),
        "quick": quick,
    }
