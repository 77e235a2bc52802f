"""catapult::multi_tensor_norm_triton: the 2- or inf-norm of many tensors at once.

Same contract as the C++ catapult::multi_tensor_norm (csrc/ops.cpp):
(tensors, ord, per_tensor) -> (total: 0-d float32, per-tensor: float32 [n] or [0]).

Two kernels, no atomics, so the result is deterministic:
1. ``_norm_partials_kernel``, one launch per dtype group: each program reduces one
   chunk of one tensor (sum of squares, or max |x|) into its slot of a partials
   buffer (one float64 per block of the multi-tensor plan);
2. ``_norm_reduce_kernel``: program i reduces the partials of tensor i, in a fixed
   order, into per_tensor[i]; program n reduces all partials into the total.
The total is computed from the partials in the same order whether or not
per-tensor norms are asked for, so both calls give the same bits.
Squares are summed in float64: every float32 square fits one, so any finite input
gives a finite sum and tiny inputs do not vanish (a float32 sum overflows at one
element of 2e19), as in the C++ kernels (csrc/cuda/block_reduce.cuh).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..layout import SUPPORTED_DTYPES, is_dense
from ..op_contract import device_checked_fake, norm_fake_outputs
from .multi_tensor_table import (TL_DTYPE, address_table, can_bypass_dispatcher, check_runnable, get_plan, is_fake,
                                 is_interpreted, keep_whole_under_functionalization, set_wrap_triton_enabled,
                                 tensor_ptr)



@triton.jit
def _max_nan(a, b):
    # max that propagates NaN (tl.max alone compiles to a NaN-dropping max on GPUs)
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _accumulate(acc, x, IS_INF: tl.constexpr):
    if IS_INF:
        return _max_nan(acc, tl.abs(x))
    else:
        x = x.to(tl.float64)
        return acc + x * x


@triton.jit
def _finish(acc, IS_INF: tl.constexpr):
    if IS_INF:
        return tl.reduce(acc, 0, _max_nan)
    else:
        return tl.sum(acc, 0)


@triton.jit
def _norm_partials_kernel(addrs, numels, blocks, partials,
                          DTYPE: tl.constexpr, IS_INF: tl.constexpr, ALIGNED: tl.constexpr,
                          BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(blocks + 2 * pid)
    start = tl.multiple_of(tl.load(blocks + 2 * pid + 1), CHUNK)
    n = tl.load(numels + row)
    x_ptr = tensor_ptr(addrs, row, 1, 0, DTYPE, ALIGNED) + start
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32 if IS_INF else tl.float64)
    rem = n - start
    if rem >= CHUNK:
        # a full chunk: no masks, so loads vectorize
        for full_off in tl.range(0, CHUNK, BLOCK):
            x = tl.load(x_ptr + full_off + offs).to(tl.float32)
            acc = _accumulate(acc, x, IS_INF)
    else:
        for tail_off in tl.range(0, rem, BLOCK):
            idx = tail_off + offs
            x = tl.load(x_ptr + idx, mask=idx < rem, other=0.0).to(tl.float32)
            acc = _accumulate(acc, x, IS_INF)
    tl.store(partials + pid, _finish(acc, IS_INF))


@triton.jit
def reduce_segment(partials, segments, i, IS_INF: tl.constexpr, BLOCK: tl.constexpr):
    """The float64 partials of blocks [segments[i, 0], segments[i, 1]) (tensor i's; row n:
    all) reduced in a fixed order: summed, or for IS_INF max'ed with NaN propagating."""
    begin = tl.load(segments + 2 * i)
    end = tl.load(segments + 2 * i + 1)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for off in tl.range(begin, end, BLOCK):
        idx = off + offs
        x = tl.load(partials + idx, mask=idx < end, other=0.0)
        if IS_INF:
            acc = _max_nan(acc, x)
        else:
            acc = acc + x
    return _finish(acc, IS_INF)


@triton.jit
def _norm_reduce_kernel(partials, segments, total_out, per_tensor_out, n_tensors, first,
                        IS_INF: tl.constexpr, BLOCK: tl.constexpr):
    i = first + tl.program_id(0).to(tl.int64)
    r = reduce_segment(partials, segments, i, IS_INF, BLOCK)
    if not IS_INF:
        r = tl.sqrt(r)  # float64: correctly rounded (sqrt.rn.f64), as C++'s sqrt(double)
    r = r.to(tl.float32)
    tl.store(per_tensor_out + i, r, mask=i < n_tensors)
    tl.store(total_out, r, mask=i == n_tensors)


