"""The learning-rate schedule: linear warmup, then constant or cosine decay; or cyclic
(cyclic.py). A pure function of the step (and, for cyclic in units of the sharpness, of the
sharpnesses measured at the cycle starts), so a resumed run takes exactly the lrs of an
uninterrupted one."""
from __future__ import annotations

import math
from typing import Mapping, Optional

from .config import TrainConfig
from .cyclic import cyclic_factor


def lr_factor(step: int, cfg: TrainConfig, decay_steps: int, measured: Optional[Mapping[int, float]] = None) -> float:
    """The multiplier of the base lr for the update made at `step` (0-based). measured: cyclic
    with cycle_unit "sharpness", the sharpness at each cycle start so far (step -> value)."""
    if cfg.schedule == "cyclic":
        return cyclic_factor(step, cfg.cycle_peak, cfg.cycle_trough, cfg.cycle_period, cfg.cycle_unit, measured)
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup) / max(1, decay_steps - cfg.warmup))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
