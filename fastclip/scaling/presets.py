"""The "Scaling (Down) CLIP" findings as sweep presets on the built-in dataset, sized for a 2-core CPU.

A preset is one or more sweeps (``fastclip.scaling.sweep``) written under one folder, then a
findings report: one table of every configuration's metrics as mean and range over its seeds, a
PNG, and a short verdict that compares what the study claims with what the runs show.  A
difference smaller than the seeds' spread is reported as such, never as a result.

* ``strategies``: CLIP, FLIP (mask 0.5 and 0.75, each with and without unmasked tuning over the
  last 20% of the budget), SLIP and CLIP + strong augmentation at equal compute, and CLIP +
  augmentation at half the data against CLIP at the full data (the study: augmentation reaches
  about CLIP's result with half the data; FLIP and SLIP trade places with CLIP with the budget).

The model is the demo's (``fastclip.train.demo.DEMO_MODEL``: a 4-block ViT of width 96 on 32-px
scenes), the budget about 300 CLIP steps of 128 samples, two seeds.
"""
from __future__ import annotations

import csv
import io
import os
import statistics
from typing import Optional, Sequence

from ..atomic import atomic_write_bytes
from ..lazy import plotting
from ..train.demo import DEMO_MODEL
from .results import load_results

__all__ = ["PRESETS", "preset_sweeps", "run_preset", "findings"]

METRIC = "zero_shot/top1"
SECOND = "retrieval/image_to_text_R@1"
_BUDGET = 1.2e4  # GFLOPs: about 300 CLIP steps of 128 samples with the demo model
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
PRESETS = ("strategies",)


def preset_sweeps(name: str, output_dir: str, *, seeds: Sequence[int] = (0, 1), budget_gflops: float = _BUDGET,
                  dataset_size: int = 20000, model: Optional[dict] = None) -> list:
    """``[(sub-sweep name, sweep config dict)]`` of preset ``name`` (arguments shrink it for tests)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    model = model or _MODEL
    data_root = os.path.join(output_dir, "data")

    def sweep(sub: str, strategies, size: int) -> tuple:
        return sub, {"name": f"{name}-{sub}", "output_dir": os.path.join(output_dir, sub),
                     "grid": {"models": [model], "strategies": strategies, "dataset_sizes": [size],
                              "caption_noise": [0.0], "budgets_gflops": [budget_gflops], "seeds": list(seeds)},
                     "base": {"log": {"progress": False}}, "data": {"root": data_root}}

    return [sweep("equal-compute", _STRATEGIES, dataset_size),
            sweep("half-data", ["clip", "clip_aug"], dataset_size // 2)]


def run_preset(name: str, output_dir: str, **kwargs) -> dict:
    """Run every sweep of the preset (each resumes where it stopped), then write the findings;
    returns :func:`findings`' dict."""
    from .sweep import SweepConfig, run_sweep
    tables = []
    for _, d in preset_sweeps(name, output_dir, **kwargs):
        tables.append(run_sweep(SweepConfig.from_dict(d)))
    return findings(name, tables, output_dir)


def _read(paths: Sequence[str]) -> list:
    return [r for p in paths for r in load_results(p) if r.get("status") == "finished"]


