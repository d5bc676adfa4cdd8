"""The "Scaling (Down) CLIP" findings as sweep presets on the built-in dataset, sized for a 2-core CPU.

A preset is one or more sweeps (``fastclip.scaling.sweep``) written under one folder, then a
findings report: one table of every configuration's metrics as mean and range over its seeds, a
PNG, and a short verdict that compares what the study claims with what the runs show.  A
difference smaller than the seeds' spread is reported as such, never as a result.

* ``quality-vs-quantity``: at equal compute, N, 2N and 4N pairs at caption noise 0, 0.3 and 0.6
  (every combination), and the top 25% and 50% of the noisiest 4N set by a scorer's CLIP score
  (``fastclip filter``; the scorer is the demo model trained on 2N clean pairs of another seed).
  The study: a smaller set of high-quality data beats a larger low-quality one.
* ``model-vs-data``: at one compute budget, three ViT image towers (width x depth 64x2, 96x4 and
  128x6, the text tower the demo's) on 1k, 4k and 16k pairs; and each model at a quarter and a
  half of that budget on the largest set, for the laws.  The study: smaller models suit smaller
  datasets, larger models larger ones.
* ``strategies``: CLIP, FLIP (mask 0.5 and 0.75, each with and without unmasked tuning over the
  last 20% of the budget), SLIP and CLIP + strong augmentation at equal compute; CLIP +
  augmentation at half the data against CLIP at the full data; and CLIP and FLIP 0.75 at a
  quarter and a half of the budget, for the laws.  The study: augmentation reaches about CLIP's
  result with half the data; FLIP and SLIP trade places with CLIP with the budget.

Where a preset has runs at several budgets, the findings fit a power law of error against
compute per (model, strategy) (:func:`fastclip.scaling.plan.plan_from_results`, the laws
``fastclip plan --table`` uses) and give the plan at 4x the largest budget, outside the sweep's
range, with the ``fastclip train`` command of its best candidate.

The model is the demo's (``fastclip.train.demo.DEMO_MODEL``: a 4-block ViT of width 96 on 32-px
scenes), batch 128, two seeds.
"""
from __future__ import annotations

import math
import os
import statistics
import warnings
from typing import Optional, Sequence

from ..atomic import atomic_write_bytes
from ..lazy import plotting
from ..train.demo import DEMO_MODEL
from .results import load_results, write_results

__all__ = ["PRESETS", "preset_sweeps", "run_preset", "findings", "METRIC"]

METRIC = "zero_shot/top1"
SECOND = "retrieval/image_to_text_R@1"
PRESETS = ("quality-vs-quantity", "model-vs-data", "strategies")
_PLAN_FACTOR = 4.0  # the findings' plan: at this multiple of the largest budget (outside the sweep's range)

# (default compute budget in GFLOPs, default base dataset size)
_DEFAULTS = {"strategies": (1.2e4, 20000),        # about 300 CLIP steps of 128 samples, 2 passes
             "quality-vs-quantity": (1.0e4, 2000),  # 250 steps: 16, 8 and 4 passes over N, 2N, 4N
             "model-vs-data": (1.0e4, 1000)}       # sizes N, 4N, 16N
_MODEL = {"name": DEMO_MODEL["name"], "label": "demo", "overrides": dict(DEMO_MODEL["overrides"])}
_STRATEGIES = [
    "clip",
    {"name": "flip", "label": "flip50", "mask_ratio": 0.5},
    {"name": "flip", "label": "flip75", "mask_ratio": 0.75},
    {"name": "flip", "label": "flip50+tune", "mask_ratio": 0.5, "unmasked_fraction": 0.2},
    {"name": "flip", "label": "flip75+tune", "mask_ratio": 0.75, "unmasked_fraction": 0.2},
    "slip",
    "clip_aug",
]
_NOISE = [0.0, 0.3, 0.6]
_FILTER_TOP = [25.0, 50.0]


def _vit(width: int, depth: int) -> dict:
    """The demo model with another image tower (the text tower and embedding stay the demo's)."""
    return {"name": DEMO_MODEL["name"], "label": f"vit-{width}x{depth}",
            "overrides": dict(DEMO_MODEL["overrides"], vision_width=width, vision_layers=depth)}


