"""Tables of the encoder suite (``test_encoder_bench.py``), for ``benchmarks/report.py``.

The target records (FLIP speed-ups against the unmasked step, the ViT-B-32 step against
open_clip), a config x (image mask ratio, text) table of samples/s, forward GFLOPs per sample and
× floor per provider, and every record in full.  × floor uses each result's recorded floor (the
matmul rate measured at the start of the run).
"""
from __future__ import annotations

import math
import re

from report import (QUICK_NOTE, bench_stats, device_skip_lines, fmt, fmt_time, model_sort_key, order_of,
                    skipped_of_test, yes_no)

SUITE = "encoder"
SECTION = "Encoders"
ENCODER_PROVIDERS = ("fastclip", "open_clip")
VIT_B32_TARGET = 1.0  # test_vit_b32_vs_open_clip_target: fastclip no slower than open_clip


def _cell(e) -> str:
    return f"{e['samples_per_s']:.1f}/s, {e['fwd_gflops_per_sample']:.2f} GF, {e['ratio']:.2f}×"


def _flip_target(e: dict) -> list:
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
        out.append(f"| {r:g} | {m.get('tokens')} | {fmt_time(m['median_s'])} | {m['samples_per_s']:.1f} | "
                   f"{m['speedup']:.2f}× | {m['flop_ratio']:.2f}× | {f'≥ {tgt}×' if tgt else ''} | "
                   f"{yes_no(met) if tgt else ''} |")
    return out + [""]


def _vs_open_clip_target(e: dict) -> list:
    """test_vit_b32_vs_open_clip_target: the whole model's training step against open_clip's."""
    cut = e.get("fastclip_no_padding_cut_median_s")
    out = [(f"Whole {e['model']} training step (both towers + fastclip's ClipLoss), {e['image_size']} px, "
            f"batch {e['batch']}, captions of {e.get('caption_tokens')} tokens, same weights, median of "
            f"{e['rounds']} interleaved rounds ({e.get('machine', '')})")
           + (QUICK_NOTE if e.get("quick") else ""),
           "",
           "| provider | median step | samples/s | speed vs open_clip (t open_clip / t) | target | met |",
           "|---|---:|---:|---:|---:|---|",
           (f"| fastclip | {fmt_time(e['fastclip_median_s'])} | {e['fastclip_samples_per_s']:.2f} | "
            f"{e['speed_vs_open_clip']:.2f}× | ≥ {VIT_B32_TARGET:.1f}× | {yes_no(e.get('meets_target'))} |")]
    if cut:
        ratio = fmt(e.get("speed_vs_open_clip_no_padding_cut"), ".2f")
        out.append(f"| fastclip, text-padding cut off (open_clip's work, op for op) | {fmt_time(cut)} | "
                   f"{e['batch'] / cut:.2f} | {ratio}× | — | |")
    out.append(f"| open_clip {e.get('open_clip_version') or '?'} | {fmt_time(e['open_clip_median_s'])} | "
               f"{e['open_clip_samples_per_s']:.2f} | 1.00× | | |")
    return out + [""]


def _steps(steps: list, skips: list) -> list:
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
        return model_sort_key(model, image0.get(model, math.inf))

    models = sorted({e["model"] for e in steps}, key=config_key)
    ratios = sorted({e["mask_ratio"] for e in steps if e["tower"] == "image"})
    groups = sorted({(e["provider"], e["device"], e["dtype"]) for e in steps},
                    key=lambda g: (order_of(g[0], ENCODER_PROVIDERS), g[0], g[1] != "cpu", g[2]))
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
                cells.append(_cell(e) if e else
                             ("n/a (no patch masking on ResNets)" if resnet and r else "—"))
            e = mine.get((m, "text", 0.0))
            cells.append(_cell(e) if e else "—")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["All records:", "",
            ("| config | tower | provider | device | image px | mask | batch | tokens/sample | median step | "
             "IQR | rounds | samples/s | fwd GFLOPs/sample | × floor | achieved GFLOP/s | peak extra MB |"),
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    steps = sorted(steps, key=lambda e: (config_key(e["model"]), e["tower"] != "image", e["mask_ratio"],
                                         order_of(e["provider"], ENCODER_PROVIDERS), e["provider"],
                                         e["device"]))
    for e in steps:
        gf = f"{e['fwd_gflops_per_sample']:.3f}"
        nominal = e.get("nominal_fwd_gflops_per_sample")
        if e["tower"] == "text" and nominal and abs(nominal - e["fwd_gflops_per_sample"]) > 1e-9:
            gf += f" (77 tokens: {nominal:.3f})"
        out.append(f"| {e['model']} | {e['tower']} | {e['provider']} | {e['device']} | "
                   f"{e['image_size'] or '—'} | {e['mask_ratio']:g} | {e['batch']} | "
                   f"{fmt(e.get('tokens_per_sample'), 'd')} | {fmt_time(e['median_s'])} | "
                   f"{fmt_time(e['iqr_s'])} | "
                   f"{e['rounds']} | {e['samples_per_s']:.1f} | {gf} | {e['ratio']:.2f} | "
                   f"{e['gflops']:.1f} | {fmt(e.get('peak_extra_mb'), '.1f')} |")
    out.append("")
    return out + device_skip_lines(steps, skips)


def tables(raw: dict, records: list, skipped: list) -> list:
    """Markdown for the ``test_encoder``, ``test_flip_speedup_target`` and
    ``test_vit_b32_vs_open_clip_target`` records (empty when there are none)."""
    steps, flip, vs = [], [], []
    for b in records:
        e = b.get("extra_info") or {}
        if {"model", "tower", "provider", "floor_s"} <= e.keys():
            median, iqr, rounds = bench_stats(b)
            steps.append({**e, "median_s": median, "iqr_s": iqr, "rounds": rounds,
                          "samples_per_s": e["batch"] / median, "ratio": median / e["floor_s"],
                          "gflops": e["train_gflops_per_sample"] * e["batch"] / median})
        elif "mask0" in e and "meets_target" in e:
            flip.append(e)
        elif "speed_vs_open_clip" in e:
            vs.append(e)
    target_skips = (skipped_of_test(skipped, "test_flip_speedup_target")
                    + skipped_of_test(skipped, "test_vit_b32_vs_open_clip_target"))
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
        out += _steps(steps, skipped_of_test(skipped, "test_encoder"))
    while out and out[-1] == "":
        out.pop()
    return out
