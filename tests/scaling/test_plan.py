"""fastclip.scaling.plan and ``fastclip plan``: budgets to recommendations, with the law behind each."""

import json

import pytest

from fastclip.cli import main as cli_main
from fastclip.flops import model_flops
from fastclip.scaling import fit_power_law
from fastclip.scaling.plan import STUDY_ARCHS, plan_from_published, plan_from_results
from fastclip.scaling.results import published_results


def test_published_plan_evaluates_each_architecture_law_at_its_samples_seen():
    plan = plan_from_published(1e12, 4e8, bootstrap=100)
    assert "LAION-400M" in plan.notes[0]
    assert sorted(c.model for c in plan.candidates) == sorted(STUDY_ARCHS)
    errors = [c.error for c in plan.candidates]
    assert errors == sorted(errors) and plan.best is plan.candidates[0]
    rows = [
        r
        for r in published_results()
        if r["downstream_dataset"] == "imagenet1k" and r["upstream_dataset"] == "LAION-400M"
    ]
    for c in plan.candidates:
        seen = 1e12 / (3 * model_flops(c.model, image_size=224).total)
        assert c.x == pytest.approx(seen)
        mine = [r for r in rows if r["arch"] == c.model]
        ref = fit_power_law(
            [float(r["samples_seen"]) for r in mine], [1 - float(r["acc1"]) for r in mine], "lstsq"
        )
        assert (
            c.error == pytest.approx(ref.predict(seen)) and c.interval[0] <= c.error <= c.interval[1] + 1e-9
        )
    # ViT-B-32 at 1e12 GFLOPs sees 2.3e10 samples: inside its runs (2.4e9 to 3.4e10); ViT-L-14 below them
    by = {c.model: c for c in plan.candidates}
    assert not by["ViT-B-32"].extrapolated and by["ViT-L-14"].extrapolated
    assert "extrapolated beyond its runs" in by["ViT-L-14"].explain()
    cmd = plan.command("data/{0000..0099}.tar")
    assert cmd.startswith(
        f"fastclip train model.name={plan.best.model} model.image_size=224 strategy.name=clip"
    )
    assert "budget.gflops=1e+12 data.train=data/{0000..0099}.tar" in cmd


def test_small_datasets_use_the_smallest_study_dataset_and_say_it_is_optimistic():
    with pytest.warns(RuntimeWarning, match="every prediction is an extrapolation"):
        plan = plan_from_published(1e11, 1e6, bootstrap=0)
    assert "LAION-80M" in plan.notes[0] and "optimistic" in plan.notes[1]
    assert all(c.interval is None for c in plan.candidates)
    assert any("passes over your data" in c.note for c in plan.candidates)


def test_a_budget_beyond_every_law_warns():
    with pytest.warns(RuntimeWarning, match="outside the range of every law"):
        plan = plan_from_published(1e20, bootstrap=0)
    assert all(c.extrapolated for c in plan.candidates) and "LAION-2B" in plan.notes[0]


def sweep_rows(with_strategy=True):
    """Two models whose laws cross at C = 1e6: S is better below, M above."""
    rows = []
    for model, (a, b) in {"S": (0.5, -0.04), "M": (0.9, -0.0825)}.items():
        for c in (1e4, 1e5, 1e6, 1e7, 1e8):
            row = {"model": model, "gflops": str(c), "top1": str(1 - a * c**b), "image_size": "64"}
            if with_strategy:
                row["strategy"] = "clip"
            rows.append(row)
    return rows


@pytest.mark.parametrize("budget, best", [(1e4, "S"), (1e8, "M")])
def test_own_table_plan_follows_the_crossing_laws(budget, best):
    plan = plan_from_results(sweep_rows(), budget, "top1", bootstrap=50)
    assert plan.best.model == best and plan.best.strategy == "clip"
    assert plan.best.error == pytest.approx({"S": 0.5 * budget**-0.04, "M": 0.9 * budget**-0.0825}[best])
    assert "model.image_size=64" in plan.command()
    assert not plan.best.extrapolated


