"""End to end: a real (tiny) training run, its outputs, bad input refused before work, NaN handling,
and resumption that reproduces the uninterrupted run bit for bit (CPU, fp32)."""

import os

import pytest
import torch

from fastclip.train import CheckpointError, ConfigError, TrainConfig, Trainer, TrainingDiverged, train
from fastclip.train.metrics import read_metrics

from ._tiny import tiny_model_cfg


def _cfg(shapes, out, **sections):
    d = {"output_dir": str(out), "model": tiny_model_cfg(),
         "data": {"train": shapes["train"], "batch_size": 32, "backend": "pil", "shuffle": 64},
         "optim": {"lr": 2e-3, "warmup": 2}, "budget": {"steps": 8},
         "log": {"every_steps": 1, "progress": False, "plot": False},
         "checkpoint": {"every_steps": 4, "every_minutes": 0, "keep": 5}}
    for k, v in sections.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return TrainConfig.from_dict(d)


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "train"]


def test_a_run_writes_its_outputs_and_evaluates(shapes, tmp_path):
    cfg = _cfg(shapes, tmp_path / "run", eval={"zero_shot": shapes["zero_shot"], "retrieval": shapes["retrieval"],
                                              "every_steps": 4}, log={"plot": True})
    summary = train(cfg)
    out = str(tmp_path / "run")
    assert summary["steps"] == 8 and summary["budget_used"]["samples"] == 256
    assert summary["budget_used"]["gflops"] == pytest.approx(8 * 32 * summary["train_gflops_per_sample"]["0.0"])
    for name in ("metrics.jsonl", "summary.json", "config.yaml", "curves.png"):
        assert os.path.exists(os.path.join(out, name)), name
    import json
    with open(os.path.join(out, "summary.json")) as f:
        assert "clip_loss" in json.load(f)["environment"]["devices"]["cpu"]["ops"]
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8]
    assert 0 <= evals[-1]["zero_shot/top1"] <= 1 and "retrieval/text_to_image_R@10" in evals[-1]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 9))
    assert all(r["data/delivered"] >= 0 for r in train_recs)
    assert train_recs[0]["lr"] == pytest.approx(1e-3)  # warm-up 1/2
    assert TrainConfig.from_file(os.path.join(out, "config.yaml")) == cfg
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-00000004.pt", "step-00000008.pt"]
    # the checkpoint's weights load into a fresh model (open_clip's layout under "state_dict")
    from fastclip.models import create_model, load_checkpoint
    model = create_model("ViT-Ti-16", image_size=32, **cfg.model.overrides)
    load_checkpoint(model, os.path.join(out, "checkpoints", "step-00000008.pt"))


def test_throughput_and_mfu_are_logged_without_changing_the_run(shapes, tmp_path):
    """log.mfu measures the matmul rate once at the start and logs mfu (fastclip.flops.mfu) with the
    achieved GFLOP/s; with it off nothing is measured; the losses are the same bit for bit."""
    import json
    import math
    on = train(_cfg(shapes, tmp_path / "on", budget={"steps": 3}, checkpoint={"every_steps": 0}))
    off = train(_cfg(shapes, tmp_path / "off", budget={"steps": 3}, checkpoint={"every_steps": 0},
                     log={"mfu": False}))
    assert _losses(str(tmp_path / "on")) == _losses(str(tmp_path / "off"))  # exact floats
    rate = on["matmul_rate"]
    assert rate["device"] == "cpu" and rate["dtype"] == "float32" and rate["ranks"] == 1
    assert math.isfinite(rate["gflops"]) and rate["gflops"] > 0
    with open(os.path.join(on["output_dir"], "summary.json")) as f:
        assert json.load(f)["matmul_rate"]["gflops"] == rate["gflops"]
    recs = [r for r in read_metrics(os.path.join(on["output_dir"], "metrics.jsonl")) if r["kind"] == "train"]
    assert len(recs) == 3
    for r in recs:  # positive and finite: nothing is decided from a timing
        assert math.isfinite(r["gflops_per_s"]) and r["gflops_per_s"] > 0
        assert math.isfinite(r["mfu"]) and r["mfu"] > 0
    assert off["matmul_rate"] is None
    recs = [r for r in read_metrics(os.path.join(off["output_dir"], "metrics.jsonl")) if r["kind"] == "train"]
    assert all("mfu" not in r and r["gflops_per_s"] > 0 for r in recs)


