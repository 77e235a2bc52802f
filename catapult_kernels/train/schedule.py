"""The learning-rate schedule: linear warmup, then constant or cosine decay. A pure function
of the step, so a resumed run takes exactly the lrs of an uninterrupted one."""
from __future__ import annotations

import math

from .config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig, decay_steps: int) -> float:
    """The multiplier of the base lr for the update made at `step` (0-based)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup) / max(1, decay_steps - cfg.warmup))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
