"""Training-step benchmarks: end-to-end samples/s of one optimiser step, per strategy and model.

    pytest benchmarks/test_train_bench.py --benchmark-json=benchmarks/results/train-cpu.json
    python benchmarks/report.py benchmarks/results/train-cpu.json     # -> benchmarks/results/train-cpu.md
    pytest benchmarks/test_train_bench.py --bench-quick      # tiny sizes: checks that it runs (< 2 min)

Run the full suite on a quiet machine (nothing else on the cores): on a 2-core CPU it should take about
45 minutes (estimated from the step costs; most of it at 224 px, where SLIP runs three image
batches per step and needs about 10 GB).  Restrict it with
``FASTCLIP_BENCH_STRATEGIES=clip,flip0.5`` (of clip, flip0.5, flip0.75, slip, clip_aug) and
``FASTCLIP_BENCH_TRAIN_CASES=ViT-S-16@224:64`` (``model@px[:batch]``, comma-separated, replacing
the device's default cases; ViT-B-16 on CPU: ``FASTCLIP_BENCH_TRAIN_CASES=ViT-B-16@224:32``).
``--bench-sizes`` replaces every case's batch (a sweep), ``--bench-rounds`` the timed rounds,
``--bench-providers`` picks among ``fastclip`` (always run: the baseline), ``loader`` and ``open_clip``,
``--bench-devices`` among ``cpu`` and ``cuda`` (CUDA cases are marked ``gpu`` and skip without one).

What is measured
    One optimiser step as ``fastclip.train``'s trainer runs it, built from its own pieces:
    ``build_strategy`` -> ``CLIPConfig.from_name`` with the strategy's model overrides ->
    ``create_model`` -> the strategy's modules (SLIP's head) -> ``TrainModule`` -> ``StepRunner``
    (no accumulation) -> AdamW over the trainer's two parameter groups (weight decay on matrices
    except the logit scale and bias; ``OptimConfig``'s defaults) -> the logit-scale clamp.  The
    trainer's loop itself (budget, schedule, logging, checkpoints) is not timed.  FLIP's mask ratio
    is the strategy's first phase's.  CPU: fp32; CUDA: bf16 autocast, AdamW ``foreach`` (the
    trainer's ``precision=auto``).

    ``test_train_step`` (per device x model/resolution x strategy: clip, flip 0.5 / 0.75, slip,
    clip_aug): the step on in-memory batches (random normal images, SLIP's two extra views likewise;
    captions of the built-in dataset, ``fastclip.data.synthetic``, tokenised with
    ``fastclip.get_tokenizer``: short captions, so fastclip's text tower cuts the padding), timed
    by pytest-benchmark; then, in blocks interleaved with those rounds, the same step fed by
    ``fastclip.data.ClipLoader`` over the built-in dataset written at the benchmark's image size
    (``make_shapes_dataset``), with the trainer's loader settings (the strategy's augmentation,
    ``DataConfig``'s threads, backend and shuffle buffer, ``drop_last``).  Each loader block starts
    an epoch and drops its first step (the pipeline filling up: that step also waits for a whole
    batch to be decoded); the loader is closed between blocks, so its threads never run beside an
    in-memory step.  Recorded: median step time with its IQR, samples/s, the strategy's own training
    GFLOPs per sample (``strategy.flops(config, mask_ratio)``: 3x the forward, text at 77 tokens),
    the GFLOPs actually run (text at the batch's caption length), achieved GFLOP/s and its fraction
    of the dense matmul rate measured in the same run (the conftest's ``matmul_rate``), peak extra
    memory of a warm-up step, and the loader's step time over the in-memory one (target <= 1.1x).

    ``test_train_targets`` (ViT-S-16 at 224 px; tiny in quick mode): fastclip's CLIP step, its FLIP
    step at mask 0.5 and open_clip's model + ``open_clip.loss.ClipLoss`` step (same config, same
    starting weights, batch, resolution and AdamW; open_clip's model code loaded the way
    ``test_encoder_bench.py`` loads it, without torchvision) in interleaved rounds.  Records
    t(open_clip) / t(fastclip CLIP) (target >= 1.3x) and t(CLIP) / t(FLIP 0.5) (target >= 1.8x).

Nothing here asserts on speed (timings on shared machines are noisy); ``meets_target`` says whether
a run met a target.  Batches: 256 at 64 px, 64 at 224 px on CPU (steps of seconds to tens of
seconds: stable on 2 cores), 256 on CUDA.
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import time

import pytest
import torch

import fastclip
from fastclip import testing
from fastclip.data import ClipLoader, make_shapes_dataset
from fastclip.flops import mfu
from fastclip.train import DataConfig, OptimConfig, TrainConfig
from fastclip.train.step import batch_dict, build_optimizer
from fastclip.train.trainer import build_loader

from _train_steps import (STRATEGIES, FastclipRun, autocast_dtype, autocast_factory, memory_batch, sync,  # noqa: E402
                          tokens_run)

SUITE = "train"  # every record's extra_info["suite"] (conftest); train_report.py renders them
PROVIDERS = ("fastclip", "loader", "open_clip")
CASES = {  # (model, image px, batch)
    "cpu": (("ViT-Ti-16", 64, 256), ("ViT-S-16", 64, 256), ("ViT-S-16", 224, 64)),
    "cuda": (("ViT-S-16", 224, 256), ("ViT-B-16", 224, 256)),
}
QUICK_CASES = (("ViT-Ti-16", 64, 8),)
TARGET_CASE = {"cpu": ("ViT-S-16", 224, 64), "cuda": ("ViT-S-16", 224, 256)}
QUICK_TARGET_CASE = ("ViT-S-16", 64, 4)
TARGETS = {"loader": 1.1, "vs_open_clip": 1.3, "flip0.5_vs_clip": 1.8}
MATMUL_INNER = 512
LOADER_FILL_STEPS = 1  # dropped at the start of every loader block


def _csv(value):
    return [s.strip() for s in str(value).split(",") if s.strip()] if value else None


def _quick(config) -> bool:
    return bool(config.getoption("--bench-quick"))


def _providers(config) -> list:
    wanted = _csv(config.getoption("--bench-providers"))
    return [p for p in PROVIDERS if wanted is None or p in wanted or p == "fastclip"]


def _strategies() -> list:
    wanted = _csv(os.environ.get("FASTCLIP_BENCH_STRATEGIES"))
    if wanted:
        unknown = sorted(set(wanted) - set(STRATEGIES))
        if unknown:
            raise pytest.UsageError(f"FASTCLIP_BENCH_STRATEGIES: unknown {unknown}; known: {list(STRATEGIES)}")
        return [s for s in STRATEGIES if s in wanted]
    return list(STRATEGIES)


def _parse_cases(value: str) -> list:
    """``model@px[:batch]`` items -> [(model, px, batch or None)]."""
    names = fastclip.list_models()
    out = []
    for item in _csv(value):
        try:
            model, rest = item.split("@", 1)
            px, _, batch = rest.partition(":")
            case = (model, int(px), int(batch) if batch else None)
        except ValueError:
            raise pytest.UsageError(f"FASTCLIP_BENCH_TRAIN_CASES: {item!r} is not model@px[:batch], "
                                    "e.g. ViT-B-16@224:32") from None
        if model not in names:
            raise pytest.UsageError(f"FASTCLIP_BENCH_TRAIN_CASES: unknown model {model!r}; known: {names}")
        out.append(case)
    return out


def _default_batch(device: str, px: int) -> int:
    return 256 if device == "cuda" or px <= 128 else 64


def _cases(config, device: str) -> list:
    if _quick(config):
        cases = list(QUICK_CASES)
    elif os.environ.get("FASTCLIP_BENCH_TRAIN_CASES"):
        cases = [(m, px, b or _default_batch(device, px))
                 for m, px, b in _parse_cases(os.environ["FASTCLIP_BENCH_TRAIN_CASES"])]
    else:
        cases = list(CASES[device])
    sizes = _csv(config.getoption("--bench-sizes"))
    if sizes:
        cases = [(m, px, int(b)) for m, px, _ in cases for b in sizes]
    return cases


def pytest_generate_tests(metafunc):
    config = metafunc.config
    devices = _csv(config.getoption("--bench-devices")) or ("cpu", "cuda")
    name = metafunc.definition.originalname
    params = []
    for device in ("cpu", "cuda"):
        if device not in devices:
            continue
        marks = [pytest.mark.gpu] if device == "cuda" else []
        if name == "test_train_step":
            for model, px, batch in _cases(config, device):  # model-major: one model size at a time
                for s in _strategies():
                    params.append(pytest.param(device, model, px, batch, s, marks=marks,
                                               id=f"{device}-{model}-{px}px-b{batch}-{s}"))
        elif name == "test_train_targets":
            params.append(pytest.param(device, marks=marks, id=device))
    if name == "test_train_step":
        metafunc.parametrize("device,model_name,image_size,batch,strategy", params)
    elif name == "test_train_targets":
        metafunc.parametrize("device", params)


# ----------------------------------------------------------------------------------------------
# The training pieces, built as fastclip.train.Trainer builds them
# ----------------------------------------------------------------------------------------------
class OpenClipRun:
    """open_clip's model (fastclip's weights) + open_clip's ClipLoss, the same AdamW and clamp."""

    def __init__(self, fast_model, dev: torch.device):
        mod, why = testing.open_clip_model_module()
        if mod is None:
            raise RuntimeError(why)
        loss_mod, why = testing.load_open_clip_file("loss")
        if loss_mod is None:
            raise RuntimeError(why)
        self.dev = dev
        self.model = testing.open_clip_model(fast_model.config)
        self.model.load_state_dict(fast_model.state_dict(), strict=True)
        self.model.to(dev).train()
        self.loss = loss_mod.ClipLoss()
        self.optimizer = build_optimizer(list(self.model.named_parameters()), OptimConfig(), dev)
        self.max_log_scale = math.log(OptimConfig().max_logit_scale)
        self.autocast = autocast_factory(dev)

    def step(self, batch: dict) -> None:
        with self.autocast():  # as open_clip's training loop: forward and loss under autocast
            out = self.model(batch["images"], batch["tokens"])
            loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.max_log_scale)
        sync(self.dev)


