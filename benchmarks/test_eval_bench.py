"""Evaluation benchmarks: images/s of zero-shot classification and image-text retrieval.

Run on a quiet machine, then turn the JSON into tables:

    pytest benchmarks/test_eval_bench.py --benchmark-json=benchmarks/results/eval-cpu.json
    python benchmarks/report.py benchmarks/results/eval-cpu.json

Quick check that everything runs (tiny sets, timings meaningless): ``--bench-quick``.

What is measured
    ``evaluate_zero_shot`` and ``evaluate_retrieval`` end to end over the built-in dataset's shards
    read by ``fastclip.data.ClipLoader`` (the evaluation transform: resize + centre crop; 2 decoding
    threads; tokenisation for retrieval), as ``fastclip eval`` runs them: reading, decoding, the
    image tower (and for retrieval the text tower and the chunked recall), the metrics.  Zero-shot
    builds its classifier (30 classes x 8 templates) inside the timed call, as it does once per
    evaluation.  Models: ``ViT-Ti-16`` at 64 px (the built-in dataset's size) and ``ViT-B-32`` at
    224 px (the images are upsampled by the loader), fp32, untrained weights (speed does not depend
    on them).  One untimed warm-up call, then the timed rounds.  ``extra_info``: ``images_per_s``
    (from the median round), the image tower's forward GFLOPs per image (``fastclip.flops``; the
    text tower's share is left out: it depends on the captions' lengths, since fastclip cuts the
    padding), the image-tower GFLOP/s achieved end to end and its fraction of the dense matmul
    rate measured in the same run.

Nothing here asserts on speed.
"""

from __future__ import annotations

import pytest
import torch

SUITE = "eval"  # every record's extra_info["suite"] (conftest); eval_report.py renders them
MODELS = {"ViT-Ti-16": 64, "ViT-B-32": 224}
TASKS = ("zeroshot", "retrieval")
N_IMAGES, QUICK_IMAGES = 512, 64
BATCH = 128
THREADS = 2
MATMUL_INNER = 512


def _quick(config) -> bool:
    return bool(config.getoption("--bench-quick"))


def _machine_line(machine: dict) -> str:
    cpu = machine.get("cpu") or {}
    return f"{cpu.get('model name', cpu.get('model', 'CPU'))}, {torch.get_num_threads()} threads"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, pytestconfig):
    from fastclip.data import make_shapes_dataset

    out = tmp_path_factory.mktemp("eval-bench")
    n = QUICK_IMAGES if _quick(pytestconfig) else N_IMAGES
    info = make_shapes_dataset(str(out), num_samples=n, image_size=64, seed=11, samples_per_shard=256)
    return str(out / info["shards"]), n


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_eval(benchmark, pytestconfig, matmul_rate, machine, shards, model_name, task):
    from fastclip import create_model, get_tokenizer
    from fastclip.data import CLASSNAMES, TEMPLATES, ClipLoader
    from fastclip.eval import evaluate_retrieval, evaluate_zero_shot
    from fastclip.flops import model_flops

    pattern, n = shards
    size = 32 if _quick(pytestconfig) else MODELS[model_name]
    torch.manual_seed(0)
    model = create_model(model_name, image_size=size).eval()
    tokenizer = get_tokenizer(model_name)
    loader = ClipLoader(
        pattern,
        BATCH,
        image_size=size,
        train=False,
        shuffle=0,
        num_threads=THREADS,
        with_labels=(task == "zeroshot"),
        tokenizer=None if task == "zeroshot" else tokenizer,
        backend="pil",
    )

    def run():
        if task == "zeroshot":
            return evaluate_zero_shot(model, loader, CLASSNAMES, TEMPLATES, tokenizer)
        return evaluate_retrieval(model, loader)

    run()  # warm-up: thread pools, allocator, first-call costs
    rounds = 2 if _quick(pytestconfig) else 3
    metrics = benchmark.pedantic(run, rounds=rounds, iterations=1)
    secs = benchmark.stats.stats.median
    fl = model_flops(model_name, image_size=size)
    per_image = fl.image  # the text tower's share depends on caption lengths (padding is cut): not counted
    rate = matmul_rate("cpu", torch.float32, MATMUL_INNER)["gflops"]
    achieved = per_image * n / secs
    benchmark.extra_info.update(
        kind="eval",
        task=task,
        model=model_name,
        image_size=size,
        images=n,
        batch=BATCH,
        threads=THREADS,
        images_per_s=round(n / secs, 1),
        gflops_per_image=round(per_image, 4),
        achieved_gflops=round(achieved, 2),
        fraction_of_matmul_rate=round(achieved / rate, 4),
        matmul_gflops=round(rate, 1),
        metric_keys=sorted(metrics),
        machine=_machine_line(machine),
        quick=_quick(pytestconfig),
    )
    print(
        f"\n{task} {model_name} {size}px: {n / secs:.0f} images/s, {achieved:.1f} GFLOP/s "
        f"({100 * achieved / rate:.0f}% of the matmul rate)"
    )
