"""Where a CPU training step's time goes, and which parts could gain from native code (issue 14).

    python benchmarks/profile_step.py          # ~3-5 min on 2 cores -> benchmarks/results/profile-step-cpu.{json,md}
    python benchmarks/profile_step.py --quick  # tiny sizes, < 20 s: checks that it runs (timings mean nothing)
    python benchmarks/profile_step.py --out DIR

Run it on a quiet machine (nothing else on the cores).  Everything is measured in one process,
with the training benchmarks' harness (``_train_steps.FastclipRun``: the trainer's model, strategy,
step runner and AdamW), ``fastclip.machine.measure_matmul_rate`` and ``fastclip.flops``:

1. ``steps``: the demo recipe's step (``fastclip.train.demo``: ``DEMO_MODEL`` at 32 px, the demo
   config's batch (128), threads and strategy (clip)) and, for comparison, ViT-Ti-16 at 64 px,
   batch 256: time per step on in-memory batches and fed by ``ClipLoader`` (the trainer's
   ``build_loader``) on the PIL backend (what a plain install has) and on DALI CPU (when
   importable), over the built-in dataset written into a temporary folder, in interleaved blocks
   (the order rotates every round); median and range.  Loader share = 1 - in-memory / with loader.
   Also the process CPU time per step (all threads), whose difference is the loader's CPU cost.
2. ``loader``: ``ClipLoader`` alone at the demo's size (32 px, batch 128, 2 threads), images/s and
   CPU s per image, per backend, with the augment op on its C++ kernel (``native``) and on torch
   tensor operations (``torch``); and the augment op alone on one batch (per-sample cost).
3. ``loss``: the chunked CLIP loss, forward + backward, at the demo's shape (N=128, D=96) and at
   N=4096, D=512, against the same sequence of tile matmuls alone (``torch.mm``/``addmm_`` at the
   engine's tile shapes, 4 x 2*N^2*D FLOPs) timed in interleaved rounds: elementwise share =
   1 - matmul time / loss time; and the loss's share of the demo step.
4. ``profile``: ``torch.profiler`` over a few in-memory demo steps after warm-up: self CPU time in
   groups (matmul-like, elementwise/activation, softmax/layernorm, optimizer, other) as shares of
   the profiled self time, and the top 15 ops.

The decision rule (issue 14): a step part moves into ``csrc/`` only if it is more than 5% of the
time it belongs to (the loader's per-sample work: of the step; the loss's elementwise tile work:
of the loss time), and a native version is kept only where a benchmark shows it faster.  This
script measures the shares; it does not run native candidates.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _train_steps import FastclipRun, memory_batch, tokens_run

import fastclip
from fastclip import extension
from fastclip.data import AugmentConfig, augment_batch, backend_reasons, make_shapes_dataset
from fastclip.flops import mfu
from fastclip.machine import measure_matmul_rate
from fastclip.ops import tiles as tiles_mod
from fastclip.ops.augment import ENV as AUGMENT_ENV
from fastclip.ops.augment import draw_params
from fastclip.ops.clip_loss import clip_loss
from fastclip.ops.tiles import STAT_DTYPE, default_chunk_size, softmax_pair, sub_stat, tile_lse, tile_lse_pair
from fastclip.train import DataConfig, TrainConfig
from fastclip.train.demo import DEMO_DATA, demo_config, prepare_data
from fastclip.train.step import batch_dict
from fastclip.train.trainer import build_loader

THRESHOLD = 0.05
DECISION_RULE = ("issue 14: move a step part into csrc/ only if it is more than 5% of the time it belongs to "
                 "(loader per-sample work: of the step; the loss's elementwise tile work: of the loss time), "
                 "and keep a native version only where a benchmark shows it faster")
DEFAULT_OUT = HERE / "results"
STEM = "profile-step-cpu"
MATMUL_INNER = 512
COMPARISON_CASE = ("ViT-Ti-16", 64, 256)
LOSS_SHAPES = {"full": ((128, 96), (4096, 512)), "quick": ((128, 96), (512, 64))}
MATMUL_LIKE = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::linear", "aten::matmul",
               "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation", "aten::convolution",
               "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward",
               "aten::conv2d", "aten::scaled_dot_product_attention"}
NORM_SOFTMAX = {"aten::softmax", "aten::_softmax", "aten::log_softmax", "aten::_log_softmax",
                "aten::_softmax_backward_data", "aten::_log_softmax_backward_data", "aten::layer_norm",
                "aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::logsumexp",
                "aten::cross_entropy_loss", "aten::nll_loss", "aten::nll_loss_forward", "aten::nll_loss_backward"}
VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::permute", "aten::t",
         "aten::as_strided", "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
         "aten::split", "aten::chunk", "aten::narrow", "aten::detach", "aten::alias", "aten::unbind",
         "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::lift_fresh",
         "aten::numpy_T", "aten::unflatten", "aten::flatten", "aten::result_type", "aten::item",
         "aten::_local_scalar_dense", "aten::is_nonzero", "aten::index", "aten::index_select",
         "aten::embedding", "aten::embedding_backward", "aten::embedding_dense_backward", "aten::gather",
         "aten::scatter", "aten::arange", "aten::argmax", "aten::stack", "aten::cat", "aten::set_"}


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _machine() -> dict:
    """The benchmarks' machine summary (benchmarks/conftest.py's ``machine_summary``), loaded under
    its own module name so that it never shadows a test suite's ``conftest``."""
    spec = importlib.util.spec_from_file_location("fastclip_bench_conftest", HERE / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.machine_summary()
    out["platform"] = platform.platform()
    out["fastclip"] = getattr(fastclip, "__version__", None)
    return out


def summary(times: list) -> dict:
    """Median and range of a list of seconds."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times),
            "all_s": [round(t, 6) for t in times]}


def share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else float("nan")


@contextlib.contextmanager
def augment_backend(name: str | None):
    """Run with ``FASTCLIP_AUGMENT_BACKEND=name`` (None: as it is); the dispatcher reads it per call."""
    old = os.environ.get(AUGMENT_ENV)
    if name is not None:
        os.environ[AUGMENT_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(AUGMENT_ENV, None)
        else:
            os.environ[AUGMENT_ENV] = old


def loader_backends(wanted=("pil", "dali")) -> tuple[list, dict]:
    """(usable loader backends among ``wanted``, {backend: why not} for the others)."""
    reasons = backend_reasons("cpu")
    ok = [b for b in wanted if b in reasons and not reasons[b]]
    skipped = {b: "; ".join(reasons.get(b) or ["unknown backend"]) for b in wanted if b not in ok}
    return ok, skipped


# ----------------------------------------------------------------------------------------------
# 1. The step: in-memory vs with the loader, interleaved
# ----------------------------------------------------------------------------------------------
def _loader(run: FastclipRun, shards: str, batch: int, px: int, threads: int, backend: str, tokenizer):
    return build_loader(shards, batch, px, run.strategy, tokenizer, run.dev, backend=backend, num_threads=threads,
                        shuffle=DataConfig().shuffle, seed=TrainConfig().seed)


def time_step_case(label: str, model: str, px: int, batch: int, overrides: dict | None, strategy: str,
                   shards: str, backends: list, threads: int, rounds: int, steps: int, warmup: int) -> tuple:
    """Interleaved blocks of ``steps`` steps: in memory, then fed by each loader backend (the order
    rotates every round; each loader block drops its first step, the pipeline filling up).
    Returns (the record, the FastclipRun, its in-memory batch) so that later sections reuse them."""
    dev = torch.device("cpu")
    tokenizer = fastclip.get_tokenizer(model)
    run = FastclipRun(model, px, strategy, dev, overrides=overrides)
    mem_batch = memory_batch(run, batch, px, tokenizer)
    counted, run_gflops = run.train_gflops(tokens_run(mem_batch["tokens"]))
    for _ in range(warmup):
        run.step(mem_batch)
    loaders = {b: _loader(run, shards, batch, px, threads, b, tokenizer) for b in backends}
    wall = {k: [] for k in ["memory", *backends]}
    cpu = {k: [] for k in wall}
    fill = {b: [] for b in backends}

    def timed(get):
        c0, t0 = time.process_time(), time.perf_counter()
        run.step(get())
        return time.perf_counter() - t0, time.process_time() - c0

    def memory_block():
        for _ in range(steps):
            t, c = timed(lambda: mem_batch)
            wall["memory"].append(t)
            cpu["memory"].append(c)

    def loader_block(name):
        loader = loaders[name]
        state = {"it": iter(loader)}

        def get():
            item = next(state["it"], None)
            if item is None:  # a short epoch (tiny dataset): the next one
                state["it"].close()
                state["it"] = iter(loader)
                item = next(state["it"])
            return batch_dict(item, run.augment.extra_views)
        try:
            fill[name].append(timed(get)[0])
            for _ in range(steps):
                t, c = timed(get)
                wall[name].append(t)
                cpu[name].append(c)
        finally:
            state["it"].close()  # no loader thread outlives its block

    order = ["memory", *backends]
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            memory_block() if name == "memory" else loader_block(name)

    mem = summary(wall["memory"])
    rec = {"label": label, "model": model, "image_size": px, "batch": batch, "strategy": strategy,
           "overrides": overrides or {}, "rounds": rounds, "steps_per_block": steps, "warmup_steps": warmup,
           "num_threads": threads, "torch_threads": torch.get_num_threads(),
           "train_gflops_per_sample": counted, "train_gflops_per_sample_run": run_gflops,
           "nonfinite_steps": 0,
           "memory": {**mem, "cpu_s_median": statistics.median(cpu["memory"]),
                      "samples_per_s": batch / mem["median_s"]},
           "loaders": {}}
    for b in backends:
        s = summary(wall[b])
        cpu_med = statistics.median(cpu[b])
        rec["loaders"][b] = {**s, "cpu_s_median": cpu_med, "samples_per_s": batch / s["median_s"],
                             "fill_s": [round(t, 6) for t in fill[b]],
                             "loader_share": 1 - mem["median_s"] / s["median_s"],
                             "loader_cpu_s_per_sample": (cpu_med - rec["memory"]["cpu_s_median"]) / batch,
                             "stats": loaders[b].stats.as_dict()}
    rec["nonfinite_steps"] = run.nonfinite_steps
    return rec, run, mem_batch


def with_rate(rec: dict, rate_gflops: float) -> dict:
    """Achieved GFLOP/s of the in-memory step (FLOPs as run) and its fraction of the matmul rate."""
    m = rec["memory"]
    flops = rec["train_gflops_per_sample_run"] * rec["batch"] * 1e9
    m["achieved_gflops_run"] = flops / m["median_s"] / 1e9
    m["fraction_of_matmul_rate_run"] = mfu(flops, m["median_s"], rate_gflops * 1e9)
    return rec


# ----------------------------------------------------------------------------------------------
# 2. The loader alone
# ----------------------------------------------------------------------------------------------
def time_loader_alone(run: FastclipRun, model: str, shards: str, batch: int, px: int, threads: int, backends: list,
                      batches: int, augments=("native", "torch")) -> dict:
    """``ClipLoader`` alone, as the step of ``run`` is fed (its strategy's augmentation): images/s
    and process CPU s per image, per loader backend x augment backend."""
    tokenizer = fastclip.get_tokenizer(model)
    out = {}
    for b in backends:
        for aug in augments:
            with augment_backend(aug):
                loader = _loader(run, shards, batch, px, threads, b, tokenizer)
                it = iter(loader)
                n = 0
                try:
                    for _ in range(loader.prefetch + 1):  # the pipeline filling up and its ready batches:
                        next(it)                            # what follows is the steady rate
                    c0, t0 = time.process_time(), time.perf_counter()
                    for _ in range(batches):
                        item = next(it, None)
                        if item is None:
                            it.close()
                            it = iter(loader)
                            item = next(it)
                        n += item[0].shape[0]
                        del item
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                finally:
                    it.close()
            out[f"{b}/{aug}"] = {"backend": b, "augment_backend": aug, "images": n, "seconds": wall,
                                 "images_per_s": n / wall, "cpu_s_per_image": cpu / n, "wall_s_per_image": wall / n}
    return out


def time_augment_op(batch: int, px: int, reps: int, augments=("native", "torch")) -> dict:
    """The augment op alone on one uint8 batch [B, px, px, 3] with the clip preset's draws (the
    loader's pool threads run torch single-threaded: so does this)."""
    cfg = AugmentConfig.from_name("clip", image_size=px)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, px, px, 3), dtype=torch.uint8, generator=g)
    params = draw_params(batch, cfg, g)
    out_t = torch.empty(batch, 3, px, px)
    res = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for aug in augments:
            try:
                augment_batch(images, cfg, params=params, out=out_t, backend=aug)
            except Exception as exc:  # noqa: BLE001 - the backend cannot run here: say why
                res[aug] = {"skipped": str(exc)}
                continue
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                augment_batch(images, cfg, params=params, out=out_t, backend=aug)
                times.append(time.perf_counter() - t0)
            s = summary(times)
            res[aug] = {**s, "s_per_image": s["median_s"] / batch}
    finally:
        torch.set_num_threads(threads)
    return res


