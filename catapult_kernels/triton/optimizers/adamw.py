"""adamw_ in Triton (csrc/optimizers/adamw.h): one Adam or AdamW step (torch.optim.AdamW's
formula; with decoupled_weight_decay false, torch.optim.Adam's coupled L2), with amsgrad."""
import triton
import triton.language as tl

from ..kernel_common import nonzero_as_float32, powf
from . import UpdateArgs


def launch_args(hyper: dict, n: int, device) -> UpdateArgs:
    amsgrad, decoupled = bool(hyper["amsgrad"]), bool(hyper["decoupled_weight_decay"])
    weight_decay = float(hyper["weight_decay"])
    uses = 0b111 if amsgrad else 0b011  # exp_avgs, exp_avg_sqs[, max_exp_avg_sqs]
    return UpdateArgs(uses=uses, reads=uses,
                      scalars=(float(hyper["beta1"]), float(hyper["beta2"]), float(hyper["eps"]), weight_decay),
                      # L2: the spec's c.l2 != 0.0f
                      flags=(amsgrad, decoupled, not decoupled and nonzero_as_float32(weight_decay)))


@triton.jit
def constants(lr, t, factor, beta1, beta2, eps, weight_decay, h4, h5, AMSGRAD, DECOUPLED, L2, F3, INTERPRETED):
    decay = 1.0 - lr * weight_decay  # used when DECOUPLED (the spec's decay is 1 otherwise)
    step_size = tl.div_rn(lr, 1.0 - powf(beta1, t, INTERPRETED))
    bias_correction2_sqrt = tl.sqrt_rn(1.0 - powf(beta2, t, INTERPRETED))
    return beta1, beta2, eps, decay, weight_decay, step_size, bias_correction2_sqrt


@triton.jit
def element(p, g, m, v, vmax, s3, c, AMSGRAD, DECOUPLED, L2, F3):
    beta1, beta2, eps, decay, l2, step_size, bias_correction2_sqrt = c
    if L2:
        g = g + l2 * p
    if DECOUPLED:
        p = p * decay  # coupled: decay is 1, and p * 1 == p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    if AMSGRAD:
        vmax = tl.where(vmax > v, vmax, v)  # NaN v wins
        denom = tl.div_rn(tl.sqrt_rn(vmax), bias_correction2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    return p, m, v, vmax, s3
