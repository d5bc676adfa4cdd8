"""The trainer's in-loop evaluation: a callback over ``fastclip.eval`` (which never imports train).

:func:`make_eval_callback` checks the evaluation sets when the run starts (the shards exist; the
zero-shot set has labels and class names) and returns ``evaluate(model) -> {"<set>/<metric>": value}``
or None when no set is configured.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

from .config import ConfigError, EvalConfig

__all__ = ["make_eval_callback", "check_shards", "load_classnames"]


def check_shards(pattern: str, key: str) -> list:
    """The shard files of ``pattern`` that exist; ConfigError naming ``key`` if none exists (the
    reader counts a missing shard and goes on)."""
    from ..eval.suite import shard_files
    try:
        return shard_files(pattern, key, require_all=False)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None


def load_classnames(path: Optional[str], shards: str) -> tuple:
    """(classnames, templates): from ``path`` (JSON with both lists), else the ``meta.json`` beside the
    shards (the built-in dataset writes one), else the built-in dataset's."""
    from ..data.synthetic import CLASSNAMES, TEMPLATES
    from ..eval.suite import meta_classnames, read_classnames
    if path:
        try:
            return read_classnames(path)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"eval.classnames: {exc}") from None
    files = check_shards(shards, "eval.zero_shot")
    try:
        found = meta_classnames(files)
    except ValueError as exc:
        raise ConfigError(f"eval.zero_shot: {exc}") from None
    return found[:2] if found is not None else (list(CLASSNAMES), list(TEMPLATES))


def make_eval_callback(cfg: EvalConfig, image_size: int, tokenizer, device, autocast_dtype=None,
                       num_threads: int = 2, backend: str = "auto") -> Optional[Callable]:
    """``evaluate(model) -> dict`` over the configured sets (zero-shot, retrieval), or None."""
    if not cfg.zero_shot and not cfg.retrieval:
        return None
    size = cfg.image_size or image_size
    sets = []
    if cfg.zero_shot:
        from ..eval.suite import first_sample
        first = first_sample(check_shards(cfg.zero_shot, "eval.zero_shot"))
        if first is None:
            raise ConfigError(f"eval.zero_shot={cfg.zero_shot!r} holds no readable sample")
        if first.label < 0:
            raise ConfigError(f"eval.zero_shot={cfg.zero_shot!r} has no labels (.cls or json 'label'); zero-shot "
                              "classification needs a labelled set")
        classnames, templates = load_classnames(cfg.classnames, cfg.zero_shot)
        sets.append(("zero_shot", cfg.zero_shot, classnames, templates))
    if cfg.retrieval:
        check_shards(cfg.retrieval, "eval.retrieval")
        sets.append(("retrieval", cfg.retrieval, None, None))
    max_batches = None if cfg.max_samples is None else math.ceil(cfg.max_samples / cfg.batch_size)

    def loader(shards, with_labels):
        from ..data.loader import ClipLoader
        return ClipLoader(shards, cfg.batch_size, image_size=size, train=False, tokenizer=tokenizer,
                          with_labels=with_labels, shuffle=0, num_threads=num_threads, backend=backend,
                          device=device, rank=0, world_size=1, worker=0, num_workers=1, warn=False)

    def evaluate(model) -> dict:
        from ..eval.retrieval import evaluate_retrieval
        from ..eval.zero_shot import evaluate_zero_shot, zero_shot_classifier
        out = {}
        for kind, shards, classnames, templates in sets:
            t = time.perf_counter()
            if kind == "zero_shot":
                clf = zero_shot_classifier(model, classnames, templates, tokenizer, device=device)
                metrics = evaluate_zero_shot(model, loader(shards, True), classnames, templates, tokenizer,
                                             device=device, classifier=clf, autocast_dtype=autocast_dtype,
                                             max_batches=max_batches)
            else:
                metrics = evaluate_retrieval(model, loader(shards, False), device=device,
                                             autocast_dtype=autocast_dtype, max_batches=max_batches)
            out.update({f"{kind}/{k}": v for k, v in metrics.items()})
            out[f"{kind}/seconds"] = round(time.perf_counter() - t, 3)
        return out

    return evaluate
