"""fastclip.scaling.fit: the frontier, the power and saturating fits, bootstrap intervals, bad input."""

import math

import numpy as np
import pytest

from fastclip.scaling import fit_power_law, frontier_points


def synthetic(a=2.0, b=-0.15, c=0.0, n=60, noise=0.0, seed=0, spread=(1e4, 1e10)):
    rng = np.random.default_rng(seed)
    compute = np.exp(rng.uniform(math.log(spread[0]), math.log(spread[1]), n))
    error = a * compute**b + c
    error = error * np.exp(noise * rng.standard_normal(n))
    return compute, np.clip(error, 1e-6, 1.0)


@pytest.mark.parametrize("a, b", [(2.0, -0.15), (0.9, -0.05), (5.0, -0.3)])
def test_recovers_a_and_b_of_an_exact_power_law(a, b):
    c, e = synthetic(a, b)
    for method in ("frontier", "lstsq"):
        fit = fit_power_law(c, e, method)
        assert fit.a == pytest.approx(a, rel=1e-9) and fit.b == pytest.approx(b, abs=1e-12)
        assert fit.predict(1e12) == pytest.approx(a * 1e12**b, rel=1e-9)


def test_frontier_takes_the_least_error_per_log_compute_bin():
    # bins of log10 C over [0, 5]: width 1; two points per bin, the frontier keeps the better one
    c = np.array([1, 5, 10, 50, 100, 500, 1000, 5000, 1e4, 1e5])
    e = np.array([0.9, 0.8, 0.85, 0.7, 0.6, 0.65, 0.5, 0.55, 0.45, 0.4])
    idx = frontier_points(c, e, bins=5)
    assert c[idx].tolist() == [5, 50, 100, 1000, 1e5]  # 1e4 and 1e5: the last bin includes its right edge
    fit = fit_power_law(c, e, "frontier")
    assert fit.compute.tolist() == [5, 50, 100, 1000, 1e5]
    b, log_a = np.polyfit(np.log(c[idx]), np.log(e[idx]), 1)
    assert fit.b == pytest.approx(b) and fit.a == pytest.approx(math.exp(log_a))


def test_frontier_ignores_runs_that_are_not_compute_efficient():
    c, e = synthetic(1.5, -0.12, n=40, seed=1)
    worse = e * 1.3  # the same compute, strictly worse runs
    fit = fit_power_law(np.r_[c, c], np.r_[e, np.minimum(worse, 1.0)], "frontier")
    assert fit.b == pytest.approx(-0.12, abs=1e-9)


def test_noisy_law_with_bootstrap_interval_covers_the_truth():
    c, e = synthetic(2.0, -0.15, n=200, noise=0.05, seed=3)
    fit = fit_power_law(c, e, "lstsq", bootstrap=300, seed=1)
    lo, hi = fit.ci["b"]
    assert lo < -0.15 < hi and hi - lo < 0.05
    plo, phi = fit.interval(1e14)  # far beyond the data: wider than inside
    ilo, ihi = fit.interval(1e7)
    assert plo < 2.0 * 1e14**-0.15 < phi and (phi - plo) / fit.predict(1e14) > (ihi - ilo) / fit.predict(1e7)
    assert fit.extrapolates(1e14) and not fit.extrapolates(1e7)


def test_saturating_form_recovers_the_floor():
    c, e = synthetic(3.0, -0.25, c=0.2, n=80, seed=4)
    fit = fit_power_law(c, e, "lstsq", form="saturating")
    assert fit.c == pytest.approx(0.2, abs=1e-4) and fit.b == pytest.approx(-0.25, abs=1e-3)
    assert "+ 0.2" in fit.formula()


def test_formula_and_dict():
    fit = fit_power_law([1, 10, 100], [0.5, 0.25, 0.125], "lstsq")
    assert fit.formula() == "E = 0.5 * C^-0.301"
    d = fit.as_dict()
    assert d["points"] == [[1.0, 0.5], [10.0, 0.25], [100.0, 0.125]] and d["compute_range"] == [1.0, 100.0]


