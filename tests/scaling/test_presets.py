"""fastclip.scaling.presets: the strategies study's sweeps, and findings that weigh differences
against the seeds' spread."""
import csv
import os

import pytest

from fastclip.scaling.presets import findings, preset_sweeps
from fastclip.scaling.sweep import SweepConfig, check_runs, expand, run_sweep

from .test_sweep import BATCH, STEP_GFLOPS, TINY


def test_the_strategies_preset_is_valid_and_as_described(tmp_path):
    subs = preset_sweeps("strategies", str(tmp_path))
    assert [s for s, _ in subs] == ["equal-compute", "half-data", "budgets"]
    equal, half, budgets = (SweepConfig.from_dict(d) for _, d in subs)
    labels = [r.strategy.key for r in expand(equal)]
    assert sorted(set(labels)) == sorted(["clip", "flip50", "flip75", "flip50+tune", "flip75+tune", "slip",
                                          "clip_aug"])
    assert len(expand(equal)) == 14 and len(expand(half)) == 4  # two seeds each
    assert {r.dataset_size for r in expand(half)} == {10000} and {r.dataset_size for r in expand(equal)} == {20000}
    # the laws' runs: CLIP and FLIP 0.75 at a quarter and a half of the budget, on the full set
    assert {(r.strategy.key, r.budget_gflops, r.dataset_size) for r in expand(budgets)} == {
        (s, b, 20000) for s in ("clip", "flip75") for b in (3e3, 6e3)}
    steps = check_runs(equal)  # every configuration trains at least one step
    assert min(steps.values()) >= 100
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_sweeps("everything", str(tmp_path))


def test_the_quality_vs_quantity_preset_is_valid_and_as_described(tmp_path):
    subs = preset_sweeps("quality-vs-quantity", str(tmp_path))
    assert [s for s, _ in subs] == ["sizes-x-noise", "filtered"]
    grid, filt = (SweepConfig.from_dict(d) for _, d in subs)
    runs = expand(grid)
    assert {(r.dataset_size, r.caption_noise) for r in runs} == {(n, x) for n in (2000, 4000, 8000)
                                                                  for x in (0.0, 0.3, 0.6)}
    assert {r.seed for r in runs} == {0, 1} and {r.budget_gflops for r in runs} == {1e4}
    f = expand(filt)
    assert {(r.dataset_size, r.caption_noise, r.filter_top) for r in f} == {(8000, 0.6, 25.0), (8000, 0.6, 50.0)}
    assert [r.train_pairs for r in f[::2]] == [2000, 4000]  # the top 25% of 4N is N pairs
    assert filt.data.scorer_dataset_size == 4000 and filt.data.filter_checkpoint is None
    assert min(check_runs(grid).values()) >= 200


def test_the_model_vs_data_preset_is_valid_and_as_described(tmp_path):
    subs = preset_sweeps("model-vs-data", str(tmp_path))
    assert [s for s, _ in subs] == ["models-x-data", "budgets"]
    grid, budgets = (SweepConfig.from_dict(d) for _, d in subs)
    runs = expand(grid)
    assert {r.model.key for r in runs} == {"vit-64x2", "vit-96x4", "vit-128x6"}
    assert {r.dataset_size for r in runs} == {1000, 4000, 16000} and len(runs) == 18
    steps = check_runs(grid)
    per_model = {r.model.key: steps[r.id] for r in runs}
    # equal compute: the larger the model, the fewer steps
    assert per_model["vit-64x2"] > per_model["vit-96x4"] > per_model["vit-128x6"] >= 100
    assert {(r.budget_gflops, r.dataset_size) for r in expand(budgets)} == {(2.5e3, 16000), (5e3, 16000)}


