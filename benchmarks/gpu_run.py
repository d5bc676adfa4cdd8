"""Every GPU figure in one short run: the logic behind ``benchmarks/gpu.sh``.

    python benchmarks/gpu_run.py OUT_DIR                   # run every step within 450 s
    python benchmarks/gpu_run.py OUT_DIR --dry-run         # the plan: steps, commands, timeouts
    python benchmarks/gpu_run.py OUT_DIR --only loss,train --budget-s 200
    python benchmarks/gpu_run.py OUT_DIR --collect-only    # CPU check: how many cases each step selects

GPU time comes in short windows on a machine that starts bare, so the steps (:func:`build_steps`)
are chosen to fit one command of a few minutes, each a pytest run with a fixed selection:

    gpu-tests     the ``gpu``-marked tests
    loss          Triton vs chunked CLIP and SigLIP loss, N = 65536, D = 768, bf16 (+ the bf16 matmul rate)
    attention     Triton vs flash-attn / xformers / SDPA at CLIP's shapes, and the 0.9x target record
    data          DALI ``mixed`` images/s beside the PIL fallback
    train         ViT-B-16 CLIP training step in bf16 (MFU), and the ViT-S-16 targets record
    budget        the budget benchmark's GPU rows (``benchmarks/test_budget_bench.py``)
    triton-tests  the Triton kernels' correctness tests, on the GPU instead of the interpreter

Time: ``--budget-s`` (default 450) covers the whole run.  Each step's timeout is its weight's share
of the time still left, so a step that finishes early leaves its time to the later ones; a step
that runs past its timeout gets SIGINT (pytest then still writes the JSON of the cases that
finished: ``benchmarks/conftest.py`` leaves out the interrupted one), then SIGKILL after a grace
period, and is recorded as ``timeout``; the next step runs.

Record: every step writes ``OUT_DIR/<step>.log`` and its pytest-benchmark JSON (``<step>.json``) or
JUnit XML (``<step>.xml``); ``OUT_DIR/summary.json`` (rewritten after every step) holds::

    {"machine": {...}, "budget_s", "mode", "started", "out_dir",
     "steps": [{"name", "what", "command", "status": "ok|failed|timeout|skipped", "reason",
                "seconds", "timeout_s", "returncode", "outputs": [file names in OUT_DIR], "detail"}],
     "total_seconds"}

``detail`` holds the headline figures read back from the step's JSON (median, ratio to floor,
TFLOP/s, images/s, MFU, ...), the matmul rates, and the skipped cases with their reasons.
Without a CUDA device every step is ``skipped`` with the reason, and the exit status is 0; it is
1 when a step failed or timed out, 2 for an argument error.

This file uses the standard library only: it must run (and say what is missing) on a machine where
torch or fastclip do not import.  Nothing here asserts on speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 450.0
KILL_GRACE_S = 10.0  # after SIGINT, before SIGKILL
MIN_STEP_S = 5.0     # a step offered less than this is not started
NO_CUDA = "no CUDA device: torch.cuda.is_available() is False"
STATUSES = ("ok", "failed", "timeout", "skipped")
# extra_info keys worth reading in the summary without opening the JSON
HEADLINE_KEYS = ("provider", "mode", "N", "D", "dtype", "shape", "set", "preset", "model", "strategy",
                 "batch", "ratio_to_floor", "gflops", "tflops", "matmul_gflops", "peak_extra_mb",
                 "images_per_s", "x_pil", "samples_per_s", "fraction_of_matmul_rate",
                 "fraction_of_matmul_rate_run", "fwd", "fwd+bwd", "vs_open_clip", "flip0.5_vs_clip",
                 "meets_target", "open_clip_skipped", "skipped")
PYTEST_EXIT = {1: "some tests failed", 2: "interrupted", 3: "internal error", 4: "usage error",
               5: "no tests were collected"}


@dataclasses.dataclass
class Step:
    """One measurement: a command run from the repository root with its own timeout.

    ``argv`` selects what runs; ``record`` adds where it writes its record (left out by
    ``--collect-only``).  ``weight`` is its share of the budget, ``max_s`` a cap on its timeout.
    ``needs`` are modules that must import (else ``failed``: the machine lacks them);
    ``requires`` a repository file that must exist (else ``skipped``: not written yet)."""

    name: str
    what: str
    argv: list
    record: list = dataclasses.field(default_factory=list)
    weight: float = 1.0
    max_s: float | None = None
    env: dict = dataclasses.field(default_factory=dict)
    outputs: tuple = ()
    needs_cuda: bool = True
    needs: tuple = ()
    requires: str | None = None

    def command(self, collect_only: bool = False) -> str:
        argv = self.argv + (["--collect-only"] if collect_only else self.record)
        return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env.items()] + [shlex.join(argv)])

    @property
    def is_pytest(self) -> bool:
        return self.argv[1:3] == ["-m", "pytest"]


def build_steps(out_dir, python: str = sys.executable) -> list:
    """The GPU run's steps, in order (the module docstring lists them)."""
    out = Path(out_dir).resolve()
    pytest = [python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]  # -r: failed, errors, skipped

    def bench(name, what, args, weight, env=None, requires=None):
        return Step(name, what, pytest + args, ["--benchmark-json", str(out / f"{name}.json")], weight,
                    env=env or {}, outputs=(f"{name}.json", f"{name}.log"), needs=("pytest_benchmark",),
                    requires=requires)

    def tests(name, what, args, weight):
        return Step(name, what, pytest + args, ["--junitxml", str(out / f"{name}.xml")], weight,
                    outputs=(f"{name}.xml", f"{name}.log"), needs=("pytest",))

    triton_tests = [f"tests/ops/test_{m}.py" for m in ("clip_loss_triton", "siglip_loss_triton",
                                                       "attention_triton", "patch_mask_triton",
                                                       "triton_utils")]
    return [
        tests("gpu-tests", "the gpu-marked tests", ["tests", "-m", "gpu"], 1.0),
        # D = 768 is the suite's CUDA feature dim; -k keeps bf16 (the suite also has fp32) and checks D.
        bench("loss", "Triton vs chunked CLIP and SigLIP loss, N=65536, D=768, bf16, fwd/bwd/fwd+bwd; "
                      "bf16 matmul rate in the same run",
              ["benchmarks/test_loss_bench.py", "--bench-devices", "cuda", "--bench-sizes", "65536",
               "--bench-providers", "triton,chunked", "-k", "bfloat16 and D768"], 2.5),
        bench("attention", "Triton vs flash-attn/xformers/SDPA at CLIP shapes, bf16; the 0.9x target at "
                           "B=256 H=12 L=197 hd=64",
              ["benchmarks/test_attention_bench.py", "--bench-devices", "cuda",
               "--bench-providers", "triton,flash_attn,xformers,sdpa"], 2.0),
        # pil runs first in the same session, so every dali-mixed record carries its x_pil ratio.
        bench("data", "DALI mixed (GPU decode + operators) images/s, beside the PIL fallback",
              ["benchmarks/test_data_bench.py", "-k", "test_loader", "--bench-providers", "pil,dali-mixed"],
              2.0),
        bench("train", "ViT-B-16 CLIP training step, 224 px, batch 256, bf16 autocast (MFU); "
                       "ViT-S-16 targets (vs open_clip, FLIP 0.5)",
              ["benchmarks/test_train_bench.py", "--bench-devices", "cuda",
               "--bench-providers", "fastclip,open_clip"], 2.0,
              env={"FASTCLIP_BENCH_TRAIN_CASES": "ViT-B-16@224:256", "FASTCLIP_BENCH_STRATEGIES": "clip"}),
        bench("budget", "the budget benchmark's GPU rows",
              ["benchmarks/test_budget_bench.py", "--bench-devices", "cuda"], 1.0,
              requires="benchmarks/test_budget_bench.py"),
        tests("triton-tests", "the Triton kernels' correctness tests on the GPU", triton_tests, 1.5),
    ]


