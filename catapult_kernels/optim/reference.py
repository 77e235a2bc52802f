"""Plain-PyTorch, unfused versions of every optimizer and regularizer, written from the
papers' formulas one tensor at a time: the tests' ground truth and the benchmark's
unfused baseline. Readable first, fast never; any float dtype (float64 for gold).

    pipeline = GradPipeline(params, max_grad_norm=1.0, agc=0.01, grokfast=dict(alpha=0.98, lamb=2.0))
    opt = LionReference(params, lr=1e-4)
    loss.backward(); pipeline(); opt.step()

GradPipeline rewrites the grads in place in the fused kernels' order (global clip, AGC,
Grokfast); each optimizer then applies maximize, its weight decay and its update. SGD,
Adam and AdamW take torch.optim's own classes (foreach=False) as their references.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .regularizers import AGC_EPS, agc_rows, check_grokfast


class GradPipeline:
    """Global-norm clip (torch.nn.utils.clip_grad_norm_), AGC (Brock et al. 2021) and the
    Grokfast EMA filter (Lee et al. 2024, its gradfilter_ema: the EMA starts at the first grad)."""

    def __init__(self, params, max_grad_norm: Optional[float] = None, agc: Optional[float] = None,
                 grokfast=None):
        self.params = list(params)
        self.max_grad_norm, self.agc, self.grokfast = max_grad_norm, agc, check_grokfast(grokfast)
        self.emas: dict = {}

    @torch.no_grad()
    def __call__(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=False)
        for p in params:
            g = p.grad
            if self.agc is not None:
                unit = (agc_rows(p), -1)
                w_norm = torch.linalg.vector_norm(p.reshape(unit), dim=1).clamp(min=AGC_EPS)
                g_norm = torch.linalg.vector_norm(g.reshape(unit), dim=1)
                factor = torch.where(g_norm > 0, (self.agc * w_norm / g_norm).clamp(max=1.0), 1.0)
                g.copy_((g.reshape(unit) * factor[:, None]).reshape(g.shape))
            if self.grokfast is not None:
                alpha, lamb = self.grokfast["alpha"], self.grokfast["lamb"]
                ema = self.emas.get(p)
                ema = g.clone() if ema is None else ema * alpha + g * (1 - alpha)
                self.emas[p] = ema
                g.add_(ema, alpha=lamb)


class LionReference(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, Algorithm 2)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                c = beta1 * m + (1 - beta1) * g
                p.mul_(1 - lr * wd).sub_(lr * torch.sign(c))
                m.copy_(beta2 * m + (1 - beta2) * g)


class ADOPTReference(torch.optim.Optimizer):
    """ADOPT (Taniguchi et al. 2024, arXiv 2411.02853), with decoupled weight decay: the first
    step only sets v = g^2; then g is normalized by the v of the steps before (clipped to
    +-(t-1)^(1/4)) before it enters m, and v takes g after its use."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                if t == 1:
                    v.copy_(g * g)
                    continue
                p.mul_(1 - lr * wd)
                clip = (t - 1) ** 0.25
                ghat = (g / v.sqrt().clamp(min=group["eps"])).clamp(-clip, clip)
                m.copy_(beta1 * m + (1 - beta1) * ghat)
                p.sub_(lr * m)
                v.copy_(beta2 * v + (1 - beta2) * g * g)


class AdanReference(torch.optim.Optimizer):
    """Adan (Xie et al. 2022, arXiv 2208.06677), as in its authors' implementation: momenta of
    the grad (m), of the grad's difference from the step before (d) and of the squared
    Nesterov-corrected grad (v); no_prox decays p before the update, else p is divided by
    1 + lr * wd after it (the proximal form)."""

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02, no_prox=False,
                 maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                                      maximize=maximize))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_diff=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p), pre_grad=torch.zeros_like(p))
                state["step"] += 1
                m, d, v, t = state["exp_avg"], state["exp_avg_diff"], state["exp_avg_sq"], state["step"]
                diff = g - state["pre_grad"] if t > 1 else torch.zeros_like(g)  # no grad before the first
                m.copy_(beta1 * m + (1 - beta1) * g)
                d.copy_(beta2 * d + (1 - beta2) * diff)
                v.copy_(beta3 * v + (1 - beta3) * (g + beta2 * diff) ** 2)
                bc1, bc2, bc3 = (1 - beta ** t for beta in (beta1, beta2, beta3))
                update = (m / bc1 + beta2 * d / bc2) / (v.sqrt() / math.sqrt(bc3) + group["eps"])
                if group["no_prox"]:
                    p.mul_(1 - lr * wd).sub_(lr * update)
                else:
                    p.sub_(lr * update).div_(1 + lr * wd)
                state["pre_grad"].copy_(g)


class LAMBReference(torch.optim.Optimizer):
    """LAMB (You et al. 2019, Algorithm 2), with the usual clamp of |w| as an option."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                 max_weight_norm=None, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, max_weight_norm=max_weight_norm,
                                      maximize=maximize))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.copy_(beta1 * m + (1 - beta1) * g)
                v.copy_(beta2 * v + (1 - beta2) * g * g)
                bc1 = 1 - beta1 ** t if group["bias_correction"] else 1.0
                bc2 = 1 - beta2 ** t if group["bias_correction"] else 1.0
                r = (m / bc1) / ((v / bc2).sqrt() + group["eps"]) + group["weight_decay"] * p
                w_norm, r_norm = p.norm().item(), r.norm().item()
                if group["max_weight_norm"] is not None:
                    w_norm = min(w_norm, group["max_weight_norm"])
                trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
                p.sub_(group["lr"] * trust * r)


class LARSReference(torch.optim.Optimizer):
    """LARS (You et al. 2017): momentum SGD with the local lr
    trust_coefficient * |w| / (|g| + wd * |w|); 1-D params optionally left out."""

    def __init__(self, params, lr=1.0, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                 trust_coefficient=0.001, exclude_1d=True, maximize=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, trust_coefficient=trust_coefficient,
                                      exclude_1d=exclude_1d, maximize=maximize))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                if not (group["exclude_1d"] and p.dim() <= 1):
                    wd = group["weight_decay"]
                    w_norm, g_norm = p.norm().item(), g.norm().item()
                    local_lr = (group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm)
                                if w_norm > 0 and g_norm > 0 else 1.0)
                    g = local_lr * (g + wd * p)
                if momentum != 0:
                    buf = self.state[p].get("momentum_buffer")
                    buf = g.clone() if buf is None else momentum * buf + (1 - group["dampening"]) * g
                    self.state[p]["momentum_buffer"] = buf
                    g = g + momentum * buf if group["nesterov"] else buf
                p.sub_(group["lr"] * g)
