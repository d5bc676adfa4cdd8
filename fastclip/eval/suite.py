"""Evaluate a model on several datasets in one call: ``fastclip eval`` and :func:`run_suite`.

    fastclip eval --checkpoint run/checkpoints/step-00001000.pt --dataset shapes=data/val \
        --task zeroshot retrieval --out results/

    results = run_suite({"shapes": "data/val"}, ["zeroshot", "retrieval"],
                        checkpoint="run/checkpoints/step-00001000.pt", out_dir="results")

Every (dataset, task) pair is run with the library's evaluations (:func:`evaluate_zero_shot`,
:func:`evaluate_retrieval`, ``evaluate_linear_probe``) over webdataset shards read by
:class:`fastclip.data.ClipLoader` with the evaluation transform (resize + centre crop; images of
other modes than RGB are converted, not dropped, so that the set is the whole set).

The model (:func:`load_eval_model`): a name (``fastclip.list_models()``) or an open_clip model
config JSON, with weights from a fastclip training checkpoint (the model's config is read from the
checkpoint: no name needed), an open_clip state dict (``.pt``/``.bin``, ``.safetensors`` with the
safetensors package), or none (random init: the chance-level baseline).  A checkpoint that does not
fit the model is refused with the missing, unexpected and mis-shaped keys named.

Zero-shot class names and prompt templates: ``"builtin"`` (the built-in shapes dataset's), a JSON
file ``{"classnames": [...], "templates": ["a photo of a {}.", ...]}`` (``{c}`` placeholders, as
CLIP_benchmark writes them, are accepted too), or by default the ``meta.json`` beside the shards
(which :func:`fastclip.data.make_shapes_dataset` writes).  Retrieval: a sample whose caption has
several lines has several captions (one per line), scored by :func:`evaluate_retrieval`.

Output, per (model, dataset, task), ``<model>__<dataset>__<task>.json`` in ``out_dir``::

    {"dataset": "shapes", "model": "ViT-Ti-16-step-00001000", "task": "zeroshot",
     "metrics": {"top1": ..., "top5": ..., "mean_per_class_recall": ..., ...},
     "architecture": "ViT-Ti-16", "checkpoint": "/abs/run/checkpoints/step-00001000.pt",
     "checkpoint_format": "fastclip", "image_size": 64, "num_samples": 1000, "seconds": 3.2, ...}

and ``results.csv`` / ``results.md``: one table of every such JSON in the folder (several runs
into one folder accumulate one table).  Bad input (an unknown task or model, a dataset spec
without ``=``, missing shards, a linear probe without a training split, a class-name file that is
not JSON or has the wrong shape, a set without labels) is refused before any work.

Never imports :mod:`fastclip.train` (the layering: train calls eval); a training checkpoint is
recognised by its ``format`` entry.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import time
from typing import Mapping, Optional, Sequence, Union

import torch

from ..atomic import TRAIN_CHECKPOINT_FORMAT, atomic_write_bytes, checksum
from .linear_probe import evaluate_linear_probe
from .retrieval import evaluate_retrieval
from .zero_shot import evaluate_zero_shot

__all__ = ["TASKS", "PRECISIONS", "run_suite", "load_eval_model", "check_state_dict_fits", "read_classnames",
           "meta_classnames", "shard_files", "first_sample", "parse_spec", "write_tables", "result_filename",
           "headline"]

TASKS = ("zeroshot", "retrieval", "linear_probe")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_BUILTIN = "builtin"
_RESULT_KEYS = ("dataset", "model", "task", "metrics")
# Table columns: these first (in this order) when present, then the other metrics by name.
_METRIC_ORDER = ("top1", "top5", "mean_per_class_recall",
                 "image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
                 "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10")
# Counts, not scores: at the end of the CSV, left out of the markdown table (it has "samples").
_COUNT_METRICS = ("num_samples", "num_classes", "num_images", "num_texts", "n_train", "n_val", "n_test")


# ----------------------------------------------------------------------------------------------
# Small checks
# ----------------------------------------------------------------------------------------------
def _pos_int(name: str, value, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def sanitize(name: str) -> str:
    """``name`` as a file-name part: runs of anything but letters, digits, ``. _ + -`` become ``-``."""
    out = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(name)).strip("-.")
    return out or "unnamed"


def result_filename(model: str, dataset: str, task: str) -> str:
    """``<model>__<dataset>__<task>.json`` with every part sanitised."""
    return f"{sanitize(model)}__{sanitize(dataset)}__{sanitize(task)}.json"


def parse_spec(spec: str, what: str = "--dataset") -> tuple[str, str]:
    """``"NAME=VALUE"`` -> ``(NAME, VALUE)``; ValueError naming ``what`` when there is no ``=`` or a
    side is empty.  The first ``=`` splits (a value may hold more)."""
    if not isinstance(spec, str):
        raise TypeError(f"{what} must be a str NAME=VALUE, got {type(spec).__name__}")
    name, sep, value = spec.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ValueError(f"{what} {spec!r} must be NAME=SHARDS (a name for the results, '=', then the "
                         f"shards), e.g. {what} shapes=data/val/shard-{{00000..00009}}.tar")
    return name.strip(), value.strip()


def _named(what: str, specs) -> dict:
    """{name: value} from a mapping or a sequence of ``NAME=VALUE`` strings; duplicates refused."""
    if specs is None:
        return {}
    if isinstance(specs, Mapping):
        items = list(specs.items())
    elif isinstance(specs, str):
        items = [parse_spec(specs, what)]
    else:
        items = [parse_spec(s, what) for s in specs]
    out: dict = {}
    for name, value in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: names must be non-empty strings, got {name!r}")
        if name in out:
            raise ValueError(f"{what}: the name {name!r} is given twice")
        out[name] = value
    return out


def shard_files(shards, what: str = "shards", *, require_all: bool = True) -> list:
    """The shard files of ``shards`` (as :func:`fastclip.data.shards.expand_shards` takes them) that
    exist.  ``require_all``: FileNotFoundError naming the missing ones if any is missing (an
    evaluation set is the whole set); else only when none exists (the training reader counts a
    missing shard and goes on).  Errors begin with ``what``."""
    from ..data.shards import expand_shards
    try:
        files = expand_shards(shards)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    found = [f for f in files if os.path.isfile(f)]
    if len(found) == len(files):
        return found
    have = set(found)
    missing = [f for f in files if f not in have]
    shown = ", ".join(missing[:3]) + (f", ... ({len(missing)} in all)" if len(missing) > 3 else "")
    if require_all:
        raise FileNotFoundError(f"{what}: {len(missing)} of the {len(files)} shard files of {shards!r} do "
                                f"not exist: {shown}")
    if not found:
        raise FileNotFoundError(f"{what}: {shards!r} matches no shard file (looked for {shown})")
    return found


def first_sample(files: list):
    """The first readable sample of ``files`` (None if there is none): a cheap look before work."""
    from ..data.shards import DataStats, ShardSource
    it = ShardSource(files, shuffle=0, seed=0, check_images=False).iter(0, 0, 1, DataStats(warn=False))
    try:
        return next(iter(it), None)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


# ----------------------------------------------------------------------------------------------
# Class names and templates
# ----------------------------------------------------------------------------------------------
def _check_class_lists(d, where: str) -> tuple[list, list]:
    """(classnames, templates) from a parsed JSON object; ValueError naming ``where`` when the
    shape is wrong.  ``{c}`` placeholders become ``{}``."""
    layout = '{"classnames": ["name", ...], "templates": ["a photo of a {}.", ...]}'
    if not isinstance(d, dict):
        raise ValueError(f"{where} must hold a JSON object {layout}, got a JSON {type(d).__name__}")
    for key in ("classnames", "templates"):
        v = d.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
            got = ("nothing" if v is None else f"a {type(v).__name__}" if not isinstance(v, list)
                   else "an empty list" if not v else "a list with non-string or empty items")
            raise ValueError(f"{where}: {key!r} must be a non-empty list of non-empty strings, got {got} "
                             f"(layout: {layout})")
    templates = []
    for i, t in enumerate(d["templates"]):
        t = t.replace("{c}", "{}")
        try:
            filled = t.format("x")
        except (IndexError, KeyError, ValueError) as exc:
            raise ValueError(f"{where}: templates[{i}] = {d['templates'][i]!r} is not a template with one "
                             f"'{{}}' placeholder ({type(exc).__name__}: {exc})") from None
        if filled == t:
            raise ValueError(f"{where}: templates[{i}] = {d['templates'][i]!r} has no '{{}}' placeholder for "
                             "the class name")
        templates.append(t)
    return list(d["classnames"]), templates


def _read_json(path: str, what: str):
    """The JSON value in ``path``: FileNotFoundError / ValueError naming ``what`` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{what} {path!r} is not valid JSON ({exc})") from None


