"""Contrastive-loss benchmarks: provider x mode x N, forward/backward time, peak memory, ratio to floor.

Run the full sweep on a quiet machine (nothing else on the cores), then turn the JSON into tables:

    pytest benchmarks/test_loss_bench.py --benchmark-json=benchmarks/results/cpu.json
    python benchmarks/report.py benchmarks/results/cpu.json

Quick check that everything runs (tiny N, timings meaningless, about 20 seconds):

    pytest benchmarks/ --bench-quick          # or FASTCLIP_BENCH_QUICK=1

What is measured
    CLIP: fastclip ``chunked``, ``reference`` (materialised logits), open_clip's ``ClipLoss`` (its
    ``loss.py`` loaded standalone), fastclip ``triton`` (CUDA only).  SigLIP: fastclip ``chunked``,
    open_clip's ``SigLipLoss``, fastclip ``triton`` (CUDA only).  Modes: ``fwd`` (the training
    forward: inputs require grad), ``bwd`` (backward only; the forward runs untimed in setup) and
    ``fwd+bwd``.  Gradients are taken for both feature tensors and logit_scale (and logit_bias).

    CPU: fp32, D = 512, N in 4096, 8192, 16384, 32768, 65536 (SigLIP: 4096, 8192).
    CUDA (marked ``gpu``): bf16 and fp32, D = 768, the same N; the CUDA timing synchronises inside
    the timed function.

Floor
    A session fixture measures the dense matmul rate R in the same run: the fastest of repeated
    (4096 x D) @ (D x 4096) GEMMs ((16384 x D) @ (D x 16384) on CUDA), timed after a warm-up of at
    least 5 s that lasts until the rate stops improving (a cold CPU runs GEMMs at half speed).  Floor time =
    FLOPs / R with FLOPs = 2 N^2 D (fwd), 6 N^2 D (bwd), 8 N^2 D (fwd+bwd) for CLIP (the recompute
    algorithm's matmuls) and 2, 4, 6 N^2 D for SigLIP.  Every result stores its ratio to the floor
    and its achieved GFLOP/s on those FLOPs.  The rate is measured again at the end of the session;
    a large difference between the two says the machine was not quiet (report.py then warns, and
    uses the higher of the two for its floors).

Memory
    Peak extra memory of one untimed call, counted from the state where the inputs (and, for
    ``bwd``, the forward's graph) already exist: workspace, saved tensors and the gradients
    themselves (``grad_mb`` says how much of it the gradients are).  CPU: RSS high-water mark (see
    fastclip.machine.peak_memory, self-checked on 64 MiB and 1 GiB allocations at the session start).
    CUDA: torch.cuda.max_memory_allocated.  The memory call is preceded by an untimed warm-up call
    on CUDA and, on CPU, for N <= 8192; at larger N on CPU it is itself the warm-up.

Rounds and runtime
    CPU: N <= 4096: 5 timed rounds; N <= 16384: 3; N >= 32768: 1 (one fwd+bwd at N = 65536 takes
    about 2 minutes).  Above N = 32768 only ``fwd+bwd`` runs unless ``--bench-modes`` is given.
    The O(N^2) providers (reference, open_clip) run on CPU only up to N = 16384: above that they
    need 17-21 B x N^2 (17-21 GB at 32768, 68-84 GB at 65536; measured at N = 4096) and minutes per
    step; they are recorded as skipped with that reason, never with invented numbers.  Expected
    full CPU sweep on the 2-core machine: about 15 minutes at 200 GFLOP/s, 20 at 150 (estimated
    from the FLOP counts, the rounds above and ratios of 1.5x (chunked) to 3.1x (open_clip); N =
    16384 and 65536 take about 7 and 6 minutes of it; not yet timed on a quiet machine).
    CUDA: 10 rounds after 1 warm-up.  ``--bench-rounds`` overrides the rounds everywhere.
"""
from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from fastclip.ops import dispatch
from fastclip.ops.clip_loss import clip_loss
from fastclip.ops.siglip_loss import siglip_loss
from fastclip import testing
from fastclip.testing import load_open_clip_file

SUITE = "loss"  # every record's extra_info["suite"] (conftest); loss_report.py renders them
MODES = ("fwd", "bwd", "fwd+bwd")
CPU_SIZES = (4096, 8192, 16384, 32768, 65536)
CUDA_SIZES = (4096, 8192, 16384, 32768, 65536)
SIGLIP_CPU_SIZES = (4096, 8192)
SIGLIP_CUDA_SIZES = (16384, 65536)
QUICK_CPU_SIZES = (512, 1024)
QUICK_CUDA_SIZES = (2048, 8192)
CPU_D, CUDA_D = 512, 768
CPU_DTYPES, CUDA_DTYPES = ("float32",), ("bfloat16", "float32")

