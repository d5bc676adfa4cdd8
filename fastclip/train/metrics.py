"""What a run reports: metrics as JSONL (and TensorBoard), a progress bar, curves as a PNG.

``metrics.jsonl`` has one JSON object per line: ``{"kind": "train", "step", "samples", "gflops",
"seconds", "loss", "loss/<term>", "lr", "logit_scale", "mask_ratio", "samples_per_s", "gflops_per_s",
"mfu", "data/..."}`` every ``log.every_steps`` steps, and ``{"kind": "eval", "step", ...,
"<set>/<metric>": value}`` after every evaluation.  ``samples_per_s`` and ``gflops_per_s`` are over
the wall time since the previous record; ``mfu`` (only with ``log.mfu``) is ``gflops_per_s`` as a
fraction of the dense matmul rate measured at the start (``fastclip.train.trainer`` says how).
A resumed run first drops the lines written after its checkpoint, so the file
reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

from ..lazy import optional_module, plotting

__all__ = ["MetricsWriter", "ProgressBar", "read_metrics", "plot_curves"]


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str) -> list:
    """The records of a ``metrics.jsonl`` (a torn last line, from a crash mid-write, is ignored)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` (line-buffered, flushed) and optionally TensorBoard."""

    def __init__(self, output_dir: str, tensorboard: bool = False, resume_step: Optional[int] = None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
            os.replace(self.path + ".tmp", self.path)
        elif os.path.exists(self.path):
            os.unlink(self.path)
        self._f = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            tb, why = optional_module("torch.utils.tensorboard")
            if tb is None:
                raise RuntimeError(f"log.tensorboard=true needs the tensorboard package ({why}); "
                                   "pip install tensorboard")
            self._tb = tb.SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            kind = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind"):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


class ProgressBar:
    """A tqdm bar over the budget (per mille of the first limit reached) with samples/s, loss and
    step; silent when disabled, on non-main ranks, or without tqdm."""

    def __init__(self, enabled: bool, initial: float = 0.0):
        self._bar = None
        if not enabled:
            return
        tqdm_auto, _ = optional_module("tqdm.auto")
        if tqdm_auto is None:
            return
        self._bar = tqdm_auto.tqdm(total=1000, initial=int(initial * 1000), unit="‰", desc="budget",
                         bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
                         file=sys.stderr, dynamic_ncols=True,
                         mininterval=0.2 if sys.stderr.isatty() else 10.0)  # a log file gets a line per 10 s
        self._at = int(initial * 1000)

    def update(self, progress: float, **postfix) -> None:
        if self._bar is None:
            return
        now = int(min(1.0, progress) * 1000)
        if now > self._at:
            self._bar.update(now - self._at)
            self._at = now
        self._bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in postfix.items()), refresh=False)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def plot_curves(metrics_path: str, out_png: str) -> Optional[str]:
    """Loss (and learning rate) against samples seen, and every evaluation metric, as one PNG.
    Returns the path, or None when matplotlib is missing."""
    plt, _ = plotting()
    if plt is None:
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float))]
    evals = [r for r in records if r.get("kind") == "eval"]
    keys = sorted({k for r in evals for k in r if "/" in k and isinstance(r[k], (int, float))
                   and not k.endswith(("num_samples", "num_classes", "num_images", "num_texts", "seconds"))})
    fig, axes = plt.subplots(1, 2 if keys else 1, figsize=(12 if keys else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["samples"] for r in train], [r["loss"] for r in train], label="loss")
        ax.set_xlabel("samples seen")
        ax.set_ylabel("training loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
    if keys:
        ax = axes[0][1]
        for k in keys:
            pts = [(r["samples"], r[k]) for r in evals if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax.set_xlabel("samples seen")
        ax.set_title("evaluation")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
