"""Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
Deep Models"), as in its authors' implementation: Nesterov momentum estimated from grad
differences, with Adam-like scaling. A high-learning-rate optimizer: its authors use peak
lrs 5-10x AdamW's. One fused pass."""
from __future__ import annotations

from typing import Optional

import torch

from .base import FusedOptimizer, Part


class Adan(FusedOptimizer):
    """With diff = g - g_prev (0 on the first step) and bias corrections bc_i = 1 - beta_i^t:
    m <- b1 m + (1-b1) g; d <- b2 d + (1-b2) diff; v <- b3 v + (1-b3) (g + b2 diff)^2;
    update = (m/bc1 + b2 d/bc2) / (sqrt(v)/sqrt(bc3) + eps); p <- (p - lr update) / (1 + lr wd),
    or with no_prox p <- p (1 - lr wd) - lr update. State keys `step`, `exp_avg`,
    `exp_avg_diff`, `exp_avg_sq`, `pre_grad`. Plus the options of FusedOptimizer
    (max_grad_norm, skip_nonfinite, grokfast, agc, backend, flat, state_dtype: how the four
    state tensors are stored, master_weights, rounding_seed)."""

    _op = "adan_"

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02, *,
                 no_prox=False, maximize=False, max_grad_norm: Optional[float] = None, skip_nonfinite=False,
                 grokfast=None, agc: Optional[float] = None, backend="auto", flat=False,
                 state_dtype: Optional[torch.dtype] = None,
                 master_weights: Optional[str] = None, rounding_seed: int = 0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                        maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         grokfast=grokfast, agc=agc, backend=backend, flat=flat, state_dtype=state_dtype,
                         master_weights=master_weights, rounding_seed=rounding_seed)

    def _check_group(self, group: dict, full: bool = True) -> None:
        super()._check_group(group, full)
        if len(group["betas"]) != 3:
            raise ValueError(f"Adan takes three betas, got {group['betas']}")
        self._check_adam_like(group)

    def _state_keys(self, group: dict) -> tuple:
        return ("exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad")

    def _hyper(self, group: dict, part: Part) -> dict:
        beta1, beta2, beta3 = group["betas"]
        return dict(beta1=float(beta1), beta2=float(beta2), beta3=float(beta3), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), no_prox=bool(group["no_prox"]))
