"""fastclip.eval.suite / `fastclip eval`: checkpoints of both layouts, the JSON layout, the accumulated
table, metrics equal to the library's own evaluations, several captions per image, bad input refused
before any work (no output folder), and the linear probe once fastclip.eval.linear_probe exists."""
import csv
import json
import os

import pytest
import torch

import fastclip
from fastclip.cli import main as cli_main
from fastclip.data import CLASSNAMES, TEMPLATES, ClipLoader, make_shapes_dataset
from fastclip.data.shards import DataStats, ShardSource, ShardWriter
from fastclip.eval import (evaluate_retrieval, evaluate_zero_shot, load_eval_model, retrieval_metrics,
                           run_suite)
from fastclip.lazy import optional_module

BATCH = 16
RESULT_KEYS = {"dataset", "model", "task", "metrics", "architecture", "checkpoint", "checkpoint_format",
               "image_size", "num_samples", "seconds", "shards"}


@pytest.fixture(autouse=True)
def _pil_loader(monkeypatch):
    """The PIL loader everywhere (DALI may be installed): the direct evaluations read the same pixels."""
    monkeypatch.setenv("FASTCLIP_DATA_BACKEND", "pil")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    meta = make_shapes_dataset(str(root / "val"), 40, 32, seed=3, samples_per_shard=20, max_objects=1)
    train = make_shapes_dataset(str(root / "train"), 48, 32, seed=4, samples_per_shard=48, max_objects=1)
    return {"val": meta["shards_path"], "val_dir": str(root / "val"), "train": train["shards_path"],
            "root": root}


@pytest.fixture(scope="module")
def open_clip_files(shapes, model):
    """The shared tiny model saved as open_clip's layout (a bare state dict) + its config JSON."""
    root = shapes["root"]
    torch.save(model.state_dict(), root / "tiny.pt")
    with open(root / "tiny.json", "w") as f:
        json.dump(model.config.to_dict(), f)
    return str(root / "tiny.json"), str(root / "tiny.pt")


@pytest.fixture(scope="module")
def train_checkpoint(shapes):
    """A real fastclip training checkpoint: one step of the trainer on a tiny ViT (about 2 s)."""
    from fastclip.train import TrainConfig, train
    overrides = dict(patch_size=8, vision_layers=1, vision_width=32, vision_head_width=16, text_layers=1,
                     text_width=32, text_heads=2, embed_dim=32)
    cfg = TrainConfig.from_dict({
        "output_dir": str(shapes["root"] / "run"),
        "model": {"name": "ViT-Ti-16", "image_size": 32, "overrides": overrides},
        "data": {"train": shapes["train"], "batch_size": 16, "backend": "pil", "shuffle": 0},
        "budget": {"steps": 1}, "log": {"every_steps": 1, "progress": False, "plot": False, "mfu": False},
        "checkpoint": {"every_steps": 1, "every_minutes": 0}})
    summary = train(cfg)
    return summary["checkpoint"], overrides


def _loader(shards, **kw):
    return ClipLoader(shards, BATCH, image_size=32, train=False, backend="pil", shuffle=0, **kw)


def _eval(*args):
    return cli_main(["eval", "--batch-size", str(BATCH), *args])


def _read(out, model, dataset, task):
    with open(os.path.join(out, f"{model}__{dataset}__{task}.json")) as f:
        return json.load(f)