# ----------------------------------------------------------------------------------------------
# 3. The loss alone vs its matmuls
# ----------------------------------------------------------------------------------------------
def _tile_matmuls(a: torch.Tensor, b: torch.Tensor, chunk: int):
    """The chunked engine's matmuls and nothing else, at its tile shapes: pass 1 (z = a_i @ b_j.T),
    pass 2 (z again, then ga_i += z @ b_j and gb_j += z.T @ a_i): 4 x 2*N^2*D FLOPs."""
    n = a.shape[0]
    c = min(chunk, n)
    z = torch.empty(c, c)
    ga, gb = torch.empty_like(a), torch.empty_like(b)

    def run():
        for i in range(0, n, chunk):
            for j in range(0, n, chunk):
                ai, bj = a[i:i + chunk], b[j:j + chunk]
                torch.mm(ai, bj.T, out=z[:ai.shape[0], :bj.shape[0]])
        for i in range(0, n, chunk):
            for j in range(0, n, chunk):
                ai, bj = a[i:i + chunk], b[j:j + chunk]
                zz = z[:ai.shape[0], :bj.shape[0]]
                torch.mm(ai, bj.T, out=zz)
                ga[i:i + chunk].addmm_(zz, bj)
                gb[j:j + chunk].addmm_(zz.T, ai)
    return run