CPU_DENSE_MAX_N = 16384        # O(N^2) providers on CPU: above this they are recorded as skipped
CPU_SPLIT_MODES_MAX_N = 32768  # above this, on CPU, only fwd+bwd (runtime budget)
CPU_WARMUP_MAX_N = 8192        # up to this, on CPU, a warm-up call precedes the memory run

PROVIDERS = {
    "clip": ("chunked", "reference", "open_clip", "triton"),
    "siglip": ("chunked", "open_clip", "triton"),
}
DENSE = {"reference", "open_clip"}  # materialise the N x N logits
# Rough peak bytes per logit (fp32) of the materialising providers, from their memory records.
DENSE_BYTES_PER_LOGIT = {("clip", "reference"): 17, ("clip", "open_clip"): 21, ("siglip", "open_clip"): 21}
# FLOPs / (N^2 D) per mode: matmuls of the recompute algorithm (CLIP) and of the one-sweep algorithm (SigLIP).
FLOP_FACTOR = {"clip": {"fwd": 2, "bwd": 6, "fwd+bwd": 8}, "siglip": {"fwd": 2, "bwd": 4, "fwd+bwd": 6}}

LOGIT_SCALE = 1 / 0.07   # CLIP's initial temperature
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initialisation


def _csv(value):
    return [s.strip() for s in str(value).split(",") if s.strip()] if value else None


def _rounds(config, device: str, n: int) -> int:
    override = config.getoption("--bench-rounds")
    if override:
        return max(1, int(override))
    if config.getoption("--bench-quick"):
        return 3
    if device == "cuda":
        return 10
    return 5 if n <= 4096 else 3 if n <= 16384 else 1


def _cases(config, loss: str):
    quick = config.getoption("--bench-quick")
    sizes_opt = _csv(config.getoption("--bench-sizes"))
    modes_opt = _csv(config.getoption("--bench-modes"))
    providers = _csv(config.getoption("--bench-providers")) or PROVIDERS[loss]
    devices = _csv(config.getoption("--bench-devices")) or ("cpu", "cuda")
    for bad, allowed, what in ((modes_opt or [], MODES, "--bench-modes"),
                               (providers, sum(PROVIDERS.values(), ()), "--bench-providers"),
                               (devices, ("cpu", "cuda"), "--bench-devices")):
        unknown = sorted(set(bad) - set(allowed))
        if unknown:
            raise pytest.UsageError(f"{what}: unknown {unknown}, expected a subset of {sorted(set(allowed))}")
    cases = []
    for device in ("cpu", "cuda"):
        if device not in devices:
            continue
        if sizes_opt:
            sizes = [int(s) for s in sizes_opt]
        elif quick:
            sizes = QUICK_CPU_SIZES if device == "cpu" else QUICK_CUDA_SIZES
            sizes = sizes[:1] if loss == "siglip" else sizes
        elif loss == "siglip":
            sizes = SIGLIP_CPU_SIZES if device == "cpu" else SIGLIP_CUDA_SIZES
        else:
            sizes = CPU_SIZES if device == "cpu" else CUDA_SIZES
        d = CPU_D if device == "cpu" else CUDA_D
        marks = [pytest.mark.gpu] if device == "cuda" else []
        for dtype in (CPU_DTYPES if device == "cpu" else CUDA_DTYPES):
            for n in sizes:
                for provider in PROVIDERS[loss]:
                    if provider not in providers or (provider == "triton" and device != "cuda"):
                        continue  # triton runs on CPU only through its interpreter (tests), never timed
                    for mode in (modes_opt or MODES):
                        cases.append(pytest.param(device, dtype, d, n, provider, mode, marks=marks,
                                                  id=f"{device}-{dtype}-D{d}-N{n}-{provider}-{mode}"))
    return cases


def pytest_generate_tests(metafunc):
    loss = {"test_clip_loss": "clip", "test_siglip_loss": "siglip"}.get(metafunc.definition.originalname)
    if loss is not None:
        metafunc.parametrize("device,dtype,D,N,provider,mode", _cases(metafunc.config, loss))


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------
def open_clip_loss_module():
    """open_clip's loss.py, loaded on its own: (module, version, None) or (None, None, reason)."""
    mod, why = load_open_clip_file("loss")
    if mod is None:
        return None, None, why
    return mod, testing.open_clip_version(), None

