"""``fastclip sweep``: a grid of training runs on the built-in dataset, run one after another into
one results table that ``fastclip fit`` and ``fastclip plan --table`` read.

    cfg = SweepConfig.from_file("sweep.yaml", overrides=["grid.seeds=[0,1]"])
    path = run_sweep(cfg)               # fastclip sweep --config sweep.yaml grid.seeds=[0,1]

The grid is models x strategies x dataset sizes x caption noise x quality filter x compute
budgets x seeds (:func:`expand`); every configuration has a stable id, a readable slug and a hash
of its settings (``ViT-Ti-16_clip_n2000_noise0.2_g1e+05_s0-3f9c0a1b2d``; ``_top40`` after the
noise for a run on the top 40% of its set by CLIP score, :mod:`fastclip.scaling.filtered`), by
which results, resumption and skipping are keyed.  A configuration's training config is the demo's recipe
(:func:`fastclip.train.demo.demo_config`: batch 128, AdamW at 2e-3, cosine), then
``eval.every_steps=0`` (one evaluation, at the end), then ``base``, then the configuration's own
model, strategy, compute budget, seed and data (:func:`train_config_for`).

Before any work the sweep config and every configuration are checked (the training config's
keys and values, the model and strategy names, a dataset of at least one batch, a budget of at
least one step), and an output folder holding another sweep (another grid hash) is refused.
Then each distinct dataset is written once (the demo's :func:`~fastclip.train.demo.prepare_data`:
a training set of ``dataset_size`` captioned scenes, held-out zero-shot and retrieval sets; a
noisy training set is the clean one's spec with ``caption_noise``), and the configurations not
finished yet are trained one after another.  The output folder::

    sweep.yaml          the sweep's config, every default written out
    sweep-state.json    grid hash, finished ids, failed ids with their error, each run's row (checksummed)
    results.csv         one row per configuration run (finished or failed), in the order they ended
    data/               the built-in dataset's sets (unless data.root says otherwise)
    runs/<id>/          each run's output_dir: config.yaml, metrics.jsonl, summary.json, checkpoints/

Several processes can share one sweep (``run_sweep(..., worker=(k, n))``, ``fastclip sweep
--worker k/n``, or torchrun's ranks): each trains the configurations at grid positions k modulo n,
and the state, the table and the datasets are written under a file lock in ``output_dir``.

A configuration that raises is recorded as failed (with the error) and the sweep goes on; the
next call retries it from scratch.  An interrupted configuration continues from its newest
checkpoint (``train(..., resume="latest")``); finished ones are skipped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from ..atomic import atomic_write_bytes, checksum
from ..train.config import (ConfigError, StrategyConfig, TrainConfig, apply_overrides, coerce_value,
                            read_config_file, unknown_key)
from ..train.demo import DEMO_DATA, DEMO_MODEL

__all__ = ["SweepConfig", "GridConfig", "SweepDataConfig", "ModelSpec", "StrategySpec", "Run", "expand",
           "check_runs", "train_config_for", "prepare_sweep_data", "run_sweep", "sweep_state", "grid_hash",
           "ROW_COLUMNS"]

# The results table's leading columns; the evaluation's metrics follow, named as the trainer names them.
ROW_COLUMNS = ("run_id", "model", "image_size", "strategy", "dataset_size", "caption_noise", "filter_top", "train_pairs",
               "train_clean", "seed", "budget_gflops", "gflops", "samples_seen", "steps", "seconds", "status")
STATE_FILE = "sweep-state.json"
RESULTS_FILE = "results.csv"
STATE_VERSION = 1

# Training keys that the grid sets for every configuration: ``base`` may not set them.
_GRID_OWNED = {"output_dir": "the sweep (runs/<id>)", "seed": "grid.seeds", "model.name": "grid.models",
               "model.image_size": "grid.models", "model.overrides": "grid.models", "strategy.name": "grid.strategies",
               "budget.gflops": "grid.budgets_gflops", "data.train": "grid.dataset_sizes",
               "eval.zero_shot": "data.zero_shot", "eval.retrieval": "data.retrieval"}
# ``base`` keys that change how a run is watched or where it runs, not what it computes: left out
# of the ids and the grid hash, so that e.g. turning the progress bar off does not start a new sweep.
_NOT_HASHED = ("log", "checkpoint", "device", "data.num_threads")


# ----------------------------------------------------------------------------------------------
# the config
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A model of the grid: a fastclip model name with ``create_model`` overrides.  ``label`` is its
    name in the results table (default ``name``; two entries with one name need labels)."""

    name: str = "ViT-Ti-16"
    label: Optional[str] = None
    image_size: Optional[int] = None   # default: data.image_size
    overrides: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class StrategySpec:
    """A strategy of the grid: a ``strategy.name`` (``clip``, ``flip``, ``slip``, ``clip_aug`` or
    several joined by ``+``) with ``strategy`` settings (``mask_ratio``, ``loss``, ...)."""

    name: str = "clip"
    label: Optional[str] = None
    settings: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class GridConfig:
    """What varies; the configurations are every combination (models outermost, seeds innermost)."""

    models: list = field(default_factory=list)                           # ModelSpec (or just a name)
    strategies: list = field(default_factory=lambda: [StrategySpec()])   # StrategySpec (or just a name)
    dataset_sizes: list = field(default_factory=list)                    # samples of the built-in dataset
    caption_noise: list = field(default_factory=lambda: [0.0])           # fraction of corrupted captions
    filter_top: list = field(default_factory=lambda: [100.0])            # % kept by fastclip filter (100: all)
    budgets_gflops: list = field(default_factory=list)                   # training compute per run
    seeds: list = field(default_factory=lambda: [0])