def _tile_elementwise(n: int, chunk: int, scale: float, native: bool = False):
    """The chunked engine's elementwise tile work alone on one stand-in tile per tile position:
    pass 1 (scale, row and column log-sum-exp, the column merge), pass 2 (scale, exp(z - r) +
    exp(z - c)).  ``native=False``: the torch code (``tile_lse``, ``sub_stat``), what the fused
    native kernel replaces; True: ``tile_lse_pair`` and ``softmax_pair`` as the engine calls them
    (``fastclip._C`` when it loaded).  The rest of the loss beyond the matmuls is per-call overhead
    and O(N*D) work."""
    c = min(chunk, n)
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(c, c, generator=g) * 0.1
    z, work, p = torch.empty(c, c), torch.empty(c, c), torch.empty(c, c)
    row = torch.zeros(c, 1, dtype=STAT_DTYPE)
    col = torch.full((c,), -30.0, dtype=STAT_DTYPE)
    tiles = (-(-n // chunk)) ** 2

    def run():
        for _ in range(tiles):
            torch.mul(z0, scale, out=z)
            tile_lse(z, 1, work)
            torch.logaddexp(col, tile_lse(z, 0, work), out=col)
        for _ in range(tiles):
            torch.mul(z0, scale, out=z)
            sub_stat(z, row, p).exp_()
            p.add_(sub_stat(z, col, z).exp_())

    def run_native():
        for _ in range(tiles):
            torch.mul(z0, scale, out=z)
            torch.logaddexp(col, tile_lse_pair(z, work)[1], out=col)
        for _ in range(tiles):
            torch.mul(z0, scale, out=z)
            softmax_pair(z, row.squeeze(1), col, p)
    return run_native if native else run


@contextlib.contextmanager
def native_tiles(on: bool):
    """The chunked engine's tiles on fastclip._C (``on``, when it loaded) or on torch."""
    old = tiles_mod.NATIVE_TILES
    tiles_mod.NATIVE_TILES = on
    try:
        yield
    finally:
        tiles_mod.NATIVE_TILES = old


def time_loss(n: int, d: int, rounds: int, target_s: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)  # CLIP's initial temperature
    chunk = default_chunk_size(torch.device("cpu"))

    def loss_once():
        a.grad = b.grad = scale.grad = None
        clip_loss(a, b, scale, backend="chunked").backward()

    def loss_torch_tiles():
        with native_tiles(False):
            loss_once()

    ext, why = extension.load()
    mm_once = _tile_matmuls(a.detach(), b.detach(), chunk)
    ew_once = _tile_elementwise(n, chunk, float(scale.detach()))
    fns = {"loss_torch_tiles": loss_torch_tiles, "matmuls": mm_once, "tile_elementwise": ew_once}
    if ext is not None:  # the loss as shipped (the native tiles) and their arithmetic alone
        fns.update(loss=loss_once, tile_elementwise_native=_tile_elementwise(n, chunk, float(scale.detach()), True))
    for _ in range(2):
        for fn in fns.values():
            fn()
    t0 = time.perf_counter()
    loss_torch_tiles()
    iters = max(1, int(target_s / max(time.perf_counter() - t0, 1e-6)))  # each timing >= target_s

    def timed(fn):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters

    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):  # interleaved, the order rotating
        for k in order[r % len(order):] + order[:r % len(order)]:
            times[k].append(timed(fns[k]))
    sums = {k: summary(v) for k, v in times.items()}
    torch_loss, mm, ew = sums["loss_torch_tiles"], sums["matmuls"], sums["tile_elementwise"]
    flops = 8.0 * n * n * d
    t = torch_loss["median_s"]  # the rule judges the torch code, the one a native kernel would replace
    rec = {"n": n, "d": d, "chunk": chunk, "backend": "chunked", "mode": "fwd+bwd", "iters_per_timing": iters,
           "flops": flops, "loss_torch_tiles": torch_loss, "matmuls": mm, "tile_elementwise": ew,
           "loss_gflops": flops / t / 1e9, "matmul_gflops": flops / mm["median_s"] / 1e9,
           "elementwise_share": 1 - mm["median_s"] / t,  # everything but the matmuls
           "tile_elementwise_share": ew["median_s"] / t,  # of which the tiles' arithmetic
           "overhead_share": 1 - (mm["median_s"] + ew["median_s"]) / t}  # the rest: per-call and O(N*D)
    if ext is None:
        rec.update(loss=torch_loss, native_tiles={"loaded": False, "reason": why})
        return rec
    per_round = [x / y for x, y in zip(times["loss_torch_tiles"], times["loss"])]  # same round: a ratio
    rec.update(loss=sums["loss"], tile_elementwise_native=sums["tile_elementwise_native"],
               loss_gflops=flops / sums["loss"]["median_s"] / 1e9,
               native_tiles={"loaded": True, "speedup_per_round": [round(x, 4) for x in per_round],
                             "speedup_median": statistics.median(per_round), "speedup_min": min(per_round),
                             "speedup_max": max(per_round),
                             "tile_arithmetic_speedup": ew["median_s"] / sums["tile_elementwise_native"]["median_s"]})
    return rec


# ----------------------------------------------------------------------------------------------
# 4. torch.profiler breakdown
# ----------------------------------------------------------------------------------------------
ELEMENTWISE_WORDS = ("add", "sub", "mul", "div", "exp", "log", "gelu", "silu", "sigmoid", "tanh", "relu",
                     "clamp", "where", "copy", "clone", "contiguous", "fill", "zero", "sum", "mean", "amax",
                     "max", "min", "neg", "pow", "sqrt", "rsqrt", "lerp", "masked", "norm", "to", "_to_copy",
                     "dropout", "abs", "sign", "reciprocal", "ones", "zeros", "full", "bernoulli", "rand",
                     "threshold", "erf", "square", "addcmul", "addcdiv", "maximum", "minimum", "eq", "ne",
                     "lt", "gt", "le", "ge", "logaddexp")


def classify(name: str, in_optimizer: bool) -> str:
    if in_optimizer or name.startswith(("aten::_foreach", "Optimizer.")):
        return "optimizer"
    if name in MATMUL_LIKE or name.startswith("aten::_scaled_dot_product"):
        return "matmul"
    if name in NORM_SOFTMAX:
        return "softmax_layernorm"
    if name.startswith("aten::") and name not in VIEWS:
        base = name[len("aten::"):].rstrip("_")
        stem = base.split("_backward")[0]
        if base in ELEMENTWISE_WORDS or stem in ELEMENTWISE_WORDS or base.lstrip("_") in ELEMENTWISE_WORDS:
            return "elementwise"
    return "other"


def _groups_of(per: dict) -> str:
    """'optimizer' or, for an op split between groups, 'optimizer 80% / elementwise 20%'."""
    total = sum(per.values())
    if not per or total <= 0:
        return next(iter(per), "other")
    parts = sorted(per.items(), key=lambda kv: -kv[1])
    if len(parts) == 1 or parts[0][1] / total > 0.99:
        return parts[0][0]
    return " / ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts)


def profile_steps(run: FastclipRun, batch: dict, steps: int, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile
    run.step(batch)  # warm (the caller warmed it already; one more keeps the profiler's first step clean)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run.step(batch)
    wall = time.perf_counter() - t0
    groups = {k: 0.0 for k in ("matmul", "elementwise", "softmax_layernorm", "optimizer", "other")}
    by_name: dict = {}  # op name -> group -> self seconds (an op such as aten::mul_ runs in and out of AdamW)
    for evt in prof.events():
        parent, in_opt = evt.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("Optimizer."):
                in_opt = True
                break
            parent = parent.cpu_parent
        group, t = classify(evt.name, in_opt), evt.self_cpu_time_total / 1e6
        groups[group] += t
        per = by_name.setdefault(evt.name, {})
        per[group] = per.get(group, 0.0) + t
    total = sum(groups.values())
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"steps": steps, "wall_s": wall, "self_s_total": total,
            "groups": {k: {"self_s": v, "share": share(v, total)} for k, v in groups.items()},
            "top_ops": [{"name": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": share(
                e.self_cpu_time_total / 1e6, total), "calls": e.count, "group": _groups_of(by_name.get(e.key, {}))}
                for e in ops],
            "note": "shares of the profiled self CPU time of the main thread (torch's intra-op threads' work "
                    "counts in the op that launched it); ops under AdamW.step count as optimizer"}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def settings(quick: bool) -> dict:
    if quick:
        return {"demo_batch": 16, "rounds": 2, "steps": 1, "warmup": 1, "dataset": 128, "comparison": False,
                "loader_batches": 2, "augment_reps": 3, "loss_shapes": LOSS_SHAPES["quick"], "loss_rounds": 4,
                "loss_target_s": 0.005, "profile_steps": 1, "matmul_effort": "brief"}
    return {"demo_batch": None, "rounds": 5, "steps": 4, "warmup": 3, "dataset": 3000, "comparison": True,
            "loader_batches": 20, "augment_reps": 20, "loss_shapes": LOSS_SHAPES["full"], "loss_rounds": 10,
            "loss_target_s": 0.05, "profile_steps": 5, "matmul_effort": "full"}


