"""Learning rate and consistency weight as plain functions of the step (the authors' schedule)."""
import math

from train.config import OptimConfig


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
