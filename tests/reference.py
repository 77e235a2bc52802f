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
    if max_grad_norm is not None and max_grad_norm > 0:  # <= 0: no clipping
        clip = min(1.0, max_grad_norm / (float(grad_norm) / scale + 1e-6))
    return clip / scale


def agc_factor_view(factors, like):
    """AGC's per-row factors shaped to broadcast over `like`: one factor per index along
    dim 0 for tensors of 2+ dims, a single factor otherwise (csrc/ops.cpp, step 2)."""
    if like.dim() >= 2:
        return factors.reshape(-1, *([1] * (like.dim() - 1)))
    assert factors.numel() == 1, "a tensor of fewer than 2 dims has one AGC row"
    return factors.reshape(())


def grad_pipeline_reference(grad, mult=1.0, agc_scale=None, ema=None, grokfast_alpha=0.98, grokfast_lamb=2.0,
                            maximize=False, compute_dtype=torch.float64):
    """The grad pipeline every update op starts with (csrc/ops.cpp), for one tensor:
      1. unscale and clip: g = grad * mult (mult from grad_multiplier_reference);
      2. AGC (Brock et al. 2021): g *= agc_scale[row] (agc_scale: one factor per row, or None);
      3. Grokfast EMA filter (Lee et al. 2024): ema = alpha * ema + (1 - alpha) * g; g = g + lamb * ema
         (ema: the filter's state, or None for no filter);
      4. maximize: g = -g.
    Returns (g, new_ema) in compute_dtype; new_ema is None without the filter."""
    g = grad.to(compute_dtype)
    if agc_scale is not None:
        g = g * (mult * agc_factor_view(agc_scale.cpu().to(compute_dtype), g))
    else:
        g = g * mult
    new_ema = None
    if ema is not None:
        new_ema = grokfast_alpha * ema.to(compute_dtype) + (1 - grokfast_alpha) * g
        g = g + grokfast_lamb * new_ema
    if maximize:
        g = -g
    return g, new_ema


def _pipeline(g, mult, maximize, compute_dtype, agc_scale, ema, grokfast_alpha, grokfast_lamb):
    return grad_pipeline_reference(g, mult, agc_scale, ema, grokfast_alpha, grokfast_lamb, maximize, compute_dtype)


def _out(t, dt):
    return None if t is None else t.to(dt)


def adamw_reference(p, g, m, v, vmax, step, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                    mult=1.0, compute_dtype=torch.float64, *, decoupled_weight_decay=True, agc_scale=None,
                    ema=None, grokfast_alpha=0.98, grokfast_lamb=2.0):
    """One Adam/AdamW step for one tensor: AdamW (Loshchilov & Hutter; torch.optim.AdamW's
    formula, decay p *= 1 - lr * wd) or, with decoupled_weight_decay=False, Adam with coupled
    L2 (Kingma & Ba; torch.optim.Adam: g = g + wd * p, no decay of p). `step` is the step
    count after incrementing; g goes through grad_pipeline_reference first. Math in
    compute_dtype, results returned in the dtype of the inputs: (p, m, v, vmax, ema)."""
    dt = p.dtype
    g, ema = _pipeline(g, mult, maximize, compute_dtype, agc_scale, ema, grokfast_alpha, grokfast_lamb)
    p, m, v = (t.to(compute_dtype) for t in (p, m, v))
    if decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    elif weight_decay != 0:
        g = g + weight_decay * p
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
    return p.to(dt), m.to(dt), v.to(dt), vmax, _out(ema, dt)


def sgd_reference(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                  mult=1.0, compute_dtype=torch.float64, *, trust=1.0, agc_scale=None, ema=None,
                  grokfast_alpha=0.98, grokfast_lamb=2.0):
    """One SGD step (torch.optim.SGD's formula) for one tensor: (p, buf, ema) in the inputs'
    dtype. g goes through grad_pipeline_reference first; `trust` is LARS's per-tensor trust
    ratio (You et al. 2017), multiplying the grad after the weight decay term:
    g = trust * (g + wd * p). buf is None without momentum; on the first step it becomes
    the step's grad."""
    dt = p.dtype
    g, ema = _pipeline(g, mult, maximize, compute_dtype, agc_scale, ema, grokfast_alpha, grokfast_lamb)
    p = p.to(compute_dtype)
    if weight_decay != 0:
        g = g + weight_decay * p
    g = float(trust) * g
    if momentum != 0:
        buf = g if first_step else momentum * buf.to(compute_dtype) + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
        buf = buf.to(dt)
    p = p - lr * g
    return p.to(dt), buf, _out(ema, dt)