def measure(quick: bool = False, backends=("pil", "dali"), log=print) -> dict:
    """Every section; returns the record that :func:`write` saves."""
    t_start = time.perf_counter()
    s = settings(quick)
    usable, skipped = loader_backends(backends)
    log(f"loader backends: {usable}" + (f" (skipped: {skipped})" if skipped else ""))
    rate0 = measure_matmul_rate("cpu", torch.float32, MATMUL_INNER, effort=s["matmul_effort"])
    log(f"matmul rate: {rate0['gflops']:.1f} GFLOP/s ({rate0['shape']})")
    with tempfile.TemporaryDirectory(prefix="fastclip-profile-") as tmp:
        sizes = {**DEMO_DATA, "train": s["dataset"], "zero_shot": 16, "retrieval": 16}
        t0 = time.perf_counter()
        data = prepare_data(os.path.join(tmp, "demo"), 32, sizes)
        cfg = demo_config(data, os.path.join(tmp, "out"))
        m = cfg.model
        batch = s["demo_batch"] or cfg.data.batch_size
        threads = cfg.data.num_threads
        shards = data["train"]  # a folder of shards (meta["shards_path"] names the folder before its rename)
        log(f"demo data ({s['dataset']} images) in {time.perf_counter() - t0:.1f} s; demo step: {m.name} "
            f"{m.image_size} px, batch {batch}, {cfg.strategy.name}")
        demo, run, mem_batch = time_step_case("demo", m.name, m.image_size, batch, dict(m.overrides),
                                              cfg.strategy.name, shards, usable, threads, s["rounds"], s["steps"],
                                              s["warmup"])
        steps = [with_rate(demo, rate0["gflops"])]
        log(_step_line(demo))

        loader = time_loader_alone(run, m.name, shards, batch, m.image_size, threads, usable, s["loader_batches"])
        for k, v in loader.items():
            log(f"loader alone {k}: {v['images_per_s']:.0f} images/s, {1e6 * v['cpu_s_per_image']:.0f} CPU-us/image")
        aug = time_augment_op(batch, m.image_size, s["augment_reps"])
        log("augment op alone: " + ", ".join(f"{k} {1e6 * v['s_per_image']:.1f} us/image" if "s_per_image" in v
                                              else f"{k} skipped" for k, v in aug.items()))

        prof = profile_steps(run, mem_batch, s["profile_steps"])
        log("profile: " + ", ".join(f"{k} {100 * v['share']:.1f}%" for k, v in prof["groups"].items()))
        del run, mem_batch

        if s["comparison"]:
            model, px, cb = COMPARISON_CASE
            t0 = time.perf_counter()
            cmp_data = make_shapes_dataset(os.path.join(tmp, f"shapes{px}"), max(s["dataset"], 6 * cb),
                                           image_size=px, samples_per_shard=500)
            log(f"comparison data in {time.perf_counter() - t0:.1f} s")
            rec, run, _ = time_step_case(f"{model}@{px}", model, px, cb, None, "clip", cmp_data["shards_path"],
                                         usable, threads, max(3, s["rounds"] - 2), 2, 2)
            steps.append(with_rate(rec, rate0["gflops"]))
            log(_step_line(rec))
            del run

    losses = []
    for n, d in s["loss_shapes"]:
        rec = time_loss(n, d, s["loss_rounds"], s["loss_target_s"])
        rec["fraction_of_matmul_rate"] = mfu(rec["flops"], rec["loss"]["median_s"], rate0["gflops"] * 1e9)
        losses.append(rec)
        log(f"loss N={n} D={d} (torch tiles): {1e3 * rec['loss_torch_tiles']['median_s']:.3f} ms, its matmuls "
            f"{1e3 * rec['matmuls']['median_s']:.3f} ms: elementwise {100 * rec['elementwise_share']:.1f}% "
            f"(tile arithmetic {100 * rec['tile_elementwise_share']:.1f}%, per-call and O(N*D) "
            f"{100 * rec['overhead_share']:.1f}%); " + _native_line(rec))
    demo_loss = losses[0]
    loss_of_step = share(demo_loss["loss"]["median_s"], demo["memory"]["median_s"])
    rate1 = measure_matmul_rate("cpu", torch.float32, MATMUL_INNER, effort=s["matmul_effort"])

    record = {
        "kind": "profile_step", "quick": quick, "machine": _machine(),
        "matmul_rate": {"start": rate0, "end": rate1},
        "loader_backends": usable, "loader_backends_skipped": skipped,
        "steps": steps, "loader_alone": loader, "augment_op": aug, "loss": losses,
        "loss_share_of_demo_step": loss_of_step, "profile": prof,
        "verdicts": verdicts(demo, losses, loss_of_step), "decision_rule": DECISION_RULE,
        "threshold": THRESHOLD, "seconds": time.perf_counter() - t_start,
    }
    return record


