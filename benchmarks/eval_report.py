"""Tables of the evaluation suite (``test_eval_bench.py``), for ``benchmarks/report.py``: images/s of
zero-shot classification and retrieval per model, with the achieved GFLOP/s against the matmul rate."""

from __future__ import annotations

from report import fmt

SUITE = "eval"
TITLE = "Evaluation"


def tables(raw: dict, records: list, skipped: list) -> list:
    """Markdown for the evaluation records (empty when there are none)."""
    rows = [b.get("extra_info") or {} for b in records]
    rows = [e for e in rows if e.get("kind") == "eval"]
    if not rows:
        return []
    first = rows[0]
    out = [
        f"Evaluation end to end over the built-in dataset's shards ({first.get('images')} images, batch "
        f"{first.get('batch')}, {first.get('threads')} decoding threads; {first.get('machine', '')})"
        + ("; **quick mode: the timings mean nothing**" if first.get("quick") else ""),
        "",
        "| model | image px | task | images/s | image-tower GFLOPs / image | image-tower GFLOP/s "
        "| of the matmul rate |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for e in sorted(rows, key=lambda e: (e.get("gflops_per_image", 0), e.get("task", ""))):
        share = 100 * e["fraction_of_matmul_rate"] if e.get("fraction_of_matmul_rate") else None
        out.append(
            f"| {e.get('model')} | {e.get('image_size')} | {e.get('task')} | {fmt(e.get('images_per_s'), '.0f')} "
            f"| {fmt(e.get('gflops_per_image'), '.3g')} | {fmt(e.get('achieved_gflops'), '.1f')} "
            f"| {fmt(share, '.0f')}% |"
        )
    out += [
        "",
        "End to end: reading, decoding, both towers and the metrics. Zero-shot includes building the "
        "classifier (30 classes x 8 templates through the text tower); retrieval encodes every caption "
        "too. The GFLOP/s count the image tower only (the text tower's share depends on caption "
        "lengths); the matmul rate is the dense fp32 GEMM rate measured in the same run.",
    ]
    return out
