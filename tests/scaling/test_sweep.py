"""fastclip.scaling.sweep: a grid of tiny training runs into one results table that fit/plan read;
resumption, skipping, failures recorded, and bad configs refused before any work."""

import csv
import json
import os
from pathlib import Path

import pytest

import fastclip.train
from fastclip.cli import main as cli_main
from fastclip.flops import model_flops
from fastclip.models import CLIPConfig
from fastclip.scaling import SweepConfig, expand, load_results, run_sweep, select_points
from fastclip.scaling.plan import plan_from_results
from fastclip.scaling.sweep import ROW_COLUMNS, sweep_state
from fastclip.train import ConfigError

# A ViT small enough for CPU tests (the idea of tests/train/_tiny.py), on 32-px images.
TINY = {"patch_size": 8, "vision_layers": 2, "vision_width": 32, "vision_head_width": 16, "text_layers": 2,
        "text_width": 32, "text_heads": 2, "embed_dim": 32}
BATCH = 16
STEP_GFLOPS = BATCH * model_flops(CLIPConfig.from_name("ViT-Ti-16", image_size=32, **TINY)).train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One cache of the built-in dataset for every sweep of this file (data.root is not in the ids)."""
    return str(tmp_path_factory.mktemp("sweep-data"))


def _cfg(out, data_root, overrides=(), **grid) -> SweepConfig:
    d = {"name": "tiny", "output_dir": str(out),
         "grid": {"models": [{"name": "ViT-Ti-16", "label": "tiny", "overrides": TINY}], "strategies": ["clip"],
                  "dataset_sizes": [64], "caption_noise": [0.0], "budgets_gflops": [2.5 * STEP_GFLOPS],
                  "seeds": [0], **grid},
         "base": {"data": {"batch_size": BATCH, "backend": "pil"}, "eval.batch_size": 32,
                  "log": {"progress": False, "plot": False, "mfu": False}, "checkpoint": {"every_minutes": 0}},
         "data": {"image_size": 32, "zero_shot": 32, "retrieval": 32, "root": data_root}}
    return SweepConfig.from_dict(d, list(overrides))


def _summary(steps=3, top1=0.5):
    return {"steps": steps, "budget_used": {"steps": steps, "samples": steps * BATCH,
                                            "gflops": steps * STEP_GFLOPS, "seconds": 0.01},
            "final_eval": {"zero_shot/top1": top1, "zero_shot/seconds": 0.2, "retrieval/image_to_text_R@1": 0.25}}


class FakeTrain:
    """Stands in for fastclip.train.train: records each config (and resume), fails where told."""

    def __init__(self, fail=lambda cfg: None, real=False):
        self.calls, self.fail, self.real = [], fail, real
        self._train = fastclip.train.train

    def __call__(self, cfg, resume=None):
        self.calls.append((cfg, resume))
        error = self.fail(cfg)
        if error is not None:
            raise error
        return self._train(cfg, resume=resume) if self.real else _summary()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_sweep_trains_resumes_skips_and_fit_and_plan_read_its_table(tmp_path, data_root, monkeypatch):
    """Two real tiny runs (2 and 4 steps): stop_after=1, then a rerun does the other, then a third
    call trains nothing; the table has the layout fastclip fit / plan --results read."""
    cfg = _cfg(tmp_path / "sweep", data_root, budgets_gflops=[2.5 * STEP_GFLOPS, 4.5 * STEP_GFLOPS])
    train = FakeTrain(real=True)
    monkeypatch.setattr(fastclip.train, "train", train)
    path = run_sweep(cfg, progress=False, stop_after=1)
    assert len(train.calls) == 1 and len(_rows(path)) == 1
    assert run_sweep(cfg, progress=True) == path
    assert len(train.calls) == 2
    rows = _rows(path)
    assert len(rows) == 2
    columns = list(rows[0])
    assert tuple(columns[:len(ROW_COLUMNS)]) == ROW_COLUMNS
    assert {"zero_shot/top1", "zero_shot/top5", "retrieval/image_to_text_R@1", "retrieval/text_to_image_R@10"} \
        <= set(columns)
    assert not any(c.endswith("seconds") for c in columns[len(ROW_COLUMNS):])  # timings are not metrics
    runs = expand(cfg)
    for row, run, steps in zip(rows, runs, (2, 4)):
        assert row["run_id"] == run.id and row["status"] == "finished"
        assert (row["model"], row["strategy"], row["image_size"], row["dataset_size"]) == ("tiny", "clip", "32", "64")
        assert int(row["steps"]) == steps and int(row["samples_seen"]) == steps * BATCH
        assert float(row["gflops"]) == pytest.approx(steps * STEP_GFLOPS)
        assert float(row["budget_gflops"]) == run.budget_gflops and float(row["caption_noise"]) == 0.0
        assert 0 <= float(row["zero_shot/top1"]) <= 1
        with open(tmp_path / "sweep" / "runs" / run.id / "summary.json") as f:
            assert json.load(f)["steps"] == steps
    state = sweep_state(cfg.output_dir)
    assert state["finished"] == [r.id for r in runs] and state["failed"] == {}
    before = Path(path).read_text()
    run_sweep(cfg, progress=False)  # everything finished: nothing trains, the table is unchanged
    assert len(train.calls) == 2 and Path(path).read_text() == before
    table = load_results(path)
    pts = select_points(table, "zero_shot/top1", compute="gflops", where={"model": "tiny"})
    assert list(pts.compute) == pytest.approx([2 * STEP_GFLOPS, 4 * STEP_GFLOPS])
    plan = plan_from_results(table, 3 * STEP_GFLOPS, "zero_shot/top1", bootstrap=0)
    assert [(c.model, c.strategy, c.image_size) for c in plan.candidates] == [("tiny", "clip", 32)]


def test_each_configuration_trains_its_own_config_on_its_own_data(tmp_path, data_root, monkeypatch):
    train = FakeTrain()
    monkeypatch.setattr(fastclip.train, "train", train)
    cfg = _cfg(tmp_path / "sweep", data_root, ["base.optim.lr=1e-3"], caption_noise=[0.0, 0.5],
               strategies=["clip", {"name": "flip", "label": "flip75", "mask_ratio": 0.75}])
    run_sweep(cfg, progress=False)
    runs = expand(cfg)
    assert len(train.calls) == len(runs) == 4
    by_id = {os.path.basename(c.output_dir): c for c, _ in train.calls}
    assert set(by_id) == {r.id for r in runs}
    for run in runs:
        tc = by_id[run.id]
        assert tc.output_dir == os.path.join(cfg.output_dir, "runs", run.id)
        assert (tc.model.name, tc.model.image_size, tc.model.overrides) == ("ViT-Ti-16", 32, TINY)
        assert tc.budget.gflops == run.budget_gflops and tc.seed == 0 and tc.optim.lr == 1e-3
        assert tc.eval.every_steps == 0 and tc.data.batch_size == BATCH
        assert tc.strategy.name == run.strategy.name
        assert tc.strategy.mask_ratio == (0.75 if run.strategy.key == "flip75" else 0.5)
        with open(os.path.join(tc.data.train, "meta.json")) as f:
            meta = json.load(f)
        assert (meta["num_samples"], meta["caption_noise"]) == (64, run.caption_noise)
        assert (meta["num_corrupted"] > 0) == (run.caption_noise > 0)
    # one training set per caption noise; the held-out sets are shared
    assert len({c.data.train for c, _ in train.calls}) == 2
    assert len({(c.eval.zero_shot, c.eval.retrieval) for c, _ in train.calls}) == 1
    assert {r["strategy"] for r in _rows(os.path.join(cfg.output_dir, "results.csv"))} == {"clip", "flip75"}


def test_a_failing_configuration_is_recorded_and_the_next_one_runs(tmp_path, data_root, monkeypatch):
    train = FakeTrain(fail=lambda c: RuntimeError("boom") if c.seed == 0 else None)
    monkeypatch.setattr(fastclip.train, "train", train)
    cfg = _cfg(tmp_path / "sweep", data_root, seeds=[0, 1])
    failed, ok = (r.id for r in expand(cfg))
    path = run_sweep(cfg, progress=False)
    assert len(train.calls) == 2
    state = sweep_state(cfg.output_dir)
    assert state["failed"] == {failed: "RuntimeError: boom"} and state["finished"] == [ok]
    assert "boom" in state["records"][failed]["traceback"]
    rows = _rows(path)
    assert [(r["run_id"], r["status"]) for r in rows] == [(failed, "failed"), (ok, "finished")]
    assert rows[0]["zero_shot/top1"] == "" and rows[0]["gflops"] == "" and rows[1]["zero_shot/top1"] == "0.5"
    assert len(select_points(load_results(path), "zero_shot/top1", compute="gflops").compute) == 1
    # a rerun retries the failed configuration only
    train.fail = lambda c: None
    run_sweep(cfg, progress=False)
    assert [c.seed for c, _ in train.calls[2:]] == [0]
    assert sweep_state(cfg.output_dir)["failed"] == {}
    assert [(r["run_id"], r["status"]) for r in _rows(path)] == [(ok, "finished"), (failed, "finished")]


def test_an_interrupted_configuration_continues_from_its_checkpoint(tmp_path, data_root, monkeypatch):
    train = FakeTrain(fail=lambda c: KeyboardInterrupt())
    monkeypatch.setattr(fastclip.train, "train", train)
    cfg = _cfg(tmp_path / "sweep", data_root)
    (run,) = expand(cfg)
    with pytest.raises(KeyboardInterrupt):  # not a failure of the configuration: nothing is recorded
        run_sweep(cfg, progress=False)
    assert sweep_state(cfg.output_dir)["failed"] == {}
    ckpt = tmp_path / "sweep" / "runs" / run.id / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "step-00000002.pt").write_bytes(b"")  # what the trainer saves when interrupted
    train.fail = lambda c: None
    run_sweep(cfg, progress=False)
    assert [resume for _, resume in train.calls] == [None, "latest"]


def test_ids_are_stable_and_follow_the_settings(tmp_path, data_root):
    a = expand(_cfg(tmp_path, data_root, seeds=[0, 1], budgets_gflops=[3.0, 6.0]))
    b = expand(_cfg(tmp_path / "elsewhere", data_root, seeds=[0, 1], budgets_gflops=[3.0, 6.0]))
    assert [r.id for r in a] == [r.id for r in b] and len({r.id for r in a}) == 4
    assert a[0].id.startswith("tiny_clip_n64_noise0_g3_s0-")
    assert [(r.budget_gflops, r.seed) for r in a] == [(3.0, 0), (3.0, 1), (6.0, 0), (6.0, 1)]
    lr = expand(_cfg(tmp_path, data_root, ["base.optim.lr=1e-3"], seeds=[0, 1], budgets_gflops=[3.0, 6.0]))
    assert not {r.id for r in lr} & {r.id for r in a}  # what a run computes is in its id
    quiet = expand(_cfg(tmp_path, data_root, ["base.log.every_steps=5"], seeds=[0, 1], budgets_gflops=[3.0, 6.0]))
    assert [r.id for r in quiet] == [r.id for r in a]  # how it is logged is not


def test_the_config_prints_and_round_trips(tmp_path, data_root):
    cfg = _cfg(tmp_path / "s", data_root, ["grid.seeds=[0,1]", "data.caption_detail=0.5", "base.optim.lr=1e-3"],
               strategies=["clip", {"name": "flip", "label": "f", "settings": {"mask_ratio": 0.75}}])
    assert cfg.grid.seeds == [0, 1] and cfg.data.caption_detail == 0.5 and cfg.base["optim"] == {"lr": 1e-3}
    text = cfg.to_yaml()
    for key in ("budgets_gflops:", "caption_noise:", "mask_ratio: 0.75", "label: f", "root:"):
        assert key in text
    (tmp_path / "s.yaml").write_text(text)
    assert SweepConfig.from_file(tmp_path / "s.yaml") == cfg
    (tmp_path / "s.json").write_text(json.dumps(cfg.to_dict()))
    assert SweepConfig.from_file(tmp_path / "s.json") == cfg
    # the short forms: a model or strategy by name, strategy settings inline, dotted base keys
    short = SweepConfig.from_dict({"grid": {"models": ["ViT-S-16"], "strategies": [{"name": "flip", "mask_ratio": 0.6}]},
                                   "base": {"optim.lr": 1e-3}})
    assert short.grid.models[0].name == "ViT-S-16" and short.grid.strategies[0].settings == {"mask_ratio": 0.6}
    assert short.base == {"optim": {"lr": 1e-3}}


@pytest.mark.parametrize("change, message", [
    ({"grids": {}}, "did you mean 'grid'"),
    ({"grid.seed": [0]}, "did you mean 'grid.seeds'"),
    ({"data.img_size": 32}, "did you mean 'data.image_size'"),
    ({"grid.models": [{"name": "ViT-Ti-16", "overides": {}}]}, "did you mean 'grid.models[0].overrides'"),
    ({"grid.strategies": [{"name": "flip", "mask_rato": 0.5}]}, "did you mean 'grid.strategies[0].mask_ratio'"),
    ({"base.optim.lrr": 1e-3}, "did you mean 'optim.lr'"),
    ({"base.budget.gflops": 10.0}, "base.budget.gflops is set for every run by grid.budgets_gflops"),
    ({"grid.caption_noise": [0.0, 1.5]}, "fractions in [0, 1], got 1.5"),
    ({"grid.seeds": [0, 0]}, "grid.seeds has 0 twice"),
    ({"grid.strategies": ["flip", {"name": "flip", "mask_ratio": 0.75}]}, "give the entries distinct labels"),
    ({"grid.budgets_gflops": "lots"}, "must be a number, got 'lots'"),
])
def test_bad_keys_and_values_are_refused_with_the_key(tmp_path, data_root, change, message):
    with pytest.raises(ConfigError) as info:
        cfg = _cfg(tmp_path, data_root, list(change.items()))
        cfg.validate()
    assert message in str(info.value)


def test_an_empty_grid_is_refused(tmp_path, data_root):
    with pytest.raises(ConfigError, match=r"the grid is empty: grid.models, grid.budgets_gflops have no value"):
        expand(_cfg(tmp_path, data_root, models=[], budgets_gflops=[]))
    with pytest.raises(ConfigError, match="the grid is empty"):
        SweepConfig().validate()


@pytest.mark.parametrize("change, message", [
    ({"grid.budgets_gflops": [0.5 * STEP_GFLOPS, 3 * STEP_GFLOPS]}, "is smaller than one step"),
    ({"grid.dataset_sizes": [8]}, "dataset size 8 is smaller than one batch"),
    ({"grid.models": ["ViT-Ti-61"]}, "did you mean ViT-Ti-16"),
    ({"grid.strategies": ["flipp"]}, "unknown strategy 'flipp'"),
    ({"grid.models": ["RN50"], "grid.strategies": ["flip"]}, "needs a ViT image tower"),
])
def test_configurations_are_checked_before_any_work(tmp_path, data_root, monkeypatch, change, message):
    train = FakeTrain()
    monkeypatch.setattr(fastclip.train, "train", train)
    cfg = _cfg(tmp_path / "sweep", data_root, list(change.items()))
    with pytest.raises(ConfigError, match="configurations are invalid") as info:
        run_sweep(cfg, progress=False)
    assert message in str(info.value)
    assert train.calls == [] and not os.path.exists(cfg.output_dir)


def test_a_folder_of_another_sweep_is_refused(tmp_path, data_root, monkeypatch):
    train = FakeTrain()
    monkeypatch.setattr(fastclip.train, "train", train)
    run_sweep(_cfg(tmp_path / "sweep", data_root), progress=False)
    other = _cfg(tmp_path / "sweep", data_root, seeds=[0, 1])
    with pytest.raises(ConfigError, match=r"holds another sweep: 'tiny'.*what differs: grid"):
        run_sweep(other, progress=False)
    assert len(train.calls) == 1
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "results.csv").write_text("model,gflops\n")
    with pytest.raises(ConfigError, match="not this sweep's folder"):
        run_sweep(_cfg(tmp_path / "plain", data_root), progress=False)
    # a state file edited by hand is refused, not trusted
    state = tmp_path / "sweep" / "sweep-state.json"
    state.write_text(state.read_text().replace('"failed": {}', '"failed": {"x": "y"}'))
    with pytest.raises(ValueError, match="checksum"):
        run_sweep(_cfg(tmp_path / "sweep", data_root), progress=False)


def test_the_command_line(tmp_path, data_root, monkeypatch, capsys):
    train = FakeTrain()
    monkeypatch.setattr(fastclip.train, "train", train)
    path = tmp_path / "sweep.yaml"
    path.write_text(_cfg(tmp_path / "out", data_root).to_yaml())
    assert cli_main(["sweep", "--config", str(path), "grid.seeds=[3,4]", "--print-config"]) == 0
    assert SweepConfig.from_dict(__import__("yaml").safe_load(capsys.readouterr().out)).grid.seeds == [3, 4]
    assert cli_main(["sweep", "--config", str(path), "--dry-run"]) == 0
    (run,) = expand(SweepConfig.from_file(path))
    assert f"{run.id}: 2 steps" in capsys.readouterr().out and train.calls == []
    assert cli_main(["sweep", "--config", str(path)]) == 0
    assert len(train.calls) == 1 and (tmp_path / "out" / "results.csv").is_file()
    assert cli_main(["sweep", "--config", str(path), "grid.budgets_gflops=[1e-3]"]) == 2
    assert "smaller than one step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["sweep", "--config", str(path), "grid.seed=1"])
    assert "did you mean 'grid.seeds'" in capsys.readouterr().err


def test_workers_split_a_sweep_and_share_its_state(tmp_path, data_root):
    """Two processes started at once (--worker 0/2 and 1/2) train each configuration once, into one
    state and one table."""
    import subprocess
    import sys
    cfg = _cfg(tmp_path / "sweep", data_root, seeds=[0, 1, 2], caption_noise=[0.0, 0.25])
    path = tmp_path / "sweep.yaml"
    path.write_text(cfg.to_yaml())
    env = dict(os.environ, PYTHONPATH=str(Path(fastclip.__file__).parent.parent))
    procs = [subprocess.Popen([sys.executable, "-m", "fastclip.cli", "sweep", "--config", str(path), "--worker",
                               f"{k}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = expand(cfg)
    state = sweep_state(cfg.output_dir)
    assert sorted(state["finished"]) == sorted(r.id for r in runs) and state["failed"] == {}
    rows = _rows(tmp_path / "sweep" / "results.csv")
    assert sorted(r["run_id"] for r in rows) == sorted(r.id for r in runs)  # each once
    for k, out in enumerate(outs):  # worker k trained the configurations at positions k, k+2, ...
        assert f"[worker {k}/2]" in out
        assert {r.id for r in runs[k::2]} == {r.id for r in runs if f"{r.id} finished" in out}


def test_under_torchrun_each_rank_trains_its_share_alone(tmp_path, data_root, monkeypatch):
    seen = []

    def fake(cfg, resume=None):
        seen.append((cfg.seed, os.environ.get("WORLD_SIZE"), os.environ.get("RANK")))
        return _summary()
    monkeypatch.setattr(fastclip.train, "train", fake)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    run_sweep(_cfg(tmp_path / "sweep", data_root, seeds=[0, 1, 2, 3]), progress=False)
    assert seen == [(1, "1", "0"), (3, "1", "0")]  # positions 1 and 3; the trainer sees one process
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["RANK"] == "1"  # restored
    with pytest.raises(ValueError, match=r"worker must be \(index, count\)"):
        run_sweep(_cfg(tmp_path / "sweep", data_root, seeds=[0, 1, 2, 3]), worker=(2, 2))
    with pytest.raises(SystemExit):
        cli_main(["sweep", "--worker", "3/2"])


def test_filter_top_trains_on_the_top_of_the_set_by_a_given_scorer(tmp_path, data_root, monkeypatch):
    """A real tiny run's checkpoint scores the pairs; the configuration with filter_top=50 trains on
    the kept half, and the table says how many pairs and how clean."""
    first = _cfg(tmp_path / "scorer", data_root)
    run_sweep(first, progress=False)
    (scorer,) = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "scorer" / "runs") for f in fs
                 if f.endswith(".pt")]
    train = FakeTrain()
    monkeypatch.setattr(fastclip.train, "train", train)
    cfg = _cfg(tmp_path / "sweep", data_root, [("data.filter_checkpoint", scorer)], dataset_sizes=[64],
               caption_noise=[0.5], filter_top=[100, 50])
    runs = expand(cfg)
    assert [r.id.split("-")[0] for r in runs] == ["tiny_clip_n64_noise0.5_g2.5e+03_s0".replace(
        "2.5e+03", f"{2.5 * STEP_GFLOPS:.3g}"), f"tiny_clip_n64_noise0.5_top50_g{2.5 * STEP_GFLOPS:.3g}_s0"]
    run_sweep(cfg, progress=False)
    (raw, _), (filtered, _) = train.calls
    assert filtered.data.train == raw.data.train.rstrip("/") + "-top50-scorer" + filtered.data.train.split("scorer")[-1]
    with open(os.path.join(filtered.data.train, "filter.json")) as f:
        report = json.load(f)
    assert (report["scored"], report["kept"], report["keep"]) == (64, 32, 0.5)
    rows = _rows(tmp_path / "sweep" / "results.csv")
    assert [(r["filter_top"], r["train_pairs"]) for r in rows] == [("100.0", "64"), ("50.0", "32")]
    assert 0.3 < float(rows[0]["train_clean"]) < 0.7  # about half the captions corrupted
    # unfiltered runs keep the ids they had before filter_top existed; the filter's settings are in the others'
    assert runs[0].id == expand(_cfg(tmp_path / "x", data_root, dataset_sizes=[64], caption_noise=[0.5]))[0].id
    bad = _cfg(tmp_path / "bad", data_root, dataset_sizes=[64], filter_top=[20])
    with pytest.raises(ConfigError, match=r"the top 20% of 64 pairs \(13\) is smaller than one batch"):
        run_sweep(bad, progress=False)
    with pytest.raises(ConfigError, match=r"grid.filter_top values must be percentages in \(0, 100\]"):
        _cfg(tmp_path, data_root, filter_top=[0]).validate()


def test_plan_check_trains_the_recommendation_outside_the_sweeps_range(tmp_path, data_root, capsys):
    """sweep -> fastclip plan --table ... --check: the best run's config is trained at a budget beyond
    the sweep's and its measured error is set against the predicted interval."""
    cfg = _cfg(tmp_path / "sweep", data_root, seeds=[0, 1], budgets_gflops=[2.5 * STEP_GFLOPS, 4.5 * STEP_GFLOPS])
    table = run_sweep(cfg, progress=False)
    out = tmp_path / "check"
    budget = 6.5 * STEP_GFLOPS
    assert cli_main(["plan", "--table", table, "--metric", "zero_shot/top1", "--gflops", str(budget),
                     "--bootstrap", "50", "--check", str(out)]) == 0
    text = capsys.readouterr().out
    with open(out / "check.json") as f:
        rep = json.load(f)
    assert rep["steps"] == 6 and rep["gflops_used"] == pytest.approx(6 * STEP_GFLOPS)
    assert rep["extrapolated"] and rep["model"] == "tiny" and rep["config"].endswith("config.yaml")
    with open(out / "summary.json") as f:
        assert rep["measured_error"] == pytest.approx(1 - json.load(f)["final_eval"]["zero_shot/top1"])
    lo, hi = rep["interval"]
    assert rep["inside"] == (lo <= rep["measured_error"] <= hi)
    assert f"check: measured error {rep['measured_error']:.3f}" in text
    with pytest.raises(SystemExit):  # the built-in laws have no training config to check with
        cli_main(["plan", "--gflops", "1e6", "--check", str(out)])
    assert "--check needs --table" in capsys.readouterr().err
