"""Shared machinery of the benchmark suites (``pytest benchmarks/``; never part of ``pytest``'s test run).

What lives here:

* command-line options (and their environment twins) that select what runs: ``--bench-quick``,
  ``--bench-sizes``, ``--bench-modes``, ``--bench-providers``, ``--bench-devices``, ``--bench-rounds``;
* ``matmul_rate``: a session fixture measuring the machine's dense matmul rate (fp32 on CPU, bf16
  and fp32 on CUDA) in the same run as the benchmarks, so that every result can be stated as a
  ratio to the FLOP floor at that rate (``fastclip.machine.measure_matmul_rate``, effort "full",
  or "quick" under ``--bench-quick``);
* ``peak_memory``: peak extra memory of one untimed call (``fastclip.machine.peak_memory``: RSS
  high-water mark on CPU, the caching allocator's peak on CUDA), checked once per session against
  known allocations;
* ``suite``: every record's ``extra_info["suite"]`` names its suite (the module's ``SUITE``), which
  ``benchmarks/report.py`` dispatches on;
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

import pytest
import torch

from fastclip.machine import CPU_PEAK_METHOD, measure_matmul_rate, peak_memory

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
    # ``pytest benchmarks/`` ends with the headline budget benchmark (a stable sort keeps the rest).
    items.sort(key=lambda it: "test_budget_bench.py" in it.nodeid)
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
# The suite of every record
# ----------------------------------------------------------------------------------------------
def suite_name(module) -> str:
    """A suite module's ``SUITE`` (``test_<suite>_bench.py`` without one: ``<suite>``)."""
    suite = getattr(module, "SUITE", None)
    if suite:
        return suite
    m = re.fullmatch(r"test_(\w+?)_bench", module.__name__.rsplit(".", 1)[-1])
    return m.group(1) if m else module.__name__


@pytest.fixture(autouse=True)
def _record_suite(request):
    """Every pytest-benchmark record names its suite: ``extra_info["suite"]``, which report.py reads."""
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info["suite"] = suite_name(request.module)


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
# Dense matmul rate, measured in the same run (fastclip.machine: its docstring states the contract)
# ----------------------------------------------------------------------------------------------
def _rate_key(device: str, dtype: torch.dtype, inner: int) -> str:
    return f"{device}/{str(dtype).replace('torch.', '')}/D={inner}"


def _effort(quick: bool) -> str:
    return "quick" if quick else "full"


@pytest.fixture(scope="session")
def matmul_rate(pytestconfig):
    """``rate(device, dtype, inner) -> dict`` (``fastclip.machine.measure_matmul_rate``'s record, with
    ``gflops``: the best of several GEMMs), measured once per session and key, lazily (a CUDA rate
    is only measured when a CUDA case runs)."""
    store = pytestconfig._fastclip_bench["rates"]
    effort = _effort(pytestconfig.getoption("--bench-quick"))

    def rate(device: str, dtype: torch.dtype, inner: int) -> dict:
        key = _rate_key(device, dtype, inner)
        if key not in store:
            store[key] = {"start": measure_matmul_rate(device, dtype, inner, effort),
                          "args": (device, dtype, inner)}
        return store[key]["start"]

    return rate


# ----------------------------------------------------------------------------------------------
# Peak extra memory (fastclip.machine.peak_memory)
# ----------------------------------------------------------------------------------------------
def cpu_memory_self_check() -> dict:
    """Does the RSS method see known allocations?  64 MiB (the scale of the ≤128 MB target) and 1 GiB."""
    result = {"method": CPU_PEAK_METHOD}
    checks = []
    for mib in (64, 1024):
        # allocated, touched (ones), freed
        peak, _ = peak_memory(lambda mib=mib: torch.ones(mib * MiB // 4).sum(), "cpu")
        if peak is None:  # no /proc, or clear_refs not writable (some sandboxes)
            result["ok"] = False
            result["reason"] = ("OSError: /proc/self/clear_refs is not usable here: no CPU peak-memory "
                                "measurement")
            return result
        seen = peak / MiB
        checks.append({"allocated_mib": mib, "seen_mib": round(seen, 1),
                       "ok": abs(seen - mib) <= 0.05 * mib + 4})
    result["checks"] = checks
    result["ok"] = all(c["ok"] for c in checks)
    if not result["ok"]:
        result["reason"] = "RSS high-water mark does not match known allocations"
    return result


@pytest.fixture(scope="session", name="peak_memory")
def peak_memory_fixture(pytestconfig):
    """``measure(fn, device) -> (peak extra bytes or None, fn's result)`` (``fastclip.machine.peak_memory``).

    On CPU the method is self-checked once; if it fails, peaks are recorded as None (the reason is
    in the JSON) rather than as wrong numbers.
    """
    state = pytestconfig._fastclip_bench
    check = state["memory_check"] = cpu_memory_self_check()  # once, before any benchmark allocates

    def measure(fn, device: str):
        if device.startswith("cuda") or check["ok"]:
            return peak_memory(fn, device)
        return None, fn()

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


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_generate_json(config, benchmarks, include_data, machine_info, commit_info):
    """A case stopped mid-measurement (SIGINT: ``benchmarks/gpu_run.py``'s per-step timeout) has no
    timed round; pytest-benchmark would fail on it and write no JSON at all, losing the cases that
    finished.  Mark it as failed (left out of the JSON, named in ``fastclip.interrupted``); returning
    None lets pytest-benchmark's own implementation build the JSON."""
    state = getattr(config, "_fastclip_bench", None)
    for bench in benchmarks:
        if not bench and not bench.has_error:
            bench.fixture.has_error = True
            if state is not None:
                state.setdefault("interrupted", []).append(bench.fullname)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Re-measure every matmul rate used (drift between start and end flags a noisy machine) and add
    the skipped cases with their reasons, so the record says what could not run instead of omitting it."""
    state = getattr(config, "_fastclip_bench", None)
    if state is None:
        return
    quick = config.getoption("--bench-quick")
    for entry in state["rates"].values():
        if "end" not in entry:
            entry["end"] = measure_matmul_rate(*entry["args"], effort=_effort(quick))
    rates = _rates_record(state)
    output_json.setdefault("machine_info", {}).setdefault("fastclip", {})["matmul_rates"] = rates
    output_json["fastclip"] = {
        "matmul_rates": rates,
        "memory_method": state["memory_check"],
        "skipped": list(_SKIPPED),
        "interrupted": state.get("interrupted", []),
        "quick": quick,
    }