@dataclass
class SweepDataConfig:
    """The built-in dataset (``fastclip.data.make_shapes_dataset``): rendering and held-out sets."""

    image_size: int = DEMO_MODEL["image_size"]          # pixels the scenes are rendered at
    zero_shot: int = DEMO_DATA["zero_shot"]             # held-out single-object scenes (30 classes)
    retrieval: int = DEMO_DATA["retrieval"]             # held-out captioned scenes
    seed: int = DEMO_DATA["seed"]
    caption_detail: float = DEMO_DATA["caption_detail"]
    root: Optional[str] = None                          # where the sets are cached (default: output_dir/data)
    # grid.filter_top < 100: the scorer (fastclip.scaling.filtered): a training checkpoint, or
    # the demo model trained by the sweep on clean pairs of another seed
    filter_checkpoint: Optional[str] = None
    scorer_dataset_size: int = 5000
    scorer_budget_gflops: float = 1.2e4


@dataclass
class SweepConfig:
    """A sweep: ``grid`` (what varies), ``base`` (training config keys for every run, nested or
    dotted: ``{data: {batch_size: 64}, optim.lr: 1e-3}``) and ``data`` (the built-in dataset)."""

    name: str = "sweep"
    output_dir: str = "sweeps/sweep"
    grid: GridConfig = field(default_factory=GridConfig)
    base: dict = field(default_factory=dict)
    data: SweepDataConfig = field(default_factory=SweepDataConfig)

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Optional[dict] = None, overrides=()) -> "SweepConfig":
        """From a nested dict (a YAML/JSON file's content), then ``overrides``: ``"a.b=value"``
        strings (values parsed as YAML) or a flat ``{"a.b": value}`` dict."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError(f"a sweep config must be a mapping of sections, got {type(d).__name__}")
        cfg = cls()
        for key, value in d.items():
            cfg.set(str(key), value)
        apply_overrides(cfg, overrides, "grid.seeds=[0,1]")
        return cfg

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], overrides=()) -> "SweepConfig":
        return cls.from_dict(read_config_file(path, "sweep config file"), overrides)

    def set(self, key: str, value: Any) -> None:
        """Set a dotted key (``grid.seeds``, ``data.image_size``, ``base.optim.lr``); unknown keys are
        refused with the closest valid name.  A section given as a mapping sets its keys one by one."""
        parts = key.split(".")
        head = parts[0]
        if head == "base":
            if len(parts) == 1:
                if value is None:
                    value = {}
                if not isinstance(value, dict):
                    raise ConfigError(f"base must be a mapping of training config keys (e.g. {{optim: {{lr: 1e-3}}}}), "
                                      f"got {value!r}")
                base = _nested(value, "base")
            else:
                base = _nested(self.base, "base")
                _put(base, parts[1:], _nested(value, key) if isinstance(value, dict) else value, key)
            self.base = _checked_base(base)
            return
        if head in ("grid", "data"):
            section = getattr(self, head)
            if len(parts) == 1:
                if value is None:
                    value = {}
                if not isinstance(value, dict):
                    raise ConfigError(f"{head} must be a mapping, got {value!r}")
                for k, v in value.items():
                    self.set(f"{head}.{k}", v)
                return
            if len(parts) == 2 and parts[1] in {f.name for f in fields(section)}:
                setattr(section, parts[1], _FIELD_PARSERS[f"{head}.{parts[1]}"](key, value))
                return
        elif len(parts) == 1 and head in ("name", "output_dir"):
            setattr(self, head, _str(key, value))
            return
        valid = [f.name for f in fields(self)] if len(parts) == 1 else _SWEEP_KEYS
        unknown_key(key, valid, "sweep config key", "fastclip sweep --print-config lists every key")

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str) -> None:
        atomic_write_bytes(path, self.to_yaml().encode())

    # -- checks ------------------------------------------------------------------------------
    def validate(self) -> "SweepConfig":
        """Check every value of the sweep itself (not yet each configuration: :func:`check_runs`);
        raise ConfigError naming the key."""
        if not self.name.strip():
            raise ConfigError("name must be a non-empty string")
        if not self.output_dir.strip():
            raise ConfigError("output_dir must name a folder")
        g, d = self.grid, self.data
        empty = [f"grid.{f.name}" for f in fields(g) if not getattr(g, f.name)]
        if empty:
            raise ConfigError(f"the grid is empty: {', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no "
                              "value (every list needs at least one; fastclip sweep --print-config shows the layout)")
        for name in ("dataset_sizes", "caption_noise", "filter_top", "budgets_gflops", "seeds"):
            _no_duplicates(f"grid.{name}", getattr(g, name))
        _no_duplicates("grid.models (by label)", [m.key for m in g.models],
                       "give the entries distinct labels (label: ...), the results table's model column")
        _no_duplicates("grid.strategies (by label)", [s.key for s in g.strategies],
                       "give the entries distinct labels (label: ...), the results table's strategy column")
        for i, m in enumerate(g.models):
            if m.image_size is not None and m.image_size < 8:
                raise ConfigError(f"grid.models[{i}].image_size must be >= 8, got {m.image_size}")
        for v in g.dataset_sizes:
            if v < 1:
                raise ConfigError(f"grid.dataset_sizes must be positive sample counts, got {v}")
        for v in g.caption_noise:
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"grid.caption_noise values must be fractions in [0, 1], got {v}")
        for v in g.filter_top:
            if not 0.0 < v <= 100.0:
                raise ConfigError(f"grid.filter_top values must be percentages in (0, 100] (100: unfiltered), got {v}")
        if d.scorer_dataset_size < 1:
            raise ConfigError(f"data.scorer_dataset_size must be a positive sample count, got {d.scorer_dataset_size}")
        if not (math.isfinite(d.scorer_budget_gflops) and d.scorer_budget_gflops > 0):
            raise ConfigError(f"data.scorer_budget_gflops must be finite and > 0, got {d.scorer_budget_gflops}")
        for v in g.budgets_gflops:
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"grid.budgets_gflops values must be finite and > 0, got {v}")
        if d.image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8, got {d.image_size}")
        for name in ("zero_shot", "retrieval"):
            if getattr(d, name) < 1:
                raise ConfigError(f"data.{name} must be a positive sample count, got {getattr(d, name)}")
        if not 0.0 <= d.caption_detail <= 1.0:
            raise ConfigError(f"data.caption_detail must be a probability in [0, 1], got {d.caption_detail}")
        _checked_base(self.base)
        return self


# ----------------------------------------------------------------------------------------------
# the configurations
# ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One configuration of the grid.  ``id`` = readable slug + hash of ``settings`` (everything
    that defines what the run computes)."""

    id: str
    model: ModelSpec
    strategy: StrategySpec
    image_size: int
    dataset_size: int
    caption_noise: float
    budget_gflops: float
    seed: int
    settings: dict
    filter_top: float = 100.0

    @property
    def data_key(self) -> tuple:
        return (self.dataset_size, self.caption_noise, self.filter_top)

    @property
    def train_pairs(self) -> int:
        """The pairs trained on: the dataset, or the part of it the filter keeps (as it rounds)."""
        return self.dataset_size if self.filter_top >= 100 else max(1, round(self.filter_top / 100 * self.dataset_size))


