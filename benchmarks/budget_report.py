"""Tables and the plot of the budget suite (``test_budget_bench.py``), for ``benchmarks/report.py``:
training throughput against training compute per sample for every model x strategy, and the wall
time each needs to spend a set of compute budgets on the machine that ran it."""
from __future__ import annotations

import os

from report import fmt

SUITE = "budget"
TITLE = "Compute-budget"
SECTION = "Throughput against compute budget"
STRATEGY_ORDER = ("clip", "flip0.5", "flip0.75", "slip", "clip_aug")


def _rows(records: list) -> list:
    rows = [b.get("extra_info") or {} for b in records]
    return [e for e in rows if e.get("kind") == "budget"]


def _duration(seconds) -> str:
    if seconds is None:
        return "—"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def tables(raw: dict, records: list, skipped: list) -> list:
    """One table per device: model, strategy, throughput, compute per sample, share of the matmul
    rate, and the time to spend each budget."""
    rows = _rows(records)
    if not rows:
        return []
    out = []
    for device in sorted({e["device"] for e in rows}):
        mine = [e for e in rows if e["device"] == device]
        budgets = list(mine[0]["seconds_to_budget"])
        first = mine[0]
        out += [f"{device}: {first['image_size']} px, {first['dtype']}, one training step as the trainer runs it "
                f"(matmul rate {fmt(first.get('matmul_gflops'), '.0f')} GFLOP/s)"
                + ("; **quick mode: the timings mean nothing**" if first.get("quick") else ""), "",
                "| model | strategy | batch | train GFLOPs / sample (counted / run) | samples/s | GFLOP/s run "
                "| of the matmul rate | "
                + " | ".join(f"time for {b} FLOPs" for b in budgets) + " |",
                "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(budgets)]
        order = {s: i for i, s in enumerate(STRATEGY_ORDER)}
        size = {}  # models in order of their compute per sample
        for e in mine:
            size[e["model"]] = min(size.get(e["model"], float("inf")), e["train_gflops_per_sample"])
        for e in sorted(mine, key=lambda e: (size[e["model"]], e["model"], order.get(e["strategy"], 99))):
            share = 100 * e["fraction_of_matmul_rate"] if e.get("fraction_of_matmul_rate") else None
            gf = f"{fmt(e['train_gflops_per_sample'], '.3g')} / {fmt(e.get('run_gflops_per_sample'), '.3g')}"
            out.append(f"| {e['model']} | {e['strategy']} | {e['batch']} | {gf} "
                       f"| {fmt(e['samples_per_s'], '.1f')} | {fmt(e['achieved_gflops'], '.1f')} | {fmt(share, '.0f')}% | "
                       + " | ".join(_duration(e["seconds_to_budget"].get(b)) for b in budgets) + " |")
        out.append("")
    reasons = sorted({s.get("reason", "") for s in skipped if "test_budget" in s.get("nodeid", "")})
    if reasons:
        out += ["Skipped: " + "; ".join(r for r in reasons if r), ""]
    out.pop()
    return out


def plots(raw: dict, records: list, out_dir: str, stem: str) -> list:
    """``<stem>.png``: samples/s against training GFLOPs per sample (log-log), one colour per
    strategy, one marker per device; returns the paths written (none without matplotlib)."""
    from fastclip.lazy import plotting
    rows = _rows(records)
    plt, _ = plotting()
    if not rows or plt is None:
        return []
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    colours = dict(zip(STRATEGY_ORDER, ("#4C72B0", "#DD8452", "#C44E52", "#55A868", "#8172B3")))
    for device, marker in (("cpu", "o"), ("cuda", "s")):
        for strategy in STRATEGY_ORDER:
            pts = [e for e in rows if e["device"] == device and e["strategy"] == strategy]
            if not pts:
                continue
            ax.scatter([e["train_gflops_per_sample"] for e in pts], [e["samples_per_s"] for e in pts], marker=marker,
                       color=colours[strategy], s=28, label=f"{strategy} ({device}, {pts[0]['image_size']} px)")
            if strategy == "clip":
                for e in pts:
                    ax.annotate(e["model"], (e["train_gflops_per_sample"], e["samples_per_s"]), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute per sample as a budget counts it (GFLOPs, 3 x forward)")
    ax.set_ylabel("training throughput (samples/s)")
    ax.set_title("Throughput against compute per sample")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}.png")
    fig.savefig(path)
    plt.close(fig)
    return [path]
