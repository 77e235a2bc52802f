"""The cyclic lr schedule (--schedule cyclic): a square wave, each cycle of `period` steps at
the peak for its first half (rounded up) and at the trough for the rest, both in units of
2/lambda0, or of 2/(the sharpness at the cycle's first step) with unit "sharpness".

A square wave, not a triangle: the lr jumps above 2/sharpness at a known step, so each cycle
starts with a catapult (Lewkowycz et al. 2020; Zhu et al. 2024's staircase: a loss spike,
then the sharpness below 2/lr), and the trough lets the loss settle before the next jump.

The trainer's base lr for a cyclic run is 2/lambda0, so these are multipliers of it. They are
pure functions of the step and the sharpnesses measured at the cycle starts, which the trainer
keeps in its checkpoint: a resumed run takes exactly the lrs of an uninterrupted one."""
from __future__ import annotations

from typing import Mapping, Optional


def cycle_start(step: int, period: int) -> int:
    """The first step of the cycle that `step` lies in."""
    return step - step % period


def cycle_level(step: int, peak: float, trough: float, period: int) -> float:
    """The lr of update `step` in units of 2/unit: the peak for the first ceil(period/2)
    steps of each cycle, the trough for the rest."""
    return peak if step % period < (period + 1) // 2 else trough


def cyclic_factor(step: int, peak: float, trough: float, period: int, unit: str,
                  measured: Optional[Mapping[int, float]] = None) -> float:
    """The multiplier of the base lr 2/lambda0 for the update made at `step`. unit "sharpness":
    the level in units of 2/s with s = measured[cycle start], the sharpness at the params before
    that cycle's first update, so the factor is level * lambda0 / s, with lambda0 = measured[0]
    (the sharpness before update 0: the same measurement)."""
    level = cycle_level(step, peak, trough, period)
    if unit == "lambda0":
        return level
    return level * measured[0] / measured[cycle_start(step, period)]