@pytest.mark.parametrize(
    "compute, error, match",
    [
        ([1, 2, -3], [0.5, 0.4, 0.3], r"compute must be finite and > 0, got \[-3.0\]"),
        ([1, 2, float("inf")], [0.5, 0.4, 0.3], "compute must be finite"),
        ([1, 2, 3], [0.5, 0.0, 0.3], r"error must be in \(0, 1\]"),
        ([1, 2, 3], [0.5, 1.2, 0.3], r"error must be in \(0, 1\]"),
        ([1, 2, 3], [0.5, 0.4], "the same length, got 3 and 2"),
        ([5], [0.5], "needs at least 2 points"),
        ([5, 5, 5], [0.5, 0.4, 0.3], "needs at least 2 points of different compute"),
    ],
)
def test_bad_points_are_refused_naming_the_problem(compute, error, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(compute, error, "lstsq")


def test_bad_options():
    c, e = synthetic()
    with pytest.raises(ValueError, match="method must be one of"):
        fit_power_law(c, e, "mean")
    with pytest.raises(ValueError, match="form must be one of"):
        fit_power_law(c, e, form="exp")
    with pytest.raises(ValueError, match="bootstrap must be an int"):
        fit_power_law(c, e, bootstrap=-1)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        fit_power_law(c, e, level=1.5)
    with pytest.raises(ValueError, match="saturating fit needs at least 3 points"):
        fit_power_law([1, 10], [0.5, 0.4], "lstsq", form="saturating")
    fit = fit_power_law(c, e)
    with pytest.raises(ValueError, match="no bootstrap"):
        fit.interval(10.0)
    with pytest.raises(ValueError, match="compute must be finite and > 0"):
        fit.predict(0.0)


# The study's fits, computed once from its published table with this code (LAION: frontier of 5
# log-compute bins; OpenAI: least squares through its 3 models; compute = gmacs_total).  The slopes
# are the scaling coefficients the paper reports for these tasks (zero-shot ImageNet: OpenCLIP
# -0.11, OpenAI CLIP -0.16; MS-COCO image retrieval R@5: OpenCLIP -0.08, OpenAI CLIP -0.05).
PUBLISHED_FITS = [
    ("acc1", "imagenet1k", "LAION (OpenCLIP)", 5.808237, -0.1109418, -0.11),
    ("acc1", "imagenet1k", "OpenAI (CLIP-WIT)", 23.18355, -0.1637747, -0.16),
    ("image_retrieval_recall@5", "mscoco_captions", "LAION (OpenCLIP)", 2.803548, -0.0798320, -0.08),
    ("image_retrieval_recall@5", "mscoco_captions", "OpenAI (CLIP-WIT)", 1.588605, -0.0507594, -0.05),
]


@pytest.mark.parametrize("metric, dataset, group, a, b, paper_b", PUBLISHED_FITS)
def test_the_study_fits_on_its_published_results(metric, dataset, group, a, b, paper_b):
    from fastclip.scaling import published_results, study_groups

    pts = {g.name: g for g in study_groups(published_results(), metric, dataset)}[group]
    fit = fit_power_law(pts.compute, pts.error, pts.method)
    assert fit.a == pytest.approx(a, rel=1e-5) and fit.b == pytest.approx(b, abs=1e-6)
    assert round(fit.b, 2) == paper_b
    assert set(fit.compute.tolist()) <= set(pts.compute.tolist())  # the frontier's points are real runs


def test_too_few_points_for_a_bootstrap_is_its_own_error():
    """Callers (the planner) tell 'no interval possible' from other failures by type, not by text."""
    from fastclip.scaling import TooFewPointsError
    with pytest.raises(TooFewPointsError, match="too few distinct points"):
        # two points: about half the resamples draw one point twice (45 of 100 fit with seed 0)
        fit_power_law([10.0, 100.0], [0.5, 0.4], "lstsq", bootstrap=100, seed=0)
    assert issubclass(TooFewPointsError, ValueError)
