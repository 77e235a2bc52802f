"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"): momentum
SGD with a per-tensor local lr, trust_coefficient * |w| / (|g| + weight_decay * |w|).
The norms take one fused multi-tensor pass; the update is the fused SGD kernel with
the local lrs as per-tensor trust ratios. With AGC or Grokfast, which change the grad
whose norm counts, the grad pipeline runs first into buffers (catapult::grad_pipeline_)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .base import Bucket, FusedOptimizer, Part, StepControl
from .regularizers import grad_multiplier
from .sgd import SGD


class LARS(SGD):
    """g <- local_lr * (g + wd * w); buf <- momentum * buf + (1 - dampening) * g (the first
    step: buf <- g); w <- w - lr * buf, where local_lr = trust_coefficient * |w| /
    (|g| + wd * |w|) per tensor, 1 where |w| or |g| is 0. |g| is the norm of the grad the
    update sees (after clipping, AGC and Grokfast). exclude_1d leaves 1-D params (biases,
    norm scales) out of the adaptation and the weight decay: they take plain momentum SGD.
    State key `momentum_buffer`. Plus the options of FusedOptimizer (state_dtype: how the
    momentum buffer is stored; master_weights: |w| is then the master value's norm)."""

    _flattenable = False  # the trust ratios need each param's own norms

    def __init__(self, params, lr=1.0, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 trust_coefficient=0.001, exclude_1d=True, maximize=False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite=False, grokfast=None,
                 agc: Optional[float] = None, backend="auto", flat=False,
                 state_dtype: Optional[torch.dtype] = None,
                 master_weights: Optional[str] = None, rounding_seed: int = 0):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, trust_coefficient=trust_coefficient,
                        exclude_1d=exclude_1d)
        # SGD's checks, state and kernel call, with LARS's own defaults
        FusedOptimizer.__init__(self, params, defaults, max_grad_norm=max_grad_norm,
                                skip_nonfinite=skip_nonfinite, grokfast=grokfast, agc=agc, backend=backend, flat=flat,
                                state_dtype=state_dtype, master_weights=master_weights, rounding_seed=rounding_seed)

    def _check_group(self, group: dict, full: bool = True) -> None:
        super()._check_group(group, full)
        if not group["trust_coefficient"] > 0:
            raise ValueError(f"Invalid trust_coefficient: {group['trust_coefficient']} (must be > 0)")

    def _update(self, bucket: Bucket, control: StepControl) -> None:
        group = bucket.group
        pipeline = None
        if group["agc"] is not None or group["grokfast"] is not None:
            # AGC and Grokfast shape the grad whose norm the trust ratios need: the grad
            # pipeline runs first, into buffers, and the update takes them as they are.
            bucket, pipeline = self._through_pipeline(bucket, control), self._skip_only
        adapted, rest = [], []
        for i, p in enumerate(bucket.params):
            (rest if group["exclude_1d"] and p.dim() <= 1 else adapted).append(i)
        if adapted:
            trust = self._trust_ratios(bucket, adapted, control, piped=pipeline is not None)
            self._sgd_step(bucket, control, group["weight_decay"], trust_ratios=trust, only=adapted,
                           pipeline=pipeline)
        if rest:
            self._sgd_step(bucket, control, 0.0, only=rest, pipeline=pipeline)

    @staticmethod
    def _skip_only(bucket: Bucket, part: Part, control: StepControl) -> ops.PipelineArgs:
        """The pipeline of an update over grads that went through it already: the skip flag alone."""
        return ops.PipelineArgs(skip=part.skip(control.skip))

    def _trust_ratios(self, bucket: Bucket, idx: list, control: StepControl, piped: bool) -> torch.Tensor:
        """The local lr of each param of the bucket listed in idx, in that order, on the device:
        from the norms of the params and of the grads as the update sees them (piped: the
        bucket's grads are the pipeline's output; else the pipeline is the one factor of
        unscale and clip)."""
        group = bucket.group
        wd, tc = float(group["weight_decay"]), float(group["trust_coefficient"])
        params, grads = self._weights(bucket, idx), [bucket.grads[i] for i in idx]  # |w| of what the update takes
        norms = ops.multi_tensor_norm(params + grads, 2.0, True, self.backend)[1]
        if bucket.shardings is not None:  # DTensor shards: each norm over the whole tensor
            from ..distributed.norms import reduce_squares
            shardings = [bucket.shardings[i] for i in idx] * 2
            norms = reduce_squares(norms.to(torch.float64).square(), shardings).sqrt().to(norms.dtype)
        w, g = norms[:len(idx)], norms[len(idx):]
        if not piped:
            g = g * grad_multiplier(control.grad_norm, self.max_grad_norm or 0.0, control.grad_scale,
                                    bucket.device).abs()
        return torch.where((w > 0) & (g > 0), tc * w / (g + wd * w), torch.ones_like(w))
