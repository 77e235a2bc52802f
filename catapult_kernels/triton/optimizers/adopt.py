"""adopt_ in Triton (csrc/optimizers/adopt.h): one ADOPT step (Taniguchi et al. 2024).
t = 1: v = g^2 (m and p unchanged). t >= 2: p = p * (1 - lr * wd); ghat = clamp(g /
max(sqrt(v), eps), -(t-1)^(1/4), (t-1)^(1/4)); m = beta1 * m + (1 - beta1) * ghat;
p = p - lr * m; v = beta2 * v + (1 - beta2) * g^2."""
import triton
import triton.language as tl

from ..kernel_common import powf
from . import UpdateArgs


def launch_args(hyper: dict, n: int, device) -> UpdateArgs:
    return UpdateArgs(uses=0b11, reads=0b11,  # exp_avgs, exp_avg_sqs
                      scalars=(float(hyper["beta1"]), float(hyper["beta2"]), float(hyper["eps"]),
                               float(hyper["weight_decay"])))


@triton.jit
def constants(lr, t, factor, beta1, beta2, eps, weight_decay, h4, h5, F0, F1, F2, F3, INTERPRETED):
    # (t - 1)^(1/4); at t = 1 (unused: the first step only sets v) 1, not the interpreter's log(0)
    clip = powf(tl.maximum(t - 1.0, 1.0), tl.full([], 0.25, tl.float32), INTERPRETED)
    return lr, beta1, beta2, eps, 1.0 - lr * weight_decay, clip, t == 1.0


@triton.jit
def element(p, g, m, v, s2, s3, c, F0, F1, F2, F3):
    lr, beta1, beta2, eps, decay, clip, first = c
    new_p = p * decay
    sqrt_v = tl.sqrt_rn(v)
    ghat = tl.div_rn(g, tl.where(sqrt_v < eps, eps, sqrt_v))  # clamp_min (lanes.h): NaN stays NaN
    ghat = tl.where(ghat < -clip, -clip, ghat)
    ghat = tl.where(ghat > clip, clip, ghat)
    new_m = beta1 * m + (1.0 - beta1) * ghat
    new_p = new_p - lr * new_m
    new_v = beta2 * v + (1.0 - beta2) * g * g
    # first step (t == 1): only v is set
    return tl.where(first, p, new_p), tl.where(first, m, new_m), tl.where(first, g * g, new_v), s2, s3
