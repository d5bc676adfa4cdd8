"""Tables of the distributed-loss benchmark (``test_distributed_bench.py``), for ``benchmarks/report.py``.

That benchmark writes its own JSON (``distributed_loss_<device>_N<N>_D<D>_P<ranks>.json``, not
pytest-benchmark's): step time, peak extra memory per rank and the fastclip / open_clip ratios
against the target.
"""
from __future__ import annotations

from report import QUICK_NOTE, fmt, fmt_time, suite_of_json, yes_no

SUITE = "distributed"
TITLE = "Distributed-loss"
SECTION = "Distributed loss"
SECTION_WHEN_ALONE = True
MACHINE_SECTION = False   # the record has its own machine fields, shown in the table's caption
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


def tables(raw: dict, records: list, skipped: list) -> list:
    """Markdown for a distributed-loss JSON (empty for any other): step time and peak extra memory per
    provider, and the ratios against the target."""
    if suite_of_json(raw) != SUITE:
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
            out.append(f"| {name} | {fmt_time(s['time_median_s'])} | {fmt_time(s['time_min_s'])} – "
                       f"{fmt_time(s['time_max_s'])} | {_mib_range(s.get('peak_extra_mib_per_rank'))} |")
    target = raw.get("target") or {}
    cmps = [(k, v) for k, v in summary.items() if "_vs_" in k]
    if cmps:
        tmem, ttime = target.get("memory_ratio_max"), target.get("time_ratio_max")
        out += ["", (f"Target (at {target.get('at', '?')}): fastclip's time ≤ {fmt(ttime, 'g')}× open_clip's "
                     f"and its peak extra memory per rank ≤ {fmt(tmem, '.3g')}× open_clip's."), "",
                "| comparison | time ratio | time target met | memory ratio | memory target met |",
                "|---|---:|---|---:|---|"]
        for k, c in cmps:
            mem = c.get("memory_ratio")
            out.append(f"| {k.replace('_vs_', ' / ')} | {c['time_ratio']:.2f}× | "
                       f"{yes_no(c.get('time_target_met'))} | {'—' if mem is None else f'{mem:.3f}×'} | "
                       f"{yes_no(c.get('memory_target_met'))} |")
        at = f"N={cfg.get('N')}, D={cfg.get('D')}, {cfg.get('ranks')} ranks"
        if target.get("at") and target["at"] != at:
            out += ["", f"This run ({at}) is not at the target's size: the ratios do not test the target."]
    return out