def lion_reference(p, g, m, lr, beta1, beta2, weight_decay, maximize, mult=1.0, compute_dtype=torch.float64, *,
                   agc_scale=None, ema=None, grokfast_alpha=0.98, grokfast_lamb=2.0):
    """One Lion step (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
    Algorithm 2) for one tensor, g through grad_pipeline_reference first:
        c = beta1 * m + (1 - beta1) * g
        p = p * (1 - lr * wd) - lr * sign(c)        (decoupled weight decay)
        m = beta2 * m + (1 - beta2) * g
    Returns (p, m, ema) in the inputs' dtype."""
    dt = p.dtype
    g, ema = _pipeline(g, mult, maximize, compute_dtype, agc_scale, ema, grokfast_alpha, grokfast_lamb)
    p, m = p.to(compute_dtype), m.to(compute_dtype)
    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay)
    p = p - lr * torch.sign(c)
    m = beta2 * m + (1 - beta2) * g
    return p.to(dt), m.to(dt), _out(ema, dt)


def adopt_reference(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, maximize, mult=1.0,
                    compute_dtype=torch.float64, *, agc_scale=None, ema=None, grokfast_alpha=0.98, grokfast_lamb=2.0):
    """One ADOPT step (Taniguchi et al. 2024, "ADOPT: Modified Adam Can Converge with Any
    beta2 with the Optimal Rate", arXiv 2411.02853) for one tensor, g through
    grad_pipeline_reference first; `step` is t, the count after incrementing (1 first):
        t == 1: v = g^2 (m and p unchanged)
        t >= 2: p = p * (1 - lr * wd)                      (decoupled weight decay)
                ghat = clamp(g / max(sqrt(v), eps), -c, c),  c = (t - 1)^(1/4)
                m = beta1 * m + (1 - beta1) * ghat;  p = p - lr * m
                v = beta2 * v + (1 - beta2) * g^2         (v after its use: the decorrelation)
    Returns (p, m, v, ema) in the inputs' dtype."""
    dt = p.dtype
    g, ema = _pipeline(g, mult, maximize, compute_dtype, agc_scale, ema, grokfast_alpha, grokfast_lamb)
    p, m, v = p.to(compute_dtype), m.to(compute_dtype), v.to(compute_dtype)
    if step == 1:
        return p.to(dt), m.to(dt), (g * g).to(dt), _out(ema, dt)
    p = p * (1 - lr * weight_decay)
    clip = (step - 1) ** 0.25
    ghat = (g / torch.clamp(v.sqrt(), min=eps)).clamp(-clip, clip)  # both clamps keep NaN
    m = beta1 * m + (1 - beta1) * ghat
    p = p - lr * m
    v = beta2 * v + (1 - beta2) * g * g
    return p.to(dt), m.to(dt), v.to(dt), _out(ema, dt)


def adan_reference(p, g, m, d, v, pre_grad, step, lr, beta1, beta2, beta3, eps, weight_decay, no_prox, maximize,
                   mult=1.0, compute_dtype=torch.float64, *, agc_scale=None, ema=None, grokfast_alpha=0.98,
                   grokfast_lamb=2.0):
    """One Adan step (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models", arXiv 2208.06677, as in its authors' implementation) for one
    tensor, g through grad_pipeline_reference first; `step` is t (1 on the first step):
        diff = g - pre_grad (0 when t == 1)
        m = beta1 * m + (1 - beta1) * g;  d = beta2 * d + (1 - beta2) * diff
        v = beta3 * v + (1 - beta3) * (g + beta2 * diff)^2
        update = (m / bc1 + beta2 * d / bc2) / (sqrt(v) / sqrt(bc3) + eps),  bc_i = 1 - beta_i^t
        no_prox: p = p * (1 - lr * wd) - lr * update;  else p = (p - lr * update) / (1 + lr * wd)
        pre_grad = g
    Returns (p, m, d, v, pre_grad, ema) in the inputs' dtype."""
    dt = p.dtype
    g, ema = _pipeline(g, mult, maximize, compute_dtype, agc_scale, ema, grokfast_alpha, grokfast_lamb)
    p, m, d, v = (t.to(compute_dtype) for t in (p, m, d, v))
    diff = torch.zeros_like(g) if step == 1 else g - pre_grad.to(compute_dtype)
    m = beta1 * m + (1 - beta1) * g
    d = beta2 * d + (1 - beta2) * diff
    u = g + beta2 * diff
    v = beta3 * v + (1 - beta3) * u * u
    bc1, bc2, bc3 = (1 - beta ** step for beta in (beta1, beta2, beta3))
    update = (m / bc1 + beta2 * d / bc2) / (v.sqrt() / math.sqrt(bc3) + eps)
    if no_prox:
        p = p * (1 - lr * weight_decay) - lr * update
    else:
        p = (p - lr * update) / (1 + lr * weight_decay)
    return p.to(dt), m.to(dt), d.to(dt), v.to(dt), g.to(dt), _out(ema, dt)


