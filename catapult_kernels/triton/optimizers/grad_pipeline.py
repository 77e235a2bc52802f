"""grad_pipeline_ in Triton (csrc/optimizers/grad_pipeline.h): the grad pipeline alone, its
output written into ``out`` (laid out like the grads, in their dtype); lr is not read."""
import triton
import triton.language as tl  # noqa: F401  (the interpreter wants it beside every @triton.jit)

from . import UpdateArgs


def launch_args(hyper: dict, n: int, device) -> UpdateArgs:
    return UpdateArgs(uses=0, reads=0, reads_params=False)


@triton.jit
def constants(lr, t, factor, h0, h1, h2, h3, h4, h5, F0, F1, F2, F3, INTERPRETED):
    return lr  # nothing: element takes no constants


@triton.jit
def element(out, g, s0, s1, s2, s3, c, F0, F1, F2, F3):
    return g, s0, s1, s2, s3
