"""Quality filtering: score every image-text pair with a fastclip model, keep the top fraction.

    fastclip filter "data/{00000..00009}.tar" --out filtered/ --top 40 --model ViT-Ti-16 \
        --image-size 64 --checkpoint run/checkpoint.pt

Pass 1 decodes every pair with the evaluation transform (resize + centre crop), tokenises the
caption and scores it with the cosine similarity of the model's normalised image and text
features (the "CLIP score" of DataComp's CLIP-score filtering).  Pass 2 streams the shards again
and copies the kept samples, all their members byte for byte, into new shards; the sample's json
gains ``fastclip_score``.  Written next to the shards: ``scores.csv`` (every pair), ``filter.json``
(counts, threshold, what was skipped) and ``score_histogram.png`` (with the threshold), plus the
source's ``meta.json`` updated when it has one (the built-in dataset writes it).
"""
from __future__ import annotations

import csv
import json
import os
import time
import warnings
from typing import Optional, Union

import torch

from ..data.loader import ClipLoader
from ..lazy import plotting
from ..data.shards import DataStats, ShardSource, ShardWriter, expand_shards
from ..models import create_model
from ..tokenizer import get_tokenizer

__all__ = ["score_pairs", "filter_shards", "write_histogram"]


def _resolve_model(model, image_size: int, checkpoint: Optional[str], device: torch.device):
    if isinstance(model, torch.nn.Module):
        return model.to(device).eval()
    m = create_model(model, image_size=image_size, pretrained=checkpoint)
    return m.to(device).eval()


@torch.no_grad()
def score_pairs(shards, model: Union[str, torch.nn.Module] = "ViT-Ti-16", *, image_size: int = 64,
                checkpoint: Optional[str] = None, tokenizer=None, batch_size: int = 256,
                backend: str = "auto", num_threads: int = 2, device="cpu",
                model_name: Optional[str] = None, wrong_modes: str = "convert") -> tuple[dict, DataStats]:
    """({uid: cosine similarity}, stats) for every good pair of ``shards``.

    ``model``: a name for ``fastclip.create_model`` (with ``checkpoint`` for trained weights) or a
    model; ``tokenizer`` defaults to ``fastclip.get_tokenizer(model_name or model)``.
    ``wrong_modes``: "convert" (default: grayscale, RGBA, CMYK, 16-bit images are scored as RGB,
    so filtering judges pairs by content only) or "skip" (see :class:`fastclip.data.ClipLoader`).
    """
    device = torch.device(device)
    net = _resolve_model(model, image_size, checkpoint, device)
    if tokenizer is None:
        name = model_name or (model if isinstance(model, str) else "ViT-B-32")
        tokenizer = get_tokenizer(name)
    loader = ClipLoader(shards, batch_size, image_size=image_size, augment="clip", train=False, shuffle=0,
                        tokenizer=tokenizer, backend=backend, num_threads=num_threads, device=device,
                        rank=0, world_size=1, worker=0, num_workers=1, return_meta=True,
                        wrong_modes=wrong_modes)
    scores = {}
    for images, tokens, meta in loader:
        fi = net.encode_image(images, normalize=True)
        ft = net.encode_text(tokens, normalize=True)
        for uid, s in zip(meta["uids"], (fi * ft).sum(-1).float().cpu().tolist()):
            scores[uid] = s
    return scores, loader.epoch_stats


