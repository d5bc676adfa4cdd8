"""The headline benchmark: how much training a compute budget buys with each model and strategy.

For every built-in model x strategy (CLIP, FLIP 0.5 / 0.75, SLIP, CLIP + strong augmentation), one
training step as the trainer runs it (``_train_steps.FastclipRun``: the strategy's modules, the step
runner, AdamW) on in-memory batches, timed after a warm-up.  Per case: training throughput
(samples/s); the strategy's training compute per sample as a budget counts it (``fastclip.flops``
through the strategy: 3 x forward, at the first phase's mask ratio, with SLIP's extra views and
head, the text tower at its 77 positions) and as it runs (captions cut after their last end token:
about 20 tokens here); the achieved GFLOP/s (run FLOPs) as a fraction of the dense matmul rate
measured in the same run; and the wall time this machine needs to spend each of the budgets
1e12 ... 1e16 FLOPs (counted as the trainer's budget counts them) at that throughput.

Resolutions: 64 px on CPU (so that the whole grid runs in minutes on 2 cores), 224 px on a GPU, in
bf16 autocast there (the trainer's precision="auto").  The batch is sized so that one step is about
the same work for every model (``STEP_GFLOP``), at least 4 samples.  ResNet towers cannot drop
patches: their FLIP cases are skipped with that reason.

    pytest benchmarks/test_budget_bench.py --benchmark-json=benchmarks/results/budget-cpu.json
    python benchmarks/report.py benchmarks/results/budget-cpu.json     # budget-cpu.md + budget-cpu.png

``pytest benchmarks/`` runs this file last (benchmarks/conftest.py).  ``--bench-quick``: two small
models at 32 px, timings meaningless.  Nothing here asserts on speed.
"""
from __future__ import annotations

import gc

import pytest
import torch

import fastclip
from fastclip.models import CLIPConfig

from _train_steps import STRATEGIES, FastclipRun, autocast_dtype, memory_batch, tokens_run  # noqa: E402

SUITE = "budget"  # every record's extra_info["suite"] (conftest); budget_report.py renders them
BUDGETS_FLOPS = (1e12, 1e13, 1e14, 1e15, 1e16)
IMAGE_SIZE = {"cpu": 64, "cuda": 224}
STEP_GFLOP = {"cpu": 150.0, "cuda": 60000.0}  # work per timed step: about a second on each
MIN_BATCH, MAX_BATCH = 4, 512
QUICK_MODELS = ("ViT-Ti-16", "RN50")
QUICK_IMAGE_SIZE = 32
MATMUL_INNER = 512


def _csv(value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _quick(config) -> bool:
    return bool(config.getoption("--bench-quick"))


def pytest_generate_tests(metafunc):
    if "model_name" not in metafunc.fixturenames:
        return
    config = metafunc.config
    devices = _csv(config.getoption("--bench-devices")) or ("cpu", "cuda")
    models = QUICK_MODELS if _quick(config) else tuple(fastclip.list_models())
    params = []
    for device in ("cpu", "cuda"):
        if device not in devices:
            continue
        marks = [pytest.mark.gpu] if device == "cuda" else []
        for model in models:  # model-major: one model's memory at a time
            for strategy in STRATEGIES:
                params.append(pytest.param(device, model, strategy, marks=marks, id=f"{device}-{model}-{strategy}"))
    metafunc.parametrize("device, model_name, strategy", params)


def _image_size(config, device: str) -> int:
    return QUICK_IMAGE_SIZE if _quick(config) else IMAGE_SIZE[device]


def _batch(gflops_per_sample: float, device: str, quick: bool) -> int:
    if quick:
        return MIN_BATCH
    return int(max(MIN_BATCH, min(MAX_BATCH, round(STEP_GFLOP[device] / gflops_per_sample))))


def seconds_to_budgets(gflops_per_sample: float, samples_per_s: float) -> dict:
    """{budget in FLOPs (as a string key): seconds at this throughput}."""
    flops_per_s = gflops_per_sample * 1e9 * samples_per_s
    return {f"{b:.0e}": b / flops_per_s for b in BUDGETS_FLOPS}


def test_budget(benchmark, pytestconfig, matmul_rate, machine, device, model_name, strategy):
    dev = torch.device(device)
    quick = _quick(pytestconfig)
    px = _image_size(pytestconfig, device)
    if STRATEGIES[strategy].get("mask_ratio") and CLIPConfig.from_name(model_name).vision_cfg.is_resnet:
        pytest.skip(f"{model_name} has a ResNet image tower, which cannot drop patches ({strategy})")
    run = FastclipRun(model_name, px, strategy, dev)
    try:
        per_sample = run.strategy.flops(run.config, run.mask_ratio)
        batch = _batch(per_sample, device, quick)
        data = memory_batch(run, batch, px, fastclip.get_tokenizer(model_name))
        for _ in range(1 if quick else 2):  # warm-up: allocator, first-call costs, the optimiser's state
            run.step(data)
        rounds = 2 if quick else 3
        benchmark.pedantic(run.step, args=(data,), rounds=rounds, iterations=1)
        secs = benchmark.stats.stats.median
        sps = batch / secs
        rate = matmul_rate(device, torch.float32 if dev.type == "cpu" else torch.bfloat16, MATMUL_INNER)["gflops"]
        _, run_per_sample = run.train_gflops(tokens_run(data["tokens"]))
        achieved = run_per_sample * sps
        benchmark.extra_info.update(
            kind="budget", device=device, model=model_name, strategy=strategy, image_size=px, batch=batch,
            dtype="float32" if autocast_dtype(dev) is None else "bf16 autocast",
            train_gflops_per_sample=round(per_sample, 4), run_gflops_per_sample=round(run_per_sample, 4),
            samples_per_s=round(sps, 2),
            achieved_gflops=round(achieved, 2), fraction_of_matmul_rate=round(achieved / rate, 4),
            matmul_gflops=round(rate, 1), seconds_to_budget=seconds_to_budgets(per_sample, sps),
            nonfinite_steps=run.nonfinite_steps, quick=quick)
        print(f"\n{device} {model_name} {strategy} {px}px batch {batch}: {sps:.1f} samples/s, "
              f"{per_sample:.3g} GFLOPs/sample counted, {100 * achieved / rate:.0f}% of the matmul rate")
    finally:
        del run
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
