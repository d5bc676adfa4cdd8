"""Tables and plots of the loss suite (``test_loss_bench.py``), for ``benchmarks/report.py``.

Per (loss, device, dtype, D, mode) a table of N x provider with the median time and its spread
(IQR, and the number of rounds), the ratio to the 8 N^2 D (CLIP fwd+bwd; see test_loss_bench.py for
the other modes) floor, the achieved GFLOP/s, and the peak extra memory; cases that were skipped
(e.g. materialised logits that cannot fit) appear with their reason instead of a number.  A compact
provider x N summary (``--readme`` prints it) and, with matplotlib, one PNG per section.

Loss ratios use the session's best measured matmul rate (the higher of the measurements at the
start and at the end of the run), so they never flatter a result measured after a slow start;
the per-result ``ratio_to_floor`` in the JSON uses the start measurement.  A start/end difference
above 10% is reported as a sign that the machine was not quiet.
"""
from __future__ import annotations

import os
import re
import sys
from collections import defaultdict

from report import (MODE_ORDER, best_rates, fmt, fmt_time, machine_lines, matmul_rates, order_of, rate_key,
                    short_reason)

SUITE = "loss"
PROVIDER_ORDER = ("chunked", "triton", "reference", "open_clip")
FLOOR_TEXT = {"clip": {"fwd": "2 N²D", "bwd": "6 N²D", "fwd+bwd": "8 N²D"},
              "siglip": {"fwd": "2 N²D", "bwd": "4 N²D", "fwd+bwd": "6 N²D"}}


def build(raw: dict, records: list, skipped: list, path: str) -> dict:
    """The loss rows (one per result, floors at the session's best rate) and skipped cases of ``raw``."""
    rates = matmul_rates(raw)
    best_rate = best_rates(rates)
    rows = []
    for b in records:
        e = b.get("extra_info") or {}
        if "loss" not in e or "provider" not in e:
            continue
        st = b["stats"]
        key = rate_key(e["device"], e["dtype"], e["D"])
        rate = best_rate.get(key, e.get("matmul_gflops"))
        median = st["median"]
        floor_s = e["flops"] / (rate * 1e9) if rate else None
        rows.append({**e, "median_s": median, "iqr_s": st.get("iqr"), "stddev_s": st.get("stddev"),
                     "rounds": st.get("rounds"), "rate_gflops": rate, "floor_s": floor_s,
                     "ratio": median / floor_s if floor_s else None, "gflops": e["flops"] / median / 1e9})

    skips, elsewhere = [], defaultdict(int)
    devices_run = {(r["device"], r["dtype"]) for r in rows}
    for s in skipped:
        p = dict(s.get("params") or {})
        m = re.search(r"test_(\w+?)_loss\[", s.get("nodeid", ""))
        if not m or "provider" not in p:
            continue
        p["loss"] = m.group(1)
        p["reason"] = s.get("reason", "")
        if (p.get("device"), p.get("dtype")) in devices_run:
            skips.append(p)
        else:
            elsewhere[(p.get("device"), p["reason"])] += 1
    return {"raw": raw, "rates": rates, "best_rate": best_rate, "rows": rows, "skipped": skips,
            "skipped_elsewhere": dict(elsewhere), "path": path}


def machine(rep) -> list:
    """The machine section of a loss report: floors at the session's best rate."""
    return machine_lines(rep["raw"], floors="best", cuda=any(r["device"] == "cuda" for r in rep["rows"]))


def _provider_key(p):
    return order_of(p, PROVIDER_ORDER)


def _sections(rep):
    keys = {(r["loss"], r["device"], r["dtype"], r["D"]) for r in rep["rows"]}
    return sorted(keys, key=lambda k: (k[0] != "clip", k[1], k[2], k[3]))


