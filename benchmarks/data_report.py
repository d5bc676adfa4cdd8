"""Tables of the data-pipeline suite (``test_data_bench.py``), for ``benchmarks/report.py``.

A loader table (images/s, ratio to the PIL fallback, time to the first batch), an augment-op table
(images/s per backend, time over the copy floor), a tokenizer table and the dataset-generation
time; records are told apart by their extra_info ``kind`` (the dataset generation has none: it
has ``samples`` and ``seconds``).
"""
from __future__ import annotations

from report import fmt

SUITE = "data"
TITLE = "Data-pipeline"          # "# Data-pipeline benchmarks: <file>"
SECTION = "Data pipeline"        # "## Data pipeline" in a report of several suites
SECTION_WHEN_ALONE = False       # alone, the tables follow the title directly
MACHINE_SECTION = False          # each table names its machine
LOADER_ORDER = ("pil", "dali", "dali-all", "dali-mixed")


def tables(raw: dict, records: list, skipped: list) -> list:
    """Markdown for the loader, augment, tokenizer and dataset-generation records (empty when there
    are none)."""
    loaders, tokenizers, augments, other = {}, {}, {}, []
    for b in records:
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
                       f"{fmt(e.get('x_pil'), '.2f')} | {fmt(e.get('first_batch_s'), '.3f')} s |")
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
            out.append(f"| {preset} | {prov} | {e['images_per_s']:.0f} | {fmt(e.get('x_floor'), '.2f')} | "
                       f"{fmt(e.get('x_torch'), '.2f')} |")
        out.append("")
    if tokenizers:
        out += ["| tokenizer | captions/s | × open_clip | ids identical to open_clip |",
                "|---|---:|---:|---|"]
        for prov, e in sorted(tokenizers.items()):
            out.append(f"| {prov} | {e['captions_per_s']:.0f} | {fmt(e.get('x_open_clip'), '.1f')} | "
                       f"{'yes' if e.get('ids_identical_to_open_clip') else '—'} |")
        out.append("")
    for name, e in other:
        target = f" (target {e['target_s']:g} s)" if e.get("target_s") else ""
        out.append(f"- {name}: {e['samples']} samples in {e['seconds']:.2f} s{target}")
    return out
