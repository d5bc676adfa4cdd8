"""Turn the benchmark suites' JSON records into markdown tables (and, for the loss suite, PNG plots).

    pytest benchmarks/test_loss_bench.py --benchmark-json=benchmarks/results/loss-cpu.json
    python benchmarks/report.py benchmarks/results/loss-cpu.json            # loss-cpu.md, loss-cpu_*.png
    python benchmarks/report.py benchmarks/results/loss-cpu.json --readme   # also prints the README tables
    python benchmarks/report.py benchmarks/results/distributed_loss_cpu_N32768_D512_P2.json

The JSON is the raw record.  This script only reads it, and writes ``<stem>.md`` beside it (or in
``--out-dir``) with the tables of every suite it holds.  Each suite's tables live next to it, in
``benchmarks/<suite>_report.py`` (``tables(raw, records, skipped) -> markdown lines``; the loss
suite's module also draws the plots); this file keeps what they share: reading the JSON and sorting
its records by suite, the machine section, the formatting helpers and the command line.

Which suite a record belongs to: its ``extra_info["suite"]`` (written by ``benchmarks/conftest.py``
from the suite module's ``SUITE``); in older files that lack it, the module named in the record's
``fullname`` (``benchmarks/test_<suite>_bench.py::...``).  Skipped cases are sorted by their node
id the same way.  The distributed benchmark writes its own JSON (not pytest-benchmark's), named by
its top-level ``suite`` or, in older files, ``"benchmark": "distributed_loss"``.

The suites, in the order a report of several shows them: data (``data_report.py``), attention
(``attention_report.py``), encoders (``encoder_report.py``), training (``train_report.py``) and the
distributed loss (``distributed_report.py``), all in ``<stem>.md``; the loss suite
(``loss_report.py``) goes to ``<stem>.md`` too, or to ``<stem>-loss.md`` when the JSON also holds
another suite (a JSON from the whole ``pytest benchmarks/``).  Each says what machine it ran on and
warns when the run was made in quick mode.

Plots need matplotlib (``pip install matplotlib``); without it the tables are still written.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
# Suites whose tables go into <stem>.md, in the order a report of several shows them.
TABLE_SUITES = ("data", "attention", "encoder", "train", "eval", "budget", "distributed")
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")
DRIFT_WARN = 0.10
QUICK_NOTE = "; **quick mode: tiny sizes, the timings mean nothing**"
VIT_FAMILIES = ("Ti", "S", "M", "B", "L", "H", "g", "bigG")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def load(path: str) -> dict:
    """The JSON record as written."""
    with open(path) as f:
        return json.load(f)


def suite_of_nodeid(nodeid: str):
    """``"loss"`` for ``benchmarks/test_loss_bench.py::test_clip_loss[...]``; None for anything else."""
    m = re.search(r"(?:^|/)test_(\w+?)_bench\.py::", nodeid or "")
    return m.group(1) if m else None


def suite_of_record(b: dict):
    """The suite of one pytest-benchmark record: its ``extra_info["suite"]``, else its test module."""
    return (b.get("extra_info") or {}).get("suite") or suite_of_nodeid(b.get("fullname", ""))


def suite_of_json(raw: dict):
    """The suite of a JSON that is not pytest-benchmark's (the distributed benchmark's own), or None."""
    if raw.get("suite"):
        return raw["suite"]
    return "distributed" if raw.get("benchmark") == "distributed_loss" else None


def by_suite(raw: dict) -> dict:
    """``{suite: (records, skipped cases)}`` of a JSON, each list in the file's order."""
    out = defaultdict(lambda: ([], []))
    for b in raw.get("benchmarks", []):
        suite = suite_of_record(b)
        if suite:
            out[suite][0].append(b)
    for s in (raw.get("fastclip") or {}).get("skipped", []):
        suite = suite_of_nodeid(s.get("nodeid", ""))
        if suite:
            out[suite][1].append(s)
    own = suite_of_json(raw)
    if own and own not in out:
        out[own] = ([], [])  # present, with no pytest-benchmark records
    return dict(out)