def _sizes(dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, num_warps) of the partials kernel. CHUNK (elements per program)
    fixes the partials and so the summation order: it depends on nothing but the mode,
    so results are reproducible run to run and process to process (no autotuning)."""
    if interpreted:
        return 256, 1024, 4  # small blocks so that small test tensors still take the loops
    # Measured on an H100 with float32 accumulation (100M elements in 100 tensors, kernel
    # alone): float32 100% and bfloat16 94% of the d2d copy roof (torch._foreach_norm: 49%
    # and 17%); BLOCK 2048-8192 and CHUNK 1-4x BLOCK were within a few percent. The float64
    # accumulation that keeps any finite norm finite has not been timed on a GPU yet.
    return 2048, 8192, 4


def reduce_block(interpreted: bool) -> int:
    """BLOCK of reduce_segment's kernels."""
    return 128 if interpreted else 1024


def _check(tensors, ord) -> torch.device:
    if ord not in (2.0, math.inf):
        raise RuntimeError(f"catapult: multi_tensor_norm_triton supports ord 2 or inf, got ord={ord}")
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            raise RuntimeError(f"catapult: tensors[{i}] has dtype {t.dtype}; supported: float32, bfloat16, float16")
        if t.device != device:
            raise RuntimeError(f"catapult: tensors[{i}] is on {t.device} but tensors[0] is on {device}")
    return device


def _multi_tensor_norm(tensors, ord, per_tensor):
    """The body of catapult::multi_tensor_norm_triton."""
    ord = float(ord)
    if not tensors:
        if ord not in (2.0, math.inf):
            raise RuntimeError(f"catapult: multi_tensor_norm_triton supports ord 2 or inf, got ord={ord}")
        return torch.zeros((), dtype=torch.float32), torch.zeros((0,), dtype=torch.float32)
    device = _check(tensors, ord)
    if is_fake(tensors[0]):
        return norm_fake_outputs(tensors, ord, per_tensor)
    interpreted = is_interpreted(_norm_partials_kernel)
    check_runnable(device, _norm_partials_kernel)
    is_inf = ord == math.inf
    n = len(tensors)
    tensors = [t if is_dense(t) else t.contiguous() for t in tensors]
    keys = [t.dtype for t in tensors]
    sizes = {dt: _sizes(dt, interpreted) for dt in set(keys)}
    plan = get_plan(device, [t.numel() for t in tensors], keys, {dt: s[1] for dt, s in sizes.items()})
    total = torch.empty((), dtype=torch.float32, device=device)
    per = torch.empty((n if per_tensor else 0,), dtype=torch.float32, device=device)
    partials = torch.empty((max(plan.n_blocks, 1),), dtype=torch.float64, device=device)
    if plan.n_blocks:
        addrs, aligned = address_table([tensors], device)
        for dt, begin, end, chunk in plan.groups:
            if end == begin:
                continue
            block, _, warps = sizes[dt]
            wrap_triton(_norm_partials_kernel)[(end - begin,)](
                addrs, plan.numels, plan.group_blocks(begin), partials[begin:],
                DTYPE=TL_DTYPE[dt], IS_INF=is_inf, ALIGNED=aligned[0], BLOCK=block, CHUNK=chunk,
                num_warps=warps)
    grid = (n + 1,) if per_tensor else (1,)
    wrap_triton(_norm_reduce_kernel)[grid](
        partials, plan.segments, total, per if per_tensor else total, n, 0 if per_tensor else n,
        IS_INF=is_inf, BLOCK=reduce_block(interpreted), num_warps=4)
    return total, per


@triton_op("catapult::multi_tensor_norm_triton", mutates_args=())
def multi_tensor_norm_triton(tensors: list[torch.Tensor], ord: float,
                             per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _multi_tensor_norm(tensors, ord, per_tensor)


def multi_tensor_norm_triton_eager(tensors, ord: float = 2.0, per_tensor: bool = False):
    """torch.ops.catapult.multi_tensor_norm_triton without the dispatcher for eager calls
    (its Python layers cost per tensor); falls back to the op whenever that matters
    (torch.compile, dispatch modes, subclasses, autograd)."""
    tensors = list(tensors)
    if not can_bypass_dispatcher(tensors[:1]):
        return torch.ops.catapult.multi_tensor_norm_triton(tensors, float(ord), bool(per_tensor))
    with set_wrap_triton_enabled(False):  # launch the kernels directly, as the op's backend does
        return _multi_tensor_norm(tensors, ord, per_tensor)


multi_tensor_norm_triton.register_fake(device_checked_fake("multi_tensor_norm_triton", norm_fake_outputs))


keep_whole_under_functionalization(multi_tensor_norm_triton)
