"""``fastclip fit``: a results table -> power-law fits -> a plot, a JSON and the formulas;
``fastclip plan``: a compute budget and a dataset size -> the model and strategy to train.

    fastclip fit zeroshot_results.csv --metric acc1 --dataset imagenet1k --out fit-imagenet
    fastclip fit sweep.csv --metric zero_shot/top1 --compute gflops --group-by model
    fastclip plan --gflops 1e12 --dataset-size 4e8
    fastclip plan --hours 24 --table sweeps/strategies/results.csv --metric zero_shot/top1

Grouping: ``--group-by auto`` (the default) follows the scaling-law study where the table has its
``upstream_dataset`` column (LAION-trained models on their frontier, OpenAI's CLIP-WIT models by
least squares through all points); otherwise one group.  ``--group-by COLUMN`` fits each value of
a column separately with ``--method``; ``--group-by none`` fits every row together.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

__all__ = ["add_fit_arguments", "run_fit", "add_plan_arguments", "run_plan"]


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="results CSV (the scaling-law study's layout, or fastclip sweep's)")
    p.add_argument("--metric", required=True, help="metric column; error = 1 - metric (e.g. acc1)")
    p.add_argument(
        "--dataset",
        default=None,
        help="keep rows with this downstream_dataset (e.g. imagenet1k, mscoco_captions)",
    )
    p.add_argument(
        "--compute", default="gmacs_total", help="compute column (default gmacs_total; gflops for sweeps)"
    )
    p.add_argument(
        "--group-by", default="auto", help="auto, none, or a column whose values are fitted separately"
    )
    p.add_argument(
        "--method",
        default="frontier",
        choices=("frontier", "lstsq"),
        help="fit method of every group (with --group-by auto the study's methods are used)",
    )
    p.add_argument("--form", default="power", choices=("power", "saturating"))
    p.add_argument("--bins", type=int, default=5, help="log-compute bins of the frontier (default 5)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for confidence intervals (0: none)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument(
        "--predict", type=float, nargs="*", default=[], help="compute values to predict the error at"
    )
    p.add_argument(
        "--out", default=None, help="output stem: writes <out>.json and <out>.png (default: no files)"
    )


def _groups(rows, args):
    from .results import NoValuesError, select_points, study_groups

    where = {"downstream_dataset": args.dataset} if args.dataset else {}
    if args.group_by == "auto":
        if rows and "upstream_dataset" in rows[0] and args.dataset:
            return study_groups(rows, args.metric, args.dataset, compute=args.compute)
        return [select_points(rows, args.metric, compute=args.compute, where=where, method=args.method)]
    if args.group_by == "none":
        return [select_points(rows, args.metric, compute=args.compute, where=where, method=args.method)]
    if args.group_by not in rows[0]:
        raise ValueError(
            f"--group-by {args.group_by!r} is not a column of the table; its columns are {list(rows[0])}"
        )
    out = []
    for value in sorted({r[args.group_by] for r in rows}):
        try:
            out.append(
                select_points(
                    rows,
                    args.metric,
                    compute=args.compute,
                    method=args.method,
                    where={**where, args.group_by: value},
                    name=f"{args.group_by}={value}",
                )
            )
        except NoValuesError:  # this group has no value for the metric: no law for it
            continue
    if not out:
        raise ValueError(f"no row has a value for metric {args.metric!r}")
    return out


def run_fit(args) -> dict:
    """Fit every group; print the formulas (and predictions); write <out>.json / <out>.png."""
    from .fit import fit_power_law
    from .plot import plot_fits
    from .results import load_results

    rows = load_results(args.table)
    groups = _groups(rows, args)
    fitted, report = (
        [],
        {
            "table": os.path.abspath(args.table),
            "metric": args.metric,
            "dataset": args.dataset,
            "compute": args.compute,
            "groups": {},
        },
    )
    for pts in groups:
        fit = fit_power_law(
            pts.compute,
            pts.error,
            pts.method,
            form=args.form,
            bins=args.bins,
            bootstrap=args.bootstrap,
            level=args.level,
        )
        fitted.append((pts, fit))
        entry = fit.as_dict()
        entry["runs"] = len(pts.compute)
        line = f"{pts.name}: {fit.formula()}  ({fit.method}, {len(fit.compute)} of {len(pts.compute)} points)"
        if fit.ci:
            line += "  " + ", ".join(f"{k} in [{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in fit.ci.items())
        print(line)
        preds = []
        for c in args.predict:
            p = {"compute": c, "error": float(fit.predict(c)), "extrapolated": bool(fit.extrapolates(c))}
            if fit.samples is not None:
                lo, hi = fit.interval(c)
                p["interval"] = [float(lo), float(hi)]
            preds.append(p)
            band = f" [{p['interval'][0]:.4f}, {p['interval'][1]:.4f}]" if "interval" in p else ""
            print(
                f"  at {c:.4g}: error {p['error']:.4f}{band}"
                + ("  (extrapolated)" if p["extrapolated"] else "")
            )
        entry["predictions"] = preds
        report["groups"][pts.name] = entry
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=2)
        title = f"{args.metric}" + (f" on {args.dataset}" if args.dataset else "")
        why = plot_fits(
            fitted, args.out + ".png", title=title, xlabel=args.compute, ylabel=f"error (1 - {args.metric})"
        )
        report["plot"] = None if why else args.out + ".png"
        print(f"wrote {args.out}.json" + (f" and {args.out}.png" if not why else f" (no plot: {why})"))
    return report


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--gflops", type=float, help="training compute budget in GFLOPs (3 x forward, as fastclip.flops)"
    )
    g.add_argument("--hours", type=float, help="training time budget in device-hours (see --throughput)")
    p.add_argument(
        "--throughput",
        type=float,
        default=None,
        help="sustained training GFLOP/s for --hours (default: this machine's measured matmul rate x --mfu)",
    )
    p.add_argument(
        "--mfu",
        type=float,
        default=0.35,
        help="fraction of the matmul rate training sustains, for --hours without --throughput (default 0.35)",
    )
    p.add_argument("--dataset-size", type=float, default=None, help="image-text pairs available")
    p.add_argument(
        "--table",
        "--results",
        dest="results",
        default=None,
        help="your results table (a sweep's results.csv); default: the study's published results",
    )
    p.add_argument(
        "--metric",
        default=None,
        help="with --table: the metric column (e.g. zero_shot/top1); "
        "built-in: imagenet-zeroshot (default) or coco-image-retrieval",
    )
    p.add_argument("--compute", default="gflops", help="with --table: the compute column (default gflops)")
    p.add_argument("--bootstrap", type=int, default=500, help="resamples for the intervals (default 500)")
    p.add_argument("--train-shards", default="<your shards>", help="shards to put in the printed command")
    p.add_argument("--json", default=None, help="also write the plan as JSON here")
    p.add_argument("--check", default=None, metavar="OUT_DIR",
                   help="with --table from a sweep: train the recommended configuration at the budget into "
                        "OUT_DIR and compare its measured error with the predicted interval (check.json)")


def _budget_gflops(args) -> tuple[float, str]:
    if args.gflops is not None:
        return args.gflops, f"{args.gflops:.4g} GFLOPs"
    if not args.hours or args.hours <= 0:
        raise ValueError(f"--hours must be > 0, got {args.hours}")
    if args.throughput is not None:
        if args.throughput <= 0:
            raise ValueError(f"--throughput must be > 0, got {args.throughput}")
        rate, how = args.throughput, f"{args.throughput:.4g} GFLOP/s (given)"
    else:
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
        from ..machine import measure_matmul_rate

        print("measuring this machine's matmul rate ...", flush=True)
        peak = measure_matmul_rate(effort="quick")["gflops"]
        rate, how = peak * args.mfu, f"{peak:.4g} GFLOP/s measured matmul rate x mfu {args.mfu}"
    gflops = rate * args.hours * 3600
    return gflops, f"{args.hours:g} h at {how} = {gflops:.4g} GFLOPs"


def run_plan(args):
    """Print the ranked candidates with one line each, and the command to run."""
    from .plan import plan_from_published, plan_from_results
    from .results import load_results

    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if getattr(args, "check", None) and not args.results:
        raise ValueError("--check needs --table (a sweep's results.csv): it trains the config of the best run")
    budget, how = _budget_gflops(args)
    if args.results:
        if not args.metric:
            raise ValueError("--table needs --metric (the metric column to plan for)")
        plan = plan_from_results(
            load_results(args.results),
            budget,
            args.metric,
            dataset_size=args.dataset_size,
            compute=args.compute,
            bootstrap=args.bootstrap,
            runs_dir=glob.glob(os.path.join(os.path.dirname(os.path.abspath(args.results)), "runs"))
            + glob.glob(os.path.join(os.path.dirname(os.path.abspath(args.results)), "*", "runs")),
        )
    else:
        plan = plan_from_published(
            budget, args.dataset_size, metric=args.metric or "imagenet-zeroshot", bootstrap=args.bootstrap
        )
    print(f"budget: {how}; laws: {plan.source}; metric: {plan.metric}")
    for note in plan.notes:
        print(f"note: {note}")
    for rank, cand in enumerate(plan.candidates, 1):
        print(f"{rank}. {cand.explain()}")
    print(f"recommended: {plan.best.model} with {plan.best.strategy}")
    print(plan.command(args.train_shards))
    if args.check:
        from .plan import check_plan
        shards = None if args.train_shards == "<your shards>" else args.train_shards
        print(f"checking: training {plan.best.model} {plan.best.strategy} at {budget:.4g} GFLOPs into {args.check}",
              flush=True)
        rep = check_plan(plan, args.check, shards)
        band = (f"[{rep['interval'][0]:.3f}, {rep['interval'][1]:.3f}]" if rep["interval"] else "(no interval)")
        verdict = ("inside the interval" if rep["inside"] else
                   "" if rep["inside"] is None else f"outside it by {rep['miss']:+.3f}")
        print(f"check: measured error {rep['measured_error']:.3f} ({plan.metric} {1 - rep['measured_error']:.3f}) "
              f"vs predicted {rep['predicted_error']:.3f} {band}: {verdict}; {os.path.join(args.check, 'check.json')}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(plan.as_dict(), command=plan.command(args.train_shards), budget=how), f, indent=2)
    return plan
