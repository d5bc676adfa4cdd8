"""The sweep's quality-filter arm: a scorer model and the top-k% of a training set by its CLIP score.

``grid.filter_top: [100, 40]`` trains every configuration also on the top 40% of its training
set, as ``fastclip filter`` keeps them (:func:`fastclip.eval.filter.filter_shards`: the cosine
similarity of the scorer's image and caption features).  The scorer is ``data.filter_checkpoint``
(a fastclip training checkpoint) or, without one, a model the sweep trains once: the grid's first
model with CLIP and the sweep's recipe, on ``data.scorer_dataset_size`` clean pairs drawn from
another seed than every set of the grid, for ``data.scorer_budget_gflops`` -- the toy
counterpart of scoring web data with a CLIP trained elsewhere.

A filtered set is written once, next to the sets of the sweep (``<train set>-top40-<scorer>``),
atomically (a crash leaves no half set behind).  Its ``filter.json`` is ``fastclip filter``'s
report; :func:`clean_fraction` reads the built-in dataset's ``caption_ok`` flags of whatever set
the run trains on, so the table says how clean the filter made it.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

__all__ = ["scorer_checkpoint", "filtered_set", "clean_fraction"]

_SCORER_SEED_OFFSET = 1  # the scorer's pairs: data.seed + 1 (the grid's held-out sets use seed + 1_000_003 ...)


def scorer_checkpoint(root: str, cfg, log=print) -> dict:
    """``{"checkpoint", "zero_shot/top1", "dir"}`` of the scorer of sweep ``cfg``:
    ``data.filter_checkpoint`` as given, or the one the sweep trains (once, under ``root``): the
    grid's first model with CLIP and the sweep's recipe (the demo's, then ``base``), seed 0, on
    ``data.scorer_dataset_size`` clean pairs of seed ``data.seed + 1``, for
    ``data.scorer_budget_gflops``."""
    from ..atomic import checksum
    from ..train import train
    from ..train.demo import prepare_data
    from .sweep import Run, StrategySpec, train_config_for
    data = cfg.data
    if data.filter_checkpoint:
        if not os.path.isfile(data.filter_checkpoint):
            raise FileNotFoundError(f"data.filter_checkpoint={data.filter_checkpoint!r} does not exist")
        return {"checkpoint": os.path.abspath(data.filter_checkpoint), "zero_shot/top1": None, "dir": None}
    model = cfg.grid.models[0]
    seed = data.seed + _SCORER_SEED_OFFSET
    run = Run("scorer", model, StrategySpec("clip"), model.image_size or data.image_size, data.scorer_dataset_size,
              0.0, data.scorer_budget_gflops, 0, {})
    tag = checksum({"model": [model.name, model.overrides, run.image_size], "base": cfg.base,
                    "data": [data.scorer_dataset_size, data.scorer_budget_gflops, seed, data.image_size,
                             data.caption_detail, data.zero_shot, data.retrieval]})[:10]
    out = os.path.join(root, f"scorer-{model.key}-n{data.scorer_dataset_size}-g{data.scorer_budget_gflops:.3g}-{tag}")
    summary_path = os.path.join(out, "summary.json")
    if not os.path.isfile(summary_path):
        sets = prepare_data(root, data.image_size, {"train": data.scorer_dataset_size, "zero_shot": data.zero_shot,
                                                    "retrieval": data.retrieval, "seed": seed,
                                                    "caption_detail": data.caption_detail})
        log(f"scorer: training {model.key} with CLIP on {data.scorer_dataset_size} clean pairs (data seed {seed}) "
            f"for {data.scorer_budget_gflops:.3g} GFLOPs")
        shutil.rmtree(out, ignore_errors=True)  # an interrupted scorer starts over: it is small
        tc = train_config_for(cfg, run, sets)
        tc.output_dir = out
        tc.log.progress = False
        train(tc)
    with open(summary_path) as f:
        summary = json.load(f)
    top1 = (summary.get("final_eval") or {}).get("zero_shot/top1")
    log(f"scorer: {summary['checkpoint']}" + ("" if top1 is None else
                                              f" (zero-shot top-1 {top1:.3f} on its own held-out set)"))
    return {"checkpoint": summary["checkpoint"], "zero_shot/top1": top1, "dir": out}


def filtered_set(train_dir: str, top_percent: float, scorer: dict, image_size: int, log=print) -> str:
    """The folder of the top ``top_percent`` % of ``train_dir`` by the scorer's CLIP score (written
    once; ``fastclip filter``'s shards, ``scores.csv``, ``filter.json``, ``meta.json``)."""
    from ..atomic import checksum
    from ..eval.filter import filter_shards
    from ..eval.suite import load_eval_model
    from ..tokenizer import get_tokenizer
    tag = checksum({"checkpoint": os.path.abspath(scorer["checkpoint"])})[:8]
    out = f"{train_dir.rstrip(os.sep)}-top{top_percent:g}-scorer{tag}"
    if os.path.isfile(os.path.join(out, "filter.json")):
        return out
    model, info = load_eval_model(checkpoint=scorer["checkpoint"], image_size=image_size)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    report = filter_shards(train_dir, tmp, keep=top_percent / 100, model=model, image_size=image_size,
                           tokenizer=get_tokenizer(info["architecture"]), samples_per_shard=2500)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f"filter: kept {report['kept']} of {report['scored']} pairs of {os.path.basename(train_dir)} "
        f"(top {top_percent:g}%, score >= {report['threshold']:.4f}) in {report['seconds']:.1f} s")
    return out


def clean_fraction(train_dir: str) -> Optional[float]:
    """The share of ``train_dir``'s pairs whose caption is the scene's own (the built-in dataset's
    ``caption_ok``); None when its samples do not say."""
    from ..data.shards import DataStats, ShardSource, expand_shards
    ok = total = 0
    for s in ShardSource(expand_shards(train_dir), shuffle=0, keep_members=True).iter(0, 0, 1, DataStats(warn=False)):
        raw = dict(s.members).get("json")
        try:
            flag = json.loads(raw.decode("utf-8")).get("caption_ok") if raw else None
        except (UnicodeDecodeError, ValueError, AttributeError):
            flag = None
        if flag is None:
            return None
        ok += bool(flag)
        total += 1
    return ok / total if total else None
