"""catapult::sgd_triton_: one fused SGD step over lists of tensors.

Same schema and semantics as the C++ catapult::sgd_ (csrc/ops.cpp); the math
mirrors csrc/grad_pipeline.h and csrc/sgd_math.h operation for operation
(grad_multiplier, in kernel_common.py; sgd_element), in float32, compiled with
enable_fp_fusion=False so that no a*b+c is contracted into an FMA: every
operation rounds once, as written, so the compiled kernel, the interpreter and a
plain float32 evaluation of sgd_math.h agree bit for bit.

Without momentum, momentum_buffers is empty and is not in the address table at
all: a program reads p and g and writes p (12 B/param in float32). With momentum,
the first step (first_step) writes the buffers without reading them.

One launch per dtype group covers all the tensors of the group through the
multi-tensor tables (multi_tensor_table.py); each program updates one chunk of
one tensor. Nothing is read on the host: lr, grad_norm, grad_scale and found_inf
are read by the kernel, so a step costs no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .kernel_common import check_control_args, check_update_lists, dtype_group_plan, grad_multiplier, store_as
from .multi_tensor_table import (TL_DTYPE, address_table, can_bypass_dispatcher, check_runnable, is_fake,
                                 is_interpreted, keep_whole_under_functionalization, set_wrap_triton_enabled,
                                 tensor_ptr)


@triton.jit
def _sgd_block(p_ptr, g_ptr, buf_ptr, idx, mask, mult, lr, momentum, one_minus_dampening, weight_decay,
               DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               FIRST_STEP: tl.constexpr, DECAY: tl.constexpr, INTERPRETED: tl.constexpr):
    # sgd_element of sgd_math.h, same order of operations, float32
    p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask).to(tl.float32) * mult
    if DECAY:
        g = g + weight_decay * p  # coupled L2, as torch
    if MOMENTUM:
        if FIRST_STEP:
            buf = g  # new buffers: set to the step's grad, never read
        else:
            buf = tl.load(buf_ptr + idx, mask=mask).to(tl.float32)
            buf = momentum * buf + one_minus_dampening * g
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
        store_as(buf_ptr + idx, buf, mask, DTYPE, INTERPRETED)
    p = p - lr * g
    store_as(p_ptr + idx, p, mask, DTYPE, INTERPRETED)


@triton.jit
def _sgd_kernel(addrs, numels, blocks, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr,
                momentum, one_minus_dampening, weight_decay, max_grad_norm,
                DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                FIRST_STEP: tl.constexpr, DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
                CLIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                INTERPRETED: tl.constexpr, ALIGNED: tl.constexpr, L: tl.constexpr,
                BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return  # an overflowed step (GradScaler): write nothing
    # the float arguments in float32 (the interpreter passes Python floats as they are)
    momentum = tl.cast(momentum, tl.float32)
    one_minus_dampening = tl.cast(one_minus_dampening, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    # address table rows: p, g[, buf]  (L = 2, or 3 with momentum)
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(blocks + 2 * pid)
    start = tl.multiple_of(tl.load(blocks + 2 * pid + 1), CHUNK)
    n = tl.load(numels + row)
    p_ptr = tensor_ptr(addrs, row, L, 0, DTYPE, ALIGNED) + start
    g_ptr = tensor_ptr(addrs, row, L, 1, DTYPE, ALIGNED) + start
    if MOMENTUM:
        buf_ptr = tensor_ptr(addrs, row, L, 2, DTYPE, ALIGNED) + start
    else:
        buf_ptr = p_ptr  # no buffers, not in the table: never read nor written

    mult = grad_multiplier(grad_norm_ptr, grad_scale_ptr, max_grad_norm, CLIP, HAS_GRAD_SCALE, MAXIMIZE)
    lr = tl.load(lr_ptr)

    offs = tl.arange(0, BLOCK)
    rem = n - start
    if rem >= CHUNK:
        # a full chunk: no masks, so loads and stores vectorize
        for full_off in tl.range(0, CHUNK, BLOCK):
            _sgd_block(p_ptr, g_ptr, buf_ptr, full_off + offs, None, mult, lr, momentum, one_minus_dampening,
                       weight_decay, DTYPE, MOMENTUM, NESTEROV, FIRST_STEP, DECAY, INTERPRETED)
    else:
        for tail_off in tl.range(0, rem, BLOCK):
            idx = tail_off + offs
            _sgd_block(p_ptr, g_ptr, buf_ptr, idx, idx < rem, mult, lr, momentum, one_minus_dampening,
                       weight_decay, DTYPE, MOMENTUM, NESTEROV, FIRST_STEP, DECAY, INTERPRETED)


def _nonzero_as_float32(x: float) -> bool:
    """float(x) rounded to float32 != 0, without a tensor: |x| <= 2**-150 rounds to
    zero (2**-150 is halfway to the least subnormal and ties to even); NaN is nonzero."""
    return not abs(x) <= 2.0 ** -150


def _sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
         first_step, grad_norm, max_grad_norm, grad_scale, found_inf) -> None:
    """The body of catapult::sgd_triton_: checks (check_sgd_args), then one launch per dtype group."""
    use_momentum = momentum != 0.0  # check_sgd_args' test: momentum_buffers given iff momentum != 0
    if use_momentum:
        check_update_lists(params, [("grads", grads), ("momentum_buffers", momentum_buffers)])
    else:
        if len(momentum_buffers) != 0:
            raise RuntimeError("catapult: sgd_triton_: momentum_buffers must be empty when momentum is 0 "
                               f"(got {len(momentum_buffers)} tensors)")
        check_update_lists(params, [("grads", grads)])
    device = params[0].device if params else lr.device
    check_control_args("sgd_triton_", lr, grad_norm, max_grad_norm, grad_scale, found_inf, device)
    if not params or is_fake(params[0], grads[0], momentum_buffers[0] if use_momentum else None, lr):
        return  # nothing to do, or tracing with tensors that carry no data
    check_runnable(device, _sgd_kernel)
    interpreted = is_interpreted(_sgd_kernel)

    plan, sizes = dtype_group_plan(params, device, interpreted)
    if plan.n_blocks == 0:
        return
    lists = [params, grads] + ([momentum_buffers] if use_momentum else [])
    addrs, aligned = address_table(lists, device)
    aligned = all(aligned)
    clip = max_grad_norm > 0.0
    dummy = lr  # stands for the optional tensors that are absent (never read)
    for dt, begin, end, chunk in plan.groups:
        if end == begin:
            continue
        block, _, warps = sizes[dt]
        wrap_triton(_sgd_kernel)[(end - begin,)](
            addrs, plan.numels, plan.group_blocks(begin), lr,
            grad_norm if clip else dummy,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            # 1 - dampening in double, then rounded: the alpha torch.optim.SGD passes to add_
            float(momentum), float(1.0 - dampening), float(weight_decay), float(max_grad_norm),
            DTYPE=TL_DTYPE[dt], MOMENTUM=use_momentum, NESTEROV=bool(nesterov) and use_momentum,
            FIRST_STEP=bool(first_step) and use_momentum,
            DECAY=_nonzero_as_float32(float(weight_decay)),  # sgd_element's weight_decay != 0.0f
            MAXIMIZE=bool(maximize), CLIP=clip, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, INTERPRETED=interpreted, ALIGNED=aligned, L=len(lists),
            BLOCK=block, CHUNK=chunk, num_warps=warps, enable_fp_fusion=False)


@triton_op("catapult::sgd_triton_", mutates_args={"params", "momentum_buffers"})
def sgd_triton_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                lr: torch.Tensor, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                maximize: bool, first_step: bool, grad_norm: Optional[torch.Tensor], max_grad_norm: float,
                grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
    _sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
         first_step, grad_norm, max_grad_norm, grad_scale, found_inf)


def sgd_triton_eager(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                     maximize, first_step, grad_norm=None, max_grad_norm=0.0, grad_scale=None,
                     found_inf=None) -> None:
    """torch.ops.catapult.sgd_triton_ without the dispatcher, for eager steps.

    Same arguments and effect. Going through the dispatcher costs a few microseconds
    per tensor in Python (torch.library's version-counter bumps and alias checks,
    list by list), which dominates a step over thousands of small tensors; this
    calls the implementation directly and bumps the version counters in one C++
    call. Under torch.compile, a dispatch mode (fake tensors, tracing) or autograd
    it falls back to the op, so it is always safe to call."""
    args = (params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
            first_step, grad_norm, max_grad_norm, grad_scale, found_inf)
    if not can_bypass_dispatcher([*params[:1], *grads[:1], *momentum_buffers[:1], lr]):
        return torch.ops.catapult.sgd_triton_(*args)
    with set_wrap_triton_enabled(False):  # launch the kernels directly, as the op's backend does
        _sgd(*args)
    torch._C._increment_version(list(params) + list(momentum_buffers))


@sgd_triton_.register_fake
def _(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
      first_step, grad_norm, max_grad_norm, grad_scale, found_inf):
    return None


keep_whole_under_functionalization(sgd_triton_)
