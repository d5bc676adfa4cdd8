"""Power laws of downstream error against training compute, as the scaling-law study fits them.

    E(C) = a * C^b              (``form="power"``: a straight line in log-log space)
    E(C) = a * C^b + c          (``form="saturating"``: an irreducible error c >= 0)

``method="frontier"`` is the study's fit (Cherti et al., "Reproducible scaling laws for contrastive
language-image learning"): split log10(C) into ``bins`` (5) equal-width bins between the smallest and
the largest compute, keep the point of least error in each non-empty bin (the compute-efficient
frontier: the best any model reached at that compute), and fit through those points by least
squares in log-log space.  ``method="lstsq"`` fits every point (the study uses it for OpenAI's
models, whose few points are all on their frontier).

Uncertainty: ``bootstrap=B`` refits B resamples of the input points (drawn with replacement, the
frontier re-taken in each), giving percentile intervals for a, b (and c) and, through
:meth:`PowerLawFit.interval`, for predictions at any compute.  A prediction outside the compute
range of the points used is an extrapolation: :meth:`PowerLawFit.extrapolates` says so, and the
interval widens with the distance in log compute as the resampled slopes spread.

The saturating form needs scipy (``scipy.optimize.curve_fit``, imported lazily); its residuals are
taken in log space like the power form's, so that small errors weigh as much as large ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..lazy import require_module

__all__ = ["PowerLawFit", "fit_power_law", "frontier_points", "TooFewPointsError", "METHODS", "FORMS"]

METHODS = ("frontier", "lstsq")
FORMS = ("power", "saturating")


class TooFewPointsError(ValueError):
    """The points are too few (too few distinct compute values) for the fit or its bootstrap."""


@dataclass
class PowerLawFit:
    """A fitted law E = a * C^b (+ c).

    ``compute``/``error``: the points the fit went through (the frontier for ``method="frontier"``);
    ``all_compute``/``all_error``: every point given.  ``ci``: parameter -> (low, high) at ``level``
    from the bootstrap (empty without one); ``samples``: the bootstrap's [B, 3] (a, b, c) rows.
    """

    a: float
    b: float
    c: float = 0.0
    method: str = "frontier"
    form: str = "power"
    compute: np.ndarray = field(default_factory=lambda: np.zeros(0))
    error: np.ndarray = field(default_factory=lambda: np.zeros(0))
    all_compute: np.ndarray = field(default_factory=lambda: np.zeros(0))
    all_error: np.ndarray = field(default_factory=lambda: np.zeros(0))
    level: float = 0.95
    ci: dict = field(default_factory=dict)
    samples: Optional[np.ndarray] = None

    def predict(self, compute) -> np.ndarray:
        """E at ``compute`` (scalar or array, > 0)."""
        c = _positive_array(compute, "compute")
        return self.a * np.power(c, self.b) + self.c

    def interval(self, compute, level: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) percentile band of the bootstrap's predictions at ``compute``."""
        if self.samples is None or len(self.samples) == 0:
            raise ValueError("this fit has no bootstrap: fit with bootstrap=B (e.g. 1000) for intervals")
        level = self.level if level is None else _check_level(level)
        c = _positive_array(compute, "compute")
        preds = self.samples[:, :1] * np.power(c.reshape(1, -1), self.samples[:, 1:2]) + self.samples[:, 2:3]
        lo, hi = np.percentile(preds, [50 * (1 - level), 50 * (1 + level)], axis=0)
        return lo.reshape(c.shape), hi.reshape(c.shape)

    def extrapolates(self, compute) -> np.ndarray:
        """True where ``compute`` lies outside the compute range of the points fitted."""
        c = _positive_array(compute, "compute")
        return (c < self.compute.min()) | (c > self.compute.max())

    def formula(self, digits: int = 3, var: str = "C") -> str:
        """ "E = 1.48 * C^-0.110" (and " + c" for the saturating form); ``var`` names the variable."""
        base = f"E = {self.a:.{digits}g} * {var}^{self.b:.{digits}f}"
        return base + (f" + {self.c:.{digits}g}" if self.form == "saturating" else "")

    def as_dict(self) -> dict:
        """Plain data for JSON: the parameters, their intervals, the points used."""
        return {"a": self.a, "b": self.b, "c": self.c, "method": self.method, "form": self.form,
                "formula": self.formula(), "level": self.level,
                "ci": {k: list(v) for k, v in self.ci.items()},
                "points": [[float(x), float(y)] for x, y in zip(self.compute, self.error)],
                "compute_range": [float(self.compute.min()), float(self.compute.max())]}


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _positive_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        bad = arr[~(np.isfinite(arr) & (arr > 0))]
        raise ValueError(f"{name} must be finite and > 0, got {bad[:5].tolist()}")
    return arr


def _check_level(level) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return level