def _triton_reason(op: str, device: torch.device, dtype: torch.dtype):
    try:
        dispatch.select(op, "triton", device=device, dtype=dtype)
    except dispatch.BackendError as exc:
        return f"triton backend refuses: {exc}"
    module = f"fastclip.ops._{op}_triton"
    if importlib.util.find_spec(module) is None:
        return f"{module} does not exist (yet)"
    why = dispatch.package_status(module)
    return f"triton kernels do not import: {why}" if why else None


def _provider_fn(loss: str, provider: str, device: torch.device, dtype: torch.dtype):
    """(fn(a, b, scale, bias) -> loss, None) or (None, reason to skip)."""
    if provider == "open_clip":
        mod, _, why = open_clip_loss_module()
        if mod is None:
            return None, why
        module = mod.ClipLoss() if loss == "clip" else mod.SigLipLoss()
        if loss == "clip":
            return (lambda a, b, s, c: module(a, b, s)), None
        return (lambda a, b, s, c: module(a, b, s, c)), None
    if provider == "triton":
        why = _triton_reason(f"{loss}_loss", device, dtype)
        if why:
            return None, why
    if loss == "clip":
        return (lambda a, b, s, c: clip_loss(a, b, s, backend=provider)), None
    return (lambda a, b, s, c: siglip_loss(a, b, s, c, backend=provider)), None


def _gb(x: float) -> str:
    return f"{x / 2 ** 30:.1f} GB"


def _dense_reason(loss, provider, device, dtype, n):
    """Why a materialising provider is not run at this N (None: run it)."""
    if provider not in DENSE:
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = DENSE_BYTES_PER_LOGIT[(loss, provider)] * n * n * itemsize / 4
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if need > 0.9 * total:
            return (f"cannot fit: materialises the N x N logits, needs ~{_gb(need)} "
                    f"(~{DENSE_BYTES_PER_LOGIT[(loss, provider)]} B x N^2 in fp32), the GPU has {_gb(total)}")
        return None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > ram:
        return (f"cannot fit: materialises the N x N logits, needs ~{_gb(need)} "
                f"(~{DENSE_BYTES_PER_LOGIT[(loss, provider)]} B x N^2), the machine has {_gb(ram)} RAM")
    if n > CPU_DENSE_MAX_N:
        return (f"not run on CPU above N={CPU_DENSE_MAX_N}: materialises the N x N logits, "
                f"needs ~{_gb(need)} of {_gb(ram)} RAM (an out-of-memory kill would end the whole session) "
                f"and minutes per step")
    return None