def expand(cfg: SweepConfig) -> list:
    """The grid's configurations (:class:`Run`), models outermost and seeds innermost.  The sweep
    config is validated first; an empty grid is refused."""
    cfg.validate()
    g = cfg.grid
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("root",) + _FILTER_KEYS}
    scorer = {k: getattr(cfg.data, k) for k in _FILTER_KEYS}
    base = {k: v for k, v in _flat(cfg.base).items()
            if not any(k == p or k.startswith(p + ".") for p in _NOT_HASHED)}
    runs = []
    for m, s, size, noise, top, budget, seed in itertools.product(g.models, g.strategies, g.dataset_sizes,
                                                                  g.caption_noise, g.filter_top, g.budgets_gflops,
                                                                  g.seeds):
        image_size = m.image_size or cfg.data.image_size
        settings = {"model": {"name": m.name, "image_size": image_size, "overrides": m.overrides},
                    "strategy": dict(s.settings, name=s.name), "dataset_size": size, "caption_noise": noise,
                    "budget_gflops": budget, "seed": seed, "data": data, "base": base}
        filtered = top < 100
        if filtered:  # only filtered runs carry the filter's settings: unfiltered ids stay as they were
            settings["filter"] = dict(scorer, top=top)
        slug = _slug(f"{m.key}_{s.key}_n{size}_noise{noise:g}" + (f"_top{top:g}" if filtered else "")
                     + f"_g{budget:.3g}_s{seed}")
        runs.append(Run(f"{slug}-{_digest(settings)[:10]}", m, s, image_size, size, noise, budget, seed, settings,
                        filter_top=top))
    return runs


