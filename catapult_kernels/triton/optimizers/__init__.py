"""The Triton twins of the elementwise optimizer specs (csrc/optimizers/<name>.h, whose
contract is csrc/update_op.h): one module per C++ update op, named after it
(``adopt.py`` for ``adopt_``), found by that name when catapult_kernels.triton is
imported (elementwise_update.py runs it; nothing else lists the modules). A module holds
the op's math and nothing else, mirroring its spec operation for operation, in float32:

``launch_args(hyper: dict, n: int, device) -> UpdateArgs``
    From the op's own arguments (by schema name: those between lr and the grad
    pipeline) of a call over n params on ``device``: the spec's Params, variant, uses
    and reads. Checks what only it takes (trust_ratios).

``constants(lr, t, factor, h0, h1, h2, h3, h4, h5, F0, F1, F2, F3, INTERPRETED)``, @triton.jit
    The spec's Constants, once per program (per tensor): lr; t = state_steps[i] + 1
    (0 for an op without steps); ``factor``, element i of UpdateArgs.per_param (1 without
    one); the scalars (float32; a slot past UpdateArgs.scalars is 0) and flags (constexpr;
    a slot past UpdateArgs.flags is False), each named by position; INTERPRETED for
    kernel_common.powf. Returns a tuple, passed to ``element`` as ``c``.

``element(p, g, s0, s1, s2, s3, c, F0, F1, F2, F3)``, @triton.jit
    The spec's update on one block of elements, all float32: the param, the grad
    pipeline's output and the states (slot i: the op's i-th state list; 0 where the call
    does not read it, ignored where it does not use it). Returns (p, s0, s1, s2, s3),
    stored in the params' dtype (rounded to nearest even) where the call uses them.

The generic kernel compiles with enable_fp_fusion=False, so every operation rounds once,
as written: write each operation in the spec's order (Python's a * b * c is (a * b) * c,
as C's), and divide and take square roots with tl.div_rn and tl.sqrt_rn (what the CPU
and nvcc's default '/' and sqrtf give; Triton's '/' is approximate). powf: kernel_common.powf.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["UpdateArgs", "MAX_STATES", "MAX_SCALARS", "MAX_FLAGS"]

MAX_STATES = 4   # state slots of ``element``
MAX_SCALARS = 6  # h0 .. h5 of ``constants``
MAX_FLAGS = 4    # F0 .. F3


@dataclass(frozen=True)
class UpdateArgs:
    """What one call of an optimizer runs with (a module's launch_args)."""

    uses: int                       # bit i: the call reads or writes state list i (else it must be empty)
    reads: int                      # bit i: the call reads state list i (else element gets 0 for it)
    scalars: tuple = ()             # floats for h0, h1, ... (rounded to float32 in the kernel)
    flags: tuple = ()               # constexprs for F0, F1, ... (each a new compiled kernel)
    per_param: Optional[torch.Tensor] = None  # float32 [n]: ``factor`` of tensor i is per_param[i]
    reads_params: bool = True       # False: the first list is written only (p is 0 in element)