def _write(path, rows):
    cols = ["run_id", "strategy", "dataset_size", "steps", "status", "zero_shot/top1", "retrieval/image_to_text_R@1"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_findings_weigh_differences_against_the_seeds_spread(tmp_path):
    def row(strategy, size, seed, top1):
        return {"run_id": f"{strategy}-{size}-{seed}", "strategy": strategy, "dataset_size": size, "steps": 300,
                "status": "finished", "zero_shot/top1": top1, "retrieval/image_to_text_R@1": top1 / 2}
    a = _write(tmp_path / "a.csv", [row("clip", 200, 0, 0.40), row("clip", 200, 1, 0.44),
                                    row("flip50", 200, 0, 0.60), row("flip50", 200, 1, 0.62),
                                    row("slip", 200, 0, 0.41), row("slip", 200, 1, 0.45)])
    b = _write(tmp_path / "b.csv", [row("clip_aug", 100, 0, 0.41), row("clip_aug", 100, 1, 0.43),
                                    dict(row("clip", 100, 0, 0.1), status="failed")])
    rep = findings("strategies", [a, b], str(tmp_path / "out"))
    v = "\n".join(rep["verdict"])
    assert "flip50 vs CLIP at equal compute: 0.610 vs 0.420: +0.190, beyond the seeds' spread (0.040)" in v
    assert "slip vs CLIP at equal compute: 0.430 vs 0.420: +0.010, within the seeds' spread" in v
    assert "CLIP+Aug at half the data (100) vs CLIP at the full data (200)" in v and "0.420 vs 0.420" in v
    assert "| flip50 | 200 | 300 | 0.610 (0.600-0.620) |" in rep["markdown"]
    merged = list(csv.DictReader(open(rep["results"])))
    assert len(merged) == 8 and {r["status"] for r in merged} == {"finished"}
    assert (tmp_path / "out" / "findings.md").read_text() == rep["markdown"]
    assert rep["png"] and (tmp_path / "out" / "findings.png").stat().st_size > 5000


_TINY_BASE = {"data": {"batch_size": BATCH, "backend": "pil"}, "eval.batch_size": 32,
              "log": {"progress": False, "plot": False, "mfu": False}}
_TINY_DATA = {"image_size": 32, "zero_shot": 32, "retrieval": 32}
_TINY_MODEL = {"name": "ViT-Ti-16", "label": "tiny", "overrides": TINY}


def _tiny(name, out, **kw):
    kw.setdefault("model", _TINY_MODEL)
    return preset_sweeps(name, str(out), seeds=(0,), base=_TINY_BASE, data=_TINY_DATA, **kw)


def test_a_tiny_strategies_preset_runs_end_to_end(tmp_path):
    subs = _tiny("strategies", tmp_path, budget_gflops=2.5 * STEP_GFLOPS, dataset_size=64)
    tables = [run_sweep(SweepConfig.from_dict(d), progress=False) for _, d in subs[1:2]]  # half-data: clip, clip_aug
    rep = findings("strategies", tables, str(tmp_path))
    assert {r["strategy"] for r in csv.DictReader(open(rep["results"]))} == {"clip", "clip_aug"}
    assert "clip_aug vs CLIP at equal compute" in rep["verdict"][0]
    assert rep["plan"] is None  # one budget: no law


def test_a_tiny_quality_preset_filters_with_its_own_scorer(tmp_path):
    subs = _tiny("quality-vs-quantity", tmp_path, budget_gflops=3 * STEP_GFLOPS, dataset_size=48)
    grid, filt = (SweepConfig.from_dict(d) for _, d in subs)
    grid.grid.dataset_sizes, grid.grid.caption_noise = [48, 96], [0.0, 0.6]  # 4 of the 9 cells
    tables = [run_sweep(grid, progress=False), run_sweep(filt, progress=False)]
    rows = list(csv.DictReader(open(tables[1])))
    assert {(r["filter_top"], r["train_pairs"], r["status"]) for r in rows} == {("25.0", "48", "finished"),
                                                                               ("50.0", "96", "finished")}
    # the scorer was trained once, on clean pairs of another seed, and the sets were written once
    data = tmp_path / "data"
    assert len(list(data.glob("scorer-tiny-*/summary.json"))) == 1
    assert len(list(data.glob("train-192-*-noise0.6-top25-scorer*/filter.json"))) == 1
    for r in rows:
        assert 0.0 <= float(r["train_clean"]) <= 1.0
    rep = findings("quality-vs-quantity", tables, str(tmp_path / "out"))
    v = "\n".join(rep["verdict"])
    assert "96 pairs at caption noise 0.6 vs 48 clean pairs — the study: the smaller clean set wins" in v
    assert "the top 25% of 192 pairs at noise 0.6 (48 pairs" in v and "vs all 192 of them" not in v
    assert "| 192 | 0.6 | top 25% | 48 (" in rep["markdown"]
    assert rep["png"] and os.path.getsize(rep["png"]) > 5000


def test_model_vs_data_findings_fit_laws_and_plan_outside_the_range(tmp_path):
    def row(model, size, budget, top1, seed, cost):
        return {"run_id": f"{model}-{size}-{budget}-{seed}", "model": model, "strategy": "clip", "dataset_size": size,
                "budget_gflops": budget, "gflops": budget, "samples_seen": budget / cost, "steps": 10,
                "status": "finished", "zero_shot/top1": top1, "retrieval/image_to_text_R@1": top1 / 2}
    rows = []
    for seed, jitter in ((0, 0.0), (1, 0.01)):
        for size, (small, large) in {100: (0.50, 0.40), 400: (0.55, 0.60), 1600: (0.56, 0.70)}.items():
            rows += [row("small", size, 1000, small + jitter, seed, 1.0), row("large", size, 1000, large + jitter, seed, 4.0)]
        for b, (small, large) in {250: (0.30, 0.20), 500: (0.42, 0.45)}.items():
            rows += [row("small", 1600, b, small + jitter, seed, 1.0), row("large", 1600, b, large + jitter, seed, 4.0)]
    cols = list(rows[0])
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    rep = findings("model-vs-data", [str(path)], str(tmp_path / "out"))
    v = "\n".join(rep["verdict"])
    assert "100 pairs: best small, vs large 0.505 vs 0.405: +0.100, beyond the seeds' spread (0.010)" in v
    assert "1600 pairs: best large" in v and "small -> large -> large: it grows" in v
    assert "| small (10) | 0.505 (0.500-0.510) |" in rep["markdown"]
    plan = rep["plan"]
    assert plan["budget_gflops"] == 4000 and plan["candidates"][0]["model"] == "large"
    assert all(c["extrapolated"] for c in plan["candidates"])
    assert "plan at 4e+03 GFLOPs (4x the largest budget, outside the sweep's range): large with clip" in rep["markdown"]
