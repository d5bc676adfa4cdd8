"""Error against compute on log-log axes: the points of each group, its fitted law with the formula
and, when the fit has a bootstrap, its confidence band."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ..lazy import plotting
from .fit import PowerLawFit
from .results import Points

__all__ = ["plot_fits"]

_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def plot_fits(
    groups: Sequence[tuple[Points, PowerLawFit]],
    out_png: str,
    *,
    title: str = "",
    xlabel: str = "compute",
    ylabel: str = "error (1 - metric)",
) -> Optional[str]:
    """Write the PNG; returns None, or why it could not be written (matplotlib missing)."""
    plt, why = plotting()
    if plt is None:
        return f"{why}; install matplotlib (pip install matplotlib) for the plot"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for k, (pts, fit) in enumerate(groups):
        colour = _COLOURS[k % len(_COLOURS)]
        ax.scatter(
            pts.compute,
            pts.error,
            s=14,
            alpha=0.5,
            color=colour,
            label=f"{pts.name} ({len(pts.compute)} runs)",
        )
        ax.scatter(fit.compute, fit.error, s=36, facecolors="none", edgecolors=colour, linewidths=1.2)
        lo, hi = np.log10(pts.compute.min()), np.log10(pts.compute.max())
        xs = np.logspace(lo - 0.3, hi + 0.3, 100)
        ax.plot(xs, fit.predict(xs), color=colour, linewidth=1.5, label=f"{fit.formula()} ({fit.method})")
        if fit.samples is not None:
            band_lo, band_hi = fit.interval(xs)
            ax.fill_between(xs, band_lo, band_hi, color=colour, alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return None
