"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"): Adam's direction
plus decoupled weight decay, scaled per tensor by the trust ratio |w| / |r|. Two fused
passes inside one op: the moments and the per-tensor norms, then the update.

On DTensor shards the norms are over whole tensors, summed across ranks between the two
passes, which one op cannot do: the step then runs the grad pipeline op into buffers and
LAMB's math as torch ops on the local shards in float32 (sharded_update), with one
all-reduce of the per-tensor squares: a few more passes over memory than the fused op, and
with 16-bit grads the pipeline's output is rounded to their dtype before the moments (as
LARS's is), where the fused op keeps it in float32."""
from __future__ import annotations

from typing import Optional

import numpy
import torch

from .base import Bucket, FusedOptimizer, Part, StepControl


class LAMB(FusedOptimizer):
    """r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p; p <- p - lr * trust * r with
    trust = |w| / |r| per tensor (|w| clamped to max_weight_norm when given; 1 where
    either norm is 0). bias_correction on by default, as in the paper's Algorithm 2.
    State keys `step`, `exp_avg`, `exp_avg_sq`. Plus the options of FusedOptimizer
    (max_grad_norm, skip_nonfinite, grokfast, agc, backend, state_dtype, master_weights):
    with states stored otherwise than the params or master weights, pass 1 writes nothing
    and pass 2 recomputes r from the same old state, so the trust ratio measures the r applied."""

    _op = "lamb_"
    _flattenable = False  # the trust ratios need each param's own norms

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, *,
                 bias_correction=True, max_weight_norm: Optional[float] = None, maximize=False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite=False, grokfast=None,
                 agc: Optional[float] = None, backend="auto", flat=False,
                 state_dtype: Optional[torch.dtype] = None, master_weights: Optional[str] = None,
                 rounding_seed: int = 0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        max_weight_norm=max_weight_norm, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         grokfast=grokfast, agc=agc, backend=backend, flat=flat, state_dtype=state_dtype,
                         master_weights=master_weights, rounding_seed=rounding_seed)

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

    def _update(self, bucket: Bucket, control: StepControl) -> None:
        if bucket.shardings is None:
            return super()._update(bucket, control)
        self._sharded_update(self._through_pipeline(bucket, control), control)

    def _sharded_update(self, bucket: Bucket, control: StepControl) -> None:
        """The LAMB step of lamb_math.h in float32 over local shards whose grads went through
        the grad pipeline, as multi-tensor torch ops, the norms of p and r summed over the
        ranks (distributed/norms.py). A skipped step (control.skip) keeps the old values."""
        from ..distributed.norms import reduce_squares
        group = bucket.group
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, wd, clamp = float(group["eps"]), float(group["weight_decay"]), float(group["max_weight_norm"] or 0.0)
        params, m_old, v_old = bucket.params, bucket.columns["exp_avg"], bucket.columns["exp_avg_sq"]
        steps = bucket.columns["step"]
        as_float = lambda ts: [t.float() for t in ts]  # noqa: E731  (float32 ones as they are: read only)
        g, p32 = as_float(bucket.grads), as_float(params)
        # 1 - beta rounded as the kernels round it, in float32 (torch rounds the betas alone)
        one_minus_beta1, one_minus_beta2 = (float(numpy.float32(1) - numpy.float32(b)) for b in (beta1, beta2))
        m = torch._foreach_mul(as_float(m_old), beta1)
        torch._foreach_add_(m, g, alpha=one_minus_beta1)
        v = torch._foreach_mul(as_float(v_old), beta2)
        torch._foreach_addcmul_(v, g, g, value=one_minus_beta2)
        m_hat, v_hat = m, v
        if group["bias_correction"]:
            t = torch.stack(steps) + 1
            m_hat = torch._foreach_div(m, list((1 - beta1 ** t).unbind()))
            v_hat = torch._foreach_div(v, list((1 - beta2 ** t).unbind()))
        denom = torch._foreach_sqrt(v_hat)
        torch._foreach_add_(denom, eps)
        r = torch._foreach_div(m_hat, denom)
        if wd != 0:
            torch._foreach_add_(r, p32, alpha=wd)
        squares = torch.stack(torch._foreach_norm(list(params) + list(r), 2, dtype=torch.float64)).square()
        norms = reduce_squares(squares, bucket.shardings * 2).sqrt().float()
        w, r_norm = norms[:len(params)], norms[len(params):]
        if clamp > 0:
            w = torch.clamp(w, max=clamp)
        trust = torch.where((w > 0) & (r_norm > 0), w / r_norm, torch.ones_like(w))
        torch._foreach_mul_(r, list((self._lr_tensor(group, bucket.device) * trust).unbind()))
        new_p = torch._foreach_sub(p32, r)
        if control.skip is None:
            for old, new in ((params, new_p), (m_old, m), (v_old, v)):
                torch._foreach_copy_(old, new)
            torch._foreach_add_(steps, 1.0)
            return
        keep = control.skip == 0
        for old, new in ((params, new_p), (m_old, m), (v_old, v)):
            torch._foreach_copy_(old, [torch.where(keep, n.to(o.dtype), o) for o, n in zip(old, new)])
        torch._foreach_add_(steps, [keep.float()] * len(steps))  # a list: a 0-d tensor alone is read on the host
