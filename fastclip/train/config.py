"""The training config: one schema of dataclasses, a YAML/JSON file, ``key=value`` overrides.

    cfg = TrainConfig.from_file("run.yaml", overrides=["optim.lr=1e-3", "budget.gflops=2e6"])
    cfg = TrainConfig.from_dict({"model": {"name": "ViT-Ti-16"}, "data": {"train": "data/{0..9}.tar"}})
    print(cfg.to_yaml())               # every field with its value (``fastclip train --print-config``)

Every section refuses unknown keys with the closest valid name; values are checked in
:meth:`TrainConfig.validate`, which the trainer calls before it builds anything, so a bad config
fails before any work starts.  Batch sizes are global: ``data.batch_size`` samples per optimiser
step over all ranks and accumulation steps (each rank gets ``batch_size / world_size``, each
micro-batch ``batch_size / world_size / accum_steps``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

__all__ = ["ModelConfig", "DataConfig", "StrategyConfig", "BudgetConfig", "OptimConfig", "EvalConfig",
           "CheckpointConfig", "LogConfig", "TrainConfig", "ConfigError"]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


@dataclass
class ModelConfig:
    """The model: a built-in name (``fastclip.list_models()``) with ``create_model`` overrides."""

    name: str = "ViT-Ti-16"
    image_size: int = 64
    overrides: dict = field(default_factory=dict)   # e.g. {vision_layers: 6, text_width: 256}
    pretrained: Optional[str] = None                  # open_clip / fastclip state dict to start from
    grad_checkpointing: bool = False
    compile: bool = False                             # torch.compile the towers


@dataclass
class DataConfig:
    """Training data: webdataset shards read by ``fastclip.data.ClipLoader``."""

    train: str = ""                   # shard pattern, directory or list ("a::b")
    batch_size: int = 256             # global: over all ranks and accumulation steps
    accum_steps: int = 1              # exact gradient accumulation (features cached, all negatives kept)
    num_threads: int = 2              # decoding threads per rank
    backend: str = "auto"             # loader backend: auto, dali, pil
    shuffle: Optional[int] = None     # shuffle buffer (default 2000)
    tokenizer: Optional[str] = None   # tokenizer name (default: the model's)


@dataclass
class StrategyConfig:
    """What is trained: ``name`` is one strategy or several joined by ``+`` (e.g. ``flip+clip_aug``)."""

    name: str = "clip"
    loss: str = "clip"                   # contrastive loss: clip (InfoNCE) or siglip
    mask_ratio: float = 0.5              # flip: share of patches dropped
    unmasked_fraction: float = 0.0       # flip: last share of the budget trained unmasked
    ssl_scale: float = 1.0               # slip: weight of the SimCLR term
    ssl_temperature: float = 0.1         # slip: SimCLR temperature
    ssl_hidden_dim: Optional[int] = None  # slip head: default 4096 * width / 768
    ssl_out_dim: Optional[int] = None     # slip head: default 256 * width / 768
    label_smoothing: float = 0.0


@dataclass
class BudgetConfig:
    """When to stop; the learning-rate schedule spans the first limit reached.  At least one."""

    gflops: Optional[float] = None   # training compute, 3 x forward GFLOPs per sample (fastclip.flops)
    samples: Optional[int] = None
    steps: Optional[int] = None
    seconds: Optional[float] = None  # wall-clock training time (evaluation and checkpoints excluded)


@dataclass
class OptimConfig:
    """AdamW (no weight decay on gains, biases and the logit scale) and the schedule."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    schedule: str = "cosine"          # cosine | const-cooldown | const
    warmup: float = 0.05              # < 1: fraction of the planned steps; >= 1: steps
    cooldown: float = 0.2             # const-cooldown: last fraction of the budget, linear to min_lr
    min_lr: float = 0.0
    grad_clip: Optional[float] = None  # max global gradient norm
    precision: str = "auto"           # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    max_logit_scale: float = 100.0    # the logit scale is clamped at this (exponentiated) value


@dataclass
class EvalConfig:
    """In-loop evaluation every ``every_steps`` steps (0: only at the end) on held-out shards."""

    every_steps: int = 0
    zero_shot: Optional[str] = None      # labelled shards (.cls or json label)
    classnames: Optional[str] = None     # JSON {"classnames": [...], "templates": [...]}; default built-in
    retrieval: Optional[str] = None      # captioned shards
    batch_size: int = 256
    max_samples: Optional[int] = None    # per evaluation set (None: all)
    image_size: Optional[int] = None     # default: the model's


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    every_minutes: float = 10.0
    keep: int = 3