def _csv(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


def _samples(shards):
    return list(ShardSource(shards, shuffle=0, keep_members=True).iter(0, 0, 1, DataStats(warn=False)))


def _labels(shards):
    return [s.label for s in _samples(shards)]


# ----------------------------------------------------------------------------------------------
# Checkpoints, layout, metrics
# ----------------------------------------------------------------------------------------------
def test_open_clip_state_dict_zero_shot_and_retrieval(shapes, model, open_clip_files, tmp_path, capsys):
    config_json, weights = open_clip_files
    out = str(tmp_path / "out")
    assert _eval("--model", config_json, "--checkpoint", weights, "--dataset", f"shapes={shapes['val']}",
                 "--task", "zeroshot", "retrieval", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "tiny-tiny  shapes  zeroshot: top1" in printed and "results.md" in printed
    zs, ret = _read(out, "tiny-tiny", "shapes", "zeroshot"), _read(out, "tiny-tiny", "shapes", "retrieval")
    for r in (zs, ret):
        assert RESULT_KEYS <= set(r) and r["dataset"] == "shapes" and r["model"] == "tiny-tiny"
        assert r["architecture"] == "tiny" and r["checkpoint"] == os.path.abspath(weights)
        assert r["checkpoint_format"] == "open_clip" and r["image_size"] == 32 and r["num_samples"] == 40
        assert r["shards"] == [os.path.join(shapes["val_dir"], f"shard-0000{i}.tar") for i in (0, 1)]
        assert r["precision"] == "fp32" and r["device"] == "cpu" and r["seconds"] >= 0
    assert zs["task"] == "zeroshot" and zs["classnames"] == "builtin"  # found from the shards' meta.json
    # the library's own evaluations on the same data give the same numbers, bit for bit
    expected = evaluate_zero_shot(model, _loader(shapes["val"], with_labels=True), CLASSNAMES, TEMPLATES)
    assert zs["metrics"] == expected and {"top1", "top5", "mean_per_class_recall"} <= set(expected)
    expected = evaluate_retrieval(model, _loader(shapes["val"]))
    assert ret["metrics"] == expected and ret["metrics"]["num_texts"] == 40


def test_fastclip_training_checkpoint_needs_no_model_name(shapes, train_checkpoint, tmp_path):
    path, overrides = train_checkpoint
    out = str(tmp_path / "out")
    assert _eval("--checkpoint", path, "--dataset", f"val={shapes['val']}", "--classnames", "builtin",
                 "--out", out) == 0
    r = _read(out, "ViT-Ti-16-step-00000001", "val", "zeroshot")
    assert r["checkpoint_format"] == "fastclip" and r["architecture"] == "ViT-Ti-16" and r["image_size"] == 32
    # the trainer's weights, loaded the documented way (open_clip's layout under "state_dict")
    net = fastclip.create_model("ViT-Ti-16", image_size=32, **overrides)
    fastclip.models.load_checkpoint(net, path)
    expected = evaluate_zero_shot(net.eval(), _loader(shapes["val"], with_labels=True), CLASSNAMES, TEMPLATES)
    assert r["metrics"] == expected


def test_results_accumulate_into_one_table(shapes, open_clip_files, tmp_path):
    config_json, weights = open_clip_files
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.json").write_text('{"not": "a result"}')  # another tool's file: left out of the table
    data = f"shapes={shapes['val']}"
    assert _eval("--model", config_json, "--dataset", data, "--task", "zeroshot", "--out", str(out)) == 0
    assert _eval("--model", config_json, "--checkpoint", weights, "--name", "tiny/trained", "--dataset", data,
                 "--task", "zeroshot", "retrieval", "--max-batches", "2", "--out", str(out)) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["notes.json", "results.csv", "results.md", "tiny-random-init__shapes__zeroshot.json",
                     "tiny-trained__shapes__retrieval.json", "tiny-trained__shapes__zeroshot.json"]
    rows = _csv(str(out))
    assert [(r["model"], r["task"]) for r in rows] == [
        ("tiny/trained", "retrieval"), ("tiny-random-init", "zeroshot"), ("tiny/trained", "zeroshot")]
    for row in rows:
        r = _read(str(out), row["model"].replace("/", "-"), row["dataset"], row["task"])
        for k, v in r["metrics"].items():
            assert float(row[k]) == v, (row["model"], k)
        assert int(row["num_samples"]) == r["num_samples"]
    random_init = _read(str(out), "tiny-random-init", "shapes", "zeroshot")
    assert random_init["checkpoint"] is None and random_init["checkpoint_format"] is None
    limited = _read(str(out), "tiny-trained", "shapes", "zeroshot")
    assert limited["max_batches"] == 2 and limited["num_samples"] == 2 * BATCH
    md = (out / "results.md").read_text()
    assert "## retrieval" in md and "## zeroshot" in md and "image_to_text_R@1 |" in md
    assert sum(line.startswith("| tiny") for line in md.splitlines()) == 3


def test_classnames_file_and_several_captions_per_image(shapes, model, tmp_path):
    """A JSON class-name file ({c} placeholders accepted) gives the same numbers as the built-in lists; a
    sample whose text has several lines has several captions, scored by retrieval_metrics."""
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classnames": list(CLASSNAMES),
                                   "templates": [t.replace("{}", "{c}") for t in TEMPLATES]}))
    multi = tmp_path / "multi"
    multi.mkdir()
    samples = _samples(shapes["val"])
    with ShardWriter(str(multi / "m-%05d.tar"), 100) as w:
        for i, s in enumerate(samples):  # odd samples get a second caption
            text = s.caption + (f"\n  a picture number {i}  \n" if i % 2 else "")
            w.write(s.key, {"jpg": s.members["jpg"], "txt": text, "cls": s.members["cls"]})
    results = run_suite({"multi": str(multi)}, ["zeroshot", "retrieval"], model=model,
                        classnames=str(classes), batch_size=BATCH, backend="pil")
    zs, ret = results
    assert zs["classnames"] == str(classes)
    assert zs["metrics"] == evaluate_zero_shot(model, _loader(shapes["val"], with_labels=True), CLASSNAMES,
                                               TEMPLATES)
    assert ret["metrics"]["num_images"] == 40 and ret["metrics"]["num_texts"] == 60
    tok = fastclip.get_tokenizer()
    fi, ft, owner = [], [], []
    with torch.no_grad():  # batch by batch, as the suite encodes them
        for lo, (images, _) in zip(range(0, 40, BATCH), _loader(str(multi))):
            fi.append(model.encode_image(images, normalize=True))
            texts = []
            for i in range(lo, min(lo + BATCH, 40)):
                caps = [samples[i].caption] + ([f"a picture number {i}"] if i % 2 else [])
                texts += caps
                owner += [i] * len(caps)
            ft.append(model.encode_text(tok(texts), normalize=True))
    expected = retrieval_metrics(torch.cat(fi), torch.cat(ft), torch.tensor(owner))
    assert ret["metrics"].keys() == expected.keys()
    for k, v in expected.items():
        assert ret["metrics"][k] == pytest.approx(v, abs=1e-12), k


