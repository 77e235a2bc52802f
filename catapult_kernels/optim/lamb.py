"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"): Adam's direction
plus decoupled weight decay, scaled per tensor by the trust ratio |w| / |r|. Two fused
passes inside one op: the moments and the per-tensor norms, then the update."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .base import Bucket, FusedOptimizer, StepControl


class LAMB(FusedOptimizer):
    """r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p; p <- p - lr * trust * r with
    trust = |w| / |r| per tensor (|w| clamped to max_weight_norm when given; 1 where
    either norm is 0). bias_correction on by default, as in the paper's Algorithm 2.
    State keys `step`, `exp_avg`, `exp_avg_sq`. Plus the options of FusedOptimizer
    (max_grad_norm, skip_nonfinite, grokfast, agc, backend)."""

    _has_step = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, *,
                 bias_correction=True, max_weight_norm: Optional[float] = None, maximize=False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite=False, grokfast=None,
                 agc: Optional[float] = None, backend="auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        max_weight_norm=max_weight_norm, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         grokfast=grokfast, agc=agc, backend=backend)

    def _check_group(self, group: dict, full: bool = True) -> None:
        super()._check_group(group, full)
        self._check_adam_like(group)
        clamp = group["max_weight_norm"]
        if clamp is not None and not clamp > 0:
            raise ValueError(f"Invalid max_weight_norm: {clamp} (must be > 0, or None for no clamp)")

    def _state_keys(self, group: dict) -> tuple:
        return ("exp_avg", "exp_avg_sq")

    def _state(self, p: torch.Tensor, group: dict, device: torch.device) -> dict:
        state = self.state[p]
        for key in self._state_keys(group):
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._step_tensor(state, device)
        return state

    def _update(self, bucket: Bucket, control: StepControl) -> None:
        group = bucket.group
        self._advance_steps([s["step"] for s in bucket.states], control)
        beta1, beta2 = group["betas"]
        lr = self._lr_tensor(group, bucket.device)
        for part in self._parts(bucket):
            states = part.take(bucket.states)
            ops.lamb_(part.take(bucket.params), part.take(bucket.grads), [s["exp_avg"] for s in states],
                      [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr, float(beta1),
                      float(beta2), float(group["eps"]), float(group["weight_decay"]),
                      bool(group["bias_correction"]), float(group["max_weight_norm"] or 0.0),
                      bool(group["maximize"]), **self._pipeline_args(bucket, part, control))
