"""Tables of the training-step suite (``test_train_bench.py``), for ``benchmarks/report.py``.

The targets (fastclip's CLIP step against open_clip's, FLIP 0.5 against CLIP, interleaved rounds),
then per device a model x strategy table of the optimiser step: median and IQR, samples/s, the
strategy's training GFLOPs per sample (counted, and as run with the text padding cut), achieved
GFLOP/s and its share of the matmul rate, the step with ``ClipLoader`` against in-memory batches
(target <= 1.1x), peak extra memory; then FLIP's throughput over CLIP from those cases.
"""
from __future__ import annotations

import math
from collections import defaultdict

from report import (QUICK_NOTE, device_skip_lines, fmt, fmt_time, model_sort_key, order_of, skipped_of_test,
                    yes_no)

SUITE = "train"
TITLE = "Training"
TRAIN_STRATEGIES = ("clip", "flip0.5", "flip0.75", "slip", "clip_aug")
TRAIN_STEP_NAMES = {"fastclip_clip": "fastclip CLIP", "fastclip_flip0.5": "fastclip FLIP, mask 0.5",
                    "open_clip_clip": "open_clip + `open_clip.loss.ClipLoss`"}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _target(e: dict) -> list:
    """test_train_targets: fastclip CLIP, FLIP 0.5 and open_clip, interleaved rounds."""
    steps, targets = e.get("steps") or {}, e.get("targets") or {}
    out = [(f"**{e['model']} at {e['image_size']} px, batch {e['batch']}, {e['device']} {e['dtype']}**: one "
            f"optimiser step each, captions of {e.get('caption_tokens')} tokens, the same starting weights, "
            f"median of {e['rounds']} interleaved rounds ({e.get('machine', '')})")
           + (QUICK_NOTE if e.get("quick") else ""), "",
           ("| step | median | IQR | samples/s | achieved GFLOP/s (counted / run) "
            "| % of matmul rate (counted / run) |"),
           "|---|---:|---:|---:|---:|---:|"]
    for key, name in TRAIN_STEP_NAMES.items():
        s = steps.get(key)
        if s is None:
            continue
        if key == "open_clip_clip" and e.get("open_clip_version"):
            name = name.replace("open_clip ", f"open_clip {e['open_clip_version']} ", 1)
        out.append(f"| {name} | {fmt_time(s['median_s'])} | {fmt_time(s.get('iqr_s'))} | "
                   f"{s['samples_per_s']:.2f} | {s['achieved_gflops']:.1f} / {s['achieved_gflops_run']:.1f} | "
                   f"{_pct(s.get('fraction_of_matmul_rate'))} / "
                   f"{_pct(s.get('fraction_of_matmul_rate_run'))} |")
    met = e.get("meets_target") or {}

    def met_of(prefix):
        return next((v for k, v in met.items() if k.startswith(prefix)), None)
    out += ["", "| comparison (throughput ratio) | measured | FLOP ratio (counted / run) | target | met |",
            "|---|---:|---:|---:|---|",
            (f"| FLIP 0.5 / CLIP | {e['flip0.5_vs_clip']:.2f}× | {e['flip0.5_vs_clip_flop_ratio']:.2f}× / "
             f"{e['flip0.5_vs_clip_flop_ratio_run']:.2f}× | ≥ {fmt(targets.get('flip0.5_vs_clip'), 'g')}× | "
             f"{yes_no(met_of('flip0.5'))} |")]
    if e.get("vs_open_clip") is not None:
        out.append(f"| fastclip CLIP / open_clip CLIP | {e['vs_open_clip']:.2f}× | — | "
                   f"≥ {fmt(targets.get('vs_open_clip'), 'g')}× | {yes_no(met_of('fastclip / open_clip'))} |")
    else:
        out.append(f"| fastclip CLIP / open_clip CLIP | not run: {e.get('open_clip_skipped', '?')} | | | |")
    out += ["", ("Counted FLOPs: the strategy's `flops(config, mask_ratio)` (3x the forward, text at 77 "
                 "tokens); run: the text tower at the captions' length, as fastclip runs it (open_clip runs "
                 "all 77).  % of matmul rate: achieved GFLOP/s over the dense matmul rate measured in the "
                 "same run."), ""]
    return out


def _cell_loader(e: dict) -> tuple:
    ld = e.get("loader") or {}
    if "samples_per_s" not in ld:
        return "—", "—", ""
    met = yes_no(e.get("loader_meets_target"))
    return f"{ld['samples_per_s']:.1f}", f"{e['loader_time_ratio']:.2f}×", met