def _step_line(rec: dict) -> str:
    parts = [f"{rec['label']}: in memory {1e3 * rec['memory']['median_s']:.1f} ms/step"]
    for b, v in rec["loaders"].items():
        parts.append(f"{b} {1e3 * v['median_s']:.1f} ms (loader share {100 * v['loader_share']:.1f}%)")
    return ", ".join(parts)


def _native_line(rec: dict) -> str:
    nt = rec["native_tiles"]
    if not nt["loaded"]:
        return f"native tiles not measured: {nt['reason']}"
    return (f"native tiles (csrc/loss_tiles_cpu.cpp): loss {nt['speedup_median']:.3f}x as fast (rounds "
            f"{nt['speedup_min']:.3f}-{nt['speedup_max']:.3f}), tile arithmetic {nt['tile_arithmetic_speedup']:.2f}x")


def verdicts(demo: dict, losses: list, loss_of_step: float) -> list:
    out = []
    primary = "pil" if "pil" in demo["loaders"] else next(iter(demo["loaders"]), None)
    if primary is None:
        out.append({"candidate": "loader per-sample work", "share": None, "of": "step", "over_threshold": None,
                    "line": "loader per-sample work: not measured (no loader backend could run)"})
    else:
        x = max(0.0, demo["loaders"][primary]["loader_share"])
        others = ", ".join(f"{b} {100 * max(0.0, v['loader_share']):.1f}%" for b, v in demo["loaders"].items()
                           if b != primary)
        out.append({"candidate": "loader per-sample work", "backend": primary, "share": x, "of": "demo step",
                    "over_threshold": x > THRESHOLD,
                    "line": (f"loader per-sample work: {100 * x:.1f}% of the step (threshold 5%; {primary} backend"
                             + (f"; {others}" if others else "") + ")")})
    for rec in losses:
        y = max(0.0, rec["elementwise_share"])
        line = (f"loss elementwise tile work: {100 * y:.1f}% of the loss time (threshold 5%; N={rec['n']}, "
                f"D={rec['d']}; of it the tiles' arithmetic {100 * rec['tile_elementwise_share']:.1f}%, per-call "
                f"overhead and O(N*D) work {100 * rec['overhead_share']:.1f}%")
        if rec is losses[0]:
            line += f"; the loss is {100 * loss_of_step:.1f}% of the demo step, so at most " \
                    f"{100 * y * loss_of_step:.2f}% of the step"
        line += "); " + _native_line(rec)
        nt = rec["native_tiles"]
        out.append({"candidate": "loss elementwise tile work", "n": rec["n"], "d": rec["d"], "share": y,
                    "of": "loss time", "over_threshold": y > THRESHOLD, "line": line,
                    "native_speedup": nt.get("speedup_median"),
                    "native_faster_every_round": nt["loaded"] and nt["speedup_min"] > 1.0})
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _ms(x: float) -> str:
    return f"{1e3 * x:.2f}"


