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


def sgd_reference(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                  mult=1.0, compute_dtype=torch.float64):
    """One SGD step (torch.optim.SGD's formula) for one tensor: (p, buf) in the inputs' dtype.
    buf is None without momentum; on the first step it becomes the step's grad."""
    dt = p.dtype
    p, g = p.to(compute_dtype), g.to(compute_dtype) * mult
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum != 0:
        buf = g if first_step else momentum * buf.to(compute_dtype) + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
        buf = buf.to(dt)
    p = p - lr * g
    return p.to(dt), buf


def assert_close_to_reference(name, got, gold, same):
    """float32: within 2e-6 of the float64 formula (gold), relative to the element or to
    the tensor's largest value, since terms that nearly cancel (momentum * buf - g) keep
    the absolute error of their operands. Half types: the error against gold no more than
    2x that of the same formula computed in float32 and stored in that type (same), with
    half an ulp at the largest value as the floor of the bound."""
    got = got.cpu()
    if not got.numel():
        return
    scale = gold.double().abs().max().item()
    if got.dtype == torch.float32:
        torch.testing.assert_close(got.double(), gold.double(), rtol=2e-6, atol=2e-6 * scale,
                                   msg=lambda m: f"{name}: {m}")
        return
    err = (got.double() - gold.double()).abs().max()
    err_same = (same.double() - gold.double()).abs().max()
    floor = torch.finfo(got.dtype).eps / 2 * scale
    assert err <= 2 * max(err_same, floor), f"{name}: error {err} vs the reference's {err_same}"