def read_classnames(path: str) -> tuple[list, list]:
    """(classnames, templates) from a JSON file ``{"classnames": [...], "templates": [...]}``
    (other keys are ignored, so a dataset's ``meta.json`` serves too).  ValueError when it is not
    JSON or has the wrong shape; FileNotFoundError when it does not exist."""
    path = os.fspath(path)
    return _check_class_lists(_read_json(path, "class-name file"), f"class-name file {path!r}")


def meta_classnames(files: list) -> Optional[tuple[list, list, str]]:
    """(classnames, templates, where they came from) in the ``meta.json`` beside the first of
    ``files`` (the built-in dataset's lists, from ``"builtin"``, when it is the built-in dataset's),
    or None when there is no such file or it names no classes.  ValueError when it is not JSON or
    its lists have the wrong shape."""
    from ..data.synthetic import CLASSNAMES, TEMPLATES
    meta_path = os.path.join(os.path.dirname(os.path.abspath(files[0])), "meta.json")
    if not os.path.isfile(meta_path):
        return None
    meta = _read_json(meta_path, "meta file")
    if isinstance(meta, dict) and meta.get("name") == "fastclip-shapes":
        return list(CLASSNAMES), list(TEMPLATES), _BUILTIN
    if isinstance(meta, dict) and "classnames" in meta:
        names, templates = _check_class_lists(meta, meta_path)
        return names, templates, meta_path
    return None