# ----------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------
_PROBE = r"""
import json, os, platform, sys
out = {"python": platform.python_version(), "platform": platform.platform(), "executable": sys.executable,
       "packages": {}}
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        out["gpus"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                "memory_gb": round(p.total_memory / 2 ** 30, 1),
                                "multiprocessors": p.multi_processor_count})
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
    out["cuda_available"] = False
for name in ("triton", "pytest", "pytest_benchmark", "nvidia.dali", "flash_attn", "xformers", "open_clip",
             "numpy", "tokenizers", "fastclip"):
    try:
        mod = __import__(name, fromlist=["_"])
        out["packages"][name] = str(getattr(mod, "__version__", "installed"))
        if name == "fastclip":
            out["fastclip_path"] = os.path.dirname(mod.__file__)
    except Exception as exc:
        out["packages"][name] = f"missing ({type(exc).__name__}: {exc})"
print(json.dumps(out))
"""


def _run_quiet(argv, timeout=30.0, **kw) -> tuple:
    """(returncode or None, stdout, why it failed)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)
        return p.returncode, p.stdout, (p.stderr.strip().splitlines() or [""])[-1]
    except FileNotFoundError:
        return None, "", f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return None, "", f"{argv[0]}: no answer within {timeout:.0f} s"


def probe_machine(python: str = sys.executable, env: dict | None = None) -> dict:
    """Facts about this machine, read in a child process (the driver itself never imports torch)."""
    rc, out, why = _run_quiet([python, "-c", _PROBE], timeout=120, env=env, cwd=REPO)
    machine = {}
    if rc == 0:
        try:
            machine = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            machine = {"probe_error": f"unreadable probe output: {out[-200:]!r}"}
    else:
        machine = {"probe_error": why or f"exit status {rc}", "cuda_available": False}
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit,mig.mode.current"
    rc, out, why = _run_quiet(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"])
    machine["nvidia_smi"] = (out.strip().splitlines() if rc == 0
                             else f"unavailable: {why or f'exit status {rc}'}")
    rc, out, _ = _run_quiet(["git", "-C", str(REPO), "rev-parse", "HEAD"], timeout=10)
    if rc == 0:
        dirty = _run_quiet(["git", "-C", str(REPO), "status", "--porcelain"], timeout=10)[1].strip()
        machine["git"] = out.strip() + (" (with uncommitted changes)" if dirty else "")
    machine["install"] = os.environ.get("FASTCLIP_GPU_INSTALL", "not recorded (gpu_run.py run directly)")
    return machine


def cuda_reason(machine: dict) -> str | None:
    """Why the GPU steps cannot run here (None: they can)."""
    if machine.get("cuda_available"):
        return None
    if "torch_error" in machine:
        return f"{NO_CUDA} (torch does not import: {machine['torch_error']})"
    if "probe_error" in machine:
        return f"{NO_CUDA} (the probe failed: {machine['probe_error']})"
    if machine.get("torch") and not machine.get("torch_cuda"):
        return f"{NO_CUDA} (torch {machine['torch']} is a CPU-only build)"
    return f"{NO_CUDA} (torch {machine.get('torch')}, CUDA {machine.get('torch_cuda')}; no device visible)"


def step_env(step: Step) -> tuple:
    """(the environment a step runs in, names removed from the caller's).  TRITON_INTERPRET would
    run the kernels in the interpreter (meaningless timings); FASTCLIP_BENCH_* would change the
    selection, which is fixed here so that runs compare."""
    env = dict(os.environ)
    removed = sorted(k for k in env if k == "TRITON_INTERPRET" or k.startswith("FASTCLIP_BENCH_"))
    for k in removed:
        del env[k]
    env.update(step.env)
    env["PYTHONUNBUFFERED"] = "1"
    # the working tree is what is measured, installed or not
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    return env, removed


# ----------------------------------------------------------------------------------------------
# Reading a step's record back
# ----------------------------------------------------------------------------------------------
def _short(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def read_benchmark_json(path: Path) -> dict:
    """Headline figures, matmul rates and skipped cases of a pytest-benchmark JSON written by this suite."""
    data = json.loads(path.read_text())
    results = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        row = {"name": b.get("name"), "median_s": (b.get("stats") or {}).get("median")}
        row.update({k: info[k] for k in HEADLINE_KEYS if k in info})
        results.append(row)
    fc = data.get("fastclip", {})
    rates = {k: {f"{when}_gflops": (v.get(when) or {}).get("gflops") for when in ("start", "end")}
             for k, v in fc.get("matmul_rates", {}).items()}
    skipped = [{"case": s.get("nodeid", "").split("::")[-1], "reason": s.get("reason")}
               for s in fc.get("skipped", [])]
    return {"benchmarks": len(results), "results": results, "matmul_rates": rates, "skipped_cases": skipped,
            "interrupted_cases": fc.get("interrupted", [])}


def read_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for child in case:
            if child.tag in ("failure", "error"):
                failed.append({"test": name, "message": _short(child.get("message", ""), 200)})
            elif child.tag == "skipped":
                skipped.append({"case": name, "reason": _short(child.get("message", ""), 200)})
    return {**counts, "failed_tests": failed[:20], "skipped_cases": skipped}


def _skip_summary(skipped: list) -> str:
    reasons = sorted({s["reason"] for s in skipped if s.get("reason")})
    return _short("; ".join(reasons), 400)


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return _short(lines[-1], 200) if lines else ""


def _failed_lines(log: Path) -> list:
    """pytest's short summary lines of failed tests and errors (``-rfE``)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [_short(ln, 300) for ln in lines if ln.startswith(("FAILED ", "ERROR "))][:20]


def _collected(log: Path) -> int | None:
    """``N tests collected`` / ``N/M tests collected (K deselected)`` in a --collect-only log."""
    try:
        m = re.findall(r"(\d+)(?:/\d+)? tests? collected", log.read_text(errors="replace"))
    except OSError:
        return None
    return int(m[-1]) if m else None


def judge(step: Step, rc: int, out_dir: Path, collect_only: bool = False) -> tuple:
    """(status, reason, detail) of a step that ran to its end with exit status ``rc``."""
    log = out_dir / f"{step.name}.log"
    detail: dict = {}
    if collect_only and step.is_pytest:
        n = _collected(log)
        detail["cases"] = n
        if rc == 0 and n:
            return "ok", f"selects {n} case(s)", detail
        return "failed", f"selects no case (exit status {rc}: {_last_line(log)})", detail
    for name in step.outputs:
        path = out_dir / name
        try:
            if name.endswith(".json") and path.exists():
                detail.update(read_benchmark_json(path))
            elif name.endswith(".xml") and path.exists():
                detail.update(read_junit(path))
        except (OSError, ValueError, ET.ParseError) as exc:
            detail["record_error"] = f"{name}: {type(exc).__name__}: {exc}"
    skipped = detail.get("skipped_cases", [])
    if step.is_pytest and _failed_lines(log):
        detail["failed_lines"] = _failed_lines(log)
    if rc != 0:
        what = PYTEST_EXIT.get(rc, "") if step.is_pytest else ""
        return "failed", f"exit status {rc}{f' ({what})' if what else ''}: {_last_line(log)}", detail
    ran = detail.get("benchmarks", detail.get("tests", 0) - detail.get("skipped", 0))
    if skipped and not ran:
        return "skipped", f"every case skipped: {_skip_summary(skipped)}", detail
    if skipped:
        return "ok", f"{len(skipped)} case(s) skipped: {_skip_summary(skipped)}", detail
    return "ok", None, detail


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
class Stopped(Exception):
    """The whole run was told to stop (SIGTERM, e.g. gpu.sh's outer timeout)."""


def _on_sigterm(signum, frame):
    raise Stopped(f"signal {signum}")


def _kill_group(proc: subprocess.Popen, grace_s: float) -> str:
    """SIGINT to the step's process group (pytest then writes what it has), SIGKILL after ``grace_s``;
    the signal that ended it."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return sig.name
        except subprocess.TimeoutExpired:
            continue
    return "nothing (still running)"


def run_step(step: Step, out_dir: Path, timeout_s: float, kill_grace_s: float = KILL_GRACE_S,
             collect_only: bool = False) -> dict:
    """Run one step with a timeout; its record (without ``name``/``command``)."""
    env, _ = step_env(step)
    argv = step.argv + (["--collect-only"] if collect_only and step.is_pytest else step.record)
    log_path = out_dir / f"{step.name}.log"
    for name in step.outputs:  # an earlier run's record in a reused OUT_DIR must not pass for this one's
        (out_dir / name).unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {step.command(collect_only)}\n# timeout {timeout_s:.0f} s\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            how = _kill_group(proc, kill_grace_s)
            status, rc = "timeout", proc.returncode
            how = "SIGINT" if how == "SIGINT" else f"SIGINT, then {how} after {kill_grace_s:.0f} s"
            reason = (f"ran past its {timeout_s:.0f} s timeout: stopped with {how}; the cases that finished "
                      f"are in its record")
        except BaseException:  # the whole run is stopping: little time is left to wait
            _kill_group(proc, min(kill_grace_s, 3.0))
            raise
        else:
            status = None
    seconds = time.monotonic() - t0
    if status == "timeout":
        _, _, detail = judge(step, 0, out_dir, collect_only)
    else:
        status, reason, detail = judge(step, rc, out_dir, collect_only)
    return {"status": status, "reason": reason, "seconds": round(seconds, 1),
            "timeout_s": round(timeout_s, 1), "returncode": rc, "detail": detail}


def _write_json(path: Path, data: dict) -> None:
    # temporary file + rename, so a run killed mid-write leaves the previous summary, never half of one
    # (fastclip.atomic does this with fsync, but importing fastclip imports torch, which may be missing)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def precheck(step: Step, cuda_why: str | None, modules: dict | None, collect_only: bool = False) -> tuple:
    """(status, reason) for a step that must not start, else (None, None)."""
    if step.needs_cuda and cuda_why and not collect_only:
        return "skipped", cuda_why
    if step.requires and not (REPO / step.requires).exists():
        return "skipped", f"not written yet: {step.requires} does not exist"
    for mod in step.needs:
        have = (modules or {}).get(mod)
        if have is not None and have.startswith("missing"):
            return "failed", f"cannot run: the Python package {mod} is {have}"
    return None, None


def run_steps(steps: list, out_dir, budget_s: float = DEFAULT_BUDGET_S, *, machine: dict | None = None,
              cuda_why: str | None = None, kill_grace_s: float = KILL_GRACE_S,
              min_step_s: float = MIN_STEP_S, collect_only: bool = False, started: float | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run ``steps`` in order within ``budget_s`` seconds (counted from ``started``, default now) and
    write ``out_dir/summary.json`` after each; the summary.

    A step's timeout is ``weight / (weights of the steps still to run)`` of the time left, less the
    grace period, capped by its ``max_s``; a step that fails or times out is recorded and the next
    one runs.  ``cuda_why``: why CUDA steps cannot run (None: they can)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic() if started is None else started
    machine = dict(machine or {})
    summary = {"machine": machine, "budget_s": budget_s, "mode": "collect-only" if collect_only else "run",
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "out_dir": str(out_dir.resolve()),
               "steps": [], "total_seconds": 0.0}
    checks = [precheck(s, cuda_why, machine.get("packages"), collect_only) for s in steps]
    pending = [s.weight for s, (st, _) in zip(steps, checks) if st is None]
    stopped = None
    for step, (status, reason) in zip(steps, checks):
        rec = {"name": step.name, "what": step.what, "command": step.command(collect_only),
               "status": status, "reason": reason, "seconds": 0.0, "timeout_s": None, "returncode": None,
               "outputs": [], "detail": {}}
        ran = False
        if stopped is not None:
            rec.update(status="skipped", reason=f"not run: the whole run was stopped ({stopped})")
        elif status is None:
            left = budget_s - (time.monotonic() - t_start)
            share = left * step.weight / sum(pending)
            pending.remove(step.weight)
            timeout = share - kill_grace_s
            if timeout < min_step_s:
                rec.update(status="skipped",
                           reason=f"time budget spent: {max(left, 0):.0f} s of {budget_s:.0f} s left")
            else:
                if step.max_s is not None:
                    timeout = min(timeout, step.max_s)
                log(f"[{step.name}] {step.what}\n[{step.name}] timeout {timeout:.0f} s: {rec['command']}")
                ran, t0 = True, time.monotonic()
                try:
                    rec.update(run_step(step, out_dir, timeout, kill_grace_s, collect_only))
                except (Stopped, KeyboardInterrupt) as exc:
                    stopped = str(exc) or type(exc).__name__
                    rec.update(status="timeout",
                               reason=f"the whole run was stopped ({stopped}) while this step ran",
                               seconds=round(time.monotonic() - t0, 1), timeout_s=round(timeout, 1))
        if ran:
            names = dict.fromkeys((*step.outputs, f"{step.name}.log"))
            rec["outputs"] = [n for n in names if (out_dir / n).exists()]
        summary["steps"].append(rec)
        log(f"[{step.name}] {rec['status']}" + (f" in {rec['seconds']} s" if rec["seconds"] else "")
            + (f": {rec['reason']}" if rec["reason"] else ""))
        if rec["status"] in ("failed", "timeout") and rec["outputs"]:
            tail = (out_dir / f"{step.name}.log").read_text(errors="replace").splitlines()[-15:]
            log("\n".join(f"    | {ln}" for ln in tail))
        summary["total_seconds"] = round(time.monotonic() - t_start, 1)
        _write_json(out_dir / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None, steps: list | None = None) -> argparse.Namespace:
    names = [s.name for s in (steps or build_steps("."))]
    p = argparse.ArgumentParser(
        prog="gpu_run.py", epilog=f"steps, in order: {', '.join(names)}",
        description="Every GPU figure of fastclip in one short run (benchmarks/gpu.sh).")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the records and summary.json go (created)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (steps, commands, timeouts); run nothing")
    p.add_argument("--only", metavar="STEP,...", help=f"run these steps only, of: {','.join(names)}")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=(f"time budget of the whole run in seconds (default {DEFAULT_BUDGET_S:.0f}); "
                         "each step's timeout is its share of it"))
    p.add_argument("--collect-only", action="store_true",
                   help=("run each pytest step with --collect-only (no GPU needed): checks that every "
                         "selection still picks cases"))
    args = p.parse_args(argv)
    if not args.budget_s > 0:  # also refuses nan
        p.error(f"--budget-s must be a positive number of seconds, got {args.budget_s:g}")
    if args.only is not None:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown or not wanted:
            p.error(f"--only: unknown step(s) {unknown or [args.only]}; "
                    f"valid steps: {', '.join(names)}")
        args.only = wanted
    return args


def plan_text(steps: list, budget_s: float, collect_only: bool = False) -> str:
    """The plan, as ``--dry-run`` prints it: every step, its timeout if every step runs, its command."""
    missing = {s.name for s in steps if s.requires and not (REPO / s.requires).exists()}
    total = sum(s.weight for s in steps if s.name not in missing) or 1.0
    lines = [(f"plan: {len(steps)} step(s) within {budget_s:.0f} s (timeouts if every step runs; "
              "time a step leaves unused goes to the later ones)")]
    for s in steps:
        if s.name in missing:
            when = f"skipped (not written yet: {s.requires})"
        else:
            t = budget_s * s.weight / total - KILL_GRACE_S
            when = f"timeout {max(min(t, s.max_s or t), 0):4.0f} s"
        gate = " [needs CUDA]" if s.needs_cuda else ""
        lines.append(f"  {s.name:<13} {when}  {s.what}{gate}\n      {s.command(collect_only)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    steps = build_steps(args.out_dir)
    if args.only:
        steps = [s for s in steps if s.name in args.only]
    if args.dry_run:
        print(plan_text(steps, args.budget_s, args.collect_only))
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A SIGINT ignored by whoever started us would be inherited by the steps, and the timeout's
    # SIGINT would not reach pytest; a Python handler is reset to the default in a child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    machine = probe_machine()
    _, removed = step_env(Step("probe", "", []))
    if removed:
        machine["env_removed_for_steps"] = removed
    why = cuda_reason(machine)
    gpus = ", ".join(g["name"] for g in machine.get("gpus", [])) or "none"
    print(f"machine: torch {machine.get('torch', 'missing')} (CUDA {machine.get('torch_cuda')}), "
          f"GPUs: {gpus}; triton {machine.get('packages', {}).get('triton')}; install: {machine['install']}")
    if why:
        print(f"GPU steps will be skipped: {why}")
    print(plan_text(steps, args.budget_s, args.collect_only))
    summary = run_steps(steps, args.out_dir, args.budget_s, machine=machine, cuda_why=why,
                        collect_only=args.collect_only, started=started)
    print(f"\n{'step':<13} {'status':<8} {'seconds':>7}  reason")
    for s in summary["steps"]:
        print(f"{s['name']:<13} {s['status']:<8} {s['seconds']:>7}  {_short(s['reason'] or '', 90)}")
    print(f"total {summary['total_seconds']} s of {args.budget_s:.0f}; "
          f"summary: {Path(args.out_dir) / 'summary.json'}")
    return 1 if any(s["status"] in ("failed", "timeout") for s in summary["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