def grid_hash(runs: list) -> str:
    """The sweep's identity: a hash of its configurations' ids (their order does not matter)."""
    return _digest(sorted(r.id for r in runs))[:16]


def train_config_for(cfg: SweepConfig, run: Run, data: Optional[dict] = None,
                     device: Optional[str] = None) -> TrainConfig:
    """The training config of ``run``: the demo's recipe, ``eval.every_steps=0``, ``base``, then the
    run's model, strategy, budget and seed (and ``device`` if given).  ``data``: the prepared sets
    (``train``, ``zero_shot``, ``retrieval``); without it, placeholders (enough to check the config)."""
    from ..train.demo import demo_config
    data = data or {"train": "<train set>", "zero_shot": "<zero-shot set>", "retrieval": "<retrieval set>"}
    items = [("eval.every_steps", 0)] + list(_flat(cfg.base).items())
    items += [("seed", run.seed), ("model.name", run.model.name), ("model.image_size", run.image_size),
              ("model.overrides", dict(run.model.overrides)), ("strategy.name", run.strategy.name)]
    items += [(f"strategy.{k}", v) for k, v in run.strategy.settings.items()]
    items += [("device", device)] if device else []
    return demo_config(data, os.path.join(cfg.output_dir, "runs", run.id), run.budget_gflops, items)


def check_runs(cfg: SweepConfig, runs: Optional[list] = None) -> dict:
    """Check every configuration before any work: its training config (keys, values, model and
    strategy names), a dataset of at least one batch and a budget of at least one step (the
    trainer's :class:`~fastclip.train.Budget` plan).  Returns ``{run id: planned steps}``; raises
    one ConfigError listing every problem with the configurations it concerns."""
    from ..train import plan_run
    runs = expand(cfg) if runs is None else runs
    planned: dict = {}
    problems: dict = {}
    for run in runs:
        try:
            tc = train_config_for(cfg, run).validate()
            if run.train_pairs < tc.data.batch_size:
                what = (f"dataset size {run.dataset_size}" if run.filter_top >= 100 else
                        f"the top {run.filter_top:g}% of {run.dataset_size} pairs ({run.train_pairs})")
                raise ConfigError(f"{what} is smaller than one batch (data.batch_size={tc.data.batch_size}): "
                                  "the trainer takes full batches only")
            if "image_size" in tc.model.overrides:
                raise ConfigError("set a model's resolution with grid.models[].image_size, not in its overrides")
            _, _, budget = plan_run(tc)  # as the trainer plans it
            planned[run.id] = budget.planned_steps
        except ConfigError as exc:
            problems.setdefault(str(exc), []).append(run.id)
    if problems:
        n = sum(len(ids) for ids in problems.values())
        lines = [f"{msg}\n      in {', '.join(ids[:3])}" + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
                 for msg, ids in problems.items()]
        raise ConfigError(f"{n} of {len(runs)} configurations are invalid:\n  - " + "\n  - ".join(lines))
    return planned


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def prepare_sweep_data(cfg: SweepConfig, runs: Optional[list] = None, log=print) -> dict:
    """Write (or reuse) each distinct dataset of ``runs`` once: ``{(dataset_size, caption_noise,
    filter_top): {"train", "zero_shot", "retrieval", "pairs", "clean"}}`` (directories of shards; the
    training set's pairs and the share of them with their own caption).  Filtered sets
    (``filter_top`` < 100) are the top of the unfiltered one by the scorer's CLIP score
    (:mod:`fastclip.scaling.filtered`; the scorer is trained first when the sweep makes its own)."""
    from ..train.demo import prepare_data
    from .filtered import clean_fraction, filtered_set, scorer_checkpoint
    runs = expand(cfg) if runs is None else runs
    d = cfg.data
    root = d.root or os.path.join(cfg.output_dir, "data")
    out = {}
    scorer = None
    for size in sorted({r.dataset_size for r in runs}):
        t0 = time.perf_counter()
        for noise in sorted({r.caption_noise for r in runs if r.dataset_size == size}):
            sets = prepare_data(root, d.image_size, {"train": size, "zero_shot": d.zero_shot, "retrieval": d.retrieval,
                                                     "seed": d.seed, "caption_detail": d.caption_detail,
                                                     "caption_noise": noise})
            corrupted = sets["train_meta"].get("num_corrupted")
            held_out = {"zero_shot": sets["zero_shot"], "retrieval": sets["retrieval"]}
            out[(size, noise, 100.0)] = dict(held_out, train=sets["train"], pairs=size,
                                             clean=None if corrupted is None else 1 - corrupted / size)
            for top in sorted({r.filter_top for r in runs if r.data_key[:2] == (size, noise) and r.filter_top < 100}):
                if scorer is None:
                    scorer = scorer_checkpoint(root, cfg, log)
                train = filtered_set(sets["train"], top, scorer, d.image_size, log)
                with open(os.path.join(train, "filter.json")) as f:
                    kept = json.load(f)["kept"]
                out[(size, noise, top)] = dict(held_out, train=train, pairs=kept, clean=clean_fraction(train))
        log(f"data: {size} samples x caption noise {sorted({k[1] for k in out if k[0] == size})}"
            + (f" x top {sorted({k[2] for k in out if k[0] == size})}%" if any(k[2] < 100 for k in out) else "")
            + f" ready in {time.perf_counter() - t0:.1f} s ({root})")
    return out


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def sweep_state(output_dir: str) -> Optional[dict]:
    """The sweep state of ``output_dir`` (None if it has none); refused if damaged."""
    path = os.path.join(output_dir, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            state = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); delete it to start the sweep over") from None
    if not isinstance(state, dict) or state.get("checksum") != checksum(state):
        raise ValueError(f"{path} is damaged or was edited (checksum mismatch); delete it to start the sweep over")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} has state version {state.get('version')!r}, this fastclip reads {STATE_VERSION}")
    return state