_MODELS = [_vit(64, 2), _vit(96, 4), _vit(128, 6)]


def preset_sweeps(name: str, output_dir: str, *, seeds: Sequence[int] = (0, 1), budget_gflops: Optional[float] = None,
                  dataset_size: Optional[int] = None, model: Optional[dict] = None,
                  models: Optional[Sequence[dict]] = None, base: Optional[dict] = None,
                  data: Optional[dict] = None) -> list:
    """``[(sub-sweep name, sweep config dict)]`` of preset ``name``.

    The keyword arguments shrink a preset (tests): ``budget_gflops`` and ``dataset_size`` (the base
    size N; the strategies' full size) replace the defaults; ``model`` the demo model, ``models``
    the model-vs-data models; ``base`` and ``data`` are merged into every sweep's sections."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    budget = float(budget_gflops or _DEFAULTS[name][0])
    n = int(dataset_size or _DEFAULTS[name][1])
    model = model or _MODEL
    data_root = os.path.join(output_dir, "data")

    def sweep(sub: str, grid: dict, extra_data: Optional[dict] = None) -> tuple:
        g = {"models": [model], "caption_noise": [0.0], "seeds": list(seeds), **grid}
        return sub, {"name": f"{name}-{sub}", "output_dir": os.path.join(output_dir, sub), "grid": g,
                     "base": {"log": {"progress": False}, **(base or {})},
                     "data": {"root": data_root, **(extra_data or {}), **(data or {})}}

    if name == "strategies":
        return [sweep("equal-compute", {"strategies": _STRATEGIES, "dataset_sizes": [n], "budgets_gflops": [budget]}),
                sweep("half-data", {"strategies": ["clip", "clip_aug"], "dataset_sizes": [n // 2],
                                    "budgets_gflops": [budget]}),
                sweep("budgets", {"strategies": _STRATEGIES[:1] + _STRATEGIES[2:3], "dataset_sizes": [n],
                                  "budgets_gflops": [budget / 4, budget / 2]})]
    if name == "quality-vs-quantity":
        scorer = {"scorer_dataset_size": 2 * n, "scorer_budget_gflops": budget}
        return [sweep("sizes-x-noise", {"strategies": ["clip"], "dataset_sizes": [n, 2 * n, 4 * n],
                                        "caption_noise": _NOISE, "budgets_gflops": [budget]}),
                sweep("filtered", {"strategies": ["clip"], "dataset_sizes": [4 * n], "caption_noise": _NOISE[-1:],
                                   "filter_top": _FILTER_TOP, "budgets_gflops": [budget]}, scorer)]
    models = list(models or _MODELS)
    return [sweep("models-x-data", {"models": models, "strategies": ["clip"], "dataset_sizes": [n, 4 * n, 16 * n],
                                    "budgets_gflops": [budget]}),
            sweep("budgets", {"models": models, "strategies": ["clip"], "dataset_sizes": [16 * n],
                              "budgets_gflops": [budget / 4, budget / 2]})]


def run_preset(name: str, output_dir: str, *, worker: Optional[tuple] = None, **kwargs) -> dict:
    """Run every sweep of the preset (each resumes where it stopped; ``worker`` as in
    :func:`~fastclip.scaling.sweep.run_sweep`), then write the findings; returns :func:`findings`' dict."""
    from .sweep import SweepConfig, run_sweep
    tables = []
    for _, d in preset_sweeps(name, output_dir, **kwargs):
        tables.append(run_sweep(SweepConfig.from_dict(d), worker=worker))
    return findings(name, tables, output_dir)


# ----------------------------------------------------------------------------------------------
# findings
# ----------------------------------------------------------------------------------------------
def _read(paths: Sequence[str]) -> list:
    return [r for p in paths for r in load_results(p) if r.get("status") == "finished"]


def _budget(r: dict) -> float:
    return float(r["budget_gflops"]) if r.get("budget_gflops") else 0.0


def _stat(rs: list, col: str) -> tuple:
    vals = [float(r[col]) for r in rs if r.get(col) not in (None, "")]
    return (statistics.mean(vals), min(vals), max(vals)) if vals else (float("nan"),) * 3


