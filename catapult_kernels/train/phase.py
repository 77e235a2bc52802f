"""The run's phase, from its loss curve (Lewkowycz et al. 2020):
lazy (no spike: the loss never rises well above its start), catapult (it does, then comes
back below its start), divergent (non-finite, grows without bound, or never comes back)."""
from __future__ import annotations

import math
from typing import Optional

SPIKE = 2.0     # "well above its start": a peak at least this many times the step-0 loss
RUNAWAY = 1e6   # a loss this many times the step-0 loss is taken as unbounded: the run stops


def is_runaway(loss: float, loss0: float) -> bool:
    return not math.isfinite(loss) or loss > RUNAWAY * max(loss0, 1e-30)


def classify(loss0: float, peak_loss: float, final_loss: Optional[float], diverged: bool) -> str:
    if diverged or final_loss is None or not math.isfinite(final_loss) or final_loss > loss0:
        return "divergent"
    return "catapult" if peak_loss > SPIKE * loss0 else "lazy"