def run_sweep(cfg: SweepConfig, *, progress: bool = True, stop_after: Optional[int] = None,
              worker: Optional[tuple] = None) -> str:
    """Run the configurations of ``cfg`` not finished yet, one after another; returns the path of
    ``results.csv``.

    Args:
        cfg: the sweep (checked, with every configuration, before any work: :func:`check_runs`).
        progress: a tqdm bar over the configurations (the start/end lines are always printed).
        stop_after: return after this many configurations have run in this call (finished or
            failed); a later call continues with the rest.
        worker: ``(index, count)``: this process runs the configurations whose position in the
            grid is ``index`` modulo ``count``, so that ``count`` processes started at once (on
            one machine or several sharing the output folder) split the sweep; they share its
            state under a file lock.  Default: under torchrun, ``(RANK, WORLD_SIZE)`` (each rank
            trains its configurations alone, on ``cuda:LOCAL_RANK`` when there is a GPU and
            ``base.device`` is auto); otherwise every configuration.

    Raises ConfigError when the config or a configuration is invalid, or when ``output_dir`` holds
    another sweep's results.
    """
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be None or a positive integer, got {stop_after!r}")
    index, count, local_rank = _worker(worker)
    runs = expand(cfg)
    check_runs(cfg, runs)
    ghash = grid_hash(runs)
    out = cfg.output_dir
    state_path, results_path = os.path.join(out, STATE_FILE), os.path.join(out, RESULTS_FILE)
    mine = [r for i, r in enumerate(runs) if i % count == index]
    with _SweepLock(out):
        state = sweep_state(out)
        if state is not None and state["grid_hash"] != ghash:
            raise ConfigError(_other_sweep_message(cfg, state, ghash))
        if state is None and os.path.exists(results_path):
            raise ConfigError(f"output_dir {out!r} holds a {RESULTS_FILE} but no {STATE_FILE}: not this sweep's "
                              "folder; choose another output_dir")
        if state is None:
            state = {"version": STATE_VERSION, "sweep": cfg.name, "grid_hash": ghash, "total": len(runs),
                     "finished": [], "failed": {}, "records": {}}
            _save_state(state_path, state)
        cfg.save(os.path.join(out, "sweep.yaml"))
        _write_results(results_path, state)  # repairs a table that a crash left behind its state
        todo = [r for r in mine if r.id not in state["finished"]][:stop_after]
        report = _Progress(cfg.name if count == 1 else f"{cfg.name} [worker {index}/{count}]", runs, state, progress)
        try:
            data = prepare_sweep_data(cfg, todo, report.line) if todo else {}
        except BaseException:
            report.close()
            raise
    device = None
    if local_rank is not None and _flat(cfg.base).get("device", "auto") == "auto":
        import torch
        if torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
    try:
        from ..train import CheckpointManager
        from ..train import train as train_fn  # looked up per call: tests count the calls
        for n, run in enumerate(todo):
            report.start(run, todo[n:])
            t0 = time.perf_counter()
            run_dir = os.path.join(out, "runs", run.id)
            resume = None
            if run.id in state["failed"]:
                shutil.rmtree(run_dir, ignore_errors=True)  # a failed run starts over
            elif CheckpointManager(os.path.join(run_dir, "checkpoints")).latest():
                resume = "latest"                          # an interrupted one continues
            error = tb = None
            summary: dict = {}
            try:
                with _one_process():
                    summary = train_fn(train_config_for(cfg, run, data[run.data_key], device=device), resume=resume)
                if not isinstance(summary, dict):
                    raise TypeError(f"train() returned {type(summary).__name__}, not its summary")
            except Exception as exc:  # noqa: BLE001 - a failing configuration must not end the sweep
                error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
                summary = {}
            wall = time.perf_counter() - t0
            row = _row(run, summary, "failed" if error else "finished", data[run.data_key])
            with _SweepLock(out):
                state = sweep_state(out) or state  # the other workers' runs, as they wrote them
                state["records"].pop(run.id, None)  # a retried run moves to the end of the table
                state["records"][run.id] = {"status": row["status"], "row": row, "wall_seconds": round(wall, 3),
                                            **({"error": error, "traceback": tb} if error else {})}
                if error:
                    state["failed"][run.id] = error
                else:
                    state["failed"].pop(run.id, None)
                    if run.id not in state["finished"]:
                        state["finished"].append(run.id)
                _save_state(state_path, state)
                _write_results(results_path, state)
            report.state = state
            report.end(run, row, wall, error, todo[n + 1:])
        report.finish(results_path)
    finally:
        report.close()
    return results_path