@pytest.mark.parametrize("strategy", ["flip", "slip", "clip_aug", "flip+clip_aug"])
def test_strategies_train(shapes, tmp_path, strategy):
    cfg = _cfg(shapes, tmp_path / strategy, strategy={"name": strategy, "mask_ratio": 0.5, "unmasked_fraction": 0.25},
               budget={"steps": 4}, checkpoint={"every_steps": 0})
    summary = train(cfg)
    recs = [r for r in read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl")) if r["kind"] == "train"]
    assert summary["steps"] == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    if strategy.startswith("flip"):
        assert [r["mask_ratio"] for r in recs] == [0.5, 0.5, 0.5, 0.0]  # the unmasked last quarter, same run
    if strategy == "slip":
        assert all("loss/ssl" in r for r in recs)


def test_accumulation_trains(shapes, tmp_path):
    summary = train(_cfg(shapes, tmp_path / "acc", data={"accum_steps": 4}, budget={"steps": 2},
                         checkpoint={"every_steps": 0}))
    assert summary["steps"] == 2


@pytest.mark.parametrize("section,values,match", [
    ("model", {"name": "ViT-Q-16"}, "unknown model name 'ViT-Q-16'"),
    ("strategy", {"name": "flip+dino"}, "unknown strategy 'dino'"),
    ("data", {"train": "/nonexistent/shard-{0..3}.tar"}, "matches no shard file"),
    ("budget", {"steps": None, "gflops": 0.01}, "smaller than one step"),
    ("data", {"batch_size": 30, "accum_steps": 4}, "must divide evenly"),
    ("eval", {"zero_shot": "/nonexistent/x.tar"}, "eval.zero_shot"),
])
def test_bad_config_fails_before_any_work(shapes, tmp_path, section, values, match):
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match=match):
        Trainer(_cfg(shapes, out, **{section: values}))
    assert not out.exists()  # nothing was written


def test_evaluation_set_without_labels_is_refused(shapes, tmp_path):
    from fastclip.data import ShardWriter
    path = str(tmp_path / "nolabels-%05d.tar")
    with ShardWriter(path, 100) as w:
        from fastclip.data import ShardSource, DataStats
        for s in ShardSource(shapes["retrieval"], shuffle=0).iter(0, 0, 1, DataStats(warn=False)):
            w.write(s.key, {"jpg": s.image, "txt": s.caption})
    with pytest.raises(ConfigError, match="has no labels"):
        Trainer(_cfg(shapes, tmp_path / "x", eval={"zero_shot": str(tmp_path / "nolabels-00000.tar")}))


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", r"eval.classnames: class-name file .* must hold a JSON object"),
    ('{"classnames": ["a"], "templates": ["no placeholder"]}', r"eval.classnames: .*has no '\{\}' placeholder"),
    ('{"classnames": ["a"]', r"eval.classnames: class-name file .* is not valid JSON"),
])
def test_a_bad_class_name_file_is_refused_before_any_work(shapes, tmp_path, content, match):
    """The trainer reads class names with the evaluation suite's checks (fastclip.eval.suite)."""
    names = tmp_path / "classes.json"
    names.write_text(content)
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match=match):
        Trainer(_cfg(shapes, out, eval={"zero_shot": shapes["zero_shot"], "classnames": str(names)}))
    assert not out.exists()


def test_flip_on_a_resnet_is_refused(shapes, tmp_path):
    cfg = _cfg(shapes, tmp_path / "rn", strategy={"name": "flip"})
    cfg.model.name, cfg.model.overrides = "RN50", {}
    with pytest.raises(ConfigError, match="ViT image tower"):
        Trainer(cfg)


def test_nan_loss_stops_naming_the_last_good_checkpoint(shapes, tmp_path):
    cfg = _cfg(shapes, tmp_path / "nan", optim={"lr": 1e4, "warmup": 0, "max_logit_scale": 1e30},
               budget={"steps": 40}, checkpoint={"every_steps": 1})
    with pytest.raises(TrainingDiverged, match=r"not finite at step \d+ .*step-\d{8}\.pt"):
        train(cfg)


def test_nan_loss_can_be_skipped(shapes, tmp_path, monkeypatch):
    from fastclip.train import strategies
    calls = {"n": 0}
    original = strategies.Contrastive.losses

    def sometimes_nan(self, ctx, feats, out):
        original(self, ctx, feats, out)
        calls["n"] += 1
        if calls["n"] == 2:
            out["contrastive"] = out["contrastive"] * float("nan")
    monkeypatch.setattr(strategies.Contrastive, "losses", sometimes_nan)
    summary = train(_cfg(shapes, tmp_path / "skip", on_nan="skip", budget={"steps": 4},
                         checkpoint={"every_steps": 0}))
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4


@pytest.mark.parametrize("backend,strategy,stop", [("pil", "clip", 13), ("dali", "clip", 13), ("pil", "flip", 13),
                                                   ("dali", "flip", 13), ("pil", "clip", 20), ("dali", "clip", 20)])
