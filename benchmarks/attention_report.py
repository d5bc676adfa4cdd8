"""Tables of the attention suite (``test_attention_bench.py``), for ``benchmarks/report.py``.

A fwd+bwd summary (shape x provider), then per shape a mode x provider table of median, IQR,
rounds, × floor, achieved FLOP/s and peak extra memory, with refused cases and their reasons; the
GPU target record (Triton against the best other backend) when present.  × floor uses each
result's recorded floor (the matmul rate measured at the start of the run).
"""
from __future__ import annotations

from report import (MODE_ORDER, QUICK_NOTE, bench_stats, case_params, fmt, fmt_time, order_of, short_reason,
                    skip_count_lines, skipped_of_test, yes_no)

SUITE = "attention"
ATTENTION_PROVIDERS = ("triton", "flash_attn", "xformers", "sdpa", "reference")
ATTENTION_CASE = ("device", "dtype", "shape", "B", "H", "L", "hd", "causal")


def _target(e: dict) -> list:
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
            out.append(f"| {mode} | {fmt(tri, '.3f')} ms | {m['best_other']} | {other:.3f} ms | "
                       f"{m['speed_vs_best_other']:.2f}× | {yes_no(m.get('meets_0.9x'))} |")
        else:
            out.append(f"| {mode} | {fmt(tri, '.3f')} ms | no other backend ran | | | |")
    out.append("")
    out += [f"- {p} not run: {why}" for p, why in sorted((e.get("skipped") or {}).items())]
    return out


def tables(raw: dict, records: list, skipped: list) -> list:
    """Markdown for the ``test_attention`` and ``test_attention_target`` records (empty when there are
    none): a fwd+bwd summary, then per shape a mode x provider table."""
    cases, targets = [], []
    for b in records:
        e = b.get("extra_info") or {}
        if e.get("op") == "attention":
            median, iqr, rounds = bench_stats(b)
            cases.append({**e, "median_s": median, "iqr_s": iqr, "rounds": rounds,
                          "ratio": median / e["floor_s"], "case": tuple(e[f] for f in ATTENTION_CASE)})
        elif isinstance(e.get("ms"), dict) and isinstance(e.get("shape"), dict):
            targets.append(e)
    skips = skipped_of_test(skipped, "test_attention")
    target_skips = skipped_of_test(skipped, "test_attention_target")
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
        shapes |= {tuple(case_params(s).get(f) for f in ATTENTION_CASE) for s in skips
                   if (case_params(s).get("device"), case_params(s).get("dtype")) in shown}
        shapes = sorted(shapes, key=lambda k: (k[0] != "cpu", str(k[1]), str(k[2]),
                                               *(x or 0 for x in k[3:7]), bool(k[7])))
        provs = sorted({c["provider"] for c in cases}, key=lambda p: (order_of(p, ATTENTION_PROVIDERS), p))
        if any(c["mode"] == "fwd+bwd" for c in cases):
            out += ["### fwd+bwd: median time (× floor)", "",
                    "| device | dtype | shape | B | H | L | hd | causal | " + " | ".join(provs) + " |",
                    "|---|---|---|---:|---:|---:|---:|---|" + "---:|" * len(provs)]
            for key in shapes:
                fb = {c["provider"]: c for c in cases if c["case"] == key and c["mode"] == "fwd+bwd"}
                cells = [f"{fmt_time(fb[p]['median_s'])} ({fb[p]['ratio']:.2f}×)" if p in fb else "—"
                         for p in provs]
                out.append("| " + " | ".join(str(x) for x in key[:-1]) + f" | {'yes' if key[-1] else 'no'} | "
                           + " | ".join(cells) + " |")
            out.append("")
        for key in shapes:
            dev, dt, name, B, H, L, hd, causal = key
            unit, scale = ("GFLOP/s", 1e9) if dev == "cpu" else ("TFLOP/s", 1e12)
            entries = [(c["mode"], c["provider"], c, None) for c in cases if c["case"] == key]
            entries += [(case_params(s).get("mode"), case_params(s).get("provider"), None, s) for s in skips
                        if tuple(case_params(s).get(f) for f in ATTENTION_CASE) == key]
            out += [f"### {name}: {dev} {dt}, B = {B}, H = {H}, L = {L}, hd = {hd}"
                    + (", causal" if causal else ""), "",
                    "| mode | provider | median | IQR | rounds | × floor | achieved " + unit
                    + " | peak extra MB |",
                    "|---|---|---:|---:|---:|---:|---:|---:|"]
            entries.sort(key=lambda t: (order_of(t[0], MODE_ORDER), str(t[0]),
                                        order_of(t[1], ATTENTION_PROVIDERS), str(t[1])))
            for mode, prov, c, s in entries:
                if c is not None:
                    rate = c["flops"] / c["median_s"] / scale
                    out.append(f"| {mode} | {prov} | {fmt_time(c['median_s'])} | {fmt_time(c['iqr_s'])} | "
                               f"{c['rounds']} | {c['ratio']:.2f} | {rate:.1f} | "
                               f"{fmt(c.get('peak_extra_mb'), '.1f')} |")
                else:
                    out.append(f"| {mode} | {prov} | {short_reason(s.get('reason', ''))} | | | | | |")
            out.append("")
        out += skip_count_lines(skips, lambda p: (p.get("device"), p.get("dtype")) in shown)
    for e in targets:
        if out and out[-1] != "":
            out.append("")
        out += _target(e)
    for s in target_skips:
        out.append(f"- GPU target (`test_attention_target`) not run: {s.get('reason', '')}")
    while out and out[-1] == "":
        out.pop()
    return out