def _worker(worker: Optional[tuple]) -> tuple:
    """``(index, count, local rank or None)`` of this process; refused when inconsistent."""
    if worker is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:  # torchrun
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        return 0, 1, None
    ok = (isinstance(worker, (tuple, list)) and len(worker) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in worker))
    if not ok or not (worker[1] >= 1 and 0 <= worker[0] < worker[1]):
        raise ValueError(f"worker must be (index, count) with 0 <= index < count, got {worker!r}")
    return worker[0], worker[1], None


class _SweepLock:
    """An exclusive lock on ``output_dir/.sweep.lock`` (fcntl; waits), held while the sweep state,
    the results table or the datasets are written, so that several workers can share a sweep."""

    def __init__(self, output_dir: str):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, ".sweep.lock")
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): one process per sweep
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class _one_process:
    """Hide torchrun's world from the trainer while a worker trains one configuration alone."""

    KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.KEYS}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _row(run: Run, summary: dict, status: str, data: Optional[dict] = None) -> dict:
    used = summary.get("budget_used") or {}
    data = data or {}
    row = {"run_id": run.id, "model": run.model.key, "image_size": run.image_size, "strategy": run.strategy.key,
           "dataset_size": run.dataset_size, "caption_noise": run.caption_noise, "filter_top": run.filter_top,
           "train_pairs": data.get("pairs", run.train_pairs), "train_clean": data.get("clean"), "seed": run.seed,
           "budget_gflops": run.budget_gflops, "gflops": used.get("gflops"), "samples_seen": used.get("samples"),
           "steps": summary.get("steps"), "seconds": used.get("seconds"), "status": status}
    for k, v in (summary.get("final_eval") or {}).items():
        # every number the evaluation produced but its timings (as ``fastclip train`` prints them)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("seconds"):
            row[k] = v
    return row


def _write_results(path: str, state: dict) -> None:
    from .results import write_results
    rows = [rec["row"] for rec in state["records"].values()]
    if rows:
        write_results(path, rows, ROW_COLUMNS)


def _save_state(path: str, state: dict) -> None:
    body = json.loads(json.dumps({k: v for k, v in state.items() if k != "checksum"}))  # as it reads back
    state["checksum"] = checksum(body)
    atomic_write_bytes(path, json.dumps(state, indent=1).encode())