def test_resume_reproduces_the_uninterrupted_run_bitwise(shapes, tmp_path, backend, strategy, stop):
    """26 steps straight vs ``stop`` steps, a new Trainer, resume: same losses, bit for bit.  13 stops
    inside the first epoch, 20 right after its last batch (640 samples / batch 32)."""
    pytest.importorskip("nvidia.dali") if backend == "dali" else None
    straight = _cfg(shapes, tmp_path / "a", data={"backend": backend}, strategy={"name": strategy},
                    budget={"steps": 26}, checkpoint={"every_steps": stop})
    train(straight)
    first = _cfg(shapes, tmp_path / "b", data={"backend": backend}, strategy={"name": strategy},
                 budget={"steps": 26}, checkpoint={"every_steps": stop})
    t = Trainer(first)
    t.budget.limits.steps = stop  # stop early, as a crash after the checkpoint would
    t.run()
    resumed = train(_cfg(shapes, tmp_path / "b", data={"backend": backend}, strategy={"name": strategy},
                         budget={"steps": 26}, checkpoint={"every_steps": stop}), resume="latest")
    assert resumed["steps"] == 26
    a, b = _losses(str(tmp_path / "a")), _losses(str(tmp_path / "b"))
    assert [s for s, _ in b] == list(range(1, 27))
    assert a == b  # exact floats
    pa = torch.load(str(tmp_path / "a" / "checkpoints" / "step-00000026.pt"), weights_only=False)["state_dict"]
    pb = torch.load(str(tmp_path / "b" / "checkpoints" / "step-00000026.pt"), weights_only=False)["state_dict"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_refuses_an_incompatible_config(shapes, tmp_path):
    train(_cfg(shapes, tmp_path / "c", budget={"steps": 4}))
    with pytest.raises(CheckpointError, match=r"optim\.lr: checkpoint 0\.002, now 0\.001"):
        Trainer(_cfg(shapes, tmp_path / "c", optim={"lr": 1e-3}), resume="latest")
    with pytest.raises(CheckpointError, match="another model|model.overrides"):
        Trainer(_cfg(shapes, tmp_path / "c", model=tiny_model_cfg(vision_layers=1)), resume="latest")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(_cfg(shapes, tmp_path / "empty"), resume="latest")
    # a longer budget is a compatible change (continue training)
    more = train(_cfg(shapes, tmp_path / "c", budget={"steps": 6}), resume="latest")
    assert more["steps"] == 6


def test_bf16_autocast_grad_checkpointing_and_tensorboard(shapes, tmp_path):
    """The options a CPU user can turn on run end to end (bf16 autocast on CPU, checkpointed blocks,
    TensorBoard when installed)."""
    tb = True
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        tb = False
    cfg = _cfg(shapes, tmp_path / "opts", optim={"precision": "bf16", "grad_clip": 1.0},
               model=dict(tiny_model_cfg(), grad_checkpointing=True), budget={"steps": 3},
               log={"tensorboard": tb}, checkpoint={"every_steps": 0})
    summary = train(cfg)
    recs = [r for r in read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl")) if r["kind"] == "train"]
    assert summary["steps"] == 3 and all("grad_norm" in r for r in recs)
    if tb:
        assert os.listdir(os.path.join(cfg.output_dir, "tensorboard"))


def test_cli_train_print_config_and_usage_errors(shapes, tmp_path, capsys):
    from fastclip.cli import main
    assert main(["train", "--print-config", "optim.lr=0.01"]) == 0
    assert "lr: 0.01" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["train", "optim.lrr=1"])
    assert exc.value.code == 2 and "did you mean 'optim.lr'" in capsys.readouterr().err
    assert main(["train", f"data.train={tmp_path}/none-{{0..3}}.tar", "budget.steps=1"]) == 2
    assert "matches no shard file" in capsys.readouterr().err


def test_compiled_training_runs_and_keeps_the_checkpoint_layout(shapes, tmp_path):
    """model.compile=true compiles the training module in place: the checkpoint keeps open_clip's
    parameter names (no ``_orig_mod.`` prefix) and the losses stay close to eager mode's."""
    eager = train(_cfg(shapes, tmp_path / "eager", budget={"steps": 2}, checkpoint={"every_steps": 0}))
    compiled = train(_cfg(shapes, tmp_path / "compiled", model=dict(tiny_model_cfg(), compile=True),
                          budget={"steps": 2}, checkpoint={"every_steps": 0}))
    a, b = _losses(str(tmp_path / "eager")), _losses(str(tmp_path / "compiled"))
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2]
    for (_, la), (_, lb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-3)
    keys = set(torch.load(compiled["checkpoint"], weights_only=False)["state_dict"])
    assert keys == set(torch.load(eager["checkpoint"], weights_only=False)["state_dict"])


def test_checkpoints_on_the_clock(shapes, tmp_path):
    """checkpoint.every_minutes triggers on wall time alone (here: after every step)."""
    summary = train(_cfg(shapes, tmp_path / "clock", budget={"steps": 3},
                         checkpoint={"every_steps": 0, "every_minutes": 1e-6, "keep": 10}))
    names = sorted(os.listdir(os.path.join(summary["output_dir"], "checkpoints")))
    assert names == ["step-00000001.pt", "step-00000002.pt", "step-00000003.pt"]
