"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"): momentum
SGD with a per-tensor local lr, trust_coefficient * |w| / (|g| + weight_decay * |w|).
The norms take one fused multi-tensor pass; the update is the fused SGD kernel with
the local lrs as per-tensor trust ratios."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .base import Bucket, FusedOptimizer, StepControl
from .regularizers import grad_multiplier
from .unwritten import UnwrittenFlag
from .sgd import SGD


class LARS(SGD):
    """g <- local_lr * (g + wd * w); buf <- momentum * buf + (1 - dampening) * g (the first
    step: buf <- g); w <- w - lr * buf, where local_lr = trust_coefficient * |w| /
    (|g| + wd * |w|) per tensor, 1 where |w| or |g| is 0. |g| is the norm of the grad the
    update sees (after clipping, AGC and Grokfast). exclude_1d leaves 1-D params (biases,
    norm scales) out of the adaptation and the weight decay: they take plain momentum SGD.
    State key `momentum_buffer`. Plus the options of FusedOptimizer."""

    def __init__(self, params, lr=1.0, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 trust_coefficient=0.001, exclude_1d=True, maximize=False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite=False, grokfast=None,
                 agc: Optional[float] = None, backend="auto"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, trust_coefficient=trust_coefficient,
                        exclude_1d=exclude_1d)
        # SGD's checks, state and kernel call, with LARS's own defaults
        FusedOptimizer.__init__(self, params, defaults, max_grad_norm=max_grad_norm,
                                skip_nonfinite=skip_nonfinite, grokfast=grokfast, agc=agc, backend=backend)

    def _check_group(self, group: dict, full: bool = True) -> None:
        super()._check_group(group, full)
        if not group["trust_coefficient"] > 0:
            raise ValueError(f"Invalid trust_coefficient: {group['trust_coefficient']} (must be > 0)")

    def _update(self, bucket: Bucket, control: StepControl) -> None:
        group = bucket.group
        adapted, rest = [], []
        for i, p in enumerate(bucket.params):
            (rest if group["exclude_1d"] and p.dim() <= 1 else adapted).append(i)
        if adapted:
            trust = self._trust_ratios(bucket, adapted, control)
            self._sgd_step(bucket, control, group["weight_decay"], trust_ratios=trust, only=adapted)
        if rest:
            self._sgd_step(bucket, control, 0.0, only=rest)

    def _trust_ratios(self, bucket: Bucket, idx: list, control: StepControl) -> torch.Tensor:
        """The local lr of each param of the bucket listed in idx, in that order, on the device."""
        group = bucket.group
        wd, tc = float(group["weight_decay"]), float(group["trust_coefficient"])
        w, g = self._norms(bucket, idx, control)
        return torch.where((w > 0) & (g > 0), tc * w / (g + wd * w), torch.ones_like(w))

    def _norms(self, bucket: Bucket, idx: list, control: StepControl) -> tuple[torch.Tensor, torch.Tensor]:
        """Per param listed in idx: the norm of the param, and of its grad as the update sees
        it (after the grad pipeline)."""
        group = bucket.group
        mult = grad_multiplier(control.grad_norm, self.max_grad_norm or 0.0, control.grad_scale, bucket.device)
        params, grads = [bucket.params[i] for i in idx], [bucket.grads[i] for i in idx]
        if group["agc"] is None and group["grokfast"] is None:  # one norm pass over p and g
            norms = ops.multi_tensor_norm(params + grads, 2.0, True, self.backend)[1]
            return norms[:len(idx)], norms[len(idx):] * mult.abs()
        w = ops.multi_tensor_norm(params, 2.0, True, self.backend)[1]
        # With AGC or Grokfast the grad the update sees is only formed inside the kernel:
        # form it here in temporaries (the EMA as the kernel will leave it), for the norms.
        norms = []
        for i, g in zip(idx, grads):
            g = g.float() * mult
            if bucket.agc_scales is not None and bucket.agc_scales[i] is not None:  # one per row (dim 0)
                g = g * bucket.agc_scales[i].reshape((-1,) + (1,) * (g.dim() - 1))
            grokfast = group["grokfast"]
            if grokfast is not None:
                alpha = new_ema_alpha(bucket.ema_fresh[i], grokfast["alpha"])
                ema = alpha * bucket.states[i]["grokfast_ema"].float() + (1.0 - alpha) * g
                g = g + grokfast["lamb"] * ema
            norms.append(torch.linalg.vector_norm(g))
        return w, torch.stack(norms)


def new_ema_alpha(ema_fresh, alpha: float):
    """The EMA decay a kernel call uses: 0 starts a new EMA at the grad; where the EMA may
    be unwritten (its first steps skipped), the device flag chooses."""
    if isinstance(ema_fresh, UnwrittenFlag):
        return alpha * (1.0 - ema_fresh.value)
    return 0.0 if ema_fresh else alpha