def _other_sweep_message(cfg: SweepConfig, state: dict, ghash: str) -> str:
    differs = ""
    try:
        old = SweepConfig.from_file(os.path.join(cfg.output_dir, "sweep.yaml"))
        parts = [s for s in ("grid", "base", "data") if getattr(old, s) != getattr(cfg, s)]
        differs = f" (what differs: {', '.join(parts)})" if parts else ""
    except (ConfigError, OSError, ValueError):
        pass
    return (f"output_dir {cfg.output_dir!r} holds another sweep: {state.get('sweep')!r}, grid hash "
            f"{state['grid_hash']}, {len(state.get('finished', []))} of {state.get('total')} configurations finished; "
            f"this config's grid hash is {ghash}{differs}. Use another output_dir, or delete "
            f"{os.path.join(cfg.output_dir, STATE_FILE)} to start over there")


class _Progress:
    """One line per configuration start and end (done/total, elapsed, ETA), and a tqdm bar."""

    def __init__(self, name: str, runs: list, state: dict, enabled: bool):
        from ..lazy import optional_module
        self.name, self.state, self.t0 = name, state, time.perf_counter()
        self.budgets = {r.id: r.budget_gflops for r in runs}
        self.total = len(runs)
        self.bar = None
        tqdm_auto, _ = optional_module("tqdm.auto") if enabled else (None, None)
        if tqdm_auto is not None:
            self.bar = tqdm_auto.tqdm(total=self.total, initial=self._done(), desc=f"sweep {name}", unit="run",
                                      file=sys.stderr, dynamic_ncols=True)

    def _done(self) -> int:
        return len(self.state["finished"]) + len(self.state["failed"])

    def _eta(self, left: list) -> str:
        # The finished runs' time per GFLOP of budget (a failure is no measure), times the budgets left.
        recs = [(self.budgets.get(i, 0.0), r["wall_seconds"]) for i, r in self.state["records"].items()
                if r["status"] == "finished"]
        spent = sum(b for b, _ in recs)
        if not left:
            return _clock(0)
        if spent <= 0:
            return "?"
        return _clock(sum(r.budget_gflops for r in left) * sum(s for _, s in recs) / spent)

    def line(self, text: str) -> None:
        text = f"sweep {self.name}: {text}"
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def start(self, run: Run, left: list) -> None:
        """``left``: the configurations still to run in this call, ``run`` first."""
        self.line(f"{self._done() + (run.id not in self.state['failed'])}/{self.total} {run.id} started (elapsed {_clock(time.perf_counter() - self.t0)}, "
                  f"ETA {self._eta(left)})")

    def end(self, run: Run, row: dict, wall: float, error: Optional[str], left: list) -> None:
        if error:
            what = f"failed in {wall:.1f} s: {error.splitlines()[0]}"
        else:
            shown = ", ".join(f"{k}={row[k]:.3f}" for k in ("zero_shot/top1", "retrieval/image_to_text_R@1") if k in row)
            what = f"finished in {wall:.1f} s ({row['steps']} steps{', ' + shown if shown else ''})"
        self.line(f"{self._done()}/{self.total} {run.id} {what} (elapsed {_clock(time.perf_counter() - self.t0)}, "
                  f"ETA {self._eta(left)})")
        if self.bar is not None:
            self.bar.n = self._done()
            self.bar.refresh()

    def finish(self, results_path: str) -> None:
        failed = self.state["failed"]
        self.line(f"{len(self.state['finished'])}/{self.total} finished, {len(failed)} failed"
                  + (f" ({', '.join(failed)})" if failed else "") + f"; results: {results_path}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nested(d: dict, where: str) -> dict:
    """``{"optim.lr": 1, "data": {"batch_size": 2}}`` -> ``{"optim": {"lr": 1}, "data": {"batch_size": 2}}``."""
    out: dict = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise ConfigError(f"{where}: keys must be strings, got {k!r}")
        _put(out, k.split("."), _nested(v, f"{where}.{k}") if isinstance(v, dict) else v, f"{where}.{k}")
    return out


def _checked_base(base: dict) -> dict:
    """``base`` with its values as the training config reads them (``lr: 1e-3``, a string in YAML
    1.1, becomes 0.001); refused: unknown keys (with the closest name) and keys the grid sets."""
    flat = _flat(base)
    for key in flat:
        owner = next((k for k in _GRID_OWNED if key == k or key.startswith(k + ".")), None)
        if owner:
            raise ConfigError(f"base.{key} is set for every run by {_GRID_OWNED[owner]}; remove it from base")
    try:
        tc = TrainConfig.from_dict({}, flat)
    except ConfigError as exc:
        raise ConfigError(f"base: {exc}") from None
    out: dict = {}
    for key in flat:
        value = tc
        for part in key.split("."):
            value = getattr(value, part)
        _put(out, key.split("."), value, f"base.{key}")
    return out


def _put(d: dict, parts: list, value, where: str) -> None:
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: {p!r} is a value, not a section")
    if isinstance(value, dict) and isinstance(d.get(parts[-1]), dict):
        for k, v in value.items():
            _put(d[parts[-1]], [k], v, where)
    else:
        d[parts[-1]] = value


def _no_duplicates(key: str, values: list, hint: str = "") -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(f"{key} has {v!r} twice" + (f"; {hint}" if hint else ""))
        seen.add(v)


def _str(key: str, v) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{key} must be a string, got {v!r}")
    return v


def _int(key: str, v) -> int:
    return coerce_value(key, v, "int")


def _float(key: str, v) -> float:
    return coerce_value(key, v, "float")


def _list_of(item):
    def parse(key, value):
        if value is None:
            return []
        values = value if isinstance(value, (list, tuple)) else [value]
        return [item(f"{key}[{i}]", v) for i, v in enumerate(values)]
    return parse


_MODEL_KEYS = [f.name for f in fields(ModelSpec)]
_STRATEGY_SETTINGS = [f.name for f in fields(StrategyConfig) if f.name != "name"]


def _model_spec(where: str, v) -> ModelSpec:
    if isinstance(v, ModelSpec):
        return v
    if isinstance(v, str):
        return ModelSpec(name=v)
    if not isinstance(v, dict):
        raise ConfigError(f"{where} must be a model name or a mapping with name, label, image_size, overrides; got {v!r}")
    for k in v:
        if k not in _MODEL_KEYS:
            unknown_key(f"{where}.{k}", [f"{where}.{n}" for n in _MODEL_KEYS], "key", hint="")
    if "name" not in v:
        raise ConfigError(f"{where} needs a name (a fastclip model name, e.g. ViT-Ti-16)")
    overrides = v.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}.overrides must be a mapping of create_model overrides, got {overrides!r}")
    return ModelSpec(name=_str(f"{where}.name", v["name"]),
                     label=None if v.get("label") is None else _str(f"{where}.label", v["label"]),
                     image_size=None if v.get("image_size") is None else _int(f"{where}.image_size", v["image_size"]),
                     overrides=dict(overrides))


