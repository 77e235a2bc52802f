"""Plain-PyTorch references written from the formulas: readable first, fast never."""
from __future__ import annotations

import math

import torch


def norm_reference(tensors, ord=2.0):
    """(total, per-tensor) norms in float64."""
    per = [torch.linalg.vector_norm(t.double().cpu().flatten(), ord) if t.numel() else torch.zeros((), dtype=torch.float64)
           for t in tensors]
    if not per:
        return torch.zeros((), dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    per = torch.stack(per)
    return torch.linalg.vector_norm(per, ord), per


def grad_multiplier_reference(grad_norm, max_grad_norm, grad_scale):
    """What every grad is multiplied by: unscale, then clip to max_grad_norm
    (torch.nn.utils.clip_grad_norm_'s coefficient, computed on the unscaled norm)."""
    scale = 1.0 if grad_scale is None else float(grad_scale)
    clip = 1.0
    if max_grad_norm:
        clip = min(1.0, max_grad_norm / (float(grad_norm) / scale + 1e-6))
    return clip / scale


def adamw_reference(p, g, m, v, vmax, step, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                    mult=1.0, compute_dtype=torch.float64):
    """One AdamW step (Loshchilov & Hutter; torch.optim.AdamW's formula) for one tensor.
    `step` is the step count after incrementing. Math in compute_dtype, results returned
    in the dtype of the inputs: (p, m, v, vmax)."""
    dt = p.dtype
    p, g, m, v = (t.to(compute_dtype) for t in (p, g, m, v))
    g = g * mult
    if maximize:
        g = -g
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    if amsgrad:
        vmax = torch.maximum(vmax.to(compute_dtype), v)
        denom = vmax.sqrt() / math.sqrt(bias_correction2) + eps
    else:
        denom = v.sqrt() / math.sqrt(bias_correction2) + eps
    p = p - (lr / bias_correction1) * m / denom
    vmax = vmax.to(dt) if amsgrad else vmax
    return p.to(dt), m.to(dt), v.to(dt), vmax
