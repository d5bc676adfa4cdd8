"""The training loop: a CLIP model, a strategy, a compute budget, checkpoints, evaluation.

    from fastclip.train import TrainConfig, train
    summary = train(TrainConfig.from_file("run.yaml"))            # or fastclip train --config run.yaml
    summary = train(cfg, resume="latest")                         # continue after a crash

What happens, in order: the config is checked (every key and value, the shards, the evaluation
sets, the model and strategy names, the budget against one step, a resumed checkpoint against the
config) before any training work; then the model, the loader (``fastclip.data.ClipLoader``, its
augmentation chosen by the strategy), AdamW and the schedule are built, and the loop runs
steps until the budget is used:

    phase (mask ratio) -> learning rate -> forward/backward (StepRunner: exact accumulation)
    -> finite check -> gradient clipping -> AdamW step -> logit scale clamp -> budget
    -> log, evaluate, checkpoint

Throughput: every train record has ``samples_per_s`` and ``gflops_per_s`` (the budget's training
GFLOPs over wall time since the last record) and, with ``log.mfu`` (the default), ``mfu``: that
rate over the dense matmul rate measured once before the first step by
``fastclip.machine.measure_matmul_rate`` (effort "brief", inner dim 512, the training precision's
dtype, on the main rank; times the number of ranks), computed by ``fastclip.flops.mfu``.  The
measurement touches no RNG and no training state, and is not counted in the time budget.

A resumed run continues bitwise where the checkpoint left it on CPU in fp32 (the loader's position
inside its epoch, every RNG, the optimiser and the budget are restored); ``metrics.jsonl`` then
reads as one uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from ..distributed.process import DistInfo, barrier, gather_objects, init_distributed, rank0_decisions, shutdown
from ..flops import mfu
from .budget import Budget, lr_at
from .checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from .config import ConfigError, TrainConfig
from .evaluation import check_shards, make_eval_callback
from .metrics import MetricsWriter, ProgressBar, plot_curves
from .step import StepRunner, TrainModule, batch_dict, build_optimizer, optimizer_step, restore_optimizer
from .strategies import LossContext, build_strategy

__all__ = ["Trainer", "train", "TrainingDiverged", "build_loader", "plan_run"]

MFU_MATMUL_INNER = 512  # inner dim of the GEMMs whose rate MFU is measured against (as in the benchmarks)

# Config sections that may change between a checkpoint and its resumption (they change neither
# the model nor the training trajectory's definition); everything else must match.
_RESUMABLE_CHANGES = ("budget", "eval", "checkpoint", "log", "output_dir", "device", "data.num_threads",
                      "data.backend", "on_nan")


def build_loader(shards, batch_size: int, image_size: int, strategy, tokenizer, device, *, backend: str = "auto",
                 num_threads: int = 2, shuffle=None, seed: int = 0, rank: int = 0, world_size: int = 1):
    """The training loader the trainer uses: ``ClipLoader`` with the strategy's augmentation, full
    batches only (``drop_last``), and with several ranks the sample split (every rank's stream
    is a stride of the one-process stream, so 2 ranks x b see the samples of 1 x 2b)."""
    from ..data.augment import AugmentConfig
    from ..data.loader import ClipLoader
    aug = strategy.augment(AugmentConfig.from_name("clip", image_size=image_size))
    return ClipLoader(shards, batch_size, image_size=image_size, augment=aug, tokenizer=tokenizer, backend=backend,
                      device=device, num_threads=num_threads, shuffle=shuffle, seed=seed, rank=rank,
                      world_size=world_size, worker=0, num_workers=1, split="sample" if world_size > 1 else "auto",
                      drop_last=True, warn=False)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict) -> list:
    """Keys whose values differ and that a resumed run may not change."""
    a, b = _flat(saved), _flat(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in _RESUMABLE_CHANGES):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
    return diffs


def _rng_snapshot(device: torch.device) -> dict:
    # Plain values and tensors only, so that torch.load(weights_only=True) reads the checkpoint.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _rng_restore(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def plan_run(cfg: TrainConfig):
    """``(strategy, model config, Budget)`` of a checked ``cfg``, as the trainer builds them: the
    strategy's model overrides on top of ``model.overrides``, masking refused on a ResNet tower, the
    budget planned over the strategy's phases.  Raises ConfigError; builds no model and reads no data,
    so a sweep can check every configuration before any work."""
    from ..models import CLIPConfig
    strategy = build_strategy(cfg.strategy)
    try:
        overrides = dict(cfg.model.overrides)
        if "image_size" in overrides:
            raise ConfigError("set the resolution with model.image_size, not model.overrides.image_size")
        overrides.update(strategy.model_overrides())
        model_config = CLIPConfig.from_name(cfg.model.name, image_size=cfg.model.image_size, **overrides)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from None
    phases = strategy.phases()
    if model_config.vision_cfg.is_resnet and any(r > 0 for _, r in phases):
        raise ConfigError(f"strategy {cfg.strategy.name!r} masks patches, which needs a ViT image tower; "
                          f"model {cfg.model.name!r} has a ResNet tower")
    budget = Budget(cfg.budget, phases, lambda r: strategy.flops(model_config, r), cfg.data.batch_size)
    return strategy, model_config, budget


class Trainer:
    """Builds everything from a :class:`TrainConfig` (checking it first) and runs the loop.

    Args:
        config: the config (or a dict, or a path to a YAML/JSON file).
        resume: None, ``"latest"`` (the newest checkpoint in ``output_dir/checkpoints``) or a path.
    """

    def __init__(self, config: Union[TrainConfig, dict, str], resume: Optional[str] = None):
        if isinstance(config, str):
            config = TrainConfig.from_file(config)
        elif isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        self.cfg = cfg = config
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world_size=world)
        check_shards(cfg.data.train, "data.train")
        self.strategy, self.model_config, self.budget = plan_run(cfg)
        self.ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
        self.resume_payload = None
        self.resume_path = None
        if resume:
            self.resume_path = self._find_resume(resume)
            self.resume_payload = load_checkpoint(self.resume_path)
            diffs = config_differences(self.resume_payload["config"], cfg.to_dict())
            if diffs:
                raise CheckpointError(f"checkpoint {self.resume_path} was written by an incompatible config; "
                                      "what differs:\n  " + "\n  ".join(diffs))
            if self.resume_payload["model_config"] != self.model_config.to_dict():
                raise CheckpointError(f"checkpoint {self.resume_path} holds another model: "
                                      f"{self.resume_payload['model_config']} vs {self.model_config.to_dict()}")
            if self.resume_payload["world_size"] != world:
                raise CheckpointError(f"checkpoint {self.resume_path} was written with world_size="
                                      f"{self.resume_payload['world_size']}, this run has world_size={world}")
        # Distributed, device.
        self.dist: DistInfo = init_distributed(torch.device("cuda" if cfg.device.startswith("cuda") or (
            cfg.device == "auto" and torch.cuda.is_available()) else "cpu"))
        self.device = _resolve_device(cfg.device, self.dist.local_rank)
        if self.dist.backend == "nccl":
            self.dist.device = self.device
        self.precision = cfg.optim.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("optim.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        from ..tokenizer import get_tokenizer
        self.tokenizer = get_tokenizer(cfg.data.tokenizer or cfg.model.name)
        self.evaluate = None
        if self.dist.is_main:
            self.evaluate = make_eval_callback(cfg.eval, cfg.model.image_size, self.tokenizer, self.device,
                                               self.autocast_dtype, cfg.data.num_threads, cfg.data.backend)

    def _find_resume(self, resume: str) -> str:
        if resume == "latest":
            latest = CheckpointManager(self.ckpt_dir).latest()
            if latest is None:
                raise CheckpointError(f"--resume latest: no checkpoint in {self.ckpt_dir}")
            return latest
        if not os.path.isfile(resume):
            raise CheckpointError(f"--resume {resume!r}: no such checkpoint file")
        return resume

    # ------------------------------------------------------------------------------------------
    def _build(self):
        cfg, dev = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        from ..models import create_model
        self.model = create_model(dataclasses.replace(self.model_config), device=dev,
                                  pretrained=cfg.model.pretrained)
        self.model.train()
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.modules = nn.ModuleDict(self.strategy.build_modules(self.model)).to(dev)
        self.ctx = LossContext(self.model, self.modules, self.dist.rank, self.dist.world_size, self.dist.group)
        module = TrainModule(self.model, self.strategy, self.ctx)
        if cfg.model.compile:
            module.compile()
        if self.dist.world_size > 1:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
        self.module = module
        params = list(self.model.named_parameters()) + [(f"modules.{n}", p) for n, p in self.modules.named_parameters()]
        self.optimizer = build_optimizer(params, cfg.optim, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.precision == "fp16")
        self.params = [p for _, p in params]
        # Masks draw from the global RNG: a different stream per rank.
        torch.manual_seed(cfg.seed * 1000003 + 7919 * (self.dist.rank + 1))
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed((cfg.seed * 7 + self.dist.rank) % 2**32)
        d = cfg.data
        self.loader = build_loader(d.train, d.batch_size // self.dist.world_size, cfg.model.image_size,
                                   self.strategy, self.tokenizer, dev, backend=d.backend, num_threads=d.num_threads,
                                   shuffle=d.shuffle, seed=cfg.seed, rank=self.dist.rank,
                                   world_size=self.dist.world_size)
        self.extra_views = self.loader.cfg.extra_views

        def autocast():
            if self.autocast_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(dev.type, dtype=self.autocast_dtype)
        self.runner = StepRunner(self.module, self.strategy, self.ctx, d.accum_steps, autocast,
                                 self.scaler.scale, dev)
        self.step = 0
        self.warmup_end_clock = None
        self.skipped_steps = 0

    def _restore(self, payload: dict) -> None:
        self.model.load_state_dict(payload["state_dict"])
        self.modules.load_state_dict(payload["modules"])
        restore_optimizer(self.optimizer, payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])
        self.budget.load_state_dict(payload["budget"])
        self.step = payload["step"]
        self.warmup_end_clock = payload["schedule"].get("warmup_end_clock")
        self.skipped_steps = payload["schedule"].get("skipped_steps", 0)
        self.loader.load_state_dict(payload["data"][self.dist.rank])
        _rng_restore(payload["rng"][self.dist.rank], self.device)

    def _payload(self) -> dict:
        from .. import __version__
        rng = gather_objects(_rng_snapshot(self.device), self.dist)
        data = gather_objects(self.loader.state_dict(), self.dist)
        return {
            "step": self.step, "fastclip_version": __version__, "world_size": self.dist.world_size,
            "state_dict": self.model.state_dict(), "modules": self.modules.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "schedule": {"warmup_end_clock": self.warmup_end_clock, "skipped_steps": self.skipped_steps},
            "budget": self.budget.state_dict(), "rng": rng, "data": data,
            "config": self.cfg.to_dict(), "model_config": self.model_config.to_dict(),
            "strategy": self.strategy.describe(),
        }

    def _checkpoint(self, manager: CheckpointManager) -> Optional[str]:
        payload = self._payload()  # collective: every rank takes part
        path = None
        if self.dist.is_main:
            path = manager.save(self.step, payload)
        barrier(self.dist)
        self.last_checkpoint = path or manager.path(self.step)
        return path

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        main = self.dist.is_main
        try:
            self._build()
            if self.resume_payload is not None:
                self._restore(self.resume_payload)
            os.makedirs(cfg.output_dir, exist_ok=True)
            self.matmul_rate = self._measure_matmul_rate() if cfg.log.mfu and main else None
            manager = CheckpointManager(self.ckpt_dir, cfg.checkpoint.keep)
            self.last_checkpoint = self.resume_path
            writer = MetricsWriter(cfg.output_dir, cfg.log.tensorboard,
                                   resume_step=self.step if self.resume_payload is not None else None) if main else None
            if main:
                cfg.save(os.path.join(cfg.output_dir, "config.yaml"))
            bar = ProgressBar(cfg.log.progress and main, self.budget.progress())
            try:
                result = self._loop(manager, writer, bar)
            except KeyboardInterrupt:
                if self.dist.world_size == 1:
                    path = self._checkpoint(manager)
                    bar.write(f"interrupted at step {self.step}: saved {path}; continue with --resume latest")
                raise
            finally:
                bar.close()
                if writer is not None:
                    writer.close()
            return result
        finally:
            shutdown(self.dist)

    def _measure_matmul_rate(self) -> dict:
        """The dense matmul rate MFU is logged against (fastclip.machine's record, plus ``ranks``)."""
        from ..machine import measure_matmul_rate
        record = measure_matmul_rate(self.device, self.autocast_dtype or torch.float32, MFU_MATMUL_INNER,
                                     effort="brief")
        return {**record, "ranks": self.dist.world_size}

    def _loop(self, manager, writer, bar) -> dict:
        cfg, budget, dev = self.cfg, self.budget, self.device
        main = self.dist.is_main
        every_ckpt_s = cfg.checkpoint.every_minutes * 60
        last_ckpt_t = time.monotonic()
        last_log = (time.perf_counter(), budget.used.samples, budget.used.gflops)
        # Every rank runs at the main rank's measured rate: the budget's GFLOPs are over all ranks.
        peak_flops = self.matmul_rate["gflops"] * 1e9 * self.dist.world_size if self.matmul_rate else None
        epoch_iter = None
        batches_in_epoch = empty_epochs = 0
        done = False
        evals: list = []
        while not done:
            if epoch_iter is None:
                epoch_iter = iter(self.loader)
            ratio = budget.mask_ratio_at(budget.progress(clock=False))
            time_up = budget.limits.seconds is not None and budget.used.seconds >= budget.limits.seconds
            if not budget.fits(ratio, clock=False) or rank0_decisions([time_up], self.dist)[0]:
                break
            batch = next(epoch_iter, None)
            if not self._all_have(batch is not None):
                epoch_iter = None
                # One empty epoch is the rest of an epoch that a checkpoint taken after its last batch
                # resumes; two in a row mean the data cannot fill a batch.
                empty_epochs = empty_epochs + 1 if batches_in_epoch == 0 else 0
                if empty_epochs >= 2:
                    raise ConfigError(
                        f"data.train={cfg.data.train!r} gave no full batch of {self.loader.batch_size} samples per "
                        f"rank in an epoch (loader counters: {self.loader.stats.as_dict()}); use more data or a "
                        "smaller data.batch_size")
                batches_in_epoch = 0
                continue
            batches_in_epoch += 1
            if hasattr(self.model.visual, "mask_ratio") and self.model.mask_ratio != ratio:
                self.model.set_mask_ratio(ratio)
            clock = budget.used.seconds / budget.limits.seconds if budget.limits.seconds else None
            lr = lr_at(cfg.optim, self.step, budget.planned_steps, clock, self.warmup_end_clock)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss, terms = self.runner.run(batch_dict(batch, self.extra_views))
            del batch
            if loss is None:
                bad = {k: float(v.detach()) for k, v in terms.items()}
                if cfg.on_nan == "skip":
                    self.optimizer.zero_grad(set_to_none=True)
                    self.skipped_steps += 1
                    bar.write(f"step {self.step}: non-finite loss {bad}, batch skipped (on_nan=skip)")
                else:
                    where = self.last_checkpoint or "none was written yet"
                    raise TrainingDiverged(f"the loss is not finite at step {self.step} ({bad}); the last good "
                                           f"checkpoint is {where} (set on_nan=skip to skip such batches)")
            else:
                grad_norm = optimizer_step(self.optimizer, self.scaler, self.params, self.model, cfg.optim.grad_clip,
                                           cfg.optim.max_logit_scale)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            budget.add_step(ratio, seconds)
            self.step += 1
            if self.warmup_end_clock is None and cfg.optim.warmup >= 1 and self.step >= cfg.optim.warmup \
                    and budget.limits.seconds:
                self.warmup_end_clock = budget.used.seconds / budget.limits.seconds
            progress = budget.progress()
            if loss is not None and main:
                now = time.perf_counter()
                window_s = max(1e-9, now - last_log[0])
                rate = (budget.used.samples - last_log[1]) / window_s
                bar.update(progress, step=self.step, loss=f"{loss.item():.4f}", samples_s=f"{rate:.0f}")
                if self.step % cfg.log.every_steps == 0 or self.step == 1:
                    window_gflops = budget.used.gflops - last_log[2]  # wall time, as samples_per_s
                    rec = {"kind": "train", "step": self.step, "epoch": self.loader.epoch - 1,
                           **budget.used.as_dict(), "progress": progress, "loss": loss.item(),
                           **{f"loss/{k}": v.item() for k, v in terms.items()}, "lr": lr,
                           "logit_scale": self.model.logit_scale.exp().item(), "mask_ratio": ratio,
                           "samples_per_s": rate, "gflops_per_s": window_gflops / window_s,
                           "skipped_steps": self.skipped_steps,
                           **{f"data/{k}": v for k, v in self.loader.stats.as_dict().items()}}
                    if peak_flops is not None:
                        rec["mfu"] = mfu(window_gflops * 1e9, window_s, peak_flops)
                    if cfg.optim.grad_clip is not None and loss is not None:
                        rec["grad_norm"] = float(grad_norm)
                    writer.write(rec)
                    last_log = (time.perf_counter(), budget.used.samples, budget.used.gflops)
            finished = not budget.fits(budget.mask_ratio_at(budget.progress(clock=False)), clock=False)
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and not finished:
                self._evaluate(writer, bar, evals)
            time_ckpt = every_ckpt_s > 0 and time.monotonic() - last_ckpt_t >= every_ckpt_s
            step_ckpt = cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0
            if step_ckpt or rank0_decisions([time_ckpt], self.dist)[0]:
                self._checkpoint(manager)
                last_ckpt_t = time.monotonic()
        # the end: a final checkpoint, evaluation, curves, summary
        if self.last_checkpoint is None or not self.last_checkpoint.endswith(f"step-{self.step:08d}.pt"):
            self._checkpoint(manager)
        final = self._evaluate(writer, bar, evals)
        summary = {"steps": self.step, "budget_used": budget.used.as_dict(), "planned_steps": budget.planned_steps,
                   "strategy": self.strategy.describe(), "model": self.cfg.model.name,
                   "skipped_steps": self.skipped_steps, "data": self.loader.stats.as_dict(),
                   "world_size": self.dist.world_size, "batch_per_rank": self.loader.batch_size,
                   "accum_steps": cfg.data.accum_steps,
                   "final_eval": final, "checkpoint": self.last_checkpoint, "output_dir": cfg.output_dir,
                   "train_gflops_per_sample": {str(r): budget.step_cost(r) / budget.batch_size
                                               for _, r in budget.phases},
                   "matmul_rate": self.matmul_rate}
        if main:
            import json

            from ..info import report_dict
            summary["environment"] = report_dict()  # versions, devices, every backend's usability
            with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1, default=str)
            if cfg.log.plot:
                summary["plot"] = plot_curves(os.path.join(cfg.output_dir, "metrics.jsonl"),
                                              os.path.join(cfg.output_dir, "curves.png"))
        return summary

    def _all_have(self, have: bool) -> bool:
        if self.dist.world_size == 1:
            return have
        import torch.distributed as dist
        t = torch.tensor([0.0 if have else 1.0], dtype=torch.float64, device=self.dist.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.dist.group)
        return t.item() == 0.0

    def _evaluate(self, writer, bar, evals: list) -> Optional[dict]:
        if self.evaluate is None:
            barrier(self.dist)
            return None
        was_training = self.model.training
        t = time.perf_counter()
        result = self.evaluate(self.model)
        self.model.train(was_training)
        rec = {"kind": "eval", "step": self.step, **self.budget.used.as_dict(), **result,
               "eval_seconds": round(time.perf_counter() - t, 3)}
        writer.write(rec)
        evals.append(rec)
        shown = ", ".join(f"{k}={v:.3f}" for k, v in result.items()
                          if isinstance(v, float) and not k.endswith("seconds"))
        bar.write(f"step {self.step}: {shown}")
        barrier(self.dist)
        return result


def train(config: Union[TrainConfig, dict, str], resume: Optional[str] = None) -> dict:
    """Train as ``config`` says (see :class:`Trainer`); returns the run's summary (also written to
    ``output_dir/summary.json``)."""
    return Trainer(config, resume=resume).run()
