"""AdamW (Loshchilov & Hutter), a drop-in for torch.optim.AdamW with fused global
clipping: one norm pass over the grads, one update pass over everything."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .base import Bucket, FusedOptimizer, StepControl


class AdamW(FusedOptimizer):
    """torch.optim.AdamW's arguments and state keys, plus:

    max_grad_norm: clip the global L2 norm of all grads to this (None: no clipping);
        equals torch.nn.utils.clip_grad_norm_ then step, but the grads are left as given.
    skip_nonfinite: skip the whole step on the device when that norm is inf or nan.
    backend: 'auto', 'cpu', 'cuda' or 'triton'.
    After a step, `grad_norm` holds the pre-clip global norm (a 0-d device tensor) when
    it was computed (max_grad_norm or skip_nonfinite), and `skipped_steps` the count of skips.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach: Optional[bool] = None,
                 capturable=False, differentiable=False, fused: Optional[bool] = None,
                 max_grad_norm: Optional[float] = None, skip_nonfinite=False, backend="auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite, backend=backend)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        beta1, beta2 = group["betas"]
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        if not 0.0 <= float(beta1) < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        if not 0.0 <= float(beta2) < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")

    def _param_like_state_keys(self, group: dict) -> tuple:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _state(self, p: torch.Tensor, group: dict, device: torch.device) -> dict:
        state = self.state[p]
        for key in self._param_like_state_keys(group):
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._step_tensor(state, device)
        return state

    def _update(self, bucket: Bucket, control: StepControl) -> None:
        group = bucket.group
        amsgrad = group["amsgrad"]
        states = bucket.states
        steps = [s["step"] for s in states]
        self._advance_steps(steps, control)
        beta1, beta2 = group["betas"]
        ops.adamw_(bucket.params, bucket.grads,
                   [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                   [s["max_exp_avg_sq"] for s in states] if amsgrad else [], steps,
                   self._lr_tensor(group, bucket.device), float(beta1), float(beta2),
                   float(group["eps"]), float(group["weight_decay"]), bool(amsgrad),
                   bool(group["maximize"]), control.grad_norm, self.max_grad_norm or 0.0,
                   control.grad_scale, control.skip, backend=self.backend)
