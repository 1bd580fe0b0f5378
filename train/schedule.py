"""Learning rate and consistency weight as plain functions of the step (the authors' schedule), and
the run's length in steps."""
import math
from dataclasses import dataclass

from mgssl.train.config import Config, OptimConfig


@dataclass
class RunPlan:
    total_steps: int
    warmup_steps: int
    steps_per_epoch: float


def plan(cfg: Config, unlabeled_size: int) -> RunPlan:
    """Steps from train.steps or train.epochs (an epoch is one pass over the unlabeled set)."""
    per_epoch = unlabeled_size / cfg.data.batch_size
    total = cfg.train.steps if cfg.train.steps is not None else math.ceil(cfg.train.epochs * per_epoch)
    warmup = (round(cfg.optim.warmup_epochs * per_epoch) if cfg.optim.warmup_epochs is not None
              else cfg.optim.warmup_steps)
    return RunPlan(int(total), int(warmup), per_epoch)


def learning_rate(step: int, cfg: OptimConfig, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up lr·step/warmup (0 at step 0, as the authors' code), then the paper's steps
    (×gamma once the step is past a milestone: step > m) or cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return cfg.lr * step / warmup_steps
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(step > m for m in cfg.milestones)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def consistency_weight(step: int, weight: float, rampup_steps: int) -> float:
    """w grows linearly from 0 over the first `rampup_steps` steps (the authors' ramp)."""
    if rampup_steps <= 0:
        return weight
    return weight * min(1.0, step / rampup_steps)