def _strategy_spec(where: str, v) -> StrategySpec:
    if isinstance(v, StrategySpec):
        return v
    if isinstance(v, str):
        return StrategySpec(name=v)
    if not isinstance(v, dict):
        raise ConfigError(f"{where} must be a strategy name or a mapping (name, label, settings such as mask_ratio); "
                          f"got {v!r}")
    if "name" not in v:
        raise ConfigError(f"{where} needs a name (clip, flip, slip, clip_aug, or several joined by '+')")
    settings = {}
    given = v.get("settings") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{where}.settings must be a mapping of strategy settings, got {given!r}")
    flat = {k: x for k, x in v.items() if k not in ("name", "label", "settings")}  # the short form
    valid = [f"{where}.{n}" for n in ("name", "label", "settings")] + [f"{where}.{n}" for n in _STRATEGY_SETTINGS]
    for k, x in list(given.items()) + list(flat.items()):
        if k not in _STRATEGY_SETTINGS:
            unknown_key(f"{where}.{k}", valid, "strategy setting", hint="")
        try:  # the training config's own coercion and messages
            settings[k] = getattr(TrainConfig.from_dict({"strategy": {k: x}}).strategy, k)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return StrategySpec(name=_str(f"{where}.name", v["name"]),
                        label=None if v.get("label") is None else _str(f"{where}.label", v["label"]),
                        settings=settings)


_FIELD_PARSERS = {
    "grid.models": _list_of(_model_spec),
    "grid.strategies": _list_of(_strategy_spec),
    "grid.dataset_sizes": _list_of(_int),
    "grid.caption_noise": _list_of(_float),
    "grid.budgets_gflops": _list_of(_float),
    "grid.seeds": _list_of(_int),
    "data.image_size": _int,
    "data.zero_shot": _int,
    "data.retrieval": _int,
    "data.seed": _int,
    "data.caption_detail": _float,
    "data.root": lambda key, v: None if v is None else _str(key, v),
    "data.filter_checkpoint": lambda key, v: None if v is None else _str(key, v),
    "data.scorer_dataset_size": _int,
    "data.scorer_budget_gflops": _float,
    "grid.filter_top": _list_of(_float),
}
_FILTER_KEYS = ("filter_checkpoint", "scorer_dataset_size", "scorer_budget_gflops")
_SWEEP_KEYS = ["name", "output_dir", "base"] + list(_FIELD_PARSERS)
