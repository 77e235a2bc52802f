"""lion_ in Triton (csrc/optimizers/lion.h): one Lion step (Chen et al. 2023, Algorithm 2):
p = p * (1 - lr * wd); p = p - lr * sign(beta1 * m + (1 - beta1) * g); m = beta2 * m + (1 - beta2) * g."""
import triton
import triton.language as tl

from . import UpdateArgs


def launch_args(hyper: dict, n: int, device) -> UpdateArgs:
    beta1, beta2 = float(hyper["beta1"]), float(hyper["beta2"])
    # 1 - beta in double, then rounded, as the reference's alpha arguments
    return UpdateArgs(uses=0b1, reads=0b1,
                      scalars=(beta1, 1.0 - beta1, beta2, 1.0 - beta2, float(hyper["weight_decay"])))


@triton.jit
def constants(lr, t, factor, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, h5, F0, F1, F2, F3,
              INTERPRETED):
    return lr, beta1, one_minus_beta1, beta2, one_minus_beta2, 1.0 - lr * weight_decay


@triton.jit
def element(p, g, m, s1, s2, s3, c, F0, F1, F2, F3):
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay = c
    direction = beta1 * m + one_minus_beta1 * g
    p = p * decay
    # sign_of (lanes.h): 1, -1, or the value itself (0, -0, NaN): a NaN is not hidden
    p = p - lr * tl.where(direction > 0.0, 1.0, tl.where(direction < 0.0, -1.0, direction))
    m = beta2 * m + one_minus_beta2 * g
    return p, m, s1, s2, s3
