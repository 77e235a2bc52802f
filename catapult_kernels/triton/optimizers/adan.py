"""adan_ in Triton (csrc/optimizers/adan.h): one Adan step (Xie et al. 2022, as in its
authors' implementation). With bc_i = 1 - beta_i^t: diff = g - pre_grad (0 at t = 1);
m = b1 m + (1-b1) g; d = b2 d + (1-b2) diff; u = g + b2 diff; v = b3 v + (1-b3) u^2;
update = (m/bc1 + b2 d/bc2) / (sqrt(v)/sqrt(bc3) + eps); no_prox: p = p (1 - lr wd) -
lr update, else p = (p - lr update) / (1 + lr wd); pre_grad = g."""
import triton
import triton.language as tl

from ..kernel_common import powf
from . import UpdateArgs


def launch_args(hyper: dict, n: int, device) -> UpdateArgs:
    return UpdateArgs(uses=0b1111, reads=0b1111,  # exp_avgs, exp_avg_diffs, exp_avg_sqs, pre_grads
                      scalars=(float(hyper["beta1"]), float(hyper["beta2"]), float(hyper["beta3"]),
                               float(hyper["eps"]), float(hyper["weight_decay"])),
                      flags=(bool(hyper["no_prox"]),))


@triton.jit
def constants(lr, t, factor, beta1, beta2, beta3, eps, weight_decay, h5, NO_PROX, F1, F2, F3, INTERPRETED):
    bias_correction1 = 1.0 - powf(beta1, t, INTERPRETED)
    bias_correction2 = 1.0 - powf(beta2, t, INTERPRETED)
    bias_correction3_sqrt = tl.sqrt_rn(1.0 - powf(beta3, t, INTERPRETED))
    return (lr, beta1, beta2, beta3, eps, bias_correction1, bias_correction2, bias_correction3_sqrt,
            lr * weight_decay, t == 1.0)


@triton.jit
def element(p, g, m, d, v, pre_grad, c, NO_PROX, F1, F2, F3):
    lr, beta1, beta2, beta3, eps, bias_correction1, bias_correction2, bias_correction3_sqrt, weight_decay_lr, first = c
    diff = tl.where(first, 0.0, g - pre_grad)
    m = beta1 * m + (1.0 - beta1) * g
    d = beta2 * d + (1.0 - beta2) * diff
    u = g + beta2 * diff
    v = beta3 * v + (1.0 - beta3) * u * u
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction3_sqrt) + eps
    step = tl.div_rn(tl.div_rn(m, bias_correction1) + tl.div_rn(beta2 * d, bias_correction2), denom)
    if NO_PROX:
        p = p * (1.0 - weight_decay_lr) - lr * step
    else:
        p = tl.div_rn(p - lr * step, 1.0 + weight_decay_lr)
    return p, m, d, v, g
