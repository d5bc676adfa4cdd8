"""Results tables: rows of (model, compute, samples seen, metrics) read from CSV, and the points a
fit needs taken from them.

The layout is the scaling-law study's (``zeroshot_results.csv``: ``arch, samples_seen,
gmacs_total, upstream_dataset, downstream_dataset, acc1, image_retrieval_recall@5, ...``), which
``fastclip sweep`` also writes (its compute column is ``gflops``).  A metric is turned into an
error as 1 - metric; compute is whatever column the caller names.

:func:`study_groups` splits the study's rows the way the study fits them: models trained on LAION
(any size) on their compute-efficient frontier, OpenAI's (upstream ``CLIP-WIT``) by least squares
through all of their points.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

__all__ = [
    "load_results",
    "write_results",
    "NoValuesError",
    "Points",
    "select_points",
    "study_groups",
    "OPENAI_UPSTREAM",
    "PUBLISHED_RESULTS",
    "published_results",
]

OPENAI_UPSTREAM = "CLIP-WIT"
# The study's published table, shipped with fastclip (see fastclip/assets/README.md).
PUBLISHED_RESULTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "zeroshot_results.csv.gz"
)


class NoValuesError(ValueError):
    """No row of a results table (matching the selection) has a value for the metric."""


def write_results(path: Union[str, os.PathLike], rows: Sequence[dict], leading: Sequence[str] = ()) -> None:
    """Write ``rows`` as a CSV table, atomically: the columns are ``leading``, then every other key
    in the order the rows first use it; a missing or None value is an empty field."""
    import io

    from ..atomic import atomic_write_bytes

    columns = list(leading)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    atomic_write_bytes(os.fspath(path), buf.getvalue().encode())


def published_results() -> list[dict]:
    """The scaling-law study's evaluation results (1312 rows: 29 OpenCLIP models trained on
    LAION-80M/400M/2B and 3 OpenAI models, each on 41 downstream tasks)."""
    return load_results(PUBLISHED_RESULTS)


def load_results(path: Union[str, os.PathLike]) -> list[dict]:
    """The rows of a CSV results table (``.csv`` or ``.csv.gz``) as dicts of strings (refused: a
    missing file, no header, no rows)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results table {path!r} does not exist")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"results table {path!r} has no header row")
        rows = [dict(r) for r in reader]
    if not rows:
        raise ValueError(f"results table {path!r} has a header but no rows")
    return rows


@dataclass
class Points:
    """(compute, error) points of one group, with a label per point (for plots)."""

    name: str
    compute: np.ndarray
    error: np.ndarray
    labels: list = field(default_factory=list)
    method: str = "frontier"


def _number(row: dict, column: str, where: str) -> Optional[float]:
    raw = row.get(column)
    if raw is None or str(raw).strip() == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{where}: column {column!r} must be a number, got {raw!r}") from None


def select_points(
    rows: Sequence[dict],
    metric: str,
    *,
    compute: str = "gmacs_total",
    where: Optional[dict] = None,
    label: Sequence[str] = ("arch", "samples_seen_pretty"),
    name: str = "",
    method: str = "frontier",
) -> Points:
    """The (compute, 1 - metric) points of the rows matching ``where`` ({column: value or list of
    values}).  Rows whose metric is empty are skipped (a table holds several tasks); any other bad
    value is refused naming its row and column.

    Raises ValueError when a column is missing (listing the table's columns), when no row matches,
    or on non-positive / non-finite compute and metrics outside [0, 1).
    """
    if not rows:
        raise ValueError("the results table has no rows")
    columns = list(rows[0])
    wanted = [metric, compute] + list(where or {})
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(
            f"the results table has no column {', '.join(map(repr, missing))}; its columns are {columns}"
        )
    conds = {
        k: ({str(x) for x in v} if isinstance(v, (list, tuple, set)) else {str(v)})
        for k, v in (where or {}).items()
    }
    cs, es, labels = [], [], []
    for i, row in enumerate(rows):
        if any(row.get(k) not in v for k, v in conds.items()):
            continue
        at = f"row {i + 2}"  # 1-based, after the header
        m = _number(row, metric, at)
        if m is None:
            continue
        c = _number(row, compute, at)
        if c is None or not math.isfinite(c) or c <= 0:
            raise ValueError(
                f"{at}: compute column {compute!r} must be finite and > 0, got {row.get(compute)!r}"
            )
        if not math.isfinite(m) or not 0.0 <= m < 1.0:
            raise ValueError(f"{at}: metric {metric!r} must be in [0, 1) (error = 1 - metric), got {m}")
        cs.append(c)
        es.append(1.0 - m)
        labels.append(" ".join(str(row.get(k, "")) for k in label if row.get(k)))
    if not cs:
        raise NoValuesError(f"no row has a value for metric {metric!r}" + (f" where {where}" if where else ""))
    return Points(name or metric, np.array(cs), np.array(es), labels, method)


def study_groups(
    rows: Sequence[dict], metric: str, dataset: str, *, compute: str = "gmacs_total"
) -> list[Points]:
    """The study's two groups for ``metric`` on ``dataset`` (``downstream_dataset``): LAION-trained
    models (every upstream but CLIP-WIT) fitted on their frontier, and OpenAI's by least squares
    (omitted when the table has none)."""
    if not rows:
        raise ValueError("the results table has no rows")
    for col in ("upstream_dataset", "downstream_dataset"):
        if col not in rows[0]:
            raise ValueError(
                f"the study's grouping needs column {col!r}; the table's columns are {list(rows[0])}"
            )
    upstreams = sorted({r["upstream_dataset"] for r in rows if r["downstream_dataset"] == dataset})
    if not upstreams:
        datasets = sorted({r["downstream_dataset"] for r in rows})
        raise ValueError(f"no row has downstream_dataset {dataset!r}; the table has {datasets}")
    groups = (("LAION (OpenCLIP)", "frontier", [u for u in upstreams if u != OPENAI_UPSTREAM]),
              ("OpenAI (CLIP-WIT)", "lstsq", [u for u in upstreams if u == OPENAI_UPSTREAM]))
    return [select_points(rows, metric, compute=compute, name=name, method=method,
                          where={"downstream_dataset": dataset, "upstream_dataset": ups})
            for name, method, ups in groups if ups]