def _summary(rows: list, keys: Sequence[str]) -> dict:
    """{key tuple: {"metric": (mean, lo, hi), "second": ..., "seeds": n, "steps": mean}}."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = {}
    for k, rs in groups.items():
        def stat(col):
            vals = [float(r[col]) for r in rs if r.get(col) not in (None, "")]
            return (statistics.mean(vals), min(vals), max(vals)) if vals else (float("nan"),) * 3
        out[k] = {"metric": stat(METRIC), "second": stat(SECOND), "seeds": len(rs),
                  "steps": statistics.mean(float(r["steps"]) for r in rs)}
    return out


def _compare(a: dict, b: dict) -> str:
    """"0.412 vs 0.398: +0.014, within the seeds' spread" (a minus b, spread = the wider range)."""
    (ma, la, ha), (mb, lb, hb) = a["metric"], b["metric"]
    diff, spread = ma - mb, max(ha - la, hb - lb)
    within = abs(diff) <= spread
    return (f"{ma:.3f} vs {mb:.3f}: {diff:+.3f}, "
            + ("within the seeds' spread" if within else f"beyond the seeds' spread ({spread:.3f})"))


def findings(name: str, tables: Sequence[str], output_dir: str) -> dict:
    """Write ``findings.md``, ``findings.png`` and ``results.csv`` (every sub-sweep's rows) under
    ``output_dir``; returns ``{"markdown", "verdict": [lines], "png" (or None), "results"}``."""
    rows = _read(tables)
    if not rows:
        raise ValueError(f"preset {name!r}: no finished run in {list(tables)}")
    os.makedirs(output_dir, exist_ok=True)
    merged = os.path.join(output_dir, "results.csv")
    cols = list(rows[0])
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, cols, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(merged, buf.getvalue().encode())
    summ = _summary(rows, ("strategy", "dataset_size"))
    full = max(int(k[1]) for k in summ)
    half = min(int(k[1]) for k in summ)
    table = [f"| strategy | pairs | steps | {METRIC} (mean, range over seeds) | {SECOND} | seeds |",
             "|---|---:|---:|---|---|---:|"]
    for (strategy, size), s in sorted(summ.items(), key=lambda kv: (-int(kv[0][1]), -kv[1]["metric"][0])):
        m, r2 = s["metric"], s["second"]
        table.append(f"| {strategy} | {size} | {s['steps']:.0f} | {m[0]:.3f} ({m[1]:.3f}-{m[2]:.3f}) | "
                     f"{r2[0]:.3f} ({r2[1]:.3f}-{r2[2]:.3f}) | {s['seeds']} |")
    at = {k[0]: v for k, v in summ.items() if int(k[1]) == full}
    verdict = []
    if "clip" in at:
        for other in [s for s in at if s != "clip"]:
            verdict.append(f"{other} vs CLIP at equal compute: {_compare(at[other], at['clip'])}")
    halves = {k[0]: v for k, v in summ.items() if int(k[1]) == half}
    if half != full and "clip_aug" in halves and "clip" in at:
        verdict.append(f"CLIP+Aug at half the data ({half}) vs CLIP at the full data ({full}) — the study: about "
                       f"equal: {_compare(halves['clip_aug'], at['clip'])}")
    png = _plot(summ, os.path.join(output_dir, "findings.png"), full)
    md = [f"# Preset {name}: findings", "", *table, "", "Verdict (differences are mean over seeds; the spread "
          "is the wider of the two ranges):", "", *[f"- {v}" for v in verdict], ""]
    if png:
        md += [f"![{name}]({os.path.basename(png)})", ""]
    atomic_write_bytes(os.path.join(output_dir, "findings.md"), "\n".join(md).encode())
    return {"markdown": "\n".join(md), "verdict": verdict, "png": png, "results": merged}


def _plot(summ: dict, path: str, full: int) -> Optional[str]:
    plt, _ = plotting()
    if plt is None:
        return None
    items = sorted(summ.items(), key=lambda kv: (-int(kv[0][1]), kv[0][0]))
    labels = [f"{k[0]}" + ("" if int(k[1]) == full else f"\n(n={k[1]})") for k, _ in items]
    means = [v["metric"][0] for _, v in items]
    errs = [[v["metric"][0] - v["metric"][1] for _, v in items], [v["metric"][2] - v["metric"][0] for _, v in items]]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    ax.bar(range(len(items)), means, yerr=errs, capsize=3, color="#4C72B0")
    ax.set_xticks(range(len(items)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel(f"{METRIC} (mean, range over seeds)")
    ax.set_title("Strategies at equal compute")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
