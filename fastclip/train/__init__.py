"""Training under a compute budget: strategies (CLIP, FLIP, SLIP, CLIP+Aug), the trainer loop,
budget accounting, checkpoints and torchrun DDP.

    from fastclip.train import TrainConfig, train
    cfg = TrainConfig.from_file("run.yaml", overrides=["budget.gflops=5e6"])
    summary = train(cfg)                      # fastclip train --config run.yaml budget.gflops=5e6

Nothing in fastclip's ops, nn, models or data imports this package; it imports them.
"""
from .budget import Budget, BudgetUsed, lr_at
from .checkpoint import CheckpointError, CheckpointManager, list_checkpoints, load_checkpoint, save_checkpoint
from .config import (BudgetConfig, CheckpointConfig, ConfigError, DataConfig, EvalConfig, LogConfig, ModelConfig,
                     OptimConfig, StrategyConfig, TrainConfig)
from .strategies import STRATEGIES, SlipHead, Strategy, StrategyStack, build_strategy
from .trainer import Trainer, TrainingDiverged, plan_run, train

__all__ = ["TrainConfig", "ModelConfig", "DataConfig", "StrategyConfig", "BudgetConfig", "OptimConfig",
           "EvalConfig", "CheckpointConfig", "LogConfig", "ConfigError", "Trainer", "train", "TrainingDiverged",
           "Budget", "BudgetUsed", "lr_at", "STRATEGIES", "Strategy", "StrategyStack", "SlipHead",
           "build_strategy", "CheckpointError", "CheckpointManager", "save_checkpoint", "load_checkpoint",
           "list_checkpoints", "plan_run"]
