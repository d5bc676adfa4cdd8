"""Evaluation with a model: scoring image-text pairs (quality filtering).

Above data and models in fastclip's layering (data -> models -> losses -> train -> eval), so it
may use both.
"""
from .filter import filter_shards, score_pairs

__all__ = ["filter_shards", "score_pairs"]