def write_histogram(scores, threshold: Optional[float], path: str, title: str = "") -> Optional[str]:
    """A PNG histogram of ``scores`` with the threshold; returns None, or why it could not be written."""
    plt, why = plotting()
    if plt is None:
        return f"{why}; install matplotlib (pip install matplotlib) for the score histogram"
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(list(scores), bins=50, color="#4C72B0")
    if threshold is not None:
        ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold:.4f}")
        ax.legend()
    ax.set_xlabel("image-text cosine similarity")
    ax.set_ylabel("pairs")
    ax.set_title(title or "fastclip filter: score histogram")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def filter_shards(shards, out_dir: str, *, keep: float = 0.4,
                  model: Union[str, torch.nn.Module] = "ViT-Ti-16", image_size: int = 64,
                  checkpoint: Optional[str] = None, tokenizer=None, batch_size: int = 256,
                  backend: str = "auto", num_threads: int = 2, device="cpu", samples_per_shard: int = 1000,
                  histogram: bool = True, prefix: str = "shard", wrong_modes: str = "convert") -> dict:
    """Keep the top ``keep`` fraction (0 < keep <= 1) of ``shards`` by CLIP score; write new shards.

    ``wrong_modes`` as in :func:`score_pairs`: by default images of other modes than RGB are
    scored (as RGB) and kept or dropped by score like the rest; "skip" drops them all.

    Returns the report also written to ``out_dir/filter.json``: ``scored``, ``kept``,
    ``threshold`` (lowest kept score), ``shards`` (pattern of the new shards, absolute),
    ``skipped`` (per reason), ``histogram`` (path or None) and ``histogram_error``.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    scores, stats = score_pairs(shards, model, image_size=image_size, checkpoint=checkpoint,
                                tokenizer=tokenizer, batch_size=batch_size, backend=backend,
                                num_threads=num_threads, device=device, wrong_modes=wrong_modes)
    n = len(scores)
    n_keep = min(n, max(1, round(keep * n))) if n else 0
    ranked = sorted(scores, key=lambda u: (-scores[u], u))  # ties: the earlier sample first
    kept = set(ranked[:n_keep])
    threshold = scores[ranked[n_keep - 1]] if n_keep else None

    # Pass 2: copy the kept samples byte for byte.
    urls = expand_shards(shards)
    n_out = max(1, (n_keep + samples_per_shard - 1) // samples_per_shard)
    width = max(5, len(str(n_out - 1)))
    pattern = os.path.join(out_dir, f"{prefix}-%0{width}d.tar")
    source = ShardSource(urls, shuffle=0, keep_members=True)
    rows = []
    with ShardWriter(pattern, samples_per_shard) as writer:
        for s in source.iter(0, 0, 1, DataStats(warn=False)):
            if s.uid not in scores:
                continue  # failed to decode in pass 1 (counted there)
            score = scores[s.uid]
            rows.append((s.shard, s.key, score, s.uid in kept))
            if s.uid not in kept:
                continue
            members = dict(s.members)
            meta = {}
            if "json" in members:
                try:
                    meta = json.loads(members["json"].decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    meta = None
            if isinstance(meta, dict):
                meta["fastclip_score"] = score
                members["json"] = json.dumps(meta).encode("utf-8")
            writer.write(s.key, members)
        written = writer.total
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["shard", "key", "score", "kept"])
        w.writerows(rows)

    hist_path, hist_error = os.path.join(out_dir, "score_histogram.png"), None
    if histogram and n:
        hist_error = write_histogram(scores.values(), threshold, hist_path,
                                     f"{n} pairs, top {100 * keep:g}% kept (>= {threshold:.4f})")
    if not histogram or hist_error or not n:
        hist_path = None
    if hist_error:
        warnings.warn(f"fastclip filter: no histogram: {hist_error}", UserWarning, stacklevel=2)
    braces = f"{{{0:0{width}d}..{n_out - 1:0{width}d}}}"
    out_pattern = os.path.join(os.path.abspath(out_dir), f"{prefix}-{braces}.tar")
    report = {
        "source": [os.path.abspath(u) for u in urls] if len(urls) <= 16 else f"{len(urls)} shards",
        "scored": n, "kept": written, "keep": keep, "threshold": threshold,
        "model": model if isinstance(model, str) else type(model).__name__, "checkpoint": checkpoint,
        "image_size": image_size, "shards": out_pattern, "skipped": dict(stats.skipped),
        "histogram": hist_path, "histogram_error": hist_error, "seconds": round(time.perf_counter() - t0, 2),
    }
    with open(os.path.join(out_dir, "filter.json"), "w") as f:
        json.dump(report, f, indent=1)
    _copy_meta(urls, out_dir, report)
    return report


def _copy_meta(urls, out_dir: str, report: dict) -> None:
    """Carry the source's meta.json (class names, templates) over, updated for the filtered set."""
    src = os.path.join(os.path.dirname(os.path.abspath(urls[0])), "meta.json")
    if not os.path.exists(src) or os.path.abspath(src) == os.path.abspath(os.path.join(out_dir, "meta.json")):
        return
    try:
        with open(src) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return
    meta.update(num_samples=report["kept"], shards=os.path.basename(report["shards"]),
                shards_path=report["shards"],
                filtered={k: report[k] for k in ("scored", "kept", "keep", "threshold", "model",
                                                 "checkpoint")})
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