def test_linear_probe_task(shapes, open_clip_files, tmp_path):
    pytest.importorskip("fastclip.eval.linear_probe")
    config_json, weights = open_clip_files
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert _eval("--model", config_json, "--checkpoint", weights, "--dataset", f"shapes={shapes['val']}",
                 "--task", "linear_probe", "--train", f"shapes={shapes['train']}", "--cache-dir", str(cache),
                 "--out", str(out)) == 0
    r = _read(str(out), "tiny-tiny", "shapes", "linear_probe")
    m = r["metrics"]
    assert {"top1", "top5", "mean_per_class_recall", "weight_decay", "n_train", "n_val"} <= set(m)
    assert 0 <= m["top1"] <= 1 and m["n_test"] == 40 == r["num_samples"] and m["n_train"] + m["n_val"] == 48
    assert r["train_shards"] == [os.path.join(os.path.dirname(shapes["train"]), "shard-00000.tar")]
    assert os.listdir(cache)  # the features, kept for a rerun
    assert "linear_probe" in {row["task"] for row in _csv(str(out))}


def test_safetensors_checkpoints(model, tmp_path):
    st, why = optional_module("safetensors.torch")
    path = str(tmp_path / "tiny.safetensors")
    if st is None:
        with open(path, "wb") as f:
            f.write(b"\0" * 16)
        with pytest.raises(ValueError, match="safetensors"):
            load_eval_model(model.config, path)
        return
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    net, info = load_eval_model(model.config, path)
    assert info["checkpoint_format"] == "open_clip"
    for k, v in model.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k


# ----------------------------------------------------------------------------------------------
# Bad input: refused before any work, naming the problem
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(shapes, model):
    root = shapes["root"] / "bad"
    root.mkdir()
    (root / "notjson.json").write_text("{'classnames': ['a']")
    (root / "list.json").write_text('["red circle", "blue square"]')
    (root / "notemplates.json").write_text('{"classnames": ["a", "b"], "templates": []}')
    (root / "noplaceholder.json").write_text('{"classnames": ["a", "b"], "templates": ["a photo"]}')
    first = _labels(shapes["val"])[0]
    assert first > 0, "the fixture's seed must give the first sample a label above 0"
    (root / "few.json").write_text(json.dumps({"classnames": ["c"] * first, "templates": ["{}"]}))
    state = dict(model.state_dict())
    state.pop("logit_scale")
    state["visual.extra"] = torch.zeros(1)
    torch.save(state, root / "misfit.pt")
    (root / "garbage.pt").write_bytes(b"not a torch file")
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    with ShardWriter(str(unlabelled / "u-%05d.tar"), 100) as w:
        for s in _samples(shapes["val"]):
            w.write(s.key, {"jpg": s.members["jpg"], "txt": s.caption})
    return root


