"""Scaling laws: power-law fits of error against compute, results tables, plots.

Above eval in fastclip's layering (data -> models -> losses -> train -> eval -> scaling): it reads
results tables, never a model.
"""

from .fit import FORMS, METHODS, PowerLawFit, fit_power_law, frontier_points
from .plot import plot_fits
from .results import (
    OPENAI_UPSTREAM,
    PUBLISHED_RESULTS,
    Points,
    load_results,
    published_results,
    select_points,
    study_groups,
)
from .sweep import Run, SweepConfig, expand, run_sweep

__all__ = [
    "fit_power_law",
    "PowerLawFit",
    "frontier_points",
    "METHODS",
    "FORMS",
    "load_results",
    "select_points",
    "study_groups",
    "Points",
    "OPENAI_UPSTREAM",
    "plot_fits",
    "PUBLISHED_RESULTS",
    "published_results",
    "SweepConfig",
    "Run",
    "expand",
    "run_sweep",
]