@dataclass
class LogConfig:
    every_steps: int = 10
    progress: bool = True     # tqdm bar
    tensorboard: bool = False
    plot: bool = True         # PNG of the loss and evaluation curves at the end
    mfu: bool = True          # measure the matmul rate at the start (< 1 s) and log mfu against it


def read_config_file(path: Union[str, os.PathLike], what: str = "config file") -> dict:
    """The mapping in a YAML (or ``.json``) file; ConfigError naming ``what`` and the path when the
    file is missing or holds something else.  An empty file is an empty mapping."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        d = json.loads(text)
    else:
        import yaml
        d = yaml.safe_load(text)
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {path!r} must hold a mapping of sections, got {type(d).__name__}")
    return d


def apply_overrides(cfg, overrides, example: str) -> None:
    """``cfg.set`` each override: ``"a.b=value"`` strings (values parsed as YAML) or a flat
    ``{"a.b": value}`` dict; ``example`` shows the form in the error for a string without ``=``."""
    if isinstance(overrides, dict):
        overrides = list(overrides.items())
    for item in overrides:
        if isinstance(item, str):
            if "=" not in item:
                raise ConfigError(f"override {item!r} must be key=value (e.g. {example})")
            key, raw = item.split("=", 1)
            value = _parse_value(raw)
        else:
            key, value = item
        cfg.set(key.strip(), value)


@dataclass
class TrainConfig:
    """A training run.  ``output_dir`` receives ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
    ``curves.png`` and ``summary.json``."""

    output_dir: str = "runs/fastclip"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N (torchrun: the local rank's GPU)
    on_nan: str = "stop"          # stop | skip (a non-finite loss)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Optional[dict] = None, overrides=()) -> "TrainConfig":
        """From a nested dict (a YAML/JSON file's content), then ``overrides``: ``"a.b=value"``
        strings (values parsed as YAML) or a flat ``{"a.b": value}`` dict."""
        cfg = _build(cls, d or {}, "")
        apply_overrides(cfg, overrides, "optim.lr=1e-3")
        return cfg

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], overrides=()) -> "TrainConfig":
        return cls.from_dict(read_config_file(path, "config file"), overrides)

    def set(self, key: str, value: Any) -> None:
        """Set a dotted key (``optim.lr``); unknown keys are refused with the closest valid name."""
        parts = key.split(".")
        target: Any = self
        for i, part in enumerate(parts):
            names = [f.name for f in fields(target)]
            if part not in names:
                unknown_key(key, _all_keys(type(self)))
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(getattr(target, part)):
                    if not isinstance(value, dict):
                        raise ConfigError(f"{key} is a section; set its keys (e.g. {key}.{fields(getattr(target, part))[0].name}=...)")
                    for k, v in value.items():
                        self.set(f"{key}.{k}", v)
                    return
                setattr(target, part, coerce_value(key, value, _field_type(target, part)))
            else:
                target = getattr(target, part)
                if not dataclasses.is_dataclass(target):
                    if isinstance(target, dict):  # free-form mapping (model.overrides)
                        target[".".join(parts[i + 1:])] = value
                        return
                    unknown_key(key, _all_keys(type(self)))

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_yaml())

    # -- checks ------------------------------------------------------------------------------
    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Check every value (and the batch split over ``world_size`` ranks); raise ConfigError
        naming the key.  Checks that need the filesystem or the model live in the trainer."""
        d, o, b, s = self.data, self.optim, self.budget, self.strategy
        if not d.train:
            raise ConfigError("data.train must name the training shards (a pattern, a directory or a list)")
        _positive_int("data.batch_size", d.batch_size)
        _positive_int("data.accum_steps", d.accum_steps)
        _positive_int("data.num_threads", d.num_threads)
        if d.batch_size % (world_size * d.accum_steps):
            raise ConfigError(
                f"data.batch_size={d.batch_size} (global) must divide evenly over world_size={world_size} ranks "
                f"x data.accum_steps={d.accum_steps} micro-batches, got a remainder of "
                f"{d.batch_size % (world_size * d.accum_steps)}")
        if d.backend not in ("auto", "dali", "pil"):
            raise ConfigError(f"data.backend must be auto, dali or pil, got {d.backend!r}")
        _positive_int("model.image_size", self.model.image_size)
        if not isinstance(self.model.overrides, dict):
            raise ConfigError(f"model.overrides must be a mapping, got {type(self.model.overrides).__name__}")
        limits = {k: getattr(b, k) for k in ("gflops", "samples", "steps", "seconds")}
        if all(v is None for v in limits.values()):
            raise ConfigError("budget: set at least one of budget.gflops, budget.samples, budget.steps, "
                              "budget.seconds")
        for k, v in limits.items():
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and math.isfinite(v) and v > 0):
                raise ConfigError(f"budget.{k} must be a positive number, got {v!r}")
        for name in ("lr", "eps"):
            _positive_float(f"optim.{name}", getattr(o, name))
        for name in ("weight_decay", "min_lr"):
            _nonneg_float(f"optim.{name}", getattr(o, name))
        for name in ("beta1", "beta2"):
            v = getattr(o, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ConfigError(f"optim.{name} must be in [0, 1), got {v!r}")
        if o.schedule not in ("cosine", "const-cooldown", "const"):
            raise ConfigError(f"optim.schedule must be cosine, const-cooldown or const, got {o.schedule!r}")
        _nonneg_float("optim.warmup", o.warmup)
        if not 0 <= o.cooldown <= 1:
            raise ConfigError(f"optim.cooldown must be a fraction in [0, 1], got {o.cooldown!r}")
        if o.grad_clip is not None:
            _positive_float("optim.grad_clip", o.grad_clip)
        if o.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"optim.precision must be auto, fp32, bf16 or fp16, got {o.precision!r}")
        _positive_float("optim.max_logit_scale", o.max_logit_scale)
        if s.loss not in ("clip", "siglip"):
            raise ConfigError(f"strategy.loss must be clip or siglip, got {s.loss!r}")
        if not 0 <= s.unmasked_fraction < 1:
            raise ConfigError(f"strategy.unmasked_fraction must be in [0, 1), got {s.unmasked_fraction!r}")
        if not 0 <= s.mask_ratio < 1:
            raise ConfigError(f"strategy.mask_ratio must be in [0, 1), got {s.mask_ratio!r}")
        _nonneg_float("strategy.ssl_scale", s.ssl_scale)
        _positive_float("strategy.ssl_temperature", s.ssl_temperature)
        if self.on_nan not in ("stop", "skip"):
            raise ConfigError(f"on_nan must be stop or skip, got {self.on_nan!r}")
        if self.eval.every_steps < 0:
            raise ConfigError(f"eval.every_steps must be >= 0, got {self.eval.every_steps}")
        _positive_int("eval.batch_size", self.eval.batch_size)
        _positive_int("checkpoint.keep", self.checkpoint.keep)
        if self.checkpoint.every_steps < 0 or self.checkpoint.every_minutes < 0:
            raise ConfigError("checkpoint.every_steps and checkpoint.every_minutes must be >= 0 (0: off)")
        _positive_int("log.every_steps", self.log.every_steps)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _all_keys(cls, prefix: str = "") -> list:
    out = []
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.extend(_all_keys(type(default), f"{prefix}{f.name}."))
        else:
            out.append(f"{prefix}{f.name}")
    return out


