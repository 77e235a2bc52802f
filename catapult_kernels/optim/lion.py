"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of
an interpolation of momentum and grad, decoupled weight decay. One fused pass."""
from __future__ import annotations

from typing import Optional

import torch

from .base import FusedOptimizer, Part


class Lion(FusedOptimizer):
    """update = sign(beta1 * m + (1 - beta1) * g); p <- p * (1 - lr * wd) - lr * update;
    m <- beta2 * m + (1 - beta2) * g. State key `exp_avg`. The paper's defaults; its
    advice: an lr 3-10x smaller and a weight_decay 3-10x larger than AdamW's. Plus the
    options of FusedOptimizer (max_grad_norm, skip_nonfinite, grokfast, agc, backend, flat,
    state_dtype: how the momentum is stored, master_weights, rounding_seed)."""

    _op = "lion_"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite=False, grokfast=None,
                 agc: Optional[float] = None, backend="auto", flat=False,
                 state_dtype: Optional[torch.dtype] = None,
                 master_weights: Optional[str] = None, rounding_seed: int = 0):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         grokfast=grokfast, agc=agc, backend=backend, flat=flat, state_dtype=state_dtype,
                         master_weights=master_weights, rounding_seed=rounding_seed)

    def _check_group(self, group: dict, full: bool = True) -> None:
        super()._check_group(group, full)
        self._check_adam_like(group, beta_one_allowed=True)  # beta = 1: a frozen momentum, still valid

    def _state_keys(self, group: dict) -> tuple:
        return ("exp_avg",)

    def _hyper(self, group: dict, part: Part) -> dict:
        beta1, beta2 = group["betas"]
        return dict(beta1=float(beta1), beta2=float(beta2), weight_decay=float(group["weight_decay"]))