def loss_agreement(rep) -> list:
    """Providers whose loss value differs from chunked's at the same case: a benchmark of a wrong
    computation is worthless, so say so."""
    by = defaultdict(dict)
    for r in rep["rows"]:
        by[(r["loss"], r["device"], r["dtype"], r["D"], r["N"])][r["provider"]] = r.get("loss_value")
    out = []
    for key, vals in sorted(by.items()):
        ref = vals.get("chunked")
        tol = 1e-3 if key[2] in ("float32", "float64") else 2e-2
        for p, v in vals.items():
            if ref is not None and v is not None and abs(v - ref) > tol * max(1.0, abs(ref)):
                out.append(f"- {key[0]} {key[1]} {key[2]} N={key[4]}: {p} loss {v:.6g} vs chunked {ref:.6g}")
    return out


def _pick(items, loss, device, dtype, d, mode=None):
    return [x for x in items if (x["loss"], x["device"], x["dtype"], x["D"]) == (loss, device, dtype, d)
            and (mode is None or x["mode"] == mode)]


def mode_table(rep, loss, device, dtype, d, mode) -> list:
    rows = _pick(rep["rows"], loss, device, dtype, d, mode)
    skips = _pick(rep["skipped"], loss, device, dtype, d, mode)
    if not rows and not skips:
        return []
    lines = [(f"| N | provider | median | IQR | rounds | × floor ({FLOOR_TEXT[loss][mode]}) | "
              "% of matmul rate | GFLOP/s | peak extra MB | of which grads MB |"),
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    entries = [(r["N"], _provider_key(r["provider"]), r, None) for r in rows]
    entries += [(s["N"], _provider_key(s["provider"]), None, s) for s in skips]
    for n, _, r, s in sorted(entries, key=lambda t: (t[0], t[1])):
        if r is not None:
            iqr = fmt_time(r["iqr_s"]) if r["rounds"] > 1 else "—"
            pct = fmt(r["ratio"] and 100 / r["ratio"], ".0f")
            lines.append(f"| {n} | {r['provider']} | {fmt_time(r['median_s'])} | {iqr} | {r['rounds']} | "
                         f"{fmt(r['ratio'], '.2f')} | {pct} | {r['gflops']:.1f} | "
                         f"{fmt(r.get('peak_extra_mb'), '.1f')} | {fmt(r.get('grad_mb'), '.1f')} |")
        else:
            lines.append(f"| {n} | {s['provider']} | {short_reason(s['reason'])} | | | | | | | |")
    return lines


def summary_tables(rep, mode="fwd+bwd") -> list:
    """Compact provider x N tables for the README: ratio to floor (median time, peak MB)."""
    out = []
    for loss, device, dtype, d in _sections(rep):
        rows = _pick(rep["rows"], loss, device, dtype, d, mode)
        skips = _pick(rep["skipped"], loss, device, dtype, d, mode)
        if not rows:
            continue
        ns = sorted({r["N"] for r in rows} | {s["N"] for s in skips})
        provs = sorted({r["provider"] for r in rows} | {s["provider"] for s in skips}, key=_provider_key)
        rate = rep["best_rate"].get(rate_key(device, dtype, d), float("nan"))
        out.append(f"**{loss.upper()} {mode}, {device} {dtype}, D = {d}**: × floor ({FLOOR_TEXT[loss][mode]} "
                   f"at {rate:.0f} GFLOP/s), median time, peak extra memory")
        out.append("")
        out.append("| provider | " + " | ".join(f"N = {n}" for n in ns) + " |")
        out.append("|---|" + "---:|" * len(ns))
        for p in provs:
            cells = []
            for n in ns:
                r = next((r for r in rows if r["provider"] == p and r["N"] == n), None)
                s = next((s for s in skips if s["provider"] == p and s["N"] == n), None)
                if r is not None:
                    mem = f", {r['peak_extra_mb']:.0f} MB" if r.get("peak_extra_mb") is not None else ""
                    cells.append(f"{fmt(r['ratio'], '.2f')}× ({fmt_time(r['median_s'])}{mem})")
                elif s is not None:
                    cells.append(short_reason(s["reason"]).replace("not run: ", ""))
                else:
                    cells.append("")
            out.append(f"| {p} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def markdown(rep, plots: list) -> str:
    src = os.path.basename(rep["path"])
    out = [f"# Loss benchmarks: {src}", "", "## Machine", ""] + machine(rep) + [""]
    bad = loss_agreement(rep)
    if bad:
        out += ["## Warning: loss values disagree", ""] + bad + [""]
    out += ["## Summary (fwd+bwd)", ""] + summary_tables(rep)
    for loss, device, dtype, d in _sections(rep):
        out += [f"## {loss.upper()} on {device}, {dtype}, D = {d}", ""]
        for mode in MODE_ORDER:
            t = mode_table(rep, loss, device, dtype, d, mode)
            if t:
                out += [f"### {mode}", ""] + t + [""]
        for p in plots:
            if f"_{loss}_{device}_{dtype}_D{d}." in p:
                out += [f"![{loss} {device} {dtype}]({os.path.basename(p)})", ""]
    for (device, reason), count in sorted(rep["skipped_elsewhere"].items()):
        out.append(f"- {count} {device} cases not run: {reason}")
    out += ["", ("Median over the timed rounds; IQR is the spread (— with one round).  × floor = median / "
                 "(FLOPs / measured matmul rate); % of matmul rate = 100 / (× floor).  GFLOP/s = floor "
                 "FLOPs / median.  Peak extra memory counts everything one call allocates beyond its "
                 "inputs (workspace, saved tensors, gradients)."), ""]
    return "\n".join(out)


def plot(rep, out_dir: str, stem: str) -> list:
    """One PNG per (loss, device, dtype, D): time / floor, fwd+bwd time, fwd+bwd peak memory against N."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install matplotlib)", file=sys.stderr)
        return []
    styles = {"fwd": ":", "bwd": "--", "fwd+bwd": "-"}
    written = []
    for loss, device, dtype, d in _sections(rep):
        rows = _pick(rep["rows"], loss, device, dtype, d)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        provs = sorted({r["provider"] for r in rows}, key=_provider_key)
        colors = {p: f"C{i}" for i, p in enumerate(provs)}
        for p in provs:
            for mode in MODE_ORDER:
                pts = sorted((r["N"], r) for r in rows if r["provider"] == p and r["mode"] == mode)
                if not pts:
                    continue
                ns = [n for n, _ in pts]
                kw = dict(color=colors[p], linestyle=styles[mode], marker="o", markersize=3)
                axes[0].plot(ns, [r["ratio"] for _, r in pts], label=f"{p} {mode}", **kw)
                if mode == "fwd+bwd":
                    axes[1].errorbar(ns, [r["median_s"] for _, r in pts],
                                     yerr=[(r["iqr_s"] or 0) / 2 for _, r in pts], label=p, capsize=2, **kw)
                    mem = [(n, r["peak_extra_mb"]) for n, r in pts if r.get("peak_extra_mb") is not None]
                    if mem:
                        axes[2].plot([n for n, _ in mem], [m for _, m in mem], label=p, **kw)
        axes[0].axhline(1.0, color="gray", linewidth=0.8)
        axes[0].set(xscale="log", title="time / floor (all modes)", xlabel="N", ylabel="× floor")
        axes[1].set(xscale="log", yscale="log", title="fwd+bwd median time (bars: IQR)",
                    xlabel="N", ylabel="s")
        axes[2].set(xscale="log", yscale="log", title="fwd+bwd peak extra memory", xlabel="N", ylabel="MB")
        all_ns = sorted({r["N"] for r in rows})
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_ns, [str(n) for n in all_ns])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        rate = rep["best_rate"].get(rate_key(device, dtype, d))
        fig.suptitle(f"{loss.upper()} loss, {device} {dtype}, D = {d}"
                     + (f" (floor at {rate:.0f} GFLOP/s)" if rate else ""))
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}_{loss}_{device}_{dtype}_D{d}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
