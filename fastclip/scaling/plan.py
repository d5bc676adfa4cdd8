"""``fastclip plan``: from a compute budget and a dataset size to the model and strategy to train.

Laws come from one of two places:

* **the built-in table** (the scaling-law study's published results, shipped with fastclip): for
  each architecture fastclip can build (ViT-B-32, ViT-B-16, ViT-L-14) and the study's dataset
  closest in size to the user's (LAION-80M, -400M or -2B), a power law of error against samples
  seen, E = a * S^b, by least squares through the study's runs (3B, 13B and 34B samples).  At a
  budget of C training GFLOPs an architecture sees S = C / (3 x its forward GFLOPs per sample,
  ``fastclip.flops``; the study's ``gmacs`` column is the same forward count in MACs), so each
  architecture's law gives the error it is predicted to reach; the strategy is CLIP (the study's).
* **the user's own results table** (a sweep's CSV: columns ``model``, the compute column
  ``gflops`` and the metric; optional ``strategy``, ``dataset_size``, ``image_size``): a law
  E = a * C^b per (model, strategy) over its runs (rows at the dataset size closest to the one
  planned for, when the table has several), evaluated at the budget.

The planner ranks the candidates by predicted error, gives each a bootstrap interval, says when a
prediction extrapolates beyond the runs its law was fitted on (a budget outside every law's range
is allowed, with that warning), and prints the ``fastclip train`` command of the best one.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .fit import PowerLawFit, TooFewPointsError, fit_power_law
from .results import NoValuesError, published_results

__all__ = [
    "Candidate",
    "Plan",
    "plan_from_published",
    "plan_from_results",
    "check_plan",
    "STUDY_ARCHS",
    "STUDY_DATASETS",
    "PUBLISHED_METRICS",
]

# The study's architectures that fastclip builds, and the study's datasets with their sizes (pairs).
STUDY_ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
STUDY_DATASETS = {"LAION-80M": 8.0e7, "LAION-400M": 4.0e8, "LAION-2B": 2.32e9}
# metric name -> (downstream dataset, column) in the published table
PUBLISHED_METRICS = {
    "imagenet-zeroshot": ("imagenet1k", "acc1"),
    "coco-image-retrieval": ("mscoco_captions", "image_retrieval_recall@5"),
}


@dataclass
class Candidate:
    """One model (and strategy) with its law and what it predicts at the budget."""

    model: str
    strategy: str
    fit: PowerLawFit
    x: float  # where the law is evaluated (samples seen, or GFLOPs)
    x_name: str  # "samples seen" or the compute column
    error: float
    interval: Optional[tuple] = None
    extrapolated: bool = False
    gflops_per_sample: Optional[float] = None
    image_size: Optional[int] = None
    note: str = ""
    config: Optional[str] = None   # a training config of one of its runs (a sweep's runs/<id>/config.yaml)

    def explain(self) -> str:
        """One line: what is predicted, from what, and how far it reaches."""
        band = f" [{self.interval[0]:.3f}, {self.interval[1]:.3f}]" if self.interval else ""
        lo, hi = self.fit.compute.min(), self.fit.compute.max()
        where = (
            f"extrapolated beyond its runs ({self.x_name} {lo:.3g}-{hi:.3g})"
            if self.extrapolated
            else f"within its runs ({self.x_name} {lo:.3g}-{hi:.3g})"
        )
        var = "S" if self.x_name == "samples seen" else "C"
        return (
            f"{self.model} {self.strategy}: error {self.error:.3f}{band} at {self.x_name} {self.x:.3g}, "
            f"{self.fit.formula(var=var)}, {where}" + (f"; {self.note}" if self.note else "")
        )


@dataclass
class Plan:
    """The ranked candidates (best first) and how the plan was made."""

    budget_gflops: float
    dataset_size: Optional[float]
    metric: str
    source: str
    candidates: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def command(self, train_shards: str = "<your shards>") -> str:
        """The ``fastclip train`` command of the best candidate: from the training config of its run
        when the laws came from a sweep (its model, strategy and recipe exactly, the budget set),
        else from its model and strategy names."""
        b = self.best
        if b.config:
            parts = ["fastclip train", f"--config {b.config}", f"budget.gflops={self.budget_gflops:.4g}",
                     f"output_dir=fastclip-plan-{b.model}-{b.strategy}-{self.budget_gflops:.3g}"]
            if train_shards != "<your shards>":
                parts.append(f"data.train={train_shards}")
            return " ".join(parts)
        parts = ["fastclip train", f"model.name={b.model}"]
        if b.image_size:
            parts.append(f"model.image_size={b.image_size}")
        parts += [
            f"strategy.name={b.strategy}",
            f"budget.gflops={self.budget_gflops:.4g}",
            f"data.train={train_shards}",
        ]
        return " ".join(parts)

    def as_dict(self) -> dict:
        """Plain data for JSON: the request, the notes, the command and every candidate."""
        return {"budget_gflops": self.budget_gflops, "dataset_size": self.dataset_size, "metric": self.metric,
                "source": self.source, "notes": self.notes, "command": self.command(),
                "candidates": [{"model": c.model, "strategy": c.strategy, "error": c.error,
                                "interval": list(c.interval) if c.interval else None,
                                "extrapolated": c.extrapolated, "at": c.x, "at_name": c.x_name,
                                "law": c.fit.as_dict(), "explanation": c.explain()} for c in self.candidates]}


def _check_budget(budget_gflops) -> float:
    b = float(budget_gflops)
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"budget_gflops must be finite and > 0, got {budget_gflops!r}")
    return b


def _check_size(dataset_size) -> Optional[float]:
    if dataset_size is None:
        return None
    d = float(dataset_size)
    if not math.isfinite(d) or d < 1:
        raise ValueError(f"dataset_size must be a number of image-text pairs >= 1, got {dataset_size!r}")
    return d


def _run_config(rows: Sequence[dict], cond: dict, runs_dir) -> Optional[str]:
    """``<runs dir>/<run_id>/config.yaml`` of a finished run matching ``cond`` (a sweep's layout), if
    any; ``runs_dir``: a folder or a list of folders (a preset's sub-sweeps each have one)."""
    dirs = [runs_dir] if isinstance(runs_dir, str) else list(runs_dir or ())
    for r in rows:
        if r.get("run_id") and r.get("status", "finished") == "finished" and all(
                str(r.get(k)) in (list(map(str, v)) if isinstance(v, list) else [str(v)]) for k, v in cond.items()):
            for d in dirs:
                path = os.path.join(d, r["run_id"], "config.yaml")
                if os.path.isfile(path):
                    return path
    return None


def _law(x, error, bootstrap: int, seed: int) -> tuple[PowerLawFit, str]:
    """A least-squares law with a bootstrap when its runs allow one; else without, and why."""
    try:
        return fit_power_law(x, error, "lstsq", bootstrap=bootstrap, seed=seed), ""
    except TooFewPointsError:
        if not bootstrap:
            raise
        return fit_power_law(x, error, "lstsq"), f"no interval: {len(np.unique(x))} distinct runs are too few"


def _predict(fit: PowerLawFit, x: float) -> tuple[float, Optional[tuple], bool]:
    interval = tuple(float(v) for v in fit.interval(x)) if fit.samples is not None else None
    return float(fit.predict(x)), interval, bool(fit.extrapolates(x))


def _finish(plan: Plan) -> Plan:
    plan.candidates.sort(key=lambda c: c.error)
    if all(c.extrapolated for c in plan.candidates):
        msg = (
            f"the budget ({plan.budget_gflops:.3g} GFLOPs) lies outside the range of every law: every "
            "prediction is an extrapolation"
        )
        plan.notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return plan


def plan_from_published(budget_gflops: float, dataset_size: Optional[float] = None, *,
                        metric: str = "imagenet-zeroshot", bootstrap: int = 500, seed: int = 0) -> Plan:
    """Plan with the built-in laws fitted to the study's published results (see the module notes).

    ``metric``: "imagenet-zeroshot" (top-1) or "coco-image-retrieval" (image retrieval R@5).
    ``dataset_size``: image-text pairs available (default: the study's largest dataset).
    """
    from ..flops import model_flops

    budget = _check_budget(budget_gflops)
    size = _check_size(dataset_size)
    if metric not in PUBLISHED_METRICS:
        raise ValueError(f"metric must be one of {sorted(PUBLISHED_METRICS)}, got {metric!r}")
    downstream, column = PUBLISHED_METRICS[metric]
    plan = Plan(budget, size, metric, "published (Cherti et al.)")
    if size is None:
        upstream = "LAION-2B"
        plan.notes.append("no dataset size given: the laws of the study's largest dataset (LAION-2B)")
    else:
        upstream = min(STUDY_DATASETS, key=lambda k: abs(math.log(STUDY_DATASETS[k] / size)))
        plan.notes.append(
            f"laws of {upstream} ({STUDY_DATASETS[upstream]:.3g} pairs), the study's dataset closest "
            f"in size to yours ({size:.3g} pairs)"
        )
        if size < 0.5 * min(STUDY_DATASETS.values()):
            plan.notes.append(
                "your dataset is smaller than any in the study: its laws saw far more distinct "
                "pairs, so these predictions are optimistic"
            )
    rows = [
        r
        for r in published_results()
        if r["downstream_dataset"] == downstream and r["upstream_dataset"] == upstream and r.get(column)
    ]
    for arch in STUDY_ARCHS:
        mine = [r for r in rows if r["arch"] == arch]
        samples = np.array([float(r["samples_seen"]) for r in mine])
        error = np.array([1.0 - float(r[column]) for r in mine])
        fit, why = _law(samples, error, bootstrap, seed)
        per_sample = 3 * model_flops(arch, image_size=224).total
        seen = budget / per_sample
        err, interval, extra = _predict(fit, seen)
        note = why
        if size is not None and seen > 10 * size:
            note = "; ".join(n for n in (note, f"{seen / size:.0f} passes over your data") if n)
        plan.candidates.append(
            Candidate(arch, "clip", fit, seen, "samples seen", err, interval, extra, per_sample, 224, note)
        )
    return _finish(plan)


def plan_from_results(rows: Sequence[dict], budget_gflops: float, metric: str, *,
                      dataset_size: Optional[float] = None, compute: str = "gflops", bootstrap: int = 500,
                      seed: int = 0, runs_dir=None) -> Plan:
    """Plan with laws fitted to the user's results table (a sweep's), one per (model, strategy)."""
    from .results import select_points

    budget = _check_budget(budget_gflops)
    size = _check_size(dataset_size)
    if not rows:
        raise ValueError("the results table has no rows")
    if "model" not in rows[0]:
        raise ValueError(
            f"a results table for planning needs a 'model' column; its columns are {list(rows[0])}"
        )
    plan = Plan(budget, size, metric, "your results table")
    where = {}
    if "dataset_size" in rows[0]:
        sizes = sorted({float(r["dataset_size"]) for r in rows if r.get("dataset_size")})
        if sizes:
            chosen = sizes[-1] if size is None else min(sizes, key=lambda s: abs(math.log(s / size)))
            where["dataset_size"] = [
                r["dataset_size"]
                for r in rows
                if r.get("dataset_size") and float(r["dataset_size"]) == chosen
            ]
            plan.notes.append(
                f"runs at dataset size {chosen:.3g}"
                + ("" if size is None else f", the closest to yours ({size:.3g})")
            )
    if "caption_noise" in rows[0]:  # one law mixes no caption qualities: the cleanest captions
        noises = sorted({float(r["caption_noise"]) for r in rows if r.get("caption_noise")})
        if len(noises) > 1:
            where["caption_noise"] = [r["caption_noise"] for r in rows
                                      if r.get("caption_noise") and float(r["caption_noise"]) == noises[0]]
            plan.notes.append(f"runs at caption noise {noises[0]:g} (the table also has {noises[1:]})")
    if "filter_top" in rows[0]:  # nor filtered and unfiltered sets: the least filtered one
        tops = sorted({float(r["filter_top"]) for r in rows if r.get("filter_top")}, reverse=True)
        if len(tops) > 1:
            where["filter_top"] = [r["filter_top"] for r in rows
                                   if r.get("filter_top") and float(r["filter_top"]) == tops[0]]
            plan.notes.append(f"runs on the top {tops[0]:g}% of their data (the table also has {tops[1:]})")
    strategies = sorted({r.get("strategy") or "clip" for r in rows})
    for model in sorted({r["model"] for r in rows}):
        for strategy in strategies:
            cond = dict(where, model=model)
            if "strategy" in rows[0]:
                cond["strategy"] = strategy
            try:
                pts = select_points(rows, metric, compute=compute, where=cond)
            except NoValuesError:
                continue
            if len(np.unique(pts.compute)) < 2:
                plan.notes.append(f"{model} {strategy}: one compute value only, no law")
                continue
            fit, why = _law(pts.compute, pts.error, bootstrap, seed)
            err, interval, extra = _predict(fit, budget)
            sizes = {r.get("image_size") for r in rows if r["model"] == model and r.get("image_size")}
            image_size = int(float(sizes.pop())) if len(sizes) == 1 else None
            plan.candidates.append(
                Candidate(model, strategy, fit, budget, compute, err, interval, extra, image_size=image_size,
                          note=why, config=_run_config(rows, cond, runs_dir))
            )
    if not plan.candidates:
        raise ValueError(
            f"no (model, strategy) of the table has runs at two or more compute values with metric "
            f"{metric!r}: nothing to fit"
        )
    return _finish(plan)


def check_plan(plan: Plan, output_dir: str, train_shards: Optional[str] = None) -> dict:
    """Train the plan's best candidate at the plan's budget and compare the measured error with the
    prediction: the check of a law outside the runs it was fitted on.

    The candidate must come with a training config (laws from a sweep's table: its run's
    ``config.yaml``); the run goes to ``output_dir`` (resuming there if it was interrupted), on
    ``train_shards`` if given.  Returns (and writes to ``output_dir/check.json``) the budget, the
    predicted error and interval, the measured error, whether it lies inside the interval, and by
    how much it misses (in error units) when it does not."""
    import json

    from ..atomic import atomic_write_bytes
    from ..train import CheckpointManager, TrainConfig, train

    best = plan.best
    if not best.config:
        raise ValueError(f"the plan's best candidate ({best.model} {best.strategy}) has no training config to check "
                         "with: plan from a sweep's results table (its runs/<id>/config.yaml)")
    overrides = [f"budget.gflops={plan.budget_gflops!r}", f"output_dir={output_dir}", "log.progress=true"]
    if train_shards:
        overrides.append(f"data.train={train_shards}")
    cfg = TrainConfig.from_file(best.config, overrides)
    resume = "latest" if CheckpointManager(os.path.join(output_dir, "checkpoints")).latest() else None
    summary = train(cfg, resume=resume)
    value = (summary.get("final_eval") or {}).get(plan.metric)
    if value is None:
        raise ValueError(f"the check run's final evaluation has no {plan.metric!r}; it has "
                         f"{sorted(summary.get('final_eval') or {})}")
    measured = 1.0 - float(value)
    inside = None if best.interval is None else bool(best.interval[0] <= measured <= best.interval[1])
    miss = None
    if inside is False:
        miss = measured - (best.interval[1] if measured > best.interval[1] else best.interval[0])
    report = {"model": best.model, "strategy": best.strategy, "budget_gflops": plan.budget_gflops,
              "gflops_used": (summary.get("budget_used") or {}).get("gflops"), "metric": plan.metric,
              "predicted_error": best.error, "interval": list(best.interval) if best.interval else None,
              "extrapolated": best.extrapolated, "law": best.fit.formula(var="C"),
              "measured_error": measured, "inside": inside, "miss": miss, "config": best.config,
              "output_dir": output_dir, "steps": summary.get("steps")}
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(output_dir, "check.json"), json.dumps(report, indent=1).encode())
    return report