def _check_points(compute, error) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(compute, dtype=np.float64).reshape(-1)
    e = np.asarray(error, dtype=np.float64).reshape(-1)
    if c.shape != e.shape:
        raise ValueError(f"compute and error must have the same length, got {c.size} and {e.size}")
    c = _positive_array(c, "compute")
    if not np.all(np.isfinite(e)) or np.any(e <= 0) or np.any(e > 1):
        bad = e[~(np.isfinite(e) & (e > 0) & (e <= 1))]
        raise ValueError(f"error must be in (0, 1] (error = 1 - metric), got {bad[:5].tolist()}")
    return c, e


# ----------------------------------------------------------------------------------------------
# The frontier and the fits
# ----------------------------------------------------------------------------------------------
def frontier_points(compute, error, bins: int = 5) -> np.ndarray:
    """Indices of the compute-efficient frontier: the least-error point in each of ``bins``
    equal-width bins of log10(compute) (empty bins are skipped), in order of compute."""
    c, e = _check_points(compute, error)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    logc = np.log10(c)
    lo, hi = logc.min(), logc.max()
    if hi == lo:
        return np.array([int(np.argmin(e))])
    which = np.minimum(((logc - lo) / (hi - lo) * bins).astype(int), bins - 1)
    keep = []
    for k in range(bins):
        idx = np.flatnonzero(which == k)
        if idx.size:
            keep.append(int(idx[np.argmin(e[idx])]))
    return np.array(sorted(keep, key=lambda i: c[i]))


def _loglog_lstsq(c: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    b, log_a = np.polyfit(np.log(c), np.log(e), 1)
    return float(math.exp(log_a)), float(b)


def _saturating(c: np.ndarray, e: np.ndarray, start: tuple[float, float]) -> tuple[float, float, float]:
    optimize = require_module("scipy.optimize", "the saturating fit (form='saturating')")
    logc, loge = np.log(c), np.log(e)

    def model(x, log_a, b, c0):
        return np.log(np.exp(log_a + b * x) + c0)

    a0, b0 = start
    p, _ = optimize.curve_fit(
        model,
        logc,
        loge,
        p0=(math.log(a0), b0, 0.0),
        bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, float(e.min())]),
        maxfev=20000,
        ftol=1e-14,
        xtol=1e-14,
        gtol=1e-14,
    )
    return float(math.exp(p[0])), float(p[1]), float(p[2])


def _fit_once(c: np.ndarray, e: np.ndarray, method: str, form: str, bins: int):
    idx = frontier_points(c, e, bins) if method == "frontier" else np.argsort(c, kind="stable")
    need = 2 if form == "power" else 3
    if len(np.unique(c[idx])) < need:
        raise ValueError(
            f"a {form} fit needs at least {need} points of different compute, got "
            f"{len(np.unique(c[idx]))}"
            + (f" on the frontier ({bins} bins of log compute)" if method == "frontier" else "")
        )
    a, b = _loglog_lstsq(c[idx], e[idx])
    c0 = 0.0
    if form == "saturating":
        a, b, c0 = _saturating(c[idx], e[idx], (a, b))
    return a, b, c0, idx


def fit_power_law(
    compute: Sequence[float],
    error: Sequence[float],
    method: str = "frontier",
    *,
    form: str = "power",
    bins: int = 5,
    bootstrap: int = 0,
    level: float = 0.95,
    seed: int = 0,
) -> PowerLawFit:
    """Fit E = a * C^b (or a * C^b + c) to (compute, error) points.

    Args:
        compute: training compute per point (GFLOPs, GMACs, ...: the unit is the caller's), > 0.
        error: 1 - metric per point, in (0, 1].
        method: "frontier" (the study's: least error per log-compute bin, then least squares in
            log-log space) or "lstsq" (every point).
        form: "power" or "saturating" (adds c >= 0; needs scipy).
        bins: number of equal-width log10(compute) bins of the frontier.
        bootstrap: number of resamples for intervals (0: none).
        level: interval level (0.95).
        seed: the bootstrap's random seed.

    Returns:
        :class:`PowerLawFit`.

    Raises:
        ValueError naming the problem: non-positive or non-finite compute, error outside (0, 1],
        lengths that differ, fewer points (of different compute) than the form needs.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an int >= 0, got {bootstrap!r}")
    level = _check_level(level)
    c, e = _check_points(compute, error)
    a, b, c0, idx = _fit_once(c, e, method, form, bins)
    fit = PowerLawFit(a, b, c0, method, form, c[idx], e[idx], c, e, level)
    if bootstrap:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(bootstrap):
            pick = rng.integers(0, len(c), len(c))
            try:
                rows.append(_fit_once(c[pick], e[pick], method, form, bins)[:3])
            except (ValueError, RuntimeError):  # a resample with too few distinct points: skipped
                continue
        if len(rows) < max(10, bootstrap // 2):
            raise TooFewPointsError(
                f"only {len(rows)} of {bootstrap} bootstrap resamples could be fitted: too few "
                f"distinct points ({len(np.unique(c))}) for intervals"
            )
        fit.samples = np.array(rows)
        q = [50 * (1 - level), 50 * (1 + level)]
        names = ("a", "b", "c") if form == "saturating" else ("a", "b")
        fit.ci = {
            k: tuple(float(v) for v in np.percentile(fit.samples[:, i], q)) for i, k in enumerate(names)
        }
    return fit
