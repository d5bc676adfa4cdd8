"""Scaling laws: power-law fits of error against compute, results tables, plots, planning and sweeps.

Above eval in fastclip's layering (data -> models -> losses -> train -> eval -> scaling).  The fits,
tables and plans read results tables, never a model; the sweep runner (which trains) is imported
only when one of its names is first used, so ``fastclip fit`` and ``plan`` do not load the trainer.
"""

from .fit import FORMS, METHODS, PowerLawFit, TooFewPointsError, fit_power_law, frontier_points
from .plan import Plan, check_plan, plan_from_published, plan_from_results
from .plot import plot_fits
from .results import (
    OPENAI_UPSTREAM,
    PUBLISHED_RESULTS,
    NoValuesError,
    Points,
    load_results,
    published_results,
    select_points,
    study_groups,
    write_results,
)

__all__ = [
    "fit_power_law",
    "PowerLawFit",
    "frontier_points",
    "METHODS",
    "FORMS",
    "TooFewPointsError",
    "NoValuesError",
    "load_results",
    "write_results",
    "Plan",
    "plan_from_published",
    "plan_from_results",
    "check_plan",
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


_SWEEP_NAMES = ("Run", "SweepConfig", "expand", "run_sweep")


def __getattr__(name):
    if name in _SWEEP_NAMES:
        from . import sweep
        return getattr(sweep, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