def _classes_for(dataset: str, source, files: list) -> tuple[list, list, str]:
    """(classnames, templates, where they came from) for ``dataset``'s zero-shot evaluation."""
    from ..data.synthetic import CLASSNAMES, TEMPLATES
    if isinstance(source, Mapping):
        names, templates = _check_class_lists(dict(source), f"classnames for dataset {dataset!r}")
        return names, templates, "given"
    if source == _BUILTIN:
        return list(CLASSNAMES), list(TEMPLATES), _BUILTIN
    if source is not None:
        names, templates = read_classnames(source)
        return names, templates, os.path.abspath(source)
    try:
        found = meta_classnames(files)
    except ValueError as exc:
        raise ValueError(f"dataset {dataset!r}: {exc}; pass --classnames {dataset}=FILE.json") from None
    if found is not None:
        return found
    raise ValueError(f"dataset {dataset!r}: no class names for zero-shot classification (no meta.json with "
                     f"them beside its shards): pass --classnames {dataset}=FILE.json with "
                     '{"classnames": [...], "templates": [...]}, or --classnames builtin for the built-in '
                     'dataset')


def _class_sources(classnames, datasets: Sequence[str]) -> dict:
    """{dataset: None | "builtin" | path | {classnames, templates}} from run_suite's ``classnames``."""
    if classnames is None:
        return {d: None for d in datasets}
    if isinstance(classnames, (str, os.PathLike)):
        return {d: os.fspath(classnames) for d in datasets}
    if isinstance(classnames, (list, tuple)):  # the command line's "[NAME=]FILE|builtin" items
        common, own = None, {}
        for item in classnames:
            name, sep, value = str(item).partition("=")
            if sep and name in datasets:
                if name in own:
                    raise ValueError(f"--classnames is given twice for dataset {name!r}")
                own[name] = value
            elif sep and not os.path.exists(item):
                raise ValueError(f"--classnames {item!r}: {name!r} is not a dataset (datasets: "
                                 f"{', '.join(datasets)}) and {item!r} is not a file")
            elif common is not None:
                raise ValueError(f"--classnames without a dataset name is given twice ({common!r} and "
                                 f"{item!r}): prefix each with NAME= to say which dataset it is for")
            else:
                common = str(item)
        return {d: own.get(d, common) for d in datasets}
    if isinstance(classnames, Mapping):
        unknown = [k for k in classnames if k not in datasets]
        if unknown:
            raise ValueError(f"classnames names {unknown}, which are not datasets (datasets: "
                             f"{list(datasets)})")
        return {d: classnames.get(d) for d in datasets}
    raise TypeError(f"classnames must be None, 'builtin', a path, a mapping dataset -> source or a list, "
                    f"got {type(classnames).__name__}")


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def _list(keys: list, n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_state_dict_fits(model: torch.nn.Module, state_dict: Mapping, what: str = "checkpoint") -> None:
    """ValueError naming the missing keys, the unexpected keys and the shape mismatches when
    ``state_dict`` (open_clip's layout, e.g. from :func:`fastclip.models.clean_state_dict`) does not
    fit ``model`` exactly; nothing otherwise."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
              for k in expected if k in state_dict and isinstance(state_dict[k], torch.Tensor)
              and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    not_tensors = [k for k in state_dict if not isinstance(state_dict[k], torch.Tensor)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_list(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_list(shapes, 4)}")
    if not_tensors:
        problems.append(f"{len(not_tensors)} entries that are not tensors: {_list(not_tensors)}")
    if problems:
        config = getattr(model, "config", None)
        arch = getattr(config, "name", None) or type(model).__name__
        size = getattr(getattr(config, "vision_cfg", None), "image_size", None)
        at = f" at image_size {size}" if size is not None else ""
        raise ValueError(f"{what} does not fit the model {arch}{at}: " + "; ".join(problems))


def load_eval_model(model=None, checkpoint: Optional[str] = None, *,
                    image_size: Optional[int] = None) -> tuple[torch.nn.Module, dict]:
    """``(model in eval mode on CPU, info)`` for evaluation.

    Args:
        model: a name (``fastclip.list_models()``), a path to an open_clip model config JSON, a
            :class:`fastclip.CLIPConfig`, an ``nn.Module`` (used as is), or None when
            ``checkpoint`` is a fastclip training checkpoint (whose model config is inside it).
        checkpoint: a fastclip training checkpoint (``checkpoints/step-*.pt``: the weights under
            ``state_dict``, the config under ``model_config``), an open_clip / OpenAI state dict
            (``.pt``, ``.bin``, bare or under ``state_dict``, DDP ``module.`` prefixes stripped;
            ``.safetensors`` with the safetensors package), or None (random init).
        image_size: the input resolution; default the checkpoint's (training checkpoints) or the
            config's.

    ``info``: ``architecture``, ``checkpoint`` (absolute path or None), ``checkpoint_format``
    (``"fastclip"``, ``"open_clip"`` or None), ``image_size``.  Raises ValueError naming the
    problem (an unknown model with the list, a checkpoint that cannot be read or does not fit:
    its missing, unexpected and mis-shaped keys), FileNotFoundError for a missing file.
    """
    from ..models import CLIPConfig, clean_state_dict, create_model, read_checkpoint
    image_size = _pos_int("image_size", image_size, allow_none=True)
    state, fmt, ckpt_config, ckpt_name, path = None, None, None, None, None
    if checkpoint is not None:
        path = os.path.abspath(os.fspath(checkpoint))
        payload = read_checkpoint(path)
        if not isinstance(payload, Mapping):
            raise ValueError(f"checkpoint {path!r} holds a {type(payload).__name__}, not a state dict")
        if payload.get("format") == TRAIN_CHECKPOINT_FORMAT:
            fmt = "fastclip"
            if payload.get("checksum") != checksum(payload):
                raise ValueError(f"checkpoint {path!r} is damaged: its checksum does not match its content")
            ckpt_config = payload.get("model_config")
            ckpt_name = (payload.get("config") or {}).get("model", {}).get("name")
            if not isinstance(payload.get("state_dict"), Mapping) or not isinstance(ckpt_config, Mapping):
                raise ValueError(f"checkpoint {path!r} says it is a fastclip training checkpoint but has no "
                                 "'state_dict' and 'model_config' entries")
        else:
            fmt = "open_clip"
        state = clean_state_dict(payload)

    if isinstance(model, torch.nn.Module):
        net = model
    else:
        if ckpt_config is not None:
            if model is not None and model != ckpt_name:
                raise ValueError(f"checkpoint {path!r} is a fastclip training checkpoint of {ckpt_name!r} "
                                 f"(its model config is inside it), but the model given is {model!r}: leave "
                                 "the model out")
            config = CLIPConfig.from_dict(dict(ckpt_config), name=ckpt_name)
            trained = config.vision_cfg.image_size
            if image_size is not None and image_size != trained:
                raise ValueError(f"image_size {image_size}, but the model of checkpoint {path!r} was trained "
                                 f"at {trained}: leave the image size out")
        elif model is None:
            from ..models import list_models
            raise ValueError("model: a model name is needed (one of " + ", ".join(list_models())
                             + ", or an open_clip model config JSON) unless the checkpoint is a fastclip "
                             "training checkpoint")
        elif isinstance(model, CLIPConfig):
            config = dataclasses.replace(model, vision_cfg=dataclasses.replace(model.vision_cfg),
                                         text_cfg=dataclasses.replace(model.text_cfg))
        elif isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".json"):
            cfg_path = os.fspath(model)
            d = _read_json(cfg_path, "model config")
            try:
                if not isinstance(d, dict):
                    raise ValueError(f"a JSON {type(d).__name__}, not an object")
                config = CLIPConfig.from_dict(d, name=os.path.splitext(os.path.basename(cfg_path))[0])
            except (ValueError, TypeError) as exc:
                raise ValueError(f"model config {cfg_path!r} is not an open_clip model config: "
                                 f"{exc}") from None
        elif isinstance(model, str):
            config = CLIPConfig.from_name(model)  # ValueError with the known names
        else:
            raise TypeError(f"model must be a name, a config JSON path, a CLIPConfig or an nn.Module, "
                            f"got {type(model).__name__}")
        if image_size is not None:
            config.apply_overrides(image_size=image_size)
        net = create_model(config)
    if state is not None:
        check_state_dict_fits(net, state, f"checkpoint {path!r}")
        net.load_state_dict(state, strict=True)
    config = getattr(net, "config", None)
    info = {"architecture": getattr(config, "name", None) or type(net).__name__, "checkpoint": path,
            "checkpoint_format": fmt,
            "image_size": getattr(getattr(config, "vision_cfg", None), "image_size", None) or image_size}
    return net.eval(), info


def _default_label(info: dict) -> str:
    if info["checkpoint"] is None:
        return f"{info['architecture']}-random-init"
    return f"{info['architecture']}-{os.path.splitext(os.path.basename(info['checkpoint']))[0]}"


# ----------------------------------------------------------------------------------------------
# The tasks
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """What every task of one run shares."""

    model: torch.nn.Module
    tokenizer: object
    image_size: int
    batch_size: int
    num_threads: int
    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    backend: str
    max_batches: Optional[int]
    progress: bool

    def loader(self, files: list, *, with_labels: bool, return_meta: bool):
        from ..data.loader import ClipLoader
        return ClipLoader(files, self.batch_size, image_size=self.image_size, augment="clip", train=False,
                          tokenizer=self.tokenizer, backend=self.backend, device=self.device,
                          num_threads=self.num_threads, shuffle=0, rank=0, world_size=1, worker=0,
                          num_workers=1, with_labels=with_labels, return_meta=return_meta,
                          wrong_modes="convert", warn=False)


class _CheckedLabels:
    """A labelled loader whose labels are checked batch by batch against the class names: a label
    the class names do not cover (or -1, no label) stops the run at that batch, naming the sample."""

    def __init__(self, loader, num_classes: int, dataset: str, source: str):
        self.loader, self.num_classes, self.dataset, self.source = loader, num_classes, dataset, source

    def __iter__(self):
        it = iter(self.loader)
        try:
            for batch in it:
                labels, meta = batch[-2], batch[-1]  # (images, tokens, labels, meta)
                bad = ((labels < 0) | (labels >= self.num_classes)).nonzero().flatten().tolist()
                if bad:
                    i = bad[0]
                    where = f"sample {meta['keys'][i]} of {meta['shards'][i]}"
                    value = int(labels[i])
                    if value < 0:
                        raise ValueError(f"dataset {self.dataset!r}: {where} has no label (.cls or json "
                                         "'label'); zero-shot accuracy needs a label for every sample")
                    raise ValueError(f"dataset {self.dataset!r}: {where} has label {value}, but the class "
                                     f"names ({self.source}) have only {self.num_classes} classes; they must "
                                     "cover every label")
                yield batch
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def _zero_shot(run: _Run, dataset: str, files: list, classes: tuple) -> tuple[dict, dict]:
    names, templates, source = classes
    loader = run.loader(files, with_labels=True, return_meta=True)
    batches = _CheckedLabels(loader, len(names), dataset, source)
    metrics = evaluate_zero_shot(run.model, batches, names, templates, run.tokenizer, device=run.device,
                                 autocast_dtype=run.autocast_dtype, max_batches=run.max_batches,
                                 progress=run.progress)
    return metrics, {"num_samples": metrics["num_samples"], "classnames": source,
                     "skipped": dict(loader.epoch_stats.skipped) if loader.epoch_stats else {}}


def _retrieval(run: _Run, files: list) -> tuple[dict, dict]:
    """Several captions per image: one per line of the sample's text."""
    loader = run.loader(files, with_labels=False, return_meta=True)
    metrics = evaluate_retrieval(run.model, loader, device=run.device, autocast_dtype=run.autocast_dtype,
                                 max_batches=run.max_batches, progress=run.progress, tokenizer=run.tokenizer)
    return metrics, {"num_samples": metrics["num_images"],
                     "skipped": dict(loader.epoch_stats.skipped) if loader.epoch_stats else {}}


def _linear_probe(run: _Run, dataset: str, files: list, train_files: list, cache_dir: Optional[str],
                  cache_key: str) -> tuple[dict, dict]:
    train_loader = run.loader(train_files, with_labels=True, return_meta=False)
    test_loader = run.loader(files, with_labels=True, return_meta=False)
    metrics = evaluate_linear_probe(run.model, train_loader, test_loader, device=run.device,
                                    autocast_dtype=run.autocast_dtype, cache_dir=cache_dir,
                                    cache_key=cache_key if cache_dir else None, max_batches=run.max_batches,
                                    progress=run.progress, seed=0)
    return metrics, {"num_samples": metrics.get("n_test"),
                     "skipped": dict(test_loader.epoch_stats.skipped) if test_loader.epoch_stats else {}}


def _cache_key(dataset: str, files: list, train_files: list, image_size: int) -> str:
    """The feature cache's name for this data: ``evaluate_linear_probe`` checks the model (its
    fingerprint) and the settings itself, but the data only by this name, so it names the shard
    files (path, size, modification time) and the resolution, not just the dataset's name."""
    stamps = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in [*files, *train_files]]
    blob = json.dumps([stamps, len(files), image_size])
    return f"{sanitize(dataset)}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _shown(files: list):
    """The shard files as a result records them: absolute paths, or a count past 16."""
    files = [os.path.abspath(f) for f in files]
    return files if len(files) <= 16 else f"{len(files)} shards: {files[0]} ... {files[-1]}"