def muon_momentum_reference(g, buf, momentum, nesterov, maximize, mult=1.0, compute_dtype=torch.float64, *,
                            agc_scale=None, ema=None, grokfast_alpha=0.98, grokfast_lamb=2.0):
    """Muon's momentum (torch.optim.Muon) for one tensor, g through grad_pipeline_reference
    first: buf = buf + (1 - momentum)(g - buf); out = g + momentum (buf - g) with nesterov,
    else buf. Returns (out, buf, ema) in g's dtype."""
    dt = g.dtype
    g, ema = _pipeline(g, mult, maximize, compute_dtype, agc_scale, ema, grokfast_alpha, grokfast_lamb)
    buf = buf.to(compute_dtype)
    buf = buf + (1 - momentum) * (g - buf)
    out = g + momentum * (buf - g) if nesterov else buf
    return out.to(dt), buf.to(dt), _out(ema, dt)


def muon_update_reference(p, u, lr, weight_decay, ratio, maximize, mult=1.0, compute_dtype=torch.float64, *,
                          agc_scale=None, ema=None, grokfast_alpha=0.98, grokfast_lamb=2.0):
    """Muon's step from the orthogonalized update u (torch.optim.Muon) for one tensor, u
    through grad_pipeline_reference first (Muon gives it none but skip):
    p = p (1 - lr weight_decay) - lr ratio u. Returns (p, ema) in p's dtype."""
    dt = p.dtype
    u, ema = _pipeline(u, mult, maximize, compute_dtype, agc_scale, ema, grokfast_alpha, grokfast_lamb)
    p = p.to(compute_dtype) * (1 - lr * weight_decay) - lr * float(ratio) * u
    return p.to(dt), _out(ema, dt)


def lamb_trust_ratio_reference(p_norm, r_norm, max_weight_norm):
    """LAMB's per-tensor trust ratio phi(|w|) / |r|, phi clamping |w| to max_weight_norm
    when that is > 0, and 1 where |w| or |r| is 0 (csrc/ops.cpp)."""
    w = float(p_norm)
    if max_weight_norm > 0:
        w = min(w, max_weight_norm)
    r = float(r_norm)
    return w / r if w > 0 and r > 0 else 1.0


def lamb_reference(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, bias_correction, max_weight_norm,
                   maximize, mult=1.0, compute_dtype=torch.float64, *, agc_scale=None, ema=None,
                   grokfast_alpha=0.98, grokfast_lamb=2.0, return_trust=False):
    """One LAMB step (You et al. 2019, "Large Batch Optimization for Deep Learning",
    Algorithm 2) for one tensor, g through grad_pipeline_reference first:
        m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2
        r = (m / bc1) / (sqrt(v / bc2) + eps) + wd * p   (bc = 1 - beta^step, or 1 without
                                                          bias correction)
        p = p - lr * trust * r,  trust = phi(|p|) / |r|  (lamb_trust_ratio_reference)
    Returns (p, m, v, ema) in the inputs' dtype (and the trust ratio, a float, last when
    return_trust)."""
    dt = p.dtype
    g, ema = _pipeline(g, mult, maximize, compute_dtype, agc_scale, ema, grokfast_alpha, grokfast_lamb)
    p, m, v = p.to(compute_dtype), m.to(compute_dtype), v.to(compute_dtype)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1 = 1 - beta1 ** step if bias_correction else 1.0
    bc2 = 1 - beta2 ** step if bias_correction else 1.0
    r = (m / bc1) / ((v / bc2).sqrt() + eps) + weight_decay * p
    trust = lamb_trust_ratio_reference(torch.linalg.vector_norm(p), torch.linalg.vector_norm(r), max_weight_norm)
    p = p - lr * trust * r
    out = (p.to(dt), m.to(dt), v.to(dt), _out(ema, dt))
    return out + (trust,) if return_trust else out


def assert_close_to_reference(name, got, gold, same, before=None):
    """float32: within 2e-6 of the float64 formula (gold), relative to the element or to
    the tensor's largest value, or to the largest value before the step (before, when
    given), since terms that nearly cancel (momentum * buf - g) keep the absolute error of
    their operands: in a tensor of one element, beta1 * m + (1 - beta1) * g may come out 30x
    smaller than beta1 * m. Half types: the error against gold no more than 2x that of the
    same formula computed in float32 and stored in that type (same), with half an ulp at
    that scale as the floor of the bound."""
    got = got.cpu()
    if not got.numel():
        return
    scale = gold.double().abs().max().item()
    if before is not None:
        scale = max(scale, before.double().abs().max().item())
    if got.dtype == torch.float32:
        torch.testing.assert_close(got.double(), gold.double(), rtol=2e-6, atol=2e-6 * scale,
                                   msg=lambda m: f"{name}: {m}")
        return
    err = (got.double() - gold.double()).abs().max()
    err_same = (same.double() - gold.double()).abs().max()
    floor = torch.finfo(got.dtype).eps / 2 * scale
    assert err <= 2 * max(err_same, floor), f"{name}: error {err} vs the reference's {err_same}"


def assert_bitwise_equal(name, a, b):
    """a and b hold the same bits (NaNs included): for 'nothing was written'."""
    assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    int_type = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
    assert torch.equal(a.cpu().contiguous().view(int_type), b.cpu().contiguous().view(int_type)), f"{name} changed"
