"""Distributed contrastive loss: fastclip's lean mode against open_clip's local_loss + gather_with_grad.

Both run one forward + backward of the CLIP loss over the same global batch (N pairs, D features,
N / P per rank) with P ranks: gloo on CPU (P processes on this machine), NCCL when the machine has
P CUDA devices.  Per rank and provider it records:

* time of forward + backward (timed rounds after one warm-up call; the step time of a round is
  its slowest rank's);
* peak extra memory of each timed round (the largest is reported): on CPU the RSS high-water mark
  (VmHWM, reset by writing 5 to /proc/self/clear_refs after gc + malloc_trim) minus VmRSS before
  the call; on CUDA the caching allocator's peak minus what was allocated before.  Inputs exist
  before the baseline, so the extra covers gathered features, statistics or logits, workspace
  and the gradients.

Target: at N = 32768, D = 512, 2 ranks, fastclip's peak extra memory per rank <= 1/8 of
open_clip's and its time <= 1.1x open_clip's.  The ratios and whether they meet the target go into
the JSON record (benchmarks/results/distributed_loss_<device>_N<N>_D<D>_P<ranks>.json) and the
printed table; nothing here asserts on speed (timings on shared machines are noisy).

Run (on a quiet machine; open_clip needs ~8 GiB per rank at the default size):

    pytest benchmarks/test_distributed_bench.py -s

Environment: FASTCLIP_DIST_BENCH_N (default 32768; 2048 with --bench-quick), FASTCLIP_DIST_BENCH_D
(512), FASTCLIP_DIST_BENCH_RANKS (2), FASTCLIP_DIST_BENCH_ROUNDS (2 at N >= 16384, else 5),
FASTCLIP_DIST_BENCH_PROVIDERS (comma list of fastclip_lean, open_clip_local_gwg, fastclip_siglip,
open_clip_siglip; default the first two), FASTCLIP_DIST_BENCH_TIMEOUT (seconds, default 3600),
FASTCLIP_DIST_BENCH_OUT (folder for the JSON record, default benchmarks/results).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import queue
import statistics
import tempfile
import time
import traceback

import pytest
import torch
from fastclip.machine import peak_memory
from fastclip.testing import load_open_clip_file

SUITE = "distributed"  # the record's "suite" (its own JSON); distributed_report.py renders it
MiB = 2 ** 20
# FASTCLIP_DIST_BENCH_OUT: another folder for the record (a smoke run that must not replace a kept one)
RESULTS_DIR = (os.environ.get("FASTCLIP_DIST_BENCH_OUT")
               or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
DEFAULT_PROVIDERS = ("fastclip_lean", "open_clip_local_gwg")
ALL_PROVIDERS = DEFAULT_PROVIDERS + ("fastclip_siglip", "open_clip_siglip")
BASELINE = {"fastclip_lean": "open_clip_local_gwg", "fastclip_siglip": "open_clip_siglip"}
TARGET_MEMORY_RATIO = 1 / 8
TARGET_TIME_RATIO = 1.1


# ----------------------------------------------------------------------------------------------
# Memory (one call's peak extra)
# ----------------------------------------------------------------------------------------------
def _peak_extra(fn, device: torch.device):
    """Peak extra bytes of one call of fn (None where it cannot be measured)."""
    return peak_memory(fn, device)[0]


# ----------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------
def _make_loss(provider: str, rank: int, world: int):
    """(loss(a, b, scale, bias) callable, None) or (None, reason it cannot run)."""
    import fastclip

    if provider == "fastclip_lean":
        fn = fastclip.ClipLoss(rank=rank, world_size=world)
        return (lambda a, b, s, c: fn(a, b, s)), None
    if provider == "fastclip_siglip":
        fn = fastclip.SigLipLoss(rank=rank, world_size=world)
        return fn, None
    oc, why = load_open_clip_file("loss")
    if oc is None:
        return None, why
    if provider == "open_clip_local_gwg":
        fn = oc.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        return (lambda a, b, s, c: fn(a, b, s)), None
    if provider == "open_clip_siglip":
        fn = oc.SigLipLoss(rank=rank, world_size=world)
        return fn, None
    return None, f"unknown provider {provider!r}; choose from {ALL_PROVIDERS}"


def _open_clip_bytes_per_rank(n: int, N: int) -> int:
    # two n x N fp32 logit matrices, their log-softmax outputs (saved), and their gradients
    return 4 * n * N * 4


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------
# One rank
# ----------------------------------------------------------------------------------------------
def _bench_rank(rank, world, init_file, backend, N, D, rounds, providers, skip, out_q):
    try:
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=1800))
        n = N // world
        g = torch.Generator().manual_seed(1000 + rank)
        a = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1).to(device).requires_grad_()
        b = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1).to(device).requires_grad_()
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        out = {}
        for provider in providers:
            if provider in skip:
                out[provider] = {"skipped": skip[provider]}
                continue
            loss_fn, why = _make_loss(provider, rank, world)
            if loss_fn is None:
                out[provider] = {"skipped": why}
                continue

            def step(loss_fn=loss_fn):
                a.grad = b.grad = scale.grad = bias.grad = None
                loss = loss_fn(a, b, scale, bias)
                loss.backward()
                sync()
                return loss

            dist.barrier()
            step()  # warm-up: lazy imports, communication buffers, allocator pools
            times, peaks = [], []

            def timed(step=step, times=times):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)

            for _ in range(rounds):
                a.grad = b.grad = scale.grad = bias.grad = None
                peaks.append(_peak_extra(timed, device))  # gc and the baseline are outside the timed window
            a.grad = b.grad = scale.grad = bias.grad = None
            peak = None if None in peaks else max(peaks)
            out[provider] = {"peak_extra_bytes": peak, "peak_extra_bytes_per_round": peaks, "times_s": times}
        dist.barrier()
        dist.destroy_process_group()
        out_q.put((rank, True, out))
    except BaseException:
        out_q.put((rank, False, traceback.format_exc()))


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def _config(pytestconfig) -> dict:
    quick = bool(pytestconfig.getoption("--bench-quick", default=False))
    N = int(os.environ.get("FASTCLIP_DIST_BENCH_N", 2048 if quick else 32768))
    D = int(os.environ.get("FASTCLIP_DIST_BENCH_D", 512))
    P = int(os.environ.get("FASTCLIP_DIST_BENCH_RANKS", 2))
    rounds = int(os.environ.get("FASTCLIP_DIST_BENCH_ROUNDS", 2 if N >= 16384 else 5))
    providers = [p.strip() for p in os.environ.get("FASTCLIP_DIST_BENCH_PROVIDERS", ",".join(DEFAULT_PROVIDERS))
                 .split(",") if p.strip()]
    timeout = float(os.environ.get("FASTCLIP_DIST_BENCH_TIMEOUT", 3600))
    if N % P:
        raise ValueError(f"FASTCLIP_DIST_BENCH_N={N} must be a multiple of the ranks ({P}) for open_clip")
    return {"N": N, "D": D, "ranks": P, "rounds": rounds, "providers": providers, "timeout_s": timeout,
            "quick": quick}


def _summarise(per_rank: list, providers: list) -> dict:
    summary = {}
    for p in providers:
        rows = [r[p] for r in per_rank]
        if any("skipped" in r for r in rows):
            summary[p] = {"skipped": next(r["skipped"] for r in rows if "skipped" in r)}
            continue
        step = [max(ts) for ts in zip(*(r["times_s"] for r in rows))]  # the slowest rank sets the step
        peaks = [r["peak_extra_bytes"] for r in rows]
        summary[p] = {
            "time_median_s": statistics.median(step), "time_min_s": min(step), "time_max_s": max(step),
            "peak_extra_mib_per_rank": [None if x is None else round(x / MiB, 1) for x in peaks],
            "peak_extra_mib_max": None if None in peaks else round(max(peaks) / MiB, 1),
        }
    for ours, theirs in BASELINE.items():
        o, t = summary.get(ours), summary.get(theirs)
        if not o or not t or "skipped" in o or "skipped" in t:
            continue
        cmp = {"time_ratio": o["time_median_s"] / t["time_median_s"]}
        if o["peak_extra_mib_max"] is not None and t["peak_extra_mib_max"]:
            cmp["memory_ratio"] = o["peak_extra_mib_max"] / t["peak_extra_mib_max"]
            cmp["memory_target_met"] = cmp["memory_ratio"] <= TARGET_MEMORY_RATIO
        cmp["time_target_met"] = cmp["time_ratio"] <= TARGET_TIME_RATIO
        summary[f"{ours}_vs_{theirs}"] = cmp
    return summary


@pytest.mark.distributed
def test_distributed_loss_benchmark(pytestconfig, record_property):
    import torch.multiprocessing as mp

    cfg = _config(pytestconfig)
    N, D, P = cfg["N"], cfg["D"], cfg["ranks"]
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= P
    backend = "nccl" if use_nccl else "gloo"
    device_kind = "cuda" if use_nccl else "cpu"
    n = N // P
    skip = {}
    if device_kind == "cpu":
        need = P * _open_clip_bytes_per_rank(n, N)
        avail = _mem_available()
        if avail is not None and avail < 1.1 * need:
            for p in cfg["providers"]:
                if p == "open_clip_local_gwg":
                    skip[p] = (f"needs ~{need / 2**30:.1f} GiB over {P} ranks for its n x N logits, "
                               f"{avail / 2**30:.1f} GiB available")
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="fastclip_dist_bench_")
    os.close(fd)
    os.unlink(init_file)
    procs = [ctx.Process(target=_bench_rank, daemon=True,
                         args=(r, P, init_file, backend, N, D, cfg["rounds"], cfg["providers"], skip, out_q))
             for r in range(P)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + cfg["timeout_s"]
    try:
        while len(results) + len(errors) < P:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"benchmark ranks did not finish within {cfg['timeout_s']:.0f} s")
            try:
                rank, ok, payload = out_q.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results and r not in errors]
                if dead:
                    pytest.fail(f"benchmark ranks {dead} died (out of memory?)")
                continue
            (results if ok else errors)[rank] = payload
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        if os.path.exists(init_file):
            os.unlink(init_file)
    if errors:
        pytest.fail("".join(f"\n--- rank {r}:\n{tb}" for r, tb in sorted(errors.items())))

    per_rank = [results[r] for r in range(P)]
    summary = _summarise(per_rank, cfg["providers"])
    record = {
        "suite": SUITE,
        "benchmark": "distributed_loss",
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "device": device_kind, "backend": backend,
                    "threads_per_rank": max(1, (os.cpu_count() or 1) // P) if device_kind == "cpu" else None},
        "config": {**cfg, "n_per_rank": n},
        "memory_method": ("VmHWM - VmRSS before the call (/proc/self/status; VmHWM reset via /proc/self/clear_refs)"
                          if device_kind == "cpu" else "torch.cuda.max_memory_allocated - memory_allocated before"),
        "target": {"memory_ratio_max": TARGET_MEMORY_RATIO, "time_ratio_max": TARGET_TIME_RATIO,
                   "at": "N=32768, D=512, 2 ranks"},
        "per_rank": per_rank,
        "summary": summary,
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"distributed_loss_{device_kind}_N{N}_D{D}_P{P}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    record_property("distributed_loss", summary)

    lines = [f"\ndistributed loss, N={N} D={D} ranks={P} ({backend}), fwd+bwd, {cfg['rounds']} rounds:"]
    for p in cfg["providers"]:
        s = summary[p]
        if "skipped" in s:
            lines.append(f"  {p:22s} skipped: {s['skipped']}")
        else:
            lines.append(f"  {p:22s} time {s['time_median_s']:8.3f} s (min {s['time_min_s']:.3f})   "
                         f"peak extra/rank {s['peak_extra_mib_per_rank']} MiB")
    for key, cmp in summary.items():
        if key.endswith(tuple(BASELINE.values())) and "_vs_" in key:
            lines.append(f"  {key}: time x{cmp['time_ratio']:.3f} (target <= {TARGET_TIME_RATIO}) "
                         + (f"memory x{cmp['memory_ratio']:.4f} (target <= {TARGET_MEMORY_RATIO:.3f})"
                            if "memory_ratio" in cmp else ""))
    lines.append(f"  record: {path}")
    print("\n".join(lines))