def test_own_table_picks_the_dataset_size_closest_to_yours():
    rows = [dict(r, dataset_size="1000") for r in sweep_rows()] + [
        dict(r, dataset_size="100000", top1=str(min(0.99, float(r["top1"]) + 0.05))) for r in sweep_rows()
    ]
    plan = plan_from_results(rows, 1e6, "top1", dataset_size=2e5, bootstrap=0)
    assert "dataset size 1e+05" in plan.notes[0]
    assert plan.best.error < 0.5 * 1e6**-0.04 - 0.04


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget_gflops=0), "budget_gflops must be finite and > 0"),
        (dict(budget_gflops=float("nan")), "budget_gflops must be finite"),
        (dict(budget_gflops=1e9, dataset_size=0), "dataset_size must be a number of image-text pairs >= 1"),
        (dict(budget_gflops=1e9, metric="cifar"), "metric must be one of"),
    ],
)
def test_bad_published_requests(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_from_published(**kwargs)


def test_bad_tables():
    with pytest.raises(ValueError, match="needs a 'model' column"):
        plan_from_results([{"gflops": "1", "top1": "0.5"}], 1e6, "top1")
    one_point = [r for r in sweep_rows() if r["gflops"] == "10000.0"]
    with pytest.raises(ValueError, match="nothing to fit"):
        plan_from_results(one_point, 1e6, "top1")
    with pytest.raises(ValueError, match="no column 'top5'"):
        plan_from_results(sweep_rows(), 1e6, "top5")


def test_cli_plan_published_and_own_table(tmp_path, capsys, monkeypatch):
    args = "plan --gflops 1e12 --dataset-size 4e8 --bootstrap 50 --json".split()
    assert cli_main([*args, str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "recommended: " in out and "fastclip train model.name=" in out and "1. " in out and "3. " in out
    report = json.loads((tmp_path / "plan.json").read_text())
    assert len(report["candidates"]) == 3 and report["command"].startswith("fastclip train")
    table = tmp_path / "sweep.csv"
    rows = sweep_rows()
    table.write_text(",".join(rows[0]) + "\n" + "\n".join(",".join(r.values()) for r in rows) + "\n")
    # --hours with a given throughput: 2 h at 1e4 GFLOP/s = 7.2e7 GFLOPs, where M wins
    args = "plan --hours 2 --throughput 1e4 --table".split()
    assert cli_main([*args, str(table), *"--metric top1 --bootstrap 0".split()]) == 0
    out = capsys.readouterr().out
    assert "2 h at 1e+04 GFLOP/s (given) = 7.2e+07 GFLOPs" in out and "recommended: M with clip" in out
    # --hours without a throughput measures the machine (here: a stand-in measurement)
    import fastclip.machine

    monkeypatch.setattr(fastclip.machine, "measure_matmul_rate", lambda **kw: {"gflops": 100.0})
    with pytest.warns(RuntimeWarning, match="every prediction is an extrapolation"):
        assert cli_main(["plan", "--hours", "1", "--mfu", "0.5", "--bootstrap", "0"]) == 0
    assert "100 GFLOP/s measured matmul rate x mfu 0.5 = 1.8e+05 GFLOPs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gflops", "-1"], "budget_gflops must be finite and > 0"),
        (["--hours", "0"], "--hours must be > 0"),
        (["--hours", "1", "--throughput", "-5"], "--throughput must be > 0"),
        (["--gflops", "1e9", "--results", "x.csv"], "--table needs --metric"),
    ],
)
def test_cli_plan_refusals(args, message, capsys):
    with pytest.raises(SystemExit):
        cli_main(["plan", *args])
    assert message in capsys.readouterr().err


def test_a_sweep_table_gives_the_command_of_its_run_config(tmp_path):
    """From a sweep's results (labels in the table), the command starts from the exact training config
    of one of the best candidate's runs (runs/<run_id>/config.yaml), with the budget set."""
    rows = [dict(r, run_id=f"{r['model']}-{r['gflops']}") for r in sweep_rows()]
    for r in rows:
        (tmp_path / "runs" / r["run_id"]).mkdir(parents=True)
        (tmp_path / "runs" / r["run_id"] / "config.yaml").write_text("model: {name: ViT-Ti-16}\n")
    plan = plan_from_results(rows, 1e8, "top1", bootstrap=0, runs_dir=str(tmp_path / "runs"))
    assert plan.best.model == "M" and plan.best.config.startswith(str(tmp_path / "runs" / "M-"))
    cmd = plan.command()
    assert cmd.startswith(f"fastclip train --config {plan.best.config} budget.gflops=1e+08 output_dir=")
    assert "data.train" not in cmd and "data.train=x" in plan.command("x")


def test_too_few_runs_for_an_interval_give_a_law_without_one():
    two = [r for r in sweep_rows() if r["gflops"] in ("10000.0", "100000000.0")]
    plan = plan_from_results(two, 1e6, "top1", bootstrap=100)
    assert all(c.interval is None and "too few" in c.note for c in plan.candidates)