def _summary(rows: list, keys: Sequence[str]) -> dict:
    """{key tuple: {"metric": (mean, lo, hi), "second": ..., "seeds": n, "steps": mean, "pairs",
    "clean"}} over the rows (seeds) of each key."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k, "") for k in keys), []).append(r)
    out = {}
    for k, rs in groups.items():
        out[k] = {"metric": _stat(rs, METRIC), "second": _stat(rs, SECOND), "seeds": len(rs),
                  "steps": statistics.mean(float(r["steps"]) for r in rs),
                  "pairs": _stat(rs, "train_pairs")[0], "clean": _stat(rs, "train_clean")[0]}
    return out


def _compare(a: dict, b: dict) -> str:
    """"0.412 vs 0.398: +0.014, within the seeds' spread" (a minus b, spread = the wider range)."""
    (ma, la, ha), (mb, lb, hb) = a["metric"], b["metric"]
    diff, spread = ma - mb, max(ha - la, hb - lb)
    return (f"{ma:.3f} vs {mb:.3f}: {diff:+.3f}, "
            + ("within the seeds' spread" if _within(a, b) else f"beyond the seeds' spread ({spread:.3f})"))


def _within(a: dict, b: dict) -> bool:
    (ma, la, ha), (mb, lb, hb) = a["metric"], b["metric"]
    return abs(ma - mb) <= max(ha - la, hb - lb)


def _cell(s: dict, key: str = "metric") -> str:
    m = s[key]
    return f"{m[0]:.3f} ({m[1]:.3f}-{m[2]:.3f})"


def findings(name: str, tables: Sequence[str], output_dir: str) -> dict:
    """Write ``findings.md``, ``findings.png`` and ``results.csv`` (every sub-sweep's rows) under
    ``output_dir``; returns ``{"markdown", "verdict": [lines], "png" (or None), "results", "plan"
    (the plan's dict at 4x the largest budget, or None)}``."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    rows = _read(tables)
    if not rows:
        raise ValueError(f"preset {name!r}: no finished run in {list(tables)}")
    os.makedirs(output_dir, exist_ok=True)
    merged = os.path.join(output_dir, "results.csv")
    write_results(merged, rows)
    png = os.path.join(output_dir, "findings.png")
    laws, plan = _laws(rows, [os.path.join(os.path.dirname(t), "runs") for t in tables])
    if name == "model-vs-data":
        table, verdict, png = _model_vs_data(rows, png, plan)
    else:
        table, verdict, png = (_strategies if name == "strategies" else _quality)(rows, png)
    md = [f"# Preset {name}: findings", "", *table, "", "Verdict (differences are means over seeds; the spread "
          "is the wider of the two ranges over seeds):", "", *[f"- {v}" for v in verdict], ""]
    if laws:
        md += ["Laws (error = 1 - " + METRIC + " against training GFLOPs, least squares in log-log over the "
               "runs at the largest dataset size, 95% bootstrap interval; `fastclip plan --table results.csv "
               f"--metric {METRIC}` fits the same):", "", *[f"- {x}" for x in laws], ""]
    if png:
        md += [f"![{name}]({os.path.basename(png)})", ""]
    atomic_write_bytes(os.path.join(output_dir, "findings.md"), "\n".join(md).encode())
    return {"markdown": "\n".join(md), "verdict": verdict, "png": png, "results": merged,
            "plan": plan.as_dict() if plan is not None else None}


def _laws(rows: list, runs_dirs: list) -> tuple:
    """``(lines, plan)``: the plan at 4x the largest budget (laws per model and strategy) and its
    lines, if the runs span two budgets or more; else ``([], None)``."""
    from .plan import plan_from_results
    budgets = sorted({_budget(r) for r in rows if _budget(r) > 0})
    if len(budgets) < 2:
        return [], None
    at = _PLAN_FACTOR * budgets[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # extrapolation is the point here; the lines say so
        try:
            plan = plan_from_results(rows, at, METRIC, bootstrap=500, runs_dir=runs_dirs)
        except ValueError as exc:
            return [f"no law: {exc}"], None
    lines = [c.explain() for c in plan.candidates]
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"plan at {at:.3g} GFLOPs ({_PLAN_FACTOR:g}x the largest budget, outside the sweep's range): "
                 f"{plan.best.model} with {plan.best.strategy}: `{plan.command()}`")
    return lines, plan


# -- strategies ----------------------------------------------------------------------------------
def _strategies(rows: list, png: str) -> tuple[list, list, Optional[str]]:
    budget = max(_budget(r) for r in rows)
    at_budget = [r for r in rows if _budget(r) == budget]
    summ = _summary(at_budget, ("strategy", "dataset_size"))
    full = max(int(k[1]) for k in summ)
    half = min(int(k[1]) for k in summ)
    table = ([f"At {budget:.3g} GFLOPs per run:", ""] if budget else []) + [
             f"| strategy | pairs | steps | {METRIC} (mean, range over seeds) | {SECOND} | seeds |",
             "|---|---:|---:|---|---|---:|"]
    for (strategy, size), s in sorted(summ.items(), key=lambda kv: (-int(kv[0][1]), -kv[1]["metric"][0])):
        table.append(f"| {strategy} | {size} | {s['steps']:.0f} | {_cell(s)} | {_cell(s, 'second')} | {s['seeds']} |")
    at = {k[0]: v for k, v in summ.items() if int(k[1]) == full}
    verdict = []
    if "clip" in at:
        for other in [s for s in at if s != "clip"]:
            verdict.append(f"{other} vs CLIP at equal compute: {_compare(at[other], at['clip'])}")
    halves = {k[0]: v for k, v in summ.items() if int(k[1]) == half}
    if half != full and "clip_aug" in halves and "clip" in at:
        verdict.append(f"CLIP+Aug at half the data ({half}) vs CLIP at the full data ({full}) — the study: about "
                       f"equal: {_compare(halves['clip_aug'], at['clip'])}")
    lower = sorted({_budget(r) for r in rows if _budget(r) < budget})
    for b in lower:
        sb = _summary([r for r in rows if _budget(r) == b and int(r["dataset_size"]) == full],
                      ("strategy",))
        if ("clip",) in sb:
            for (other,), s in sb.items():
                if other != "clip":
                    verdict.append(f"{other} vs CLIP at {b:.3g} GFLOPs: {_compare(s, sb[('clip',)])}")
    return table, verdict, _bars(summ, png, full, f"Strategies at {budget:.3g} GFLOPs" if budget else
                                 "Strategies at equal compute", rows)


def _bars(summ: dict, path: str, full: int, title: str, rows: Optional[list] = None) -> Optional[str]:
    """Bars of the metric per strategy at the largest budget; beside them, when some strategies
    ran at several budgets (on the full set), the metric against the budget for those."""
    plt, _ = plotting()
    if plt is None:
        return None
    ladder: dict = {}
    for r in rows or []:
        if int(r["dataset_size"]) == full and r.get(METRIC):
            ladder.setdefault(r["strategy"], {}).setdefault(_budget(r), []).append(float(r[METRIC]))
    ladder = {k: v for k, v in ladder.items() if len(v) > 1}
    fig, axes = plt.subplots(1, 2 if ladder else 1, figsize=(12 if ladder else 8, 4), dpi=110,
                             gridspec_kw={"width_ratios": [2, 1]} if ladder else None)
    ax = axes[0] if ladder else axes
    items = sorted(summ.items(), key=lambda kv: (-int(kv[0][1]), kv[0][0]))
    labels = [f"{k[0]}" + ("" if int(k[1]) == full else f"\n(n={k[1]})") for k, _ in items]
    means = [v["metric"][0] for _, v in items]
    errs = [[v["metric"][0] - v["metric"][1] for _, v in items], [v["metric"][2] - v["metric"][0] for _, v in items]]
    ax.bar(range(len(items)), means, yerr=errs, capsize=3, color="#4C72B0")
    ax.set_xticks(range(len(items)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel(f"{METRIC} (mean, range over seeds)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if ladder:
        ax2 = axes[1]
        for strategy, by_budget in sorted(ladder.items()):
            b = sorted(by_budget)
            m = [statistics.mean(by_budget[x]) for x in b]
            ax2.errorbar(b, m, yerr=[[mi - min(by_budget[x]) for mi, x in zip(m, b)],
                                     [max(by_budget[x]) - mi for mi, x in zip(m, b)]],
                         marker="o", capsize=3, label=strategy)
        ax2.set_xscale("log")
        ax2.set_xlabel("training GFLOPs per run")
        ax2.set_title("Against the budget")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- quality vs quantity ---------------------------------------------------------------------------
def _quality(rows: list, png: str) -> tuple[list, list, Optional[str]]:
    summ = _summary(rows, ("dataset_size", "caption_noise", "filter_top"))

    def key(size, noise, top=100.0):
        return next((k for k in summ if int(k[0]) == size and float(k[1]) == noise
                     and float(k[2] or 100) == top), None)

    table = [f"| pairs | caption noise | filter | pairs trained on (clean share) | steps | {METRIC} (mean, range) "
             f"| {SECOND} | seeds |", "|---:|---:|---|---|---:|---|---|---:|"]
    for k, s in sorted(summ.items(), key=lambda kv: (float(kv[0][2] or 100) < 100, int(kv[0][0]), float(kv[0][1]),
                                                     -float(kv[0][2] or 100))):
        top = float(k[2] or 100)
        clean = "" if math.isnan(s["clean"]) else f" ({100 * s['clean']:.0f}% clean)"
        table.append(f"| {k[0]} | {float(k[1]):g} | {'top %g%%' % top if top < 100 else 'none'} | "
                     f"{s['pairs']:.0f}{clean} | {s['steps']:.0f} | {_cell(s)} | {_cell(s, 'second')} | {s['seeds']} |")
    sizes = sorted({int(k[0]) for k in summ if float(k[2] or 100) >= 100})
    noises = sorted({float(k[1]) for k in summ if float(k[2] or 100) >= 100})
    verdict = []
    n = sizes[0]
    base = key(n, 0.0)
    if base is not None:
        for size in sizes[1:]:
            for noise in noises:
                k = key(size, noise)
                if k is None:
                    continue
                if noise == 0:  # no quality difference: does more data pay at this budget at all?
                    verdict.append(f"{size} clean pairs vs {n} clean pairs (more data, same quality): "
                                   f"{_compare(summ[k], summ[base])}")
                else:
                    verdict.append(f"{size} pairs at caption noise {noise:g} vs {n} clean pairs — the study: the "
                                   f"smaller clean set wins: {_compare(summ[k], summ[base])}")
        for k, s in summ.items():
            top = float(k[2] or 100)
            if top < 100:
                clean = "" if math.isnan(s["clean"]) else f", {100 * s['clean']:.0f}% clean"
                what = f"the top {top:g}% of {k[0]} pairs at noise {float(k[1]):g} ({s['pairs']:.0f} pairs{clean})"
                verdict.append(f"{what} vs {n} clean pairs: {_compare(s, summ[base])}")
                raw = key(int(k[0]), float(k[1]))
                if raw is not None:
                    verdict.append(f"{what} vs all {k[0]} of them: {_compare(s, summ[raw])}")
    return table, verdict, _quality_plot(summ, png, sizes, noises)


def _quality_plot(summ: dict, path: str, sizes: list, noises: list) -> Optional[str]:
    plt, _ = plotting()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for size in sizes:
        pts = sorted((float(k[1]), v) for k, v in summ.items() if int(k[0]) == size and float(k[2] or 100) >= 100)
        x = [p[0] for p in pts]
        m = [p[1]["metric"] for p in pts]
        ax.errorbar(x, [v[0] for v in m], yerr=[[v[0] - v[1] for v in m], [v[2] - v[0] for v in m]], marker="o",
                    capsize=3, label=f"{size} pairs")
    for k, v in summ.items():
        top = float(k[2] or 100)
        if top < 100:  # at the share of noisy captions left after filtering
            x = 1 - v["clean"] if not math.isnan(v["clean"]) else float(k[1])
            ax.errorbar([x], [v["metric"][0]], yerr=[[v["metric"][0] - v["metric"][1]], [v["metric"][2] - v["metric"][0]]],
                        marker="*", markersize=12, capsize=3, linestyle="none",
                        label=f"top {top:g}% of {k[0]} at noise {float(k[1]):g} ({v['pairs']:.0f} pairs)")
    ax.set_xlabel("share of corrupted captions in the pairs trained on")
    ax.set_ylabel(f"{METRIC} (mean, range over seeds)")
    ax.set_title("Quality vs quantity at equal compute")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- model vs data --------------------------------------------------------------------------------
def _model_vs_data(rows: list, png: str, plan=None) -> tuple[list, list, Optional[str]]:
    budget = max(_budget(r) for r in rows)
    summ = _summary([r for r in rows if _budget(r) == budget], ("model", "dataset_size"))
    models = sorted({k[0] for k in summ}, key=lambda m: _model_order(m, rows))
    sizes = sorted({int(k[1]) for k in summ})
    steps = {m: statistics.mean(v["steps"] for k, v in summ.items() if k[0] == m) for m in models}
    table = [f"{METRIC} at {budget:.3g} GFLOPs per run (mean, range over seeds):", "",
             "| model (steps) | " + " | ".join(f"{s} pairs" for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for m in models:
        cells = [(_cell(summ[(m, str(s))]) if (m, str(s)) in summ else "") for s in sizes]
        table.append(f"| {m} ({steps[m]:.0f}) | " + " | ".join(cells) + " |")
    verdict = []
    best = {}
    for s in sizes:
        here = sorted(((summ[(m, str(s))], m) for m in models if (m, str(s)) in summ), key=lambda x: -x[0]["metric"][0])
        if len(here) < 2:
            continue
        (top, m1), (second, m2) = here[0], here[1]
        best[s] = m1
        verdict.append(f"{s} pairs: best {m1}, vs {m2} {_compare(top, second)}")
    if len(best) >= 2:
        order = [models.index(best[s]) for s in sorted(best)]
        grows = all(a <= b for a, b in zip(order, order[1:])) and order[-1] > order[0]
        verdict.append("the study: the best model grows with the data. Here the best model from the smallest to the "
                       f"largest set is {' -> '.join(best[s] for s in sorted(best))}: "
                       + ("it grows (check the spreads above before calling it a result)" if grows
                          else "it does not grow"))
    return table, verdict, _model_plot(summ, png, models, sizes, rows, plan)


def _model_order(model: str, rows: list) -> float:
    """Models ordered by their training GFLOPs per sample (budget / samples seen)."""
    per = [float(r["gflops"]) / float(r["samples_seen"]) for r in rows
           if r["model"] == model and r.get("gflops") and r.get("samples_seen")]
    return statistics.mean(per) if per else 0.0


def _model_plot(summ: dict, path: str, models: list, sizes: list, rows: list, plan=None) -> Optional[str]:
    plt, _ = plotting()
    if plt is None:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for m in models:
        pts = [(s, summ[(m, str(s))]["metric"]) for s in sizes if (m, str(s)) in summ]
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[[p[1][0] - p[1][1] for p in pts],
                                                                     [p[1][2] - p[1][0] for p in pts]],
                    marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xlabel("pairs in the training set")
    ax.set_ylabel(f"{METRIC} (mean, range over seeds)")
    ax.set_title("Model vs data at equal compute")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    largest = max(int(r["dataset_size"]) for r in rows)
    for m in models:
        pts = sorted((float(r["gflops"]), 1 - float(r[METRIC])) for r in rows
                     if r["model"] == m and int(r["dataset_size"]) == largest and r.get(METRIC))
        dots = ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="none", label=m)
        law = next((c for c in (plan.candidates if plan is not None else []) if c.model == m), None)
        if law is not None:  # the fitted law, out to the plan's budget
            import numpy as np
            x = np.geomspace(min(p[0] for p in pts), plan.budget_gflops, 50)
            ax2.plot(x, law.fit.predict(x), color=dots[0].get_color(), linewidth=1,
                     label=f"{law.fit.formula(var='C')}")
            if law.interval:
                ax2.errorbar([plan.budget_gflops], [law.error], yerr=[[law.error - law.interval[0]],
                                                                      [law.interval[1] - law.error]],
                             color=dots[0].get_color(), capsize=3, marker="x")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.xaxis.set_minor_formatter(plt.NullFormatter())  # the decades only: minor labels overlap
    ax2.set_xlabel("training GFLOPs")
    ax2.set_ylabel(f"error (1 - {METRIC})")
    ax2.set_title(f"Error vs compute at {largest} pairs")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