def suite_module(suite: str):
    """``benchmarks/<suite>_report.py``, imported."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module(f"{suite}_report")


def matmul_rates(raw: dict) -> dict:
    """``{"<device>/<dtype>/D=<inner>": {"start": record, "end": record}}`` as the conftest wrote them."""
    fc = raw.get("fastclip") or {}
    rates = fc.get("matmul_rates") or raw.get("machine_info", {}).get("fastclip", {}).get("matmul_rates")
    return rates or {}


def best_rates(rates: dict) -> dict:
    """The higher of the start and end measurement (GFLOP/s) per key."""
    return {k: max(v[p]["gflops"] for p in ("start", "end") if p in v) for k, v in rates.items()}


def rate_key(device, dtype, d) -> str:
    return f"{device}/{dtype}/D={d}"


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def fmt_time(x) -> str:
    """Seconds as ``12.3 ms`` or ``4.56 s``; ``—`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def fmt(x, spec: str) -> str:
    """``format(x, spec)``, ``—`` for None."""
    return "—" if x is None else format(x, spec)


def yes_no(flag) -> str:
    return "—" if flag is None else ("yes" if flag else "**no**")


def order_of(value, order) -> int:
    """Position of ``value`` in ``order`` (unknown values last)."""
    return order.index(value) if value in order else len(order)


def short_reason(reason: str) -> str:
    """A skip reason short enough for a table cell."""
    if reason.startswith("cannot fit"):
        m = re.search(r"needs ~([\d.]+ GB)", reason)
        return f"cannot fit (needs ~{m.group(1)})" if m else "cannot fit"
    if reason.startswith("not run on CPU above"):
        m = re.search(r"needs ~([\d.]+ GB) of ([\d.]+ GB)", reason)
        return f"not run: O(N²) memory (~{m.group(1)} of {m.group(2)} RAM)" if m else "not run: O(N²) memory"
    if reason.startswith("runtime budget"):
        return "not run: runtime budget (fwd+bwd only at this N)"
    return reason if len(reason) <= 90 else reason[:87] + "..."


def model_sort_key(model: str, gflops: float):
    """ViTs by width (Ti, S, M, B, L, ...) then by unmasked image GFLOPs, then ResNets by GFLOPs."""
    m = re.match(r"ViT-([A-Za-z]+)-", model)
    if m:
        return (0, order_of(m.group(1), VIT_FAMILIES), gflops, model)
    return (1, 0, gflops, model)


def bench_stats(b: dict) -> tuple:
    """(median s, IQR s or None, rounds) of one pytest-benchmark result."""
    st = b.get("stats") or {}
    e = b.get("extra_info") or {}
    median = st.get("median", e.get("median_s"))
    rounds = st.get("rounds", e.get("rounds"))
    iqr = st.get("iqr", e.get("iqr_s")) if (rounds or 0) > 1 else None
    return median, iqr, rounds


def case_params(skip: dict) -> dict:
    """The parameters of a skipped case (as the conftest recorded them)."""
    return skip.get("params") or {}


def skipped_of_test(skipped: list, test: str) -> list:
    """The skipped cases of one test function."""
    out = []
    for s in skipped:
        m = re.search(r"::(\w+)(?:\[|$)", s.get("nodeid", ""))
        if m and m.group(1) == test:
            out.append(s)
    return out


def skip_count_lines(skips: list, shown) -> list:
    """One line per (device, reason) for the skipped cases not shown in a table."""
    counts = defaultdict(int)
    for s in skips:
        p = case_params(s)
        if not shown(p):
            counts[(p.get("device") or "?", s.get("reason", ""))] += 1
    return [f"- {n} {device} cases not run: {reason}" for (device, reason), n in sorted(counts.items())]


def device_skip_lines(steps: list, skips: list) -> list:
    """The skipped cases of the devices that have results: counts, then each with its reason."""
    shown = {e["device"] for e in steps}
    out = skip_count_lines(skips, lambda p: p.get("device") in shown)
    return out + [f"- {s['nodeid'].split('::')[-1]} not run: {s.get('reason', '')}" for s in skips
                  if case_params(s).get("device") in shown]


# ----------------------------------------------------------------------------------------------
# The machine section
# ----------------------------------------------------------------------------------------------
def machine_lines(raw: dict, floors: str = "best", cuda: bool = False) -> list:
    """The machine section.  ``floors="best"``: the tables recompute their floors at the session's best
    matmul rate (the loss tables); ``"recorded"``: they use each result's recorded floor, i.e. the rate
    measured at the start (attention, encoders, training).  ``cuda``: whether CUDA results are shown."""
    fc = raw.get("fastclip") or {}
    rates = matmul_rates(raw)
    best = best_rates(rates)
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
    for key, v in sorted(rates.items()):
        s, e = v.get("start", {}), v.get("end", {})
        line = (f"- dense matmul rate {key}: {fmt(s.get('gflops'), '.1f')} GFLOP/s at the start, "
                f"{fmt(e.get('gflops'), '.1f')} at the end ({s.get('shape', '?')}, best GEMM after "
                f"{s.get('warmup_s', '?')} s of warm-up); "
                + (f"floors below use {best[key]:.1f}" if floors == "best" else
                   "× floor below uses each result's recorded rate (the start measurement)"))
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
    if cuda:
        out.append("- peak memory (CUDA): torch.cuda.max_memory_allocated after reset_peak_memory_stats")
    ci = raw.get("commit_info") or {}
    if ci.get("id"):
        dirty = " (dirty tree)" if ci.get("dirty") else ""
        out.append(f"- commit {ci['id'][:12]}{dirty}, run {raw.get('datetime', '?')}")
    if fc.get("quick"):
        out.append("- **quick mode: tiny sizes, the timings mean nothing**")
    return out


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def table_sections(raw: dict, suites: dict) -> list:
    """``[(suite module, markdown lines)]`` of the table suites present in ``raw`` that have tables."""
    out = []
    for name in TABLE_SUITES:
        if name in suites:
            mod = suite_module(name)
            records, skipped = suites[name]
            lines = mod.tables(raw, records, skipped)
            if lines:
                out.append((mod, lines))
    return out


def suite_layout(mod) -> dict:
    """How a suite module's tables are laid out.  A suite module may set ``TITLE`` ("# <TITLE>
    benchmarks: <file>"; default: its SUITE name capitalised), ``SECTION`` ("## <SECTION>" in a
    report of several suites; default: TITLE), ``SECTION_WHEN_ALONE`` (False: alone, its tables
    follow the title directly) and ``MACHINE_SECTION`` (False: its tables name their machine)."""
    title = getattr(mod, "TITLE", mod.SUITE.capitalize())
    return {"title": title, "section": getattr(mod, "SECTION", title),
            "section_when_alone": getattr(mod, "SECTION_WHEN_ALONE", True),
            "machine_section": getattr(mod, "MACHINE_SECTION", True)}


def sections_markdown(raw: dict, src: str, sections: list) -> list:
    """The lines of ``<stem>.md`` for the table suites."""
    layouts = [suite_layout(mod) for mod, _ in sections]
    if len(sections) == 1 and not layouts[0]["section_when_alone"]:
        return [f"# {layouts[0]['title']} benchmarks: {src}", ""] + sections[0][1]
    title = f"{layouts[0]['title']} benchmarks" if len(sections) == 1 else "Benchmarks"
    body = [f"# {title}: {src}", ""]
    if raw.get("machine_info", {}).get("fastclip") and any(lay["machine_section"] for lay in layouts):
        # These suites' tables use each result's recorded rate (the start one).
        cuda = any((b.get("extra_info") or {}).get("device") == "cuda" for b in raw.get("benchmarks", []))
        body += ["## Machine", ""] + machine_lines(raw, floors="recorded", cuda=cuda) + [""]
    for (_, lines), lay in zip(sections, layouts):
        body += [f"## {lay['section']}", ""] + lines + [""]
    body.pop()
    return body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="pytest-benchmark JSON written with --benchmark-json")
    ap.add_argument("--out-dir", help="where to write <stem>.md and the PNGs (default: the JSON's folder)")
    ap.add_argument("--readme", action="store_true", help="print the compact fwd+bwd tables for the README")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    args = ap.parse_args(argv)

    raw = load(args.json)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out_dir, exist_ok=True)
    src = os.path.basename(args.json)
    stem = os.path.splitext(src)[0]
    suites = by_suite(raw)
    sections = table_sections(raw, suites)
    if sections:
        lines = sections_markdown(raw, src, sections)
        for mod, _ in sections:  # a suite module may draw plots: plots(raw, records, out_dir, stem) -> paths
            if hasattr(mod, "plots") and not args.no_plots:
                for path in mod.plots(raw, suites[mod.SUITE][0], out_dir, stem):
                    lines += ["", f"![{mod.SUITE}]({os.path.basename(path)})"]
                    print(f"wrote {path}")
        md_path = os.path.join(out_dir, f"{stem}.md")
        with open(md_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {md_path}")
        if args.readme:
            print("\n\n".join("\n".join(lines) for _, lines in sections))
    loss = suite_module("loss")
    rep = loss.build(raw, *suites.get("loss", ([], [])), path=args.json)
    if not rep["rows"]:
        if not sections:
            print(f"{args.json}: no loss, data, attention, encoder, training or distributed benchmark results "
                  "in it", file=sys.stderr)
            return 1
        return 0
    if sections:
        stem += "-loss"
    plots = [] if args.no_plots else loss.plot(rep, out_dir, stem)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w") as f:
        f.write(loss.markdown(rep, plots))
    print(f"wrote {md_path}" + "".join(f"\nwrote {p}" for p in plots))
    if args.readme:
        print()
        print("\n".join(loss.machine(rep)))
        print()
        print("\n".join(loss.summary_tables(rep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
