"""Adam and AdamW (Kingma & Ba; Loshchilov & Hutter), drop-ins for torch.optim.Adam and
torch.optim.AdamW: one update pass over everything, with the grad pipeline fused in."""
from __future__ import annotations

from typing import Optional

import torch

from .base import FusedOptimizer, Part


class Adam(FusedOptimizer):
    """torch.optim.Adam's arguments and state keys (`step`, `exp_avg`, `exp_avg_sq`,
    `max_exp_avg_sq`): weight decay is coupled L2 (g += wd * p) unless
    decoupled_weight_decay, as in torch. Plus the options of FusedOptimizer
    (max_grad_norm, skip_nonfinite, grokfast, agc, backend, flat, state_dtype: how the
    moments are stored, e.g. torch.int8 for about 2 bytes per param instead of 8;
    master_weights of bfloat16 / float16 params: "fp32" exact for 4 more bytes per param,
    "ecc" ~16 significant bits for 1, "stochastic" unbiased rounding for 0; rounding_seed)."""

    _op = "adamw_"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach: Optional[bool] = None, maximize=False, capturable=False,
                 differentiable=False, fused: Optional[bool] = None, decoupled_weight_decay=False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite=False, grokfast=None,
                 agc: Optional[float] = None, backend="auto", flat=False, state_dtype: Optional[torch.dtype] = None,
                 master_weights: Optional[str] = None, rounding_seed: int = 0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         grokfast=grokfast, agc=agc, backend=backend, flat=flat, state_dtype=state_dtype,
                         master_weights=master_weights, rounding_seed=rounding_seed)

    def _check_group(self, group: dict, full: bool = True) -> None:
        super()._check_group(group, full)
        self._check_adam_like(group)

    def _state_keys(self, group: dict) -> tuple:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _hyper(self, group: dict, part: Part) -> dict:
        beta1, beta2 = group["betas"]
        return dict(beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]),
                    decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
                    amsgrad=bool(group["amsgrad"]))


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (p *= 1 - lr * wd), default 1e-2."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach: Optional[bool] = None, capturable=False,
                 differentiable=False, fused: Optional[bool] = None, max_grad_norm: Optional[float] = None,
                 skip_nonfinite=False, grokfast=None, agc: Optional[float] = None, backend="auto", flat=False,
                 state_dtype: Optional[torch.dtype] = None,
                 master_weights: Optional[str] = None, rounding_seed: int = 0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite, grokfast=grokfast, agc=agc, backend=backend, flat=flat,
                         state_dtype=state_dtype, master_weights=master_weights, rounding_seed=rounding_seed)
