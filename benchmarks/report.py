"""Turn the benchmark suites' JSON records into markdown tables (and, for the loss suite, PNG plots).

    pytest benchmarks/test_loss_bench.py --benchmark-json=benchmarks/results/loss-cpu.json
    python benchmarks/report.py benchmarks/results/loss-cpu.json            # loss-cpu.md, loss-cpu_*.png
    python benchmarks/report.py benchmarks/results/loss-cpu.json --readme   # also prints the README tables
    python benchmarks/report.py benchmarks/results/distributed_loss_cpu_N32768_D512_P2.json

The JSON is the raw record.  This script only reads it, and writes ``<stem>.md`` beside it (or in
``--out-dir``) with tables for whichever record kinds it holds, each recognised by its fields:

* data pipeline (``test_data_bench.py``, extra_info ``kind``, or ``samples`` and ``seconds``): a
  loader table (images/s, ratio to the PIL fallback, time to the first batch), an augment-op
  table (images/s per backend, time over the copy floor), a tokenizer table and the
  dataset-generation time;
* attention (``test_attention_bench.py``, extra_info ``op == "attention"``): a fwd+bwd summary
  (shape x provider), then per shape a mode x provider table of median, IQR, rounds, × floor,
  achieved FLOP/s and peak extra memory, with refused cases and their reasons; the GPU target
  record (Triton against the best other backend) when present;
* encoders (``test_encoder_bench.py``, extra_info ``model`` and ``tower``, ``mask0`` or
  ``speed_vs_open_clip``): the target records (FLIP speed-ups against the unmasked step, the
  ViT-B-32 step against open_clip), a config x (image mask ratio, text) table of samples/s,
  forward GFLOPs per sample and × floor per provider, and every record in full;
* training (``test_train_bench.py``, extra_info ``suite == "train"``): the targets (fastclip's CLIP
  step against open_clip's, FLIP 0.5 against CLIP, interleaved rounds), then per device a model x
  strategy table of the optimiser step: median and IQR, samples/s, the strategy's training GFLOPs
  per sample (counted, and as run with the text padding cut), achieved GFLOP/s and its share of the
  matmul rate, the step with ``ClipLoader`` against in-memory batches (target <= 1.1x), peak extra
  memory; then FLIP's throughput over CLIP from those cases;
* distributed loss (``test_distributed_bench.py``, which writes its own JSON with
  ``"benchmark": "distributed_loss"``, not pytest-benchmark's): step time, peak extra memory per
  rank and the fastclip / open_clip ratios against the target.

Each says what machine it ran on and warns when the run was made in quick mode.  The attention
and encoder tables use each result's recorded floor (the matmul rate measured at the start of
the run), as the suites record it; so do the training tables.

Loss records (``test_loss_bench.py``) go to ``<stem>.md`` too, or to ``<stem>-loss.md`` when the
JSON also holds one of the kinds above (a JSON from the whole ``pytest benchmarks/``).  Per (loss,
device, dtype, D, mode) a table
of N x provider with the median time and its spread (IQR, and the number of rounds), the ratio to
the 8 N^2 D (CLIP fwd+bwd; see test_loss_bench.py for the other modes) floor, the achieved
GFLOP/s, and the peak extra memory; cases that were skipped (e.g. materialised logits that cannot
fit) appear with their reason instead of a number.

Loss ratios use the session's best measured matmul rate (the higher of the measurements at the
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
            continue  # another suite's record: the per-suite functions below read those
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


def machine_lines(rep, floors="best", cuda=None) -> list[str]:
    """The machine section.  ``floors="best"``: the tables recompute their floors at the session's best
    matmul rate (the loss tables); ``"recorded"``: they use each result's recorded floor, i.e. the rate
    measured at the start (attention, encoders).  ``cuda``: whether CUDA results are shown (default:
    any loss row on CUDA)."""
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
                f"{s.get('warmup_s', '?')} s of warm-up); "
                + (f"floors below use {rep['best_rate'][key]:.1f}" if floors == "best" else
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
    if any(r["device"] == "cuda" for r in rep["rows"]) if cuda is None else cuda:
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
LOADER_ORDER = ("pil", "dali", "dali-all", "dali-mixed")


def data_tables(raw: dict) -> list[str]:
    """Markdown for the loader, tokenizer and dataset-generation records of a data-bench JSON
    (empty when it has none)."""
    loaders, tokenizers, augments, other = {}, {}, {}, []
    for b in raw.get("benchmarks", []):
        e = b.get("extra_info") or {}
        if e.get("kind") == "loader":
            loaders[(e["set"], e["preset"], e["provider"])] = e
        elif e.get("kind") == "augment":
            augments[(e["preset"], e["provider"])] = e
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
    if augments:
        first = next(iter(augments.values()))
        order = ("floor", "torch", "native")
        out += [f"The augment op alone: {first.get('px')} px, batch {first.get('images')}, one thread "
                f"({first.get('machine', '')})" + ("; **quick mode: the timings mean nothing**"
                                                  if first.get("quick") else ""), "",
                "| preset | backend | images/s | time × floor | × torch |", "|---|---|---:|---:|---:|"]
        for (preset, prov), e in sorted(augments.items(), key=lambda kv: (
                kv[0][0], order.index(kv[0][1]) if kv[0][1] in order else 9)):
            out.append(f"| {preset} | {prov} | {e['images_per_s']:.0f} | {_f(e.get('x_floor'), '.2f')} | "
                       f"{_f(e.get('x_torch'), '.2f')} |")
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
# Shared by the attention, encoder and distributed tables
# ----------------------------------------------------------------------------------------------
QUICK_NOTE = "; **quick mode: tiny sizes, the timings mean nothing**"


def _order(value, order):
    return order.index(value) if value in order else len(order)


def _stats(b: dict) -> tuple:
    """(median s, IQR s or None, rounds) of one pytest-benchmark result."""
    st = b.get("stats") or {}
    e = b.get("extra_info") or {}
    median = st.get("median", e.get("median_s"))
    rounds = st.get("rounds", e.get("rounds"))
    iqr = st.get("iqr", e.get("iqr_s")) if (rounds or 0) > 1 else None
    return median, iqr, rounds


def _params(skip: dict) -> dict:
    return skip.get("params") or {}


def _skips(raw: dict, test: str) -> list[dict]:
    """Skipped cases of one test function (the fastclip conftest records them with their reasons)."""
    out = []
    for s in (raw.get("fastclip") or {}).get("skipped", []):
        m = re.search(r"::(\w+)(?:\[|$)", s.get("nodeid", ""))
        if m and m.group(1) == test:
            out.append(s)
    return out


def _skip_counts(skips: list[dict], shown) -> list[str]:
    """One line per (device, reason) for the skipped cases not shown in a table."""
    counts = defaultdict(int)
    for s in skips:
        p = _params(s)
        if not shown(p):
            counts[(p.get("device") or "?", s.get("reason", ""))] += 1
    return [f"- {n} {device} cases not run: {reason}" for (device, reason), n in sorted(counts.items())]


def _yes(flag) -> str:
    return "—" if flag is None else ("yes" if flag else "**no**")


# ----------------------------------------------------------------------------------------------
# Attention records (test_attention_bench.py)
# ----------------------------------------------------------------------------------------------
ATTENTION_PROVIDERS = ("triton", "flash_attn", "xformers", "sdpa", "reference")
ATTENTION_CASE = ("device", "dtype", "shape", "B", "H", "L", "hd", "causal")


def _attention_target(e: dict) -> list[str]:
    """The GPU target record: Triton against the best other backend at the ViT-B/16 shape."""
    sh = e["shape"]
    out = [(f"### GPU target: Triton vs the best other backend, {e.get('gpu', '?')}, B = {sh.get('B')}, "
            f"H = {sh.get('H')}, L = {sh.get('L')}, hd = {sh.get('hd')}, {sh.get('dtype')} "
            "(CUDA events, median of 30)"), "",
           "| mode | triton | best other | its time | speed vs best other (t other / t triton) | ≥ 0.9× |",
           "|---|---:|---|---:|---:|---|"]
    for mode in ("fwd", "fwd+bwd"):
        m = e.get(mode)
        tri = (e["ms"].get("triton") or {}).get(f"{mode}_ms")
        if m:
            other = e["ms"][m["best_other"]][f"{mode}_ms"]
            out.append(f"| {mode} | {_f(tri, '.3f')} ms | {m['best_other']} | {other:.3f} ms | "
                       f"{m['speed_vs_best_other']:.2f}× | {_yes(m.get('meets_0.9x'))} |")
        else:
            out.append(f"| {mode} | {_f(tri, '.3f')} ms | no other backend ran | | | |")
    out.append("")
    out += [f"- {p} not run: {why}" for p, why in sorted((e.get("skipped") or {}).items())]
    return out


def attention_tables(raw: dict) -> list[str]:
    """Markdown for the ``test_attention`` and ``test_attention_target`` records of an attention-bench
    JSON (empty when it has none): a fwd+bwd summary, then per shape a mode x provider table."""
    cases, targets = [], []
    for b in raw.get("benchmarks", []):
        e = b.get("extra_info") or {}
        if e.get("op") == "attention":
            median, iqr, rounds = _stats(b)
            cases.append({**e, "median_s": median, "iqr_s": iqr, "rounds": rounds,
                          "ratio": median / e["floor_s"], "case": tuple(e[f] for f in ATTENTION_CASE)})
        elif isinstance(e.get("ms"), dict) and isinstance(e.get("shape"), dict):
            targets.append(e)
    skips = _skips(raw, "test_attention")
    target_skips = _skips(raw, "test_attention_target")
    if not cases and not targets:
        return []
    out = []
    if cases:
        first = cases[0]
        rates = " and ".join(sorted({f"{c['matmul_gflops']:.1f}" for c in cases if c.get("matmul_gflops")}))
        quick = QUICK_NOTE if any(c.get("quick") for c in cases) else ""
        out += [(f"Attention: `fastclip.ops.attention(backend=provider)` on q, k, v views of one "
                 f"[B, L, 3, H, hd] projection, gradients for it ({first.get('machine', '')}); × floor = "
                 f"median / (FLOPs at the dense {first.get('matmul_shape', '?')} matmul rate, {rates} "
                 f"GFLOP/s, measured at the start of the run){quick}"), "",
                "FLOPs: fwd 4·B·H·L²·hd (halved when causal), bwd 2.5× fwd, fwd+bwd 3.5× fwd.", ""]
        shown = {(c["device"], c["dtype"]) for c in cases}
        shapes = {c["case"] for c in cases}
        shapes |= {tuple(_params(s).get(f) for f in ATTENTION_CASE) for s in skips
                   if (_params(s).get("device"), _params(s).get("dtype")) in shown}
        shapes = sorted(shapes, key=lambda k: (k[0] != "cpu", str(k[1]), str(k[2]),
                                               *(x or 0 for x in k[3:7]), bool(k[7])))
        provs = sorted({c["provider"] for c in cases}, key=lambda p: (_order(p, ATTENTION_PROVIDERS), p))
        if any(c["mode"] == "fwd+bwd" for c in cases):
            out += ["### fwd+bwd: median time (× floor)", "",
                    "| device | dtype | shape | B | H | L | hd | causal | " + " | ".join(provs) + " |",
                    "|---|---|---|---:|---:|---:|---:|---|" + "---:|" * len(provs)]
            for key in shapes:
                fb = {c["provider"]: c for c in cases if c["case"] == key and c["mode"] == "fwd+bwd"}
                cells = [f"{_t(fb[p]['median_s'])} ({fb[p]['ratio']:.2f}×)" if p in fb else "—"
                         for p in provs]
                out.append("| " + " | ".join(str(x) for x in key[:-1]) + f" | {'yes' if key[-1] else 'no'} | "
                           + " | ".join(cells) + " |")
            out.append("")
        for key in shapes:
            dev, dt, name, B, H, L, hd, causal = key
            unit, scale = ("GFLOP/s", 1e9) if dev == "cpu" else ("TFLOP/s", 1e12)
            entries = [(c["mode"], c["provider"], c, None) for c in cases if c["case"] == key]
            entries += [(_params(s).get("mode"), _params(s).get("provider"), None, s) for s in skips
                        if tuple(_params(s).get(f) for f in ATTENTION_CASE) == key]
            out += [f"### {name}: {dev} {dt}, B = {B}, H = {H}, L = {L}, hd = {hd}"
                    + (", causal" if causal else ""), "",
                    "| mode | provider | median | IQR | rounds | × floor | achieved " + unit
                    + " | peak extra MB |",
                    "|---|---|---:|---:|---:|---:|---:|---:|"]
            entries.sort(key=lambda t: (_order(t[0], MODE_ORDER), str(t[0]),
                                        _order(t[1], ATTENTION_PROVIDERS), str(t[1])))
            for mode, prov, c, s in entries:
                if c is not None:
                    rate = c["flops"] / c["median_s"] / scale
                    out.append(f"| {mode} | {prov} | {_t(c['median_s'])} | {_t(c['iqr_s'])} | "
                               f"{c['rounds']} | {c['ratio']:.2f} | {rate:.1f} | "
                               f"{_f(c.get('peak_extra_mb'), '.1f')} |")
                else:
                    out.append(f"| {mode} | {prov} | {_short_reason(s.get('reason', ''))} | | | | | |")
            out.append("")
        out += _skip_counts(skips, lambda p: (p.get("device"), p.get("dtype")) in shown)
    for e in targets:
        if out and out[-1] != "":
            out.append("")
        out += _attention_target(e)
    for s in target_skips:
        out.append(f"- GPU target (`test_attention_target`) not run: {s.get('reason', '')}")
    while out and out[-1] == "":
        out.pop()
    return out


# ----------------------------------------------------------------------------------------------
# Encoder records (test_encoder_bench.py)
# ----------------------------------------------------------------------------------------------
ENCODER_PROVIDERS = ("fastclip", "open_clip")
VIT_FAMILIES = ("Ti", "S", "M", "B", "L", "H", "g", "bigG")
VIT_B32_TARGET = 1.0  # test_vit_b32_vs_open_clip_target: fastclip no slower than open_clip


def _config_key(model: str, gflops: float):
    """ViTs by width (Ti, S, M, B, L, ...) then by unmasked image GFLOPs, then ResNets by GFLOPs."""
    m = re.match(r"ViT-([A-Za-z]+)-", model)
    if m:
        return (0, _order(m.group(1), VIT_FAMILIES), gflops, model)
    return (1, 0, gflops, model)


def _encoder_cell(e) -> str:
    return f"{e['samples_per_s']:.1f}/s, {e['fwd_gflops_per_sample']:.2f} GF, {e['ratio']:.2f}×"


def _flip_target(e: dict) -> list[str]:
    """test_flip_speedup_target: throughput at each mask ratio against the unmasked step."""
    ratios = sorted((k for k in e if re.fullmatch(r"mask[\d.]+", k)), key=lambda k: float(k[4:]))
    targets = {}
    for k, met in (e.get("meets_target") or {}).items():
        m = re.fullmatch(r"([\d.]+) >= ([\d.]+)x", k)
        if m:
            targets[float(m.group(1))] = (m.group(2), met)
    out = [f"FLIP: {e['model']} {e['tower']} tower training step, {e['image_size']} px, batch {e['batch']}, "
           f"median of {e['rounds']} interleaved rounds ({e.get('machine', '')})"
           + (QUICK_NOTE if e.get("quick") else ""), "",
           ("| mask ratio | tokens | median step | samples/s | speed-up vs mask 0 | FLOP ratio | target "
            "| met |"),
           "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for k in ratios:
        r, m = float(k[4:]), e[k]
        tgt, met = targets.get(r, (None, None))
        out.append(f"| {r:g} | {m.get('tokens')} | {_t(m['median_s'])} | {m['samples_per_s']:.1f} | "
                   f"{m['speedup']:.2f}× | {m['flop_ratio']:.2f}× | {f'≥ {tgt}×' if tgt else ''} | "
                   f"{_yes(met) if tgt else ''} |")
    return out + [""]


def _vs_open_clip_target(e: dict) -> list[str]:
    """test_vit_b32_vs_open_clip_target: the whole model's training step against open_clip's."""
    cut = e.get("fastclip_no_padding_cut_median_s")
    out = [(f"Whole {e['model']} training step (both towers + fastclip's ClipLoss), {e['image_size']} px, "
            f"batch {e['batch']}, captions of {e.get('caption_tokens')} tokens, same weights, median of "
            f"{e['rounds']} interleaved rounds ({e.get('machine', '')})")
           + (QUICK_NOTE if e.get("quick") else ""),
           "",
           "| provider | median step | samples/s | speed vs open_clip (t open_clip / t) | target | met |",
           "|---|---:|---:|---:|---:|---|",
           (f"| fastclip | {_t(e['fastclip_median_s'])} | {e['fastclip_samples_per_s']:.2f} | "
            f"{e['speed_vs_open_clip']:.2f}× | ≥ {VIT_B32_TARGET:.1f}× | {_yes(e.get('meets_target'))} |")]
    if cut:
        ratio = _f(e.get("speed_vs_open_clip_no_padding_cut"), ".2f")
        out.append(f"| fastclip, text-padding cut off (open_clip's work, op for op) | {_t(cut)} | "
                   f"{e['batch'] / cut:.2f} | {ratio}× | — | |")
    out.append(f"| open_clip {e.get('open_clip_version') or '?'} | {_t(e['open_clip_median_s'])} | "
               f"{e['open_clip_samples_per_s']:.2f} | 1.00× | | |")
    return out + [""]


def _encoder_steps(steps: list[dict], skips: list[dict]) -> list[str]:
    """test_encoder: a config x (mask ratio, text) table per provider, then every record."""
    first = steps[0]
    rates = " and ".join(sorted({f"{e['matmul_gflops']:.1f}" for e in steps if e.get("matmul_gflops")}))
    out = ["### Training step of one tower, per config", "",
           f"Forward + backward of `(features * g).sum()`, every parameter's gradient, train mode "
           f"({first.get('machine', '')}, {first.get('torch_threads')} torch threads)"
           + (QUICK_NOTE if any(e.get("quick") for e in steps) else "")
           + f"; × floor = median / (3 × forward FLOPs at the dense {first.get('matmul_shape', '?')} matmul "
           f"rate, {rates} GFLOP/s, measured at the start of the run).  Text towers: fastclip runs the "
           "tokens up to the batch's last end token, and its FLOPs are those of the tokens it runs (the "
           "table of all records also gives the 77-token count).", ""]
    image0 = {e["model"]: e["fwd_gflops_per_sample"] for e in steps
              if e["tower"] == "image" and not e["mask_ratio"]}

    def config_key(model):
        return _config_key(model, image0.get(model, math.inf))

    models = sorted({e["model"] for e in steps}, key=config_key)
    ratios = sorted({e["mask_ratio"] for e in steps if e["tower"] == "image"})
    groups = sorted({(e["provider"], e["device"], e["dtype"]) for e in steps},
                    key=lambda g: (_order(g[0], ENCODER_PROVIDERS), g[0], g[1] != "cpu", g[2]))
    for group in groups:
        prov, dev, dt = group
        mine = {(e["model"], e["tower"], e["mask_ratio"]): e for e in steps
                if (e["provider"], e["device"], e["dtype"]) == group}
        sizes = ", ".join(f"{s} px" for s in sorted({e["image_size"] for e in mine.values()
                                                     if e["tower"] == "image"}))
        ver = next((f" {e['open_clip_version']}" for e in mine.values() if e.get("open_clip_version")), "")
        out += [(f"**{prov}{ver}, {dev} {dt}**: samples/s, forward GFLOPs per sample (masking applied), "
                 f"× floor (images at {sizes or '—'}; text at 77 tokens)"), "",
                "| config | " + " | ".join(f"image, mask {r:g}" for r in ratios) + " | text |",
                "|---|" + "---:|" * (len(ratios) + 1)]
        for m in models:
            if not any(k[0] == m for k in mine):
                continue
            unmasked = mine.get((m, "image", 0.0))
            resnet = unmasked is not None and unmasked.get("tokens_per_sample") is None  # no patch tokens
            cells = []
            for r in ratios:
                e = mine.get((m, "image", r))
                cells.append(_encoder_cell(e) if e else
                             ("n/a (no patch masking on ResNets)" if resnet and r else "—"))
            e = mine.get((m, "text", 0.0))
            cells.append(_encoder_cell(e) if e else "—")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["All records:", "",
            ("| config | tower | provider | device | image px | mask | batch | tokens/sample | median step | "
             "IQR | rounds | samples/s | fwd GFLOPs/sample | × floor | achieved GFLOP/s | peak extra MB |"),
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    steps = sorted(steps, key=lambda e: (config_key(e["model"]), e["tower"] != "image", e["mask_ratio"],
                                         _order(e["provider"], ENCODER_PROVIDERS), e["provider"],
                                         e["device"]))
    for e in steps:
        gf = f"{e['fwd_gflops_per_sample']:.3f}"
        nominal = e.get("nominal_fwd_gflops_per_sample")
        if e["tower"] == "text" and nominal and abs(nominal - e["fwd_gflops_per_sample"]) > 1e-9:
            gf += f" (77 tokens: {nominal:.3f})"
        out.append(f"| {e['model']} | {e['tower']} | {e['provider']} | {e['device']} | "
                   f"{e['image_size'] or '—'} | {e['mask_ratio']:g} | {e['batch']} | "
                   f"{_f(e.get('tokens_per_sample'), 'd')} | {_t(e['median_s'])} | {_t(e['iqr_s'])} | "
                   f"{e['rounds']} | {e['samples_per_s']:.1f} | {gf} | {e['ratio']:.2f} | "
                   f"{e['gflops']:.1f} | {_f(e.get('peak_extra_mb'), '.1f')} |")
    out.append("")
    return out + _device_skips(steps, skips)


def encoder_tables(raw: dict) -> list[str]:
    """Markdown for the ``test_encoder``, ``test_flip_speedup_target`` and
    ``test_vit_b32_vs_open_clip_target`` records of an encoder-bench JSON (empty when it has none)."""
    steps, flip, vs = [], [], []
    for b in raw.get("benchmarks", []):
        e = b.get("extra_info") or {}
        if {"model", "tower", "provider", "floor_s"} <= e.keys():
            median, iqr, rounds = _stats(b)
            steps.append({**e, "median_s": median, "iqr_s": iqr, "rounds": rounds,
                          "samples_per_s": e["batch"] / median, "ratio": median / e["floor_s"],
                          "gflops": e["train_gflops_per_sample"] * e["batch"] / median})
        elif "mask0" in e and "meets_target" in e:
            flip.append(e)
        elif "speed_vs_open_clip" in e:
            vs.append(e)
    target_skips = _skips(raw, "test_flip_speedup_target") + _skips(raw, "test_vit_b32_vs_open_clip_target")
    if not (steps or flip or vs):
        return []
    out = []
    if flip or vs or target_skips:
        out += ["### Targets (interleaved rounds in one run)", ""]
    for e in flip:
        out += _flip_target(e)
    for e in vs:
        out += _vs_open_clip_target(e)
    for s in target_skips:
        out += [f"- `{s['nodeid'].split('::')[-1]}` not run: {s.get('reason', '')}", ""]
    if steps:
        out += _encoder_steps(steps, _skips(raw, "test_encoder"))
    while out and out[-1] == "":
        out.pop()
    return out


# ----------------------------------------------------------------------------------------------
# Training-step records (test_train_bench.py)
# ----------------------------------------------------------------------------------------------
TRAIN_STRATEGIES = ("clip", "flip0.5", "flip0.75", "slip", "clip_aug")
TRAIN_STEP_NAMES = {"fastclip_clip": "fastclip CLIP", "fastclip_flip0.5": "fastclip FLIP, mask 0.5",
                    "open_clip_clip": "open_clip + `open_clip.loss.ClipLoss`"}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _train_target(e: dict) -> list[str]:
    """test_train_targets: fastclip CLIP, FLIP 0.5 and open_clip, interleaved rounds."""
    steps, targets = e.get("steps") or {}, e.get("targets") or {}
    out = [(f"**{e['model']} at {e['image_size']} px, batch {e['batch']}, {e['device']} {e['dtype']}**: one "
            f"optimiser step each, captions of {e.get('caption_tokens')} tokens, the same starting weights, "
            f"median of {e['rounds']} interleaved rounds ({e.get('machine', '')})")
           + (QUICK_NOTE if e.get("quick") else ""), "",
           "| step | median | IQR | samples/s | achieved GFLOP/s (counted / run) | % of matmul rate (counted / run) |",
           "|---|---:|---:|---:|---:|---:|"]
    for key, name in TRAIN_STEP_NAMES.items():
        s = steps.get(key)
        if s is None:
            continue
        if key == "open_clip_clip" and e.get("open_clip_version"):
            name = name.replace("open_clip ", f"open_clip {e['open_clip_version']} ", 1)
        out.append(f"| {name} | {_t(s['median_s'])} | {_t(s.get('iqr_s'))} | {s['samples_per_s']:.2f} | "
                   f"{s['achieved_gflops']:.1f} / {s['achieved_gflops_run']:.1f} | "
                   f"{_pct(s.get('fraction_of_matmul_rate'))} / {_pct(s.get('fraction_of_matmul_rate_run'))} |")
    met = e.get("meets_target") or {}

    def met_of(prefix):
        return next((v for k, v in met.items() if k.startswith(prefix)), None)
    out += ["", "| comparison (throughput ratio) | measured | FLOP ratio (counted / run) | target | met |",
            "|---|---:|---:|---:|---|",
            (f"| FLIP 0.5 / CLIP | {e['flip0.5_vs_clip']:.2f}× | {e['flip0.5_vs_clip_flop_ratio']:.2f}× / "
             f"{e['flip0.5_vs_clip_flop_ratio_run']:.2f}× | ≥ {_f(targets.get('flip0.5_vs_clip'), 'g')}× | "
             f"{_yes(met_of('flip0.5'))} |")]
    if e.get("vs_open_clip") is not None:
        out.append(f"| fastclip CLIP / open_clip CLIP | {e['vs_open_clip']:.2f}× | — | "
                   f"≥ {_f(targets.get('vs_open_clip'), 'g')}× | {_yes(met_of('fastclip / open_clip'))} |")
    else:
        out.append(f"| fastclip CLIP / open_clip CLIP | not run: {e.get('open_clip_skipped', '?')} | | | |")
    out += ["", ("Counted FLOPs: the strategy's `flops(config, mask_ratio)` (3x the forward, text at 77 tokens); "
                 "run: the text tower at the captions' length, as fastclip runs it (open_clip runs all 77).  "
                 "% of matmul rate: achieved GFLOP/s over the dense matmul rate measured in the same run."), ""]
    return out


def _train_cell_loader(e: dict) -> tuple:
    ld = e.get("loader") or {}
    if "samples_per_s" not in ld:
        return "—", "—", ""
    return f"{ld['samples_per_s']:.1f}", f"{e['loader_time_ratio']:.2f}×", _yes(e.get("loader_meets_target"))


def _train_steps(steps: list[dict], skips: list[dict]) -> list[str]:
    """test_train_step: per (device, dtype) a model x strategy table, then the FLIP ratios."""
    out = []
    image0 = {}
    for e in steps:
        image0.setdefault(e["model"], e["train_gflops_per_sample"])

    def case_key(e):
        return (_config_key(e["model"], image0.get(e["model"], math.inf)), e["image_size"], e["batch"],
                _order(e["strategy"], TRAIN_STRATEGIES), e["strategy"])
    for dev, dt in sorted({(e["device"], e["dtype"]) for e in steps}, key=lambda k: (k[0] != "cpu", k)):
        mine = sorted((e for e in steps if (e["device"], e["dtype"]) == (dev, dt)), key=case_key)
        first = mine[0]
        rates = " and ".join(sorted({f"{e['matmul_gflops']:.1f}" for e in mine if e.get("matmul_gflops")}))
        ld = next((e["loader"] for e in mine if "samples_per_s" in (e.get("loader") or {})), None)
        loader_text = ""
        if ld:
            loader_text = (f"  With the loader: `fastclip.data.ClipLoader` ({ld.get('backend')} backend, "
                           f"{ld.get('num_threads')} threads, prefetch {ld.get('prefetch')}, shuffle buffer "
                           f"{ld.get('shuffle')}, `drop_last`, the strategy's augmentation) over the "
                           f"built-in dataset at the same size ({ld.get('images')} images), in blocks interleaved "
                           f"with the in-memory rounds, each block's first {ld.get('fill_steps_per_block')} "
                           f"step(s) dropped (the pipeline filling); loader / in-memory is the ratio of median "
                           f"step times (target ≤ 1.1×).")
        out += [(f"**{dev} {dt}**: one optimiser step (forward, backward, AdamW) on in-memory batches "
                 f"({first.get('machine', '')}, {first.get('torch_threads')} torch threads)"
                 + (QUICK_NOTE if any(e.get("quick") for e in mine) else "")
                 + f"; dense matmul rate {rates} GFLOP/s ({first.get('matmul_shape', '?')}, measured at the "
                 "start of the run)." + loader_text), "",
                ("| model | px | strategy | batch | median step | IQR | rounds | samples/s | train GFLOPs/sample "
                 "(counted / run) | achieved GFLOP/s (counted / run) | % of matmul rate (counted / run) | with loader: "
                 "samples/s | loader / in-memory | ≤ 1.1× | peak extra MB |"),
                "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for e in mine:
            m = e["memory"]
            lsps, lratio, lmet = _train_cell_loader(e)
            peak = _f(e.get("peak_extra_mb"), ".0f")
            if e.get("peak_extra_mb") is not None and e.get("peak_includes_optimizer_state"):
                peak += "*"
            out.append(f"| {e['model']} | {e['image_size']} | {e['strategy']} | {e['batch']} | "
                       f"{_t(m['median_s'])} | {_t(m.get('iqr_s'))} | {m['rounds']} | {m['samples_per_s']:.1f} | "
                       f"{e['train_gflops_per_sample']:.2f} / {e['train_gflops_per_sample_run']:.2f} | "
                       f"{m['achieved_gflops']:.1f} / {m['achieved_gflops_run']:.1f} | "
                       f"{_pct(m.get('fraction_of_matmul_rate'))} / {_pct(m.get('fraction_of_matmul_rate_run'))} | "
                       f"{lsps} | {lratio} | {lmet} | {peak} |")
        out.append("")
        if any(e.get("peak_includes_optimizer_state") for e in mine):
            out += ["\\* measured on the first step, which also allocates AdamW's state.", ""]
        bad = [e for e in mine if e.get("nonfinite_steps")]
        out += [f"- {e['model']} {e['image_size']} px {e['strategy']}: {e['nonfinite_steps']} step(s) with a "
                "non-finite loss (skipped, as the trainer's on_nan=skip)" for e in bad]
        # FLIP over CLIP from the cases above (separate cases, not interleaved: the target test's
        # interleaved rounds are the fairer measurement).
        groups = defaultdict(dict)
        for e in mine:
            groups[(e["model"], e["image_size"], e["batch"])][e["strategy"]] = e
        flips = [s for s in TRAIN_STRATEGIES if s.startswith("flip")]
        rows = []
        for (model, px, batch), by in groups.items():
            base = by.get("clip")
            if base is None or not any(f in by for f in flips):
                continue
            cells = []
            for f in flips:
                e = by.get(f)
                cells.append("—" if e is None else
                             f"{base['memory']['median_s'] / e['memory']['median_s']:.2f}× "
                             f"({base['train_gflops_per_sample_run'] / e['train_gflops_per_sample_run']:.2f}×)")
            rows.append(f"| {model} | {px} | {batch} | " + " | ".join(cells) + " |")
        if rows:
            out += [("FLIP throughput over CLIP from the cases above (separate cases; the targets above "
                     "interleave them); in brackets the ratio of the FLOPs run:"), "",
                    "| model | px | batch | " + " | ".join(f"{f} / clip" for f in flips) + " |",
                    "|---|---:|---:|" + "---:|" * len(flips)] + rows + [""]
    return out + _device_skips(steps, skips)


def _device_skips(steps: list, skips: list) -> list[str]:
    """The skipped cases of the devices that have results: counts, then each with its reason."""
    shown = {e["device"] for e in steps}
    out = _skip_counts(skips, lambda p: p.get("device") in shown)
    return out + [f"- {s['nodeid'].split('::')[-1]} not run: {s.get('reason', '')}" for s in skips
                  if _params(s).get("device") in shown]


def train_tables(raw: dict) -> list[str]:
    """Markdown for the ``test_train_step`` and ``test_train_targets`` records of a training-bench JSON
    (empty when it has none): the targets, then a model x strategy table per device."""
    steps, targets = [], []
    for b in raw.get("benchmarks", []):
        e = b.get("extra_info") or {}
        if e.get("suite") != "train":
            continue
        if e.get("kind") == "train_step" and "memory" in e:
            steps.append(e)
        elif e.get("kind") == "train_targets" and "steps" in e:
            targets.append(e)
    step_skips = _skips(raw, "test_train_step")
    target_skips = _skips(raw, "test_train_targets")
    if not steps and not targets:
        return []
    out = []
    if targets or target_skips:
        out += ["### Targets (interleaved rounds in one run)", ""]
        for e in sorted(targets, key=lambda e: e["device"] != "cpu"):
            out += _train_target(e)
        out += [f"- `{s['nodeid'].split('::')[-1]}` not run: {s.get('reason', '')}" for s in target_skips]
        if target_skips:
            out.append("")
    if steps:
        out += ["### Training step per model and strategy", ""] + _train_steps(steps, step_skips)
    while out and out[-1] == "":
        out.pop()
    return out


# ----------------------------------------------------------------------------------------------
# Distributed loss records (test_distributed_bench.py; its own JSON, not pytest-benchmark's)
# ----------------------------------------------------------------------------------------------
DIST_PROVIDERS = {"fastclip_lean": "fastclip `ClipLoss(rank, world_size)`, lean (default)",
                  "open_clip_local_gwg": "open_clip `ClipLoss(local_loss=True, gather_with_grad=True)`",
                  "fastclip_siglip": "fastclip `SigLipLoss(rank, world_size)`",
                  "open_clip_siglip": "open_clip `SigLipLoss(rank, world_size)`"}


def _mib_range(values) -> str:
    vals = [v for v in values or [] if v is not None]
    if not vals:
        return "—"
    lo, hi = f"{min(vals):.0f}", f"{max(vals):.0f}"
    return lo if lo == hi else f"{lo}–{hi}"


def distributed_tables(raw: dict) -> list[str]:
    """Markdown for a ``distributed_loss_<device>_N<N>_D<D>_P<ranks>.json`` record (empty for any other
    JSON): step time and peak extra memory per provider, and the ratios against the target."""
    if raw.get("benchmark") != "distributed_loss":
        return []
    cfg, mach, summary = raw.get("config") or {}, raw.get("machine") or {}, raw.get("summary") or {}
    threads = mach.get("threads_per_rank")
    out = [f"Distributed CLIP loss, fwd+bwd: global N = {cfg.get('N')}, D = {cfg.get('D')}, "
           f"{cfg.get('ranks')} {mach.get('backend')} ranks on {mach.get('device')}"
           + (f" ({threads} thread{'s' if threads != 1 else ''} per rank)" if threads else "")
           + f", {cfg.get('n_per_rank')} pairs per rank, {cfg.get('rounds')} timed rounds after a warm-up "
           f"({mach.get('cpu_count')} CPUs, torch {mach.get('torch')}, Python {mach.get('python')}, "
           f"{mach.get('platform')}; run {raw.get('when', '?')})"
           + (QUICK_NOTE if cfg.get("quick") else ""), "",
           (f"Peak extra memory: {raw.get('memory_method', '?')}, the largest of the timed rounds.  "
            "A round's step time is its slowest rank's."), "",
           "| provider | median step | min – max | peak extra MiB per rank (range over ranks) |",
           "|---|---:|---:|---:|"]
    for p in cfg.get("providers") or [k for k in summary if "_vs_" not in k]:
        s = summary.get(p) or {}
        name = f"{p}: {DIST_PROVIDERS[p]}" if p in DIST_PROVIDERS else p
        if "skipped" in s:
            out.append(f"| {name} | not run: {s['skipped']} | | |")
        elif s:
            out.append(f"| {name} | {_t(s['time_median_s'])} | {_t(s['time_min_s'])} – "
                       f"{_t(s['time_max_s'])} | {_mib_range(s.get('peak_extra_mib_per_rank'))} |")
    target = raw.get("target") or {}
    cmps = [(k, v) for k, v in summary.items() if "_vs_" in k]
    if cmps:
        tmem, ttime = target.get("memory_ratio_max"), target.get("time_ratio_max")
        out += ["", (f"Target (at {target.get('at', '?')}): fastclip's time ≤ {_f(ttime, 'g')}× open_clip's "
                     f"and its peak extra memory per rank ≤ {_f(tmem, '.3g')}× open_clip's."), "",
                "| comparison | time ratio | time target met | memory ratio | memory target met |",
                "|---|---:|---|---:|---|"]
        for k, c in cmps:
            mem = c.get("memory_ratio")
            out.append(f"| {k.replace('_vs_', ' / ')} | {c['time_ratio']:.2f}× | "
                       f"{_yes(c.get('time_target_met'))} | {'—' if mem is None else f'{mem:.3f}×'} | "
                       f"{_yes(c.get('memory_target_met'))} |")
        at = f"N={cfg.get('N')}, D={cfg.get('D')}, {cfg.get('ranks')} ranks"
        if target.get("at") and target["at"] != at:
            out += ["", f"This run ({at}) is not at the target's size: the ratios do not test the target."]
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


SUITE_TITLES = {"Data pipeline": "Data-pipeline", "Attention": "Attention", "Encoders": "Encoder",
                "Training": "Training", "Distributed loss": "Distributed-loss"}


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
    src = os.path.basename(args.json)
    stem = os.path.splitext(src)[0]
    raw = rep["raw"]
    suites = [(title, lines) for title, lines in (
        ("Data pipeline", data_tables(raw)), ("Attention", attention_tables(raw)),
        ("Encoders", encoder_tables(raw)), ("Training", train_tables(raw)),
        ("Distributed loss", distributed_tables(raw))) if lines]
    if suites:
        if [t for t, _ in suites] == ["Data pipeline"]:
            body = [f"# Data-pipeline benchmarks: {src}", ""] + suites[0][1]
        else:
            title = f"{SUITE_TITLES[suites[0][0]]} benchmarks" if len(suites) == 1 else "Benchmarks"
            body = [f"# {title}: {src}", ""]
            if raw.get("machine_info", {}).get("fastclip") and any(
                    t in ("Attention", "Encoders", "Training") for t, _ in suites):
                # The attention, encoder and training tables use each result's recorded rate (the start one).
                cuda = any((b.get("extra_info") or {}).get("device") == "cuda"
                           for b in raw.get("benchmarks", []))
                body += ["## Machine", ""] + machine_lines(rep, floors="recorded", cuda=cuda) + [""]
            for t, lines in suites:
                body += [f"## {t}", ""] + lines + [""]
            body.pop()
        md_path = os.path.join(out_dir, f"{stem}.md")
        with open(md_path, "w") as f:
            f.write("\n".join(body) + "\n")
        print(f"wrote {md_path}")
        if args.readme:
            print("\n\n".join("\n".join(lines) for _, lines in suites))
    if not rep["rows"]:
        if not suites:
            print(f"{args.json}: no loss, data, attention, encoder, training or distributed benchmark results in it",
                  file=sys.stderr)
            return 1
        return 0
    if suites:
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
