"""Evaluation with a model: zero-shot classification, image-text retrieval, the linear probe,
scoring image-text pairs (quality filtering).

Above data and models in fastclip's layering (data -> models -> losses -> train -> eval), so it
may use both; it never imports fastclip.train (the trainer calls in, not the other way round).
The helpers the evaluation loops share (eval mode, device, autocast, batch iteration) are in
:mod:`fastclip.eval.common`.  :func:`run_suite` (``fastclip eval``, :mod:`fastclip.eval.suite`)
runs them over datasets of shards for a checkpoint and writes one JSON per result plus a table.
"""
from .filter import filter_shards, score_pairs
from .linear_probe import (LinearProbe, evaluate_linear_probe, extract_features, fit_linear_probe, linear_probe_metrics,
                           model_fingerprint)
from .retrieval import evaluate_retrieval, retrieval_metrics, retrieval_metrics_reference
from .suite import TASKS, load_eval_model, run_suite, write_tables
from .zero_shot import evaluate_zero_shot, zero_shot_classifier, zero_shot_metrics

__all__ = ["filter_shards", "score_pairs",
           "zero_shot_classifier", "zero_shot_metrics", "evaluate_zero_shot",
           "retrieval_metrics", "retrieval_metrics_reference", "evaluate_retrieval",
           "TASKS", "run_suite", "load_eval_model", "write_tables",
           "LinearProbe", "extract_features", "fit_linear_probe", "linear_probe_metrics", "evaluate_linear_probe",
           "model_fingerprint"]
