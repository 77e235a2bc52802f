"""muon_update_ in Triton (csrc/optimizers/muon_update.h): Muon's step from the
orthogonalized update u (the grads): p = fma(u, -lr ratio, p (1 - lr weight_decay)), one
lr ratio per param (lr_ratios), the factors in float64 from the float32 lr, weight decay
and ratio, then rounded."""
import triton
import triton.language as tl

from ..kernel_common import fma
from ..multi_tensor_table import is_interpreted
from . import UpdateArgs


def launch_args(hyper: dict, n: int, device) -> UpdateArgs:
    # INTERPRETED (element has no such argument of its own) picks kernel_common.fma's interpreter path
    return UpdateArgs(uses=0, reads=0, scalars=(float(hyper["weight_decay"]),), flags=(is_interpreted(fma),),
                      per_param="lr_ratios")


@triton.jit
def constants(lr, t, ratio, weight_decay, h1, h2, h3, h4, h5, F0, F1, F2, F3, INTERPRETED):
    lr64 = lr.to(tl.float64)
    return (1.0 - lr64 * weight_decay.to(tl.float64)).to(tl.float32), (-(lr64 * ratio.to(tl.float64))).to(tl.float32)


@triton.jit
def element(p, u, s0, s1, s2, s3, c, INTERPRETED, F1, F2, F3):
    decay, step = c
    p = fma(u, step, p * decay, INTERPRETED)
    return p, s0, s1, s2, s3
