"""Turn a pytest-benchmark JSON from ``pytest benchmarks/`` into markdown tables and PNG plots.

    pytest benchmarks/ --benchmark-json=benchmarks/results/cpu.json
    python benchmarks/report.py benchmarks/results/cpu.json            # writes cpu.md and cpu_*.png
    python benchmarks/report.py benchmarks/results/cpu.json --readme   # also prints the README tables

The JSON is the raw record.  This script only reads it.  Data-pipeline records
(``test_data_bench.py``) become a loader table (images/s, ratio to the PIL fallback, time to the
first batch), a tokenizer table and the dataset-generation time.  Loss records: per (loss,
device, dtype, D, mode) a table
of N x provider with the median time and its spread (IQR, and the number of rounds), the ratio to
the 8 N^2 D (CLIP fwd+bwd; see test_loss_bench.py for the other modes) floor, the achieved
GFLOP/s, and the peak extra memory; cases that were skipped (e.g. materialised logits that cannot
fit) appear with their reason instead of a number.

Ratios here use the session's best measured matmul rate (the higher of the measurements at the
start and at the end of the run), so they never flatter a result measured after a slow start;
the per-result ``ratio_to_floor`` in the JSON uses the start measurement.  A start/end difference
above 10% is reported as a sign that the machine was not quiet.

Plots need matplotlib (``pip install matplotlib``); without it the tables are still written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

PROVIDER_ORDER = ("chunked", "triton", "reference", "open_clip")
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")
FLOOR_TEXT = {"clip": {"fwd": "2 N²D", "bwd": "6 N²D", "fwd+bwd": "8 N²D"},
              "siglip": {"fwd": "2 N²D", "bwd": "4 N²D", "fwd+bwd": "6 N²D"}}
DRIFT_WARN = 0.10


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _rate_key(device, dtype, d):
    return f"{device}/{dtype}/D={d}"


def load(path: str) -> dict:
    with open(path) as f:
        raw = json.load(f)
    fc = raw.get("fastclip") or {}
    rates = fc.get("matmul_rates") or raw.get("machine_info", {}).get("fastclip", {}).get("matmul_rates")
    rates = rates or {}
    best_rate = {k: max(v[p]["gflops"] for p in ("start", "end") if p in v) for k, v in rates.items()}

    rows = []
    for b in raw.get("benchmarks", []):
        e = b.get("extra_info") or {}
        if "loss" not in e or "provider" not in e:
            continue  # another suite's benchmark (e.g. the distributed one): not this report's business
        st = b["stats"]
        key = _rate_key(e["device"], e["dtype"], e["D"])
        rate = best_rate.get(key, e.get("matmul_gflops"))
        median = st["median"]
        floor_s = e["flops"] / (rate * 1e9) if rate else None
        rows.append({**e, "median_s": median, "iqr_s": st.get("iqr"), "stddev_s": st.get("stddev"),
                     "rounds": st.get("rounds"), "rate_gflops": rate, "floor_s": floor_s,
                     "ratio": median / floor_s if floor_s else None, "gflops": e["flops"] / median / 1e9})

    skipped, elsewhere = [], defaultdict(int)
    devices_run = {(r["device"], r["dtype"]) for r in rows}
    for s in fc.get("skipped", []):
        p = dict(s.get("params") or {})
        m = re.search(r"test_(\w+?)_loss\[", s.get("nodeid", ""))
        if not m or "provider" not in p:
            continue
        p["loss"] = m.group(1)
        p["reason"] = s.get("reason", "")
        if (p.get("device"), p.get("dtype")) in devices_run:
            skipped.append(p)
        else:
            elsewhere[(p.get("device"), p["reason"])] += 1
    return {"raw": raw, "fc": fc, "rates": rates, "best_rate": best_rate, "rows": rows,
            "skipped": skipped, "skipped_elsewhere": dict(elsewhere), "path": path}


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def _t(x):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def _f(x, fmt):
    return "—" if x is None else format(x, fmt)


def _provider_key(p):
    return PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _short_reason(reason: str) -> str:
    if reason.startswith("cannot fit"):
        m = re.search(r"needs ~([\d.]+ GB)", reason)
        return f"cannot fit (needs ~{m.group(1)})" if m else "cannot fit"
    if reason.startswith("not run on CPU above"):
        m = re.search(r"needs ~([\d.]+ GB) of ([\d.]+ GB)", reason)
        return f"not run: O(N²) memory (~{m.group(1)} of {m.group(2)} RAM)" if m else "not run: O(N²) memory"
    if reason.startswith("runtime budget"):
        return "not run: runtime budget (fwd+bwd only at this N)"
    return reason if len(reason) <= 90 else reason[:87] + "..."


def _sections(rep):
    keys = {(r["loss"], r["device"], r["dtype"], r["D"]) for r in rep["rows"]}
    return sorted(keys, key=lambda k: (k[0] != "clip", k[1], k[2], k[3]))


def machine_lines(rep) -> list[str]:
    raw, fc = rep["raw"], rep["fc"]
    mi = raw.get("machine_info", {}).get("fastclip", {}).get("machine") or {}
    cpu = mi.get("cpu", {})
    out = []
    if cpu:
        fms = cpu.get("family/model/stepping")
        extra = ", ".join(x for x in (f"family/model/stepping {fms}" if fms else "", cpu.get("simd", ""),
                                      "VM" if cpu.get("hypervisor") else "") if x)
        out.append(f"- CPU: {cpu.get('model')} ({extra}); {mi.get('usable_cpus')} usable CPUs, "
                   f"{mi.get('torch_threads')} torch threads; {mi.get('ram_gb')} GB RAM")
    if mi:
        out.append(f"- torch {mi.get('torch')} (BLAS: {mi.get('blas')}), Python {mi.get('python')}")
    gpu = mi.get("gpu")
    out.append(f"- GPU: {gpu['name']} ({gpu['memory_gb']} GB, sm {gpu['capability']}, CUDA {gpu['cuda']}, "
               f"TF32 matmul {'on' if gpu['allow_tf32'] else 'off'})" if gpu else "- GPU: none")
    for key, v in sorted(rep["rates"].items()):
        s, e = v.get("start", {}), v.get("end", {})
        line = (f"- dense matmul rate {key}: {_f(s.get('gflops'), '.1f')} GFLOP/s at the start, "
                f"{_f(e.get('gflops'), '.1f')} at the end ({s.get('shape', '?')}, best GEMM after "
                f"{s.get('warmup_s', '?')} s of warm-up); floors below use {rep['best_rate'][key]:.1f}")
        if s.get("gflops") and e.get("gflops"):
            drift = abs(s["gflops"] - e["gflops"]) / max(s["gflops"], e["gflops"])
            if drift > DRIFT_WARN:
                line += f"  \n  **warning: start and end differ by {drift:.0%}: the machine was not quiet**"
        out.append(line)
    mem = fc.get("memory_method")
    if mem:
        checks = ", ".join(f"{c['allocated_mib']} MiB seen as {c['seen_mib']} MiB"
                           for c in mem.get("checks", []))
        verdict = "passed" if mem.get("ok") else "FAILED (CPU peaks not recorded)"
        out.append(f"- peak memory (CPU): {mem.get('method')}; self-check {verdict}"
                   + (f": {checks}" if checks else "") + (f" ({mem['reason']})" if mem.get("reason") else ""))
    if any(r["device"] == "cuda" for r in rep["rows"]):
        out.append("- peak memory (CUDA): torch.cuda.max_memory_allocated after reset_peak_memory_stats")
    ci = raw.get("commit_info") or {}
    if ci.get("id"):
        dirty = " (dirty tree)" if ci.get("dirty") else ""
        out.append(f"- commit {ci['id'][:12]}{dirty}, run {raw.get('datetime', '?')}")
    if fc.get("quick"):
        out.append("- **quick mode: tiny sizes, the timings mean nothing**")
    return out


def loss_agreement(rep) -> list[str]:
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


def mode_table(rep, loss, device, dtype, d, mode) -> list[str]:
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
            iqr = _t(r["iqr_s"]) if r["rounds"] > 1 else "—"
            pct = _f(r["ratio"] and 100 / r["ratio"], ".0f")
            lines.append(f"| {n} | {r['provider']} | {_t(r['median_s'])} | {iqr} | {r['rounds']} | "
                         f"{_f(r['ratio'], '.2f')} | {pct} | {r['gflops']:.1f} | "
                         f"{_f(r.get('peak_extra_mb'), '.1f')} | {_f(r.get('grad_mb'), '.1f')} |")
        else:
            lines.append(f"| {n} | {s['provider']} | {_short_reason(s['reason'])} | | | | | | | |")
    return lines


def summary_tables(rep, mode="fwd+bwd") -> list[str]:
    """Compact provider x N tables for the README: ratio to floor (median time, peak MB)."""
    out = []
    for loss, device, dtype, d in _sections(rep):
        rows = _pick(rep["rows"], loss, device, dtype, d, mode)
        skips = _pick(rep["skipped"], loss, device, dtype, d, mode)
        if not rows:
            continue
        ns = sorted({r["N"] for r in rows} | {s["N"] for s in skips})
        provs = sorted({r["provider"] for r in rows} | {s["provider"] for s in skips}, key=_provider_key)
        rate = rep["best_rate"].get(_rate_key(device, dtype, d), float("nan"))
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
                    cells.append(f"{_f(r['ratio'], '.2f')}× ({_t(r['median_s'])}{mem})")
                elif s is not None:
                    cells.append(_short_reason(s["reason"]).replace("not run: ", ""))
                else:
                    cells.append("")
            out.append(f"| {p} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def markdown(rep, plots: list[str]) -> str:
    src = os.path.basename(rep["path"])
    out = [f"# Loss benchmarks: {src}", "", "## Machine", ""] + machine_lines(rep) + [""]
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


# ----------------------------------------------------------------------------------------------
# Data-pipeline records (test_data_bench.py)
# ----------------------------------------------------------------------------------------------
LOADER_ORDER = ("pil", "dali", "dali-mixed")


def data_tables(raw: dict) -> list[str]:
    """Markdown for the loader, tokenizer and dataset-generation records of a data-bench JSON
    (empty when it has none)."""
    loaders, tokenizers, other = {}, {}, []
    for b in raw.get("benchmarks", []):
        e = b.get("extra_info") or {}
        if e.get("kind") == "loader":
            loaders[(e["set"], e["preset"], e["provider"])] = e
        elif e.get("kind") == "tokenizer":
            tokenizers[e["provider"]] = e
        elif "samples" in e and "seconds" in e:
            other.append((b["name"], e))
    out = []
    if loaders:
        first = next(iter(loaders.values()))
        out += [f"Loader: images/s of decode + augment + tokenise, {first.get('threads')} threads, batch "
                f"{first.get('batch')}, {first.get('images')} images an epoch ({first.get('machine', '')})"
                + ("; **quick mode: the timings mean nothing**" if first.get("quick") else ""), "",
                "| set | preset | provider | images/s | × PIL fallback | first batch |",
                "|---|---|---|---:|---:|---:|"]
        for (st, preset, prov), e in sorted(loaders.items(), key=lambda kv: (
                kv[0][0], kv[0][1], LOADER_ORDER.index(kv[0][2]) if kv[0][2] in LOADER_ORDER else 9)):
            out.append(f"| {st} ({e.get('out_px')} px out) | {preset} | {prov} | {e['images_per_s']:.0f} | "
                       f"{_f(e.get('x_pil'), '.2f')} | {_f(e.get('first_batch_s'), '.3f')} s |")
        out.append("")
    if tokenizers:
        out += ["| tokenizer | captions/s | × open_clip | ids identical to open_clip |",
                "|---|---:|---:|---|"]
        for prov, e in sorted(tokenizers.items()):
            out.append(f"| {prov} | {e['captions_per_s']:.0f} | {_f(e.get('x_open_clip'), '.1f')} | "
                       f"{'yes' if e.get('ids_identical_to_open_clip') else '—'} |")
        out.append("")
    for name, e in other:
        target = f" (target {e['target_s']:g} s)" if e.get("target_s") else ""
        out.append(f"- {name}: {e['samples']} samples in {e['seconds']:.2f} s{target}")
    return out


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def plot(rep, out_dir: str, stem: str) -> list[str]:
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
        rate = rep["best_rate"].get(_rate_key(device, dtype, d))
        fig.suptitle(f"{loss.upper()} loss, {device} {dtype}, D = {d}"
                     + (f" (floor at {rate:.0f} GFLOP/s)" if rate else ""))
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}_{loss}_{device}_{dtype}_D{d}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="pytest-benchmark JSON written with --benchmark-json")
    ap.add_argument("--out-dir", help="where to write <stem>.md and the PNGs (default: the JSON's folder)")
    ap.add_argument("--readme", action="store_true", help="print the compact fwd+bwd tables for the README")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    args = ap.parse_args(argv)

    rep = load(args.json)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.json))[0]
    data = data_tables(rep["raw"])
    if data:
        md_path = os.path.join(out_dir, f"{stem}.md")
        with open(md_path, "w") as f:
            title = f"# Data-pipeline benchmarks: {os.path.basename(args.json)}"
            f.write("\n".join([title, ""] + data) + "\n")
        print(f"wrote {md_path}")
        if args.readme:
            print("\n".join(data))
    if not rep["rows"]:
        if not data:
            print(f"{args.json}: no loss or data benchmark results in it", file=sys.stderr)
            return 1
        return 0
    if data:
        stem += "-loss"
    plots = [] if args.no_plots else plot(rep, out_dir, stem)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w") as f:
        f.write(markdown(rep, plots))
    print(f"wrote {md_path}" + "".join(f"\nwrote {p}" for p in plots))
    if args.readme:
        print()
        print("\n".join(machine_lines(rep)))
        print()
        print("\n".join(summary_tables(rep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
