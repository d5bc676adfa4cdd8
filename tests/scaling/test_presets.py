"""fastclip.scaling.presets: the strategies study's sweeps, and findings that weigh differences
against the seeds' spread."""
import csv

import pytest

from fastclip.scaling.presets import findings, preset_sweeps
from fastclip.scaling.sweep import SweepConfig, check_runs, expand, run_sweep

from .test_sweep import BATCH, STEP_GFLOPS, TINY


def test_the_strategies_preset_is_valid_and_as_described(tmp_path):
    subs = preset_sweeps("strategies", str(tmp_path))
    assert [s for s, _ in subs] == ["equal-compute", "half-data"]
    equal = SweepConfig.from_dict(subs[0][1])
    half = SweepConfig.from_dict(subs[1][1])
    labels = [r.strategy.key for r in expand(equal)]
    assert sorted(set(labels)) == sorted(["clip", "flip50", "flip75", "flip50+tune", "flip75+tune", "slip",
                                          "clip_aug"])
    assert len(expand(equal)) == 14 and len(expand(half)) == 4  # two seeds each
    assert {r.dataset_size for r in expand(half)} == {10000} and {r.dataset_size for r in expand(equal)} == {20000}
    steps = check_runs(equal)  # every configuration trains at least one step
    assert min(steps.values()) >= 100
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_sweeps("everything", str(tmp_path))


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


def test_a_tiny_preset_runs_end_to_end(tmp_path):
    subs = preset_sweeps("strategies", str(tmp_path), seeds=(0,), budget_gflops=2.5 * STEP_GFLOPS, dataset_size=64,
                         model={"name": "ViT-Ti-16", "label": "tiny", "overrides": TINY})
    tables = []
    for _, d in subs[1:]:  # the half-data sweep: clip and clip_aug, one seed
        d["base"].update({"data": {"batch_size": BATCH, "backend": "pil"}, "eval.batch_size": 32,
                          "log": {"progress": False, "plot": False, "mfu": False}})
        d["data"].update({"image_size": 32, "zero_shot": 32, "retrieval": 32})
        tables.append(run_sweep(SweepConfig.from_dict(d), progress=False))
    rep = findings("strategies", tables, str(tmp_path))
    assert {r["strategy"] for r in csv.DictReader(open(rep["results"]))} == {"clip", "clip_aug"}
    assert "clip_aug vs CLIP at equal compute" in rep["verdict"][0]
