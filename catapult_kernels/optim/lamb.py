"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"): Adam's direction
plus decoupled weight decay, scaled per tensor by the trust ratio |w| / |r|. Two fused
passes inside one op: the moments and the per-tensor norms, then the update."""
from __future__ import annotations

from typing import Optional

from .base import FusedOptimizer, Part


class LAMB(FusedOptimizer):
    """r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p; p <- p - lr * trust * r with
    trust = |w| / |r| per tensor (|w| clamped to max_weight_norm when given; 1 where
    either norm is 0). bias_correction on by default, as in the paper's Algorithm 2.
    State keys `step`, `exp_avg`, `exp_avg_sq`. Plus the options of FusedOptimizer
    (max_grad_norm, skip_nonfinite, grokfast, agc, backend)."""

    _op = "lamb_"
    _flattenable = False  # the trust ratios need each param's own norms

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, *,
                 bias_correction=True, max_weight_norm: Optional[float] = None, maximize=False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite=False, grokfast=None,
                 agc: Optional[float] = None, backend="auto", flat=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        max_weight_norm=max_weight_norm, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         grokfast=grokfast, agc=agc, backend=backend, flat=flat)

    def _check_group(self, group: dict, full: bool = True) -> None:
        super()._check_group(group, full)
        self._check_adam_like(group)
        clamp = group["max_weight_norm"]
        if clamp is not None and not clamp > 0:
            raise ValueError(f"Invalid max_weight_norm: {clamp} (must be > 0, or None for no clamp)")

    def _state_keys(self, group: dict) -> tuple:
        return ("exp_avg", "exp_avg_sq")

    def _hyper(self, group: dict, part: Part) -> dict:
        beta1, beta2 = group["betas"]
        return dict(beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), bias_correction=bool(group["bias_correction"]),
                    max_weight_norm=float(group["max_weight_norm"] or 0.0))
