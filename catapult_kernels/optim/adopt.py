"""ADOPT (Taniguchi et al. 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the
Optimal Rate"): Adam with the grad normalized by the second moment of the steps before it,
then momentum; converges for any beta2. One fused pass."""
from __future__ import annotations

from typing import Optional

import torch

from .base import FusedOptimizer, Part


class ADOPT(FusedOptimizer):
    """The first step sets v = g^2 only. Then, with t the step: p <- p * (1 - lr * wd)
    (decoupled); ghat = clamp(g / max(sqrt(v), eps), +-(t-1)^(1/4)); m <- beta1 * m +
    (1 - beta1) * ghat; p <- p - lr * m; v <- beta2 * v + (1 - beta2) * g^2. State keys
    `step`, `exp_avg`, `exp_avg_sq`. Defaults as the paper's code. Plus the options of
    FusedOptimizer (max_grad_norm, skip_nonfinite, grokfast, agc, backend, flat, state_dtype:
    how the moments are stored, master_weights, rounding_seed)."""

    _op = "adopt_"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, *, maximize=False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite=False, grokfast=None,
                 agc: Optional[float] = None, backend="auto", flat=False,
                 state_dtype: Optional[torch.dtype] = None,
                 master_weights: Optional[str] = None, rounding_seed: int = 0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         grokfast=grokfast, agc=agc, backend=backend, flat=flat, state_dtype=state_dtype,
                         master_weights=master_weights, rounding_seed=rounding_seed)

    def _check_group(self, group: dict, full: bool = True) -> None:
        super()._check_group(group, full)
        self._check_adam_like(group)

    def _state_keys(self, group: dict) -> tuple:
        return ("exp_avg", "exp_avg_sq")

    def _hyper(self, group: dict, part: Part) -> dict:
        beta1, beta2 = group["betas"]
        return dict(beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]))