def markdown(rec: dict) -> str:
    m = rec["machine"]
    r0, r1 = rec["matmul_rate"]["start"], rec["matmul_rate"]["end"]
    L = [f"# Profile of the CPU training step ({'quick: timings mean nothing' if rec['quick'] else 'full'})", "",
         (f"Machine: {m['cpu'].get('model')} ({m['usable_cpus']} CPUs), torch {m['torch']}, {m['platform']}; "
          f"dense fp32 matmul rate {r0['gflops']:.1f} GFLOP/s at the start, {r1['gflops']:.1f} at the end "
          f"({r0['shape']}). Run time {rec['seconds']:.0f} s."), "",
         "## Verdicts", ""]
    L += [f"- {v['line']}: **{'candidate for csrc/' if v['over_threshold'] else 'below the threshold'}**"
          for v in rec["verdicts"]]
    L += ["", f"Decision rule ({rec['decision_rule']}).", "", "## Step: in memory vs with the loader", "",
          "| case | feed | median ms/step (range) | samples/s | CPU s/step | loader share | loader CPU us/sample |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for s in rec["steps"]:
        case = f"{s['model']} {s['image_size']} px b{s['batch']}" + (" (demo)" if s["label"] == "demo" else "")
        mm = s["memory"]
        L.append(f"| {case} | in memory | {_ms(mm['median_s'])} ({_ms(mm['min_s'])}-{_ms(mm['max_s'])}) | "
                 f"{mm['samples_per_s']:.0f} | {mm['cpu_s_median']:.3f} | | |")
        for b, v in s["loaders"].items():
            L.append(f"| {case} | {b} loader | {_ms(v['median_s'])} ({_ms(v['min_s'])}-{_ms(v['max_s'])}) | "
                     f"{v['samples_per_s']:.0f} | {v['cpu_s_median']:.3f} | {100 * v['loader_share']:.1f}% | "
                     f"{1e6 * v['loader_cpu_s_per_sample']:.0f} |")
    L += ["", "In-memory step, FLOPs as run: " + "; ".join(
        f"{s['label']} {s['memory']['achieved_gflops_run']:.0f} GFLOP/s "
        f"({100 * s['memory']['fraction_of_matmul_rate_run']:.0f}% of the matmul rate)" for s in rec["steps"]),
        "", "## Loader alone", "", "| backend / augment | images/s | wall us/image | CPU us/image |",
        "|---|---:|---:|---:|"]
    for k, v in rec["loader_alone"].items():
        L.append(f"| {k} | {v['images_per_s']:.0f} | {1e6 * v['wall_s_per_image']:.1f} | "
                 f"{1e6 * v['cpu_s_per_image']:.1f} |")
    L += ["", "Augment op alone (one batch, 1 thread): " + ", ".join(
        f"{k} {1e6 * v['s_per_image']:.2f} us/image" if "s_per_image" in v else f"{k}: {v['skipped']}"
        for k, v in rec["augment_op"].items()), "",
        "## Loss alone (chunked, fwd+bwd) vs its tile matmuls", "",
        ("| N | D | loss, torch tiles, ms (range) | matmuls ms (range) | tile arithmetic ms | elementwise share "
         "(= 1 - matmuls / loss) | of it: tile arithmetic / per-call + O(N*D) | matmuls GFLOP/s |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rec["loss"]:
        lo, mm = x["loss_torch_tiles"], x["matmuls"]
        L.append(f"| {x['n']} | {x['d']} | {_ms(lo['median_s'])} ({_ms(lo['min_s'])}-{_ms(lo['max_s'])}) | "
                 f"{_ms(mm['median_s'])} ({_ms(mm['min_s'])}-{_ms(mm['max_s'])}) | "
                 f"{_ms(x['tile_elementwise']['median_s'])} | {100 * x['elementwise_share']:.1f}% | "
                 f"{100 * x['tile_elementwise_share']:.1f}% / {100 * x['overhead_share']:.1f}% | "
                 f"{x['matmul_gflops']:.0f} |")
    L += ["", "### The native tiles (fastclip._C, csrc/loss_tiles_cpu.cpp) against the torch tiles, same rounds", "",
          ("| N | D | loss, native tiles, ms (range) | loss GFLOP/s | speedup median (per-round range) | "
           "tile arithmetic: torch ms / native ms |"), "|---:|---:|---:|---:|---:|---:|"]
    for x in rec["loss"]:
        nt = x["native_tiles"]
        if not nt["loaded"]:
            L.append(f"| {x['n']} | {x['d']} | not measured: {nt['reason']} | | | |")
            continue
        lo = x["loss"]
        L.append(f"| {x['n']} | {x['d']} | {_ms(lo['median_s'])} ({_ms(lo['min_s'])}-{_ms(lo['max_s'])}) | "
                 f"{x['loss_gflops']:.0f} | {nt['speedup_median']:.3f}x ({nt['speedup_min']:.3f}-"
                 f"{nt['speedup_max']:.3f}) | {_ms(x['tile_elementwise']['median_s'])} / "
                 f"{_ms(x['tile_elementwise_native']['median_s'])} |")
    p = rec["profile"]
    L += ["", f"Loss at the demo's shape / demo step: {100 * rec['loss_share_of_demo_step']:.2f}%.", "",
          (f"## torch.profiler: {p['steps']} in-memory demo steps ({p['wall_s']:.2f} s wall, "
           f"{p['self_s_total']:.2f} s self CPU)"), "", "| group | self s | share |", "|---|---:|---:|"]
    L += [f"| {k} | {v['self_s']:.3f} | {100 * v['share']:.1f}% |" for k, v in p["groups"].items()]
    L += ["", "| op | group | calls | self s | share |", "|---|---|---:|---:|---:|"]
    L += [f"| `{o['name']}` | {o['group']} | {o['calls']} | {o['self_s']:.3f} | {100 * o['share']:.1f}% |"
          for o in p["top_ops"]]
    L += ["", p["note"] + ".", ""]
    return "\n".join(L)


def write(rec: dict, out_dir) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = STEM + ("-quick" if rec["quick"] else "")
    j, md = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    md.write_text(markdown(rec))
    return j, md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (< 20 s): checks that it runs")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--backends", default="pil,dali", help="loader backends to try (default pil,dali)")
    args = p.parse_args(argv)
    rec = measure(args.quick, tuple(b for b in args.backends.split(",") if b), log=lambda *a: print(*a, flush=True))
    j, md = write(rec, args.out)
    print()
    for v in rec["verdicts"]:
        print(v["line"], "->", "candidate for csrc/" if v["over_threshold"] else "below the threshold")
    print(f"decision rule: {DECISION_RULE}")
    print(f"wrote {j} and {md} ({rec['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
