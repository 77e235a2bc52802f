"""sgd_ in Triton (csrc/optimizers/sgd.h): one SGD step (torch.optim.SGD's formula), and
LARS's update with trust_ratios (g = trust * (g + weight_decay * p))."""
import triton
import triton.language as tl  # noqa: F401  (the interpreter wants it beside every @triton.jit)

from ..kernel_common import nonzero_as_float32
from . import UpdateArgs


def launch_args(hyper: dict, n: int, device) -> UpdateArgs:
    weight_decay = float(hyper["weight_decay"])
    momentum = float(hyper["momentum"]) != 0.0  # the spec's variant: in double, as torch.optim.SGD
    first_step = momentum and bool(hyper["first_step"])
    uses = 0b1 if momentum else 0b0  # momentum_buffers
    return UpdateArgs(uses=uses, reads=0b0 if first_step else uses,
                      # 1 - dampening in double, then rounded: the alpha torch.optim.SGD passes to add_
                      scalars=(float(hyper["momentum"]), 1.0 - float(hyper["dampening"]), weight_decay),
                      flags=(momentum, momentum and bool(hyper["nesterov"]), first_step,
                             nonzero_as_float32(weight_decay)),  # DECAY: the spec's c.weight_decay != 0.0f
                      per_param="trust_ratios")


@triton.jit
def constants(lr, t, trust, momentum, one_minus_dampening, weight_decay, h3, h4, h5, MOMENTUM, NESTEROV, FIRST_STEP,
              DECAY, INTERPRETED):
    return lr, momentum, one_minus_dampening, weight_decay, trust  # trust: 1 without trust_ratios


@triton.jit
def element(p, g, buf, s1, s2, s3, c, MOMENTUM, NESTEROV, FIRST_STEP, DECAY):
    lr, momentum, one_minus_dampening, weight_decay, trust = c
    if DECAY:
        g = g + weight_decay * p  # coupled L2, as torch
    g = trust * g
    if MOMENTUM:
        if FIRST_STEP:
            buf = g  # new buffers: set to the step's grad, never read
        else:
            buf = momentum * buf + one_minus_dampening * g
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    return p, buf, s1, s2, s3