# ----------------------------------------------------------------------------------------------
# Batches and data
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """``get(image_size, num_images) -> shard pattern`` of the built-in dataset (written once)."""
    made: dict = {}

    def get(image_size: int, num_images: int) -> dict:
        key = (image_size, num_images)
        if key not in made:
            out = tmp_path_factory.mktemp(f"shapes{image_size}px")
            made[key] = make_shapes_dataset(str(out), num_images, image_size=image_size,
                                            samples_per_shard=500)
        return made[key]

    return get


def _loader(run: FastclipRun, shards: str, batch: int, image_size: int, tokenizer) -> ClipLoader:
    d, seed = DataConfig(), TrainConfig().seed
    return build_loader(shards, batch, image_size, run.strategy, tokenizer, run.dev, backend=d.backend,
                        num_threads=d.num_threads, shuffle=d.shuffle, seed=seed)


# ----------------------------------------------------------------------------------------------
# Timing summaries
# ----------------------------------------------------------------------------------------------
def _spread(times: list) -> dict:
    med = statistics.median(times)
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = None
    return {"median_s": med, "iqr_s": iqr, "min_s": min(times), "max_s": max(times), "rounds": len(times),
            "all_s": [round(t, 6) for t in times]}


def _rates(summary: dict, batch: int, counted: float, run_gflops: float, rate: float) -> dict:
    """Throughput of a step timing summary: samples/s, achieved GFLOP/s (counted and as run), and
    their MFU against the matmul rate ``rate`` (GFLOP/s), through ``fastclip.flops.mfu``."""
    median = summary["median_s"]
    sps = batch / median
    achieved = counted * sps
    fraction = mfu(counted * batch * 1e9, median, rate * 1e9)
    return {**summary, "samples_per_s": sps, "achieved_gflops": achieved, "achieved_gflops_run": run_gflops * sps,
            "fraction_of_matmul_rate": fraction, "fraction_of_matmul_rate_run": mfu(run_gflops * batch * 1e9,
                                                                                    median, rate * 1e9),
            "ratio_to_floor": 1 / fraction}