def _steps(steps: list, skips: list) -> list:
    """test_train_step: per (device, dtype) a model x strategy table, then the FLIP ratios."""
    out = []
    image0 = {}
    for e in steps:
        image0.setdefault(e["model"], e["train_gflops_per_sample"])

    def case_key(e):
        return (model_sort_key(e["model"], image0.get(e["model"], math.inf)), e["image_size"], e["batch"],
                order_of(e["strategy"], TRAIN_STRATEGIES), e["strategy"])
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
                           f"built-in dataset at the same size ({ld.get('images')} images), in blocks "
                           f"interleaved with the in-memory rounds, each block's first "
                           f"{ld.get('fill_steps_per_block')} step(s) dropped (the pipeline filling); loader / "
                           f"in-memory is the ratio of median step times (target ≤ 1.1×).")
        out += [(f"**{dev} {dt}**: one optimiser step (forward, backward, AdamW) on in-memory batches "
                 f"({first.get('machine', '')}, {first.get('torch_threads')} torch threads)"
                 + (QUICK_NOTE if any(e.get("quick") for e in mine) else "")
                 + f"; dense matmul rate {rates} GFLOP/s ({first.get('matmul_shape', '?')}, measured at the "
                 "start of the run)." + loader_text), "",
                ("| model | px | strategy | batch | median step | IQR | rounds | samples/s | train "
                 "GFLOPs/sample (counted / run) | achieved GFLOP/s (counted / run) | % of matmul rate "
                 "(counted / run) | with loader: samples/s | loader / in-memory | ≤ 1.1× | peak extra MB |"),
                "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for e in mine:
            m = e["memory"]
            lsps, lratio, lmet = _cell_loader(e)
            peak = fmt(e.get("peak_extra_mb"), ".0f")
            if e.get("peak_extra_mb") is not None and e.get("peak_includes_optimizer_state"):
                peak += "*"
            out.append(f"| {e['model']} | {e['image_size']} | {e['strategy']} | {e['batch']} | "
                       f"{fmt_time(m['median_s'])} | {fmt_time(m.get('iqr_s'))} | {m['rounds']} | "
                       f"{m['samples_per_s']:.1f} | "
                       f"{e['train_gflops_per_sample']:.2f} / {e['train_gflops_per_sample_run']:.2f} | "
                       f"{m['achieved_gflops']:.1f} / {m['achieved_gflops_run']:.1f} | "
                       f"{_pct(m.get('fraction_of_matmul_rate'))} / "
                       f"{_pct(m.get('fraction_of_matmul_rate_run'))} | "
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
                run_ratio = None if e is None else (base["train_gflops_per_sample_run"]
                                                    / e["train_gflops_per_sample_run"])
                cells.append("—" if e is None else
                             f"{base['memory']['median_s'] / e['memory']['median_s']:.2f}× ({run_ratio:.2f}×)")
            rows.append(f"| {model} | {px} | {batch} | " + " | ".join(cells) + " |")
        if rows:
            out += [("FLIP throughput over CLIP from the cases above (separate cases; the targets above "
                     "interleave them); in brackets the ratio of the FLOPs run:"), "",
                    "| model | px | batch | " + " | ".join(f"{f} / clip" for f in flips) + " |",
                    "|---|---:|---:|" + "---:|" * len(flips)] + rows + [""]
    return out + device_skip_lines(steps, skips)


def tables(raw: dict, records: list, skipped: list) -> list:
    """Markdown for the ``test_train_step`` and ``test_train_targets`` records (empty when there are
    none): the targets, then a model x strategy table per device."""
    steps, targets = [], []
    for b in records:
        e = b.get("extra_info") or {}
        if e.get("kind") == "train_step" and "memory" in e:
            steps.append(e)
        elif e.get("kind") == "train_targets" and "steps" in e:
            targets.append(e)
    step_skips = skipped_of_test(skipped, "test_train_step")
    target_skips = skipped_of_test(skipped, "test_train_targets")
    if not steps and not targets:
        return []
    out = []
    if targets or target_skips:
        out += ["### Targets (interleaved rounds in one run)", ""]
        for e in sorted(targets, key=lambda e: e["device"] != "cpu"):
            out += _target(e)
        out += [f"- `{s['nodeid'].split('::')[-1]}` not run: {s.get('reason', '')}" for s in target_skips]
        if target_skips:
            out.append("")
    if steps:
        out += ["### Training step per model and strategy", ""] + _steps(steps, step_skips)
    while out and out[-1] == "":
        out.pop()
    return out
