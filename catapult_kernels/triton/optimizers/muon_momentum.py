"""muon_momentum_ in Triton (csrc/optimizers/muon_momentum.h): Muon's momentum, written
into ``out``: buf = lerp(buf, g, 1 - momentum); out = lerp(g, buf, momentum) with
nesterov, else buf; torch's lerp, fused: fma(w, b - a, a) for |w| < 0.5, else
fma(-(b - a), 1 - w, b)."""
import triton
import triton.language as tl

from ..kernel_common import fma
from ..multi_tensor_table import is_interpreted
from . import UpdateArgs


def launch_args(hyper: dict, n: int, device) -> UpdateArgs:
    momentum = float(hyper["momentum"])
    # 1 - momentum in double, then rounded: the weight torch passes to lerp_. INTERPRETED
    # (element has no such argument of its own) picks kernel_common.fma's interpreter path.
    return UpdateArgs(uses=0b1, reads=0b1, scalars=(1.0 - momentum, momentum),
                      flags=(bool(hyper["nesterov"]), is_interpreted(fma)), reads_params=False)


@triton.jit
def constants(lr, t, factor, weight, momentum, h2, h3, h4, h5, NESTEROV, F1, F2, F3, INTERPRETED):
    return weight, 1.0 - weight, momentum, 1.0 - momentum


@triton.jit
def _lerp(a, b, w, one_minus_w, INTERPRETED: tl.constexpr):
    small = (w < 0.5) & (w > -0.5)  # one weight per call: every element takes one branch
    return tl.where(small, fma(w, b - a, a, INTERPRETED), fma(-(b - a), one_minus_w, b, INTERPRETED))


@triton.jit
def element(out, g, buf, s1, s2, s3, c, NESTEROV, INTERPRETED, F2, F3):
    weight, one_minus_weight, momentum, one_minus_momentum = c
    buf = _lerp(buf, g, weight, one_minus_weight, INTERPRETED)
    if NESTEROV:
        out = _lerp(g, buf, momentum, one_minus_momentum, INTERPRETED)
    else:
        out = buf
    return out, buf, s1, s2, s3