def _write_atomic(path: str, text: str) -> None:
    """A reader (or a second ``fastclip eval`` into the same folder) never sees a half-written file."""
    atomic_write_bytes(path, text.encode("utf-8"), suffix=os.path.splitext(path)[1])


def _is_result(d) -> bool:
    return (isinstance(d, dict) and all(k in d for k in _RESULT_KEYS) and isinstance(d["metrics"], dict)
            and all(isinstance(d[k], str) for k in ("dataset", "model", "task")))


def _read_results(out_dir: str) -> list:
    rows = []
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            with open(os.path.join(out_dir, name), encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # not ours (another tool's file in the same folder)
        if _is_result(d):
            rows.append(d)
    rows.sort(key=lambda d: (d["task"], d["dataset"], d["model"]))
    return rows


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str)) and not isinstance(v, bool)


def _metric_columns(rows: list, counts: bool) -> list:
    keys = {k for r in rows for k, v in r["metrics"].items() if _scalar(v)}
    first = [k for k in _METRIC_ORDER if k in keys]
    rest = sorted(k for k in keys if k not in _METRIC_ORDER and k not in _COUNT_METRICS)
    tail = [k for k in _COUNT_METRICS if k in keys] if counts else []
    return first + rest + tail


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def write_tables(out_dir: str) -> tuple[str, str]:
    """``results.csv`` and ``results.md`` in ``out_dir`` from every result JSON there (files of
    another layout are left out); returns their paths.  CSV: one row per (model, dataset, task),
    every scalar metric.  Markdown: one table per task, its scores and the number of samples."""
    rows = _read_results(out_dir)
    meta_cols = ["model", "dataset", "task", "architecture", "checkpoint", "image_size", "num_samples",
                 "seconds"]
    metric_cols = [c for c in _metric_columns(rows, counts=True) if c not in meta_cols]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(meta_cols + metric_cols)
    for r in rows:
        metrics = r["metrics"]
        w.writerow([r.get(c) if r.get(c) is not None else "" for c in meta_cols]
                   + [metrics[c] if _scalar(metrics.get(c)) else "" for c in metric_cols])
    csv_path = os.path.join(out_dir, "results.csv")
    _write_atomic(csv_path, buf.getvalue())

    lines = ["# fastclip eval results", "",
             f"{len(rows)} results (one JSON each in this folder); scores are fractions in [0, 1].", ""]
    for task in sorted({r["task"] for r in rows}):
        group = [r for r in rows if r["task"] == task]
        cols = _metric_columns(group, counts=False)
        lines += [f"## {task}", "", "| " + " | ".join(["model", "dataset", *cols, "samples"]) + " |",
                  "|" + "---|" * 2 + "---:|" * (len(cols) + 1)]
        for r in group:
            scores = [_fmt(r["metrics"][c]) if _scalar(r["metrics"].get(c)) else "" for c in cols]
            cells = [r["model"], r["dataset"], *scores, _fmt(r.get("num_samples"))]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    md_path = os.path.join(out_dir, "results.md")
    _write_atomic(md_path, "\n".join(lines))
    return csv_path, md_path


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------
def run_suite(datasets: Union[Mapping[str, object], Sequence[str]],
              tasks: Union[str, Sequence[str]] = ("zeroshot",), *, model=None,
              checkpoint: Optional[str] = None, image_size: Optional[int] = None,
              name: Optional[str] = None, train: Union[None, Mapping[str, object], Sequence[str]] = None,
              classnames=None, out_dir: Optional[str] = None, batch_size: int = 256, num_threads: int = 2,
              device=None, precision: str = "auto", max_batches: Optional[int] = None,
              cache_dir: Optional[str] = None, backend: str = "auto", progress: bool = False) -> list:
    """Evaluate one model on every dataset with every task; returns the result dicts (also written
    to ``out_dir`` when given, with the accumulated ``results.csv`` / ``results.md``).

    Args:
        datasets: ``{name: shards}`` or ``["name=shards", ...]``; shards as
            :func:`fastclip.data.shards.expand_shards` takes them (brace pattern, directory,
            ``a.tar::b.tar``); every file must exist.
        tasks: any of :data:`TASKS` (``zeroshot``, ``retrieval``, ``linear_probe``), each run on
            every dataset.
        model, checkpoint, image_size: see :func:`load_eval_model`.
        name: the model's name in the results (default: architecture + checkpoint file name, or
            ``<architecture>-random-init``).
        train: ``linear_probe`` only: ``{dataset: training shards}`` (or ``"dataset=shards"``
            strings), one for every dataset.
        classnames: ``zeroshot`` only: None (each dataset's ``meta.json``: the built-in dataset's
            own class names), ``"builtin"``, a JSON path (for every dataset), ``{dataset:
            "builtin" | path | {"classnames": [...], "templates": [...]}}``, or a list of
            ``"[dataset=](path|builtin)"`` strings (the command line's).
        out_dir: where the JSONs and tables go (None: nothing is written).
        batch_size, num_threads, backend: the loader's (``backend``: auto, dali, pil).
        device: None / "auto" (CUDA when available, else CPU) or a device; an ``nn.Module``
            model is moved there.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
        max_batches: stop every set (and the probe's training set) after this many batches.
        cache_dir: ``linear_probe``: where the extracted features are cached.
        progress: tqdm bars (if tqdm is installed).

    Everything checkable is checked before the model is built or a batch read: ValueError /
    FileNotFoundError naming the problem.  A label outside the class names is found while the
    zero-shot set is read and stops the run at that batch.
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError(f"tasks must name at least one of {', '.join(TASKS)}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; valid tasks: {', '.join(TASKS)}")
    tasks = list(dict.fromkeys(tasks))
    sets = _named("--dataset", datasets)
    if not sets:
        raise ValueError("datasets must name at least one dataset (NAME=SHARDS)")
    files = {d: shard_files(s, f"dataset {d!r}") for d, s in sets.items()}
    train_sets = _named("--train", train)
    stray = [d for d in train_sets if d not in sets]
    if stray:
        raise ValueError(f"--train names {stray}, which are not datasets (datasets: {list(sets)})")
    train_files = {}
    if "linear_probe" in tasks:
        lacking = [d for d in sets if d not in train_sets]
        if lacking:
            raise ValueError(f"task linear_probe needs a training split for every dataset: give --train "
                             f"NAME=SHARDS for {', '.join(lacking)}")
        train_files = {d: shard_files(s, f"--train {d!r}") for d, s in train_sets.items()}
    batch_size = _pos_int("batch_size", batch_size)
    num_threads = _pos_int("num_threads", num_threads)
    max_batches = _pos_int("max_batches", max_batches, allow_none=True)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but torch.cuda.is_available() is False")
    autocast_dtype = (torch.bfloat16 if device.type == "cuda" else None) if precision == "auto" \
        else _AUTOCAST[precision]
    precision_name = "fp32" if autocast_dtype is None else str(autocast_dtype).replace("torch.", "")

    # Class names, and a look at every set's first sample: readable, labelled where labels count.
    class_sources = _class_sources(classnames, list(sets))
    classes = {}
    for d in sets:
        first = first_sample(files[d])
        if first is None:
            raise ValueError(f"dataset {d!r}: {sets[d]!r} holds no readable sample")
        needs_labels = [t for t in tasks if t in ("zeroshot", "linear_probe")]
        if needs_labels and first.label < 0:
            raise ValueError(f"dataset {d!r} has no labels (.cls or json 'label'; its first sample "
                             f"{first.key} has none), which task {needs_labels[0]} needs")
        if "zeroshot" in tasks:
            classes[d] = _classes_for(d, class_sources[d], files[d])
            if first.label >= len(classes[d][0]):
                raise ValueError(f"dataset {d!r}: sample {first.key} has label {first.label}, but the class "
                                 f"names ({classes[d][2]}) have only {len(classes[d][0])} classes; they must "
                                 "cover every label")
        if "linear_probe" in tasks:
            first_train = first_sample(train_files[d])
            if first_train is None or first_train.label < 0:
                why = ("holds no readable sample" if first_train is None
                       else "has no labels (.cls or json 'label')")
                raise ValueError(f"--train {d!r}: {train_sets[d]!r} {why}, which task linear_probe needs")
    for what, folder in (("out_dir", out_dir), ("cache_dir", cache_dir)):
        if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{what} {folder!r} exists and is not a directory")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty str, got {name!r}")

    net, info = load_eval_model(model, checkpoint, image_size=image_size)  # refuses a checkpoint that misfits
    net = net.to(device)
    label = name if name is not None else _default_label(info)
    for folder in (out_dir, cache_dir):
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
    from ..tokenizer import get_tokenizer
    text_cfg = getattr(getattr(net, "config", None), "text_cfg", None)
    tokenizer = get_tokenizer(context_length=getattr(text_cfg, "context_length", None))
    run = _Run(net, tokenizer, info["image_size"], batch_size, num_threads, device, autocast_dtype, backend,
               max_batches, progress)
    from .. import __version__

    results = []
    for d in sets:
        for task in tasks:
            t0 = time.perf_counter()
            if task == "zeroshot":
                metrics, extra = _zero_shot(run, d, files[d], classes[d])
            elif task == "retrieval":
                metrics, extra = _retrieval(run, files[d])
            else:
                key = _cache_key(d, files[d], train_files[d], info["image_size"])
                metrics, extra = _linear_probe(run, d, files[d], train_files[d], cache_dir, key)
                extra["train_shards"] = _shown(train_files[d])
            record = {"dataset": d, "model": label, "task": task, "metrics": metrics,
                      "architecture": info["architecture"], "checkpoint": info["checkpoint"],
                      "checkpoint_format": info["checkpoint_format"], "image_size": info["image_size"],
                      "num_samples": extra.pop("num_samples"), "seconds": round(time.perf_counter() - t0, 3),
                      "shards": _shown(files[d]), **extra,
                      "batch_size": batch_size, "max_batches": max_batches, "device": str(device),
                      "precision": precision_name,
                      "fastclip_version": __version__,
                      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            if out_dir is not None:
                path = os.path.join(out_dir, result_filename(label, d, task))
                _write_atomic(path, json.dumps(record, indent=1) + "\n")
                record["path"] = path  # where it went (not in the file)
                write_tables(out_dir)  # after each result: an interrupted suite still leaves its table
            results.append(record)
    return results


def headline(result: dict) -> str:
    """A one-line summary of a result: its task's main scores."""
    keys = [k for k in _METRIC_ORDER if k in result["metrics"]] or \
        [k for k, v in result["metrics"].items() if _scalar(v) and k not in _COUNT_METRICS]
    scores = "  ".join(f"{k} {_fmt(result['metrics'][k])}" for k in keys)
    return (f"{result['model']}  {result['dataset']}  {result['task']}: {scores}  "
            f"({result.get('num_samples')} samples, {result['seconds']:.1f} s)")