TINY = ["--model", "{tiny}"]
REFUSALS = [
    (TINY + ["--task", "zeroshot", "segmentation"],
     "invalid choice: 'segmentation'.*zeroshot.*retrieval.*linear_probe"),
    (["--model", "ViT-X-99"], "unknown model name 'ViT-X-99'.*Known models: .*ViT-B-32"),
    (TINY + ["--dataset", "{val}"], "must be NAME=SHARDS"),
    (TINY + ["--dataset", "other={root}/nowhere/shard-{{0..3}}.tar"],
     "dataset 'other': 4 of the 4 shard files .* do not exist"),
    (TINY + ["--task", "linear_probe"],
     "linear_probe needs a training split .*--train NAME=SHARDS for shapes"),
    (TINY + ["--train", "cifar={val}"], "--train names \\['cifar'\\], which are not datasets"),
    (TINY + ["--classnames", "{bad}/notjson.json"], "notjson.json' is not valid JSON"),
    (TINY + ["--classnames", "{bad}/list.json"], "must hold a JSON object .*got a JSON list"),
    (TINY + ["--classnames", "{bad}/notemplates.json"],
     "'templates' must be a non-empty list.*got an empty list"),
    (TINY + ["--classnames", "{bad}/noplaceholder.json"],
     "templates\\[0\\] = 'a photo' has no '\\{\\}' placeholder"),
    (TINY + ["--classnames", "{bad}/missing.json"], "class-name file .*missing.json' does not exist"),
    (TINY + ["--classnames", "cifar=builtin"], "'cifar' is not a dataset"),
    (TINY + ["--classnames", "{bad}/few.json"],
     "sample \\d+ has label (\\d+), but the class names .*few.json\\) have only \\1 classes"),
    (TINY + ["--dataset", "plain={bad}/unlabelled"], "dataset 'plain' has no labels"),
    (TINY + ["--checkpoint", "{bad}/misfit.pt"],
     "does not fit the model tiny at image_size 32: 1 missing keys: logit_scale; "
     "1 unexpected keys: visual.extra"),
    (["--model", "ViT-Ti-16", "--checkpoint", "{bad}/misfit.pt"],
     "ViT-Ti-16 at image_size 224: .* shape mismatches: .*checkpoint .*, model "),
    (TINY + ["--checkpoint", "{bad}/garbage.pt"], "cannot be read as a state dict"),
    (TINY + ["--checkpoint", "{bad}/absent.pt"], "checkpoint .*absent.pt' does not exist"),
    ([], "a model name is needed"),
    (TINY + ["--max-batches", "0"], "max_batches must be a positive int"),
]


@pytest.mark.parametrize("args, match", REFUSALS, ids=[m[:30] for _, m in REFUSALS])
def test_bad_input_is_refused_before_any_work(shapes, open_clip_files, bad_files, tmp_path, capsys, args,
                                              match):
    import re
    fmt = {"val": shapes["val"], "root": tmp_path, "bad": bad_files, "tiny": open_clip_files[0]}
    args = [a.format(**fmt) for a in args]
    if "--dataset" not in args:
        args += ["--dataset", f"shapes={shapes['val']}"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        _eval(*args, "--out", str(out))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err.replace("\n", " ")), err
    assert not out.exists()  # nothing written, nothing created


def test_training_checkpoint_refuses_another_model_or_size(shapes, train_checkpoint):
    path, _ = train_checkpoint
    with pytest.raises(ValueError, match="checkpoint of 'ViT-Ti-16'.*'ViT-B-32': leave the model out"):
        run_suite([f"val={shapes['val']}"], model="ViT-B-32", checkpoint=path)
    with pytest.raises(ValueError, match="image_size 64, but the model .* was trained at 32"):
        run_suite([f"val={shapes['val']}"], checkpoint=path, image_size=64)


def test_labels_beyond_the_class_names_stop_the_run_while_reading(shapes, model, tmp_path):
    """The first sample's label is covered (the look before work passes), a later one is not."""
    labels = _labels(shapes["val"])
    count = labels[0] + 1
    assert max(labels) >= count, "the fixture's seed must give a label above the first sample's"
    classes = {"classnames": list(CLASSNAMES[:count]), "templates": ["a {}"]}
    with pytest.raises(ValueError, match=f"dataset 'val': sample \\d+ of .*shard-0000\\d.tar has label \\d+, "
                                         f"but the class names \\(given\\) have only {count} classes"):
        run_suite({"val": shapes["val"]}, model=model, classnames={"val": classes}, batch_size=BATCH,
                  backend="pil", out_dir=str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []  # no result for the set


def test_library_refusals(shapes, model):
    with pytest.raises(ValueError, match="unknown task\\(s\\) 'zero-shot'; valid tasks: zeroshot, retrieval, "
                                         "linear_probe"):
        run_suite({"val": shapes["val"]}, "zero-shot", model=model)
    with pytest.raises(ValueError, match="the name 'val' is given twice"):
        run_suite([f"val={shapes['val']}", f"val={shapes['val']}"], model=model)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        run_suite({"val": shapes["val"]}, model=model, precision="int8")


def test_a_damaged_training_checkpoint_is_refused(shapes, train_checkpoint, tmp_path):
    """The format marker is fastclip.train's, and the payload's checksum is verified on load."""
    import torch

    from fastclip.eval.suite import TRAIN_CHECKPOINT_FORMAT
    from fastclip.train.checkpoint import FORMAT
    assert TRAIN_CHECKPOINT_FORMAT == FORMAT
    path, _ = train_checkpoint
    payload = torch.load(path, map_location="cpu", weights_only=False)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] + 1.0  # edited after it was written
    damaged = tmp_path / "damaged.pt"
    torch.save(payload, damaged)
    with pytest.raises(ValueError, match="is damaged: its checksum does not match its content"):
        run_suite([f"val={shapes['val']}"], checkpoint=str(damaged))
