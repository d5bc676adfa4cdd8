"""Evaluation with a model: zero-shot classification, image-text retrieval, scoring image-text
pairs (quality filtering).

Above data and models in fastclip's layering (data -> models -> losses -> train -> eval), so it
may use both; it never imports fastclip.train (the trainer calls in, not the other way round).
The helpers the evaluation loops share (eval mode, device, autocast, batch iteration) are in
:mod:`fastclip.eval.common`.
"""
from .filter import filter_shards, score_pairs
from .retrieval import evaluate_retrieval, retrieval_metrics, retrieval_metrics_reference
from .zero_shot import evaluate_zero_shot, zero_shot_classifier, zero_shot_metrics

__all__ = ["filter_shards", "score_pairs",
           "zero_shot_classifier", "zero_shot_metrics", "evaluate_zero_shot",
           "retrieval_metrics", "retrieval_metrics_reference", "evaluate_retrieval"]