# ----------------------------------------------------------------------------------------------
# The benchmark body
# ----------------------------------------------------------------------------------------------
def _inputs(loss, n, d, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(1234 + n)
    feats = []
    for _ in range(2):
        x = torch.randn(n, d, generator=gen)
        x = torch.nn.functional.normalize(x, dim=-1)  # CLIP losses see L2-normalised features
        feats.append(x.to(device=device, dtype=dtype).requires_grad_(True))
    scale = torch.tensor(LOGIT_SCALE if loss == "clip" else SIGLIP_SCALE, device=device, requires_grad=True)
    bias = torch.tensor(SIGLIP_BIAS, device=device, requires_grad=True) if loss == "siglip" else None
    return feats[0], feats[1], scale, bias


def _run(loss, benchmark, request, device, dtype, D, N, provider, mode):
    config = request.config
    dev = torch.device(device)
    tdtype = getattr(torch, dtype)
    why = _dense_reason(loss, provider, dev, tdtype, N)
    if why:
        pytest.skip(why)
    if (dev.type == "cpu" and N > CPU_SPLIT_MODES_MAX_N and mode != "fwd+bwd"
            and not config.getoption("--bench-modes")):
        pytest.skip(f"runtime budget: on CPU only fwd+bwd runs above N={CPU_SPLIT_MODES_MAX_N} "
                    f"(fwd and bwd are measured up to {CPU_SPLIT_MODES_MAX_N}; pass --bench-modes to force)")
    fn, why = _provider_fn(loss, provider, dev, tdtype)
    if fn is None:
        pytest.skip(why)

    # Session fixtures, requested only once a case is known to run.
    machine = request.getfixturevalue("machine")
    peak_memory = request.getfixturevalue("peak_memory")  # self-checks the memory method once
    rate = request.getfixturevalue("matmul_rate")(device, tdtype, D)
    a, b, scale, bias = _inputs(loss, N, D, dev, tdtype)
    wrt = (a, b, scale) + ((bias,) if bias is not None else ())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def forward():
        return fn(a, b, scale, bias)

    holder = {}

    def clear(*_):
        holder.clear()

    if mode == "fwd":
        def setup():
            holder.clear()
            sync()

        def target():
            holder["out"] = forward()  # kept (with its graph) until teardown, so freeing it is untimed
            sync()
    elif mode == "bwd":
        def setup():
            holder.clear()
            holder["loss"] = forward()
            sync()

        def target():
            holder["grads"] = torch.autograd.grad(holder.pop("loss"), wrt)
            sync()
    else:
        def setup():
            holder.clear()
            sync()

        def target():
            holder["grads"] = torch.autograd.grad(forward(), wrt)
            sync()

    # Untimed: one warm-up call (CUDA: compilation/autotuning; CPU, where it is cheap: one-time BLAS
    # buffers that would otherwise count as this case's memory), then the memory run, which is the
    # warm-up of the timed rounds at larger N on CPU.
    def untimed():
        if dev.type == "cuda" or N <= CPU_WARMUP_MAX_N:
            setup()
            target()
            clear()
        if mode == "bwd":
            setup()
            saved = holder.pop("loss")
            t0 = time.perf_counter()
            peak, grads = peak_memory(lambda: torch.autograd.grad(saved, wrt), device)
            loss_value = float(saved.detach())
        elif mode == "fwd":
            t0 = time.perf_counter()
            peak, out = peak_memory(forward, device)
            loss_value, grads = float(out.detach()), ()
        else:
            def fwd_bwd():
                out = forward()
                return out.detach(), torch.autograd.grad(out, wrt)
            t0 = time.perf_counter()
            peak, (out, grads) = peak_memory(fwd_bwd, device)
            loss_value = float(out)
        sync()
        return peak, loss_value, sum(g.numel() * g.element_size() for g in grads), time.perf_counter() - t0

    oom = None
    try:
        peak, loss_value, grad_bytes, untimed_s = untimed()
    except torch.cuda.OutOfMemoryError as exc:  # the estimate in _dense_reason was optimistic
        oom = str(exc).splitlines()[0]
    clear()
    if oom is not None:  # outside the except block, so that the traceback no longer holds tensors
        torch.cuda.empty_cache()
        pytest.skip(f"cannot fit: out of GPU memory at N={N}: {oom}")

    rounds = _rounds(config, dev.type, N)
    flops = FLOP_FACTOR[loss][mode] * N * N * D
    floor_s = flops / (rate["gflops"] * 1e9)
    benchmark.group = f"{loss} {device} {dtype} D={D} N={N} {mode}"
    info = benchmark.extra_info
    info.update({
        "loss": loss, "provider": provider, "mode": mode, "device": device, "dtype": dtype, "N": N, "D": D,
        "flops": flops, "floor_s": floor_s, "matmul_gflops": rate["gflops"], "matmul_shape": rate["shape"],
        "peak_extra_mb": None if peak is None else peak / 2 ** 20, "grad_mb": grad_bytes / 2 ** 20,
        "loss_value": loss_value, "untimed_run_s": untimed_s, "rounds": rounds,
        "machine": machine_line(machine), "quick": bool(config.getoption("--bench-quick")),
    })
    if provider == "open_clip":
        info["open_clip_version"] = open_clip_loss_module()[1]
    if loss == "siglip" and provider in ("chunked", "triton"):
        info["note"] = "fastclip SigLIP forms the gradients in its forward sweep (bwd only scales them)"

    benchmark.pedantic(target, setup=setup, teardown=clear, rounds=rounds,
                       warmup_rounds=1 if dev.type == "cuda" else 0, iterations=1)
    clear()

    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        s = stats.stats
        info.update({"median_s": s.median, "iqr_s": s.iqr, "stddev_s": s.stddev, "min_s": s.min,
                     "ratio_to_floor": s.median / floor_s, "gflops": flops / s.median / 1e9})


def machine_line(m: dict) -> str:
    s = (f"{m['cpu'].get('model')} ({m['usable_cpus']} CPUs, {m['torch_threads']} torch threads), "
         f"torch {m['torch']}")
    if m.get("gpu"):
        s += f", {m['gpu']['name']}"
    return s


def test_clip_loss(benchmark, request, device, dtype, D, N, provider, mode):
    _run("clip", benchmark, request, device, dtype, D, N, provider, mode)


def test_siglip_loss(benchmark, request, device, dtype, D, N, provider, mode):
    _run("siglip", benchmark, request, device, dtype, D, N, provider, mode)