def unknown_key(key: str, valid, what: str = "config key",
                hint: str = "fastclip train --print-config lists every key"):
    """Raise ConfigError for an unknown ``key``, naming the closest of ``valid`` (whole dotted name
    first, then its last part alone: "lr" -> "optim.lr")."""
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        tails = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=1)
        close = [v for v in valid if v.split(".")[-1] in tails]
    did = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown {what} {key!r}{did}" + (f" ({hint})" if hint else ""))


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(d).__name__}")
    obj = cls()
    names = {f.name: f for f in fields(cls)}
    for key, value in d.items():
        if key not in names:
            unknown_key(f"{prefix}{key}", _all_keys(TrainConfig) if cls is TrainConfig or prefix else _all_keys(cls))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            setattr(obj, key, _build(type(current), value if value is not None else {}, f"{prefix}{key}."))
        else:
            setattr(obj, key, coerce_value(f"{prefix}{key}", value, _field_type(obj, key)))
    return obj


def _field_type(obj, name: str) -> str:
    for f in fields(obj):
        if f.name == name:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return "Any"


def coerce_value(key: str, value, type_name: str):
    """YAML gives ints where floats are meant (``lr: 1`` or ``gflops: 2e6`` as a string in old
    YAML); convert the obvious cases and refuse the rest with the key."""
    base = type_name.replace("Optional[", "").rstrip("]")
    if value is None:
        if type_name.startswith("Optional"):
            return None
        raise ConfigError(f"{key} cannot be null")
    if base == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if base == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            try:
                value = int(float(value)) if float(value).is_integer() else value
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if base == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if base == "dict":
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _parse_value(raw: str):
    import yaml
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _positive_int(key, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key} must be a positive integer, got {v!r}")


def _positive_float(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{key} must be a positive number, got {v!r}")


def _nonneg_float(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{key} must be a non-negative number, got {v!r}")