def _machine_line(machine: dict) -> str:
    return (f"{machine['cpu'].get('model')} ({machine['usable_cpus']} CPUs), torch {machine['torch']}"
            + (f", {machine['gpu']['name']}" if machine.get("gpu") else ""))


def _rounds(config, dev: torch.device, image_size: int) -> int:
    if config.getoption("--bench-rounds"):
        return int(config.getoption("--bench-rounds"))
    if _quick(config):
        return 2
    if dev.type == "cuda":
        return 20
    return 4 if image_size <= 128 else 3


def _warmup_steps(config, dev: torch.device, image_size: int) -> int:
    if dev.type == "cuda":
        return 2 if _quick(config) else 3
    # A CPU step at 224 px takes tens of seconds: one warms it up; at 64 px the second still gains.
    return 1 if image_size > 128 else 2


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Per strategy x model: the step on in-memory batches and with the loader
# ----------------------------------------------------------------------------------------------
def test_train_step(benchmark, request, matmul_rate, peak_memory, machine, shapes_data, device, model_name,
                    image_size, batch, strategy):
    config = request.config
    quick = _quick(config)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    request.addfinalizer(_release)  # after this function's models are gone
    providers = _providers(config)
    tokenizer = fastclip.get_tokenizer(model_name)
    run = FastclipRun(model_name, image_size, strategy, dev)
    mem_batch = memory_batch(run, batch, image_size, tokenizer)
    n_tokens = tokens_run(mem_batch["tokens"])
    counted, run_gflops = run.train_gflops(n_tokens)
    rate = matmul_rate(device, torch.float32 if dev.type == "cpu" else torch.bfloat16, MATMUL_INNER)

    rounds = _rounds(config, dev, image_size)
    blocks = 2 if rounds >= 4 else 1
    per_block = -(-rounds // blocks)
    with_loader = "loader" in providers

    # Warm-up (first-call allocations, AdamW's state, backend choices); peak memory of the last.
    warm = _warmup_steps(config, dev, image_size)
    for _ in range(warm - 1):
        run.step(mem_batch)
    peak, _ = peak_memory(lambda: run.step(mem_batch), device)

    loader = shards = None
    if with_loader:
        num_images = max(64 if quick else 2000, (LOADER_FILL_STEPS + per_block + 2) * batch)
        data = shapes_data(image_size, num_images)
        shards = data["shards_path"]
        loader = _loader(run, shards, batch, image_size, tokenizer)
    loader_times, fill_times, loader_tokens, epochs = [], [], [], 0

    def loader_block():
        nonlocal epochs
        it = iter(loader)  # a new epoch; closed at the end so that no loader thread outlives the block
        epochs += 1
        try:
            for i in range(LOADER_FILL_STEPS + per_block):
                t0 = time.perf_counter()
                item = next(it, None)
                if item is None:  # the epoch ran out (a tiny dataset): the next one
                    it.close()
                    it, epochs = iter(loader), epochs + 1
                    item = next(it)
                b = batch_dict(item, run.augment.extra_views)
                run.step(b)
                t = time.perf_counter() - t0
                (fill_times if i < LOADER_FILL_STEPS else loader_times).append(t)
                loader_tokens.append(tokens_run(b["tokens"]))
                del item, b
        finally:
            it.close()

    mem_times: list = []
    calls = {"n": 0}

    def setup():
        # Loader blocks between blocks of in-memory rounds (untimed by pytest-benchmark, timed here).
        if with_loader and calls["n"] and calls["n"] % per_block == 0:
            loader_block()
        calls["n"] += 1

    def step():
        t0 = time.perf_counter()
        run.step(mem_batch)
        mem_times.append(time.perf_counter() - t0)

    benchmark.group = f"train {device} {model_name} {image_size}px"
    benchmark.pedantic(step, setup=setup, rounds=per_block * blocks, warmup_rounds=0, iterations=1)
    if with_loader:
        loader_block()

    mem = _rates(_spread(mem_times), batch, counted, run_gflops, rate["gflops"])
    info = benchmark.extra_info
    info.update({
        "kind": "train_step", "device": device, "model": model_name, "image_size": image_size,
        "strategy": strategy, "strategy_describe": run.strategy.describe(), "mask_ratio": run.mask_ratio,
        "batch": batch, "dtype": "float32" if autocast_dtype(dev) is None else "bf16 autocast",
        "extra_views": run.augment.extra_views, "caption_tokens": n_tokens,
        "train_gflops_per_sample": counted, "train_gflops_per_sample_run": run_gflops,
        "fwd_gflops_per_sample": counted / 3,
        "matmul_gflops": rate["gflops"], "matmul_shape": rate["shape"],
        "memory": mem, "median_s": mem["median_s"], "iqr_s": mem["iqr_s"], "rounds": mem["rounds"],
        "samples_per_s": mem["samples_per_s"], "achieved_gflops": mem["achieved_gflops"],
        "achieved_gflops_run": mem["achieved_gflops_run"], "fraction_of_matmul_rate": mem["fraction_of_matmul_rate"],
        "ratio_to_floor": mem["ratio_to_floor"],
        "peak_extra_mb": None if peak is None else peak / 2 ** 20,
        "peak_includes_optimizer_state": warm == 1,  # measured on the first step: AdamW allocates its state
        "warmup_steps": warm, "blocks": blocks, "nonfinite_steps": run.nonfinite_steps,
        "quick": quick, "torch_threads": torch.get_num_threads(), "machine": _machine_line(machine),
    })
    if with_loader:
        ld = _rates(_spread(loader_times), batch, counted, run_gflops, rate["gflops"])
        ratio = ld["median_s"] / mem["median_s"]
        ld.update({"fill_s": [round(t, 6) for t in fill_times], "fill_steps_per_block": LOADER_FILL_STEPS,
                   "mean_s_with_fill": statistics.mean(fill_times + loader_times), "epochs": epochs,
                   "backend": loader.backend_name, "num_threads": loader.num_threads, "prefetch": loader.prefetch,
                   "shuffle": loader.source.shuffle, "augment": run.augment.preset, "images": data["num_samples"],
                   "dataset_seconds": data["seconds"], "caption_tokens_mean": statistics.mean(loader_tokens),
                   "stats": loader.stats.as_dict()})
        info.update({"loader": ld, "loader_samples_per_s": ld["samples_per_s"], "loader_time_ratio": ratio,
                     "loader_meets_target": ratio <= TARGETS["loader"]})
    else:
        info["loader"] = {"skipped": "--bench-providers leaves out 'loader'"}


# ----------------------------------------------------------------------------------------------
# The headline comparisons, in interleaved rounds in one run
# ----------------------------------------------------------------------------------------------
def test_train_targets(benchmark, request, matmul_rate, machine, device):
    """ViT-S-16 at 224 px: fastclip CLIP vs open_clip + ClipLoss (>= 1.3x), FLIP 0.5 vs CLIP (>= 1.8x)."""
    config = request.config
    quick = _quick(config)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model_name, image_size, batch = QUICK_TARGET_CASE if quick else TARGET_CASE[device]
    sizes = _csv(config.getoption("--bench-sizes"))
    if sizes and not quick:
        batch = int(sizes[0])
    rounds = _rounds(config, dev, image_size)
    tokenizer = fastclip.get_tokenizer(model_name)
    request.addfinalizer(_release)  # after this function's models are gone

    clip = FastclipRun(model_name, image_size, "clip", dev)
    flip = FastclipRun(model_name, image_size, "flip0.5", dev)
    runs = {"fastclip_clip": clip, "fastclip_flip0.5": flip}
    oc_skip = None
    if "open_clip" not in _providers(config):
        oc_skip = "--bench-providers leaves out 'open_clip'"
    else:
        try:
            runs["open_clip_clip"] = OpenClipRun(clip.model, dev)
        except RuntimeError as exc:
            oc_skip = str(exc)
    mem_batch = memory_batch(clip, batch, image_size, tokenizer)
    n_tokens = tokens_run(mem_batch["tokens"])
    rate = matmul_rate(device, torch.float32 if dev.type == "cpu" else torch.bfloat16, MATMUL_INNER)

    for _ in range(_warmup_steps(config, dev, image_size)):
        for r in runs.values():
            r.step(mem_batch)
    times = {k: [] for k in runs}

    def timed(key):
        def fn():
            t0 = time.perf_counter()
            runs[key].step(mem_batch)
            times[key].append(time.perf_counter() - t0)
        return fn

    others = [timed(k) for k in runs if k != "fastclip_clip"]

    def setup():  # the other steps of the round, timed here; fastclip's CLIP step is the benchmark's
        for fn in others:
            fn()

    benchmark.group = f"train targets {device}"
    benchmark.pedantic(timed("fastclip_clip"), setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)

    counted_clip, run_clip = clip.train_gflops(n_tokens)
    counted_flip, run_flip = flip.train_gflops(n_tokens)
    flops = {"fastclip_clip": (counted_clip, run_clip), "fastclip_flip0.5": (counted_flip, run_flip),
             "open_clip_clip": (counted_clip, counted_clip)}  # open_clip runs all 77 text tokens
    res = {k: _rates(_spread(v), batch, *flops[k], rate["gflops"]) for k, v in times.items() if v}
    t_clip = res["fastclip_clip"]["median_s"]
    flip_ratio = t_clip / res["fastclip_flip0.5"]["median_s"]
    summary = {
        "kind": "train_targets", "device": device, "model": model_name,
        "image_size": image_size, "batch": batch, "rounds": rounds, "quick": quick,
        "dtype": "float32" if autocast_dtype(dev) is None else "bf16 autocast", "caption_tokens": n_tokens,
        "matmul_gflops": rate["gflops"], "matmul_shape": rate["shape"],
        "steps": res, "targets": dict(TARGETS),
        "flip0.5_vs_clip": flip_ratio, "flip0.5_vs_clip_flop_ratio": counted_clip / counted_flip,
        "flip0.5_vs_clip_flop_ratio_run": run_clip / run_flip,
        "nonfinite_steps": clip.nonfinite_steps + flip.nonfinite_steps,
        "meets_target": {f"flip0.5 / clip >= {TARGETS['flip0.5_vs_clip']}x": flip_ratio >= TARGETS["flip0.5_vs_clip"]},
        "machine": _machine_line(machine),
    }
    if "open_clip_clip" in res:
        vs = res["open_clip_clip"]["median_s"] / t_clip
        summary.update({"vs_open_clip": vs, "open_clip_version": testing.open_clip_version()})
        summary["meets_target"][f"fastclip / open_clip >= {TARGETS['vs_open_clip']}x"] = vs >= TARGETS["vs_open_clip"]
    else:
        summary["open_clip_skipped"] = oc_skip
    benchmark.extra_info.update(summary)
    print(f"\ntrain targets ({device}, {model_name} {image_size}px, batch {batch}):",
          {k: round(v["samples_per_s"], 2) for k, v in res.items()}, "FLIP/CLIP", round(flip_ratio, 2),
          "vs open_clip", round(summary["vs_open_clip"], 2) if "vs_open_clip" in summary else oc_skip)
