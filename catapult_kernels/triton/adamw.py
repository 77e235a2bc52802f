"""catapult::adamw_triton_: one fused AdamW step over lists of tensors.

Same schema and semantics as the C++ catapult::adamw_ (csrc/ops.cpp); the math
mirrors csrc/grad_pipeline.h and csrc/adamw_math.h operation for operation
(grad_multiplier, in kernel_common.py; adamw_step_constants, adamw_element), in
float32, with correctly rounded division and square root (tl.div_rn, tl.sqrt_rn:
what nvcc's default '/' and sqrtf give), compiled with enable_fp_fusion=False so
that no a*b+c is contracted into an FMA: every operation rounds once, as written,
so the compiled kernel, the interpreter and a plain float32 evaluation of
adamw_math.h agree bit for bit (powf aside: libdevice's __nv_powf compiled,
float64 exp/log under the interpreter).

One launch per dtype group covers all the tensors of the group through the
multi-tensor tables (multi_tensor_table.py); each program updates one chunk of
one tensor, with the step constants of that tensor's own state_steps entry.
Nothing is read on the host: lr, grad_norm, grad_scale, found_inf and the steps
are read by the kernel, so a step costs no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra import libdevice

from .kernel_common import check_control_args, check_update_lists, dtype_group_plan, grad_multiplier, store_as
from .multi_tensor_table import (TL_DTYPE, address_table, can_bypass_dispatcher, check_runnable, is_fake,
                                 is_interpreted, keep_whole_under_functionalization, set_wrap_triton_enabled,
                                 tensor_ptr)


@triton.jit
def _powf(base, exponent, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        # the interpreter has no libdevice: powf through float64, rounded once
        b = base.to(tl.float64)
        e = exponent.to(tl.float64)
        return tl.exp(e * tl.log(b)).to(tl.float32)
    else:
        return libdevice.pow(base, exponent)  # __nv_powf, as the CUDA kernel's powf


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, idx, mask, mult, decay, beta1, beta2,
                 eps, step_size, bc2_sqrt, DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                 INTERPRETED: tl.constexpr):
    # adamw_element of adamw_math.h, same order of operations, float32
    p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask).to(tl.float32) * mult
    m = tl.load(m_ptr + idx, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask).to(tl.float32)
    p = p * decay
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + idx, mask=mask).to(tl.float32)
        vmax = tl.where(vmax > v, vmax, v)  # vmax > v ? vmax : v (NaN v wins, as in C++)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
        store_as(vmax_ptr + idx, vmax, mask, DTYPE, INTERPRETED)
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    store_as(p_ptr + idx, p, mask, DTYPE, INTERPRETED)
    store_as(m_ptr + idx, m, mask, DTYPE, INTERPRETED)
    store_as(v_ptr + idx, v, mask, DTYPE, INTERPRETED)


@triton.jit
def _adamw_kernel(addrs, numels, blocks, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr,
                  beta1, beta2, eps, weight_decay, max_grad_norm,
                  DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                  CLIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                  INTERPRETED: tl.constexpr, ALIGNED: tl.constexpr, L: tl.constexpr,
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return  # an overflowed step (GradScaler): write nothing
    # the float arguments in float32 (the interpreter passes Python floats as they are)
    beta1 = tl.cast(beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    # address table rows: p, g, m, v, [vmax,] step  (L = 5 or 6)
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(blocks + 2 * pid)
    start = tl.multiple_of(tl.load(blocks + 2 * pid + 1), CHUNK)
    n = tl.load(numels + row)
    p_ptr = tensor_ptr(addrs, row, L, 0, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(addrs, row, L, 1, DTYPE, ALIGNED)
    m_ptr = tensor_ptr(addrs, row, L, 2, DTYPE, ALIGNED)
    v_ptr = tensor_ptr(addrs, row, L, 3, DTYPE, ALIGNED)
    vmax_ptr = tensor_ptr(addrs, row, L, L - 2, DTYPE, ALIGNED)  # vmax when AMSGRAD, else unused
    step = tl.load(tensor_ptr(addrs, row, L, L - 1, tl.float32, False))
    p_ptr += start
    g_ptr += start
    m_ptr += start
    v_ptr += start
    vmax_ptr += start

    mult = grad_multiplier(grad_norm_ptr, grad_scale_ptr, max_grad_norm, CLIP, HAS_GRAD_SCALE, MAXIMIZE)

    # adamw_step_constants (adamw_math.h)
    lr = tl.load(lr_ptr)
    decay = 1.0 - lr * weight_decay
    step_size = tl.div_rn(lr, 1.0 - _powf(beta1, step, INTERPRETED))
    bc2_sqrt = tl.sqrt_rn(1.0 - _powf(beta2, step, INTERPRETED))

    offs = tl.arange(0, BLOCK)
    rem = n - start
    if rem >= CHUNK:
        # a full chunk: no masks, so loads and stores vectorize
        for full_off in tl.range(0, CHUNK, BLOCK):
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, full_off + offs, None, mult, decay,
                         beta1, beta2, eps, step_size, bc2_sqrt, DTYPE, AMSGRAD, INTERPRETED)
    else:
        for tail_off in tl.range(0, rem, BLOCK):
            idx = tail_off + offs
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, idx, idx < rem, mult, decay,
                         beta1, beta2, eps, step_size, bc2_sqrt, DTYPE, AMSGRAD, INTERPRETED)


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
           weight_decay, amsgrad, maximize, grad_norm, max_grad_norm, grad_scale, found_inf) -> None:
    """The body of catapult::adamw_triton_: checks, then one launch per dtype group."""
    others = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    if amsgrad:
        others.append(("max_exp_avg_sqs", max_exp_avg_sqs))
    check_update_lists(params, others, state_steps)
    device = params[0].device if params else lr.device
    check_control_args("adamw_triton_", lr, grad_norm, max_grad_norm, grad_scale, found_inf, device)
    if not params or is_fake(params[0], grads[0], exp_avgs[0], lr):
        return  # nothing to do, or tracing with tensors that carry no data
    check_runnable(device, _adamw_kernel)
    interpreted = is_interpreted(_adamw_kernel)

    plan, sizes = dtype_group_plan(params, device, interpreted)
    if plan.n_blocks == 0:
        return
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else []) + [state_steps]
    addrs, aligned = address_table(lists, device)
    aligned = all(aligned[:-1])  # the element lists (a step is read as one float)
    clip = max_grad_norm > 0.0
    dummy = lr  # stands for the optional tensors that are absent (never read)
    for dt, begin, end, chunk in plan.groups:
        if end == begin:
            continue
        block, _, warps = sizes[dt]
        wrap_triton(_adamw_kernel)[(end - begin,)](
            addrs, plan.numels, plan.group_blocks(begin), lr,
            grad_norm if clip else dummy,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            float(beta1), float(beta2), float(eps), float(weight_decay), float(max_grad_norm),
            DTYPE=TL_DTYPE[dt], AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), CLIP=clip,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            INTERPRETED=interpreted, ALIGNED=aligned, L=len(lists), BLOCK=block, CHUNK=chunk,
            num_warps=warps, enable_fp_fusion=False)


@triton_op("catapult::adamw_triton_", mutates_args={"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"})
def adamw_triton_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                  state_steps: list[torch.Tensor], lr: torch.Tensor, beta1: float, beta2: float,
                  eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                  grad_norm: Optional[torch.Tensor], max_grad_norm: float,
                  grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
    _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
           weight_decay, amsgrad, maximize, grad_norm, max_grad_norm, grad_scale, found_inf)


def adamw_triton_eager(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                       beta2, eps, weight_decay, amsgrad, maximize, grad_norm=None, max_grad_norm=0.0,
                       grad_scale=None, found_inf=None) -> None:
    """torch.ops.catapult.adamw_triton_ without the dispatcher, for eager steps.

    Same arguments and effect. Going through the dispatcher costs a few microseconds
    per tensor in Python (torch.library's version-counter bumps and alias checks,
    list by list), which dominates a step over thousands of small tensors; this
    calls the implementation directly and bumps the version counters in one C++
    call. Under torch.compile, a dispatch mode (fake tensors, tracing) or autograd
    it falls back to the op, so it is always safe to call."""
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
            weight_decay, amsgrad, maximize, grad_norm, max_grad_norm, grad_scale, found_inf)
    if not can_bypass_dispatcher([*params[:1], *grads[:1], lr]):
        return torch.ops.catapult.adamw_triton_(*args)
    with set_wrap_triton_enabled(False):  # launch the kernels directly, as the op's backend does
        _adamw(*args)
    mutated = list(params) + list(exp_avgs) + list(exp_avg_sqs) + (list(max_exp_avg_sqs) if amsgrad else [])
    torch._C._increment_version(mutated)


@adamw_triton_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
      weight_decay, amsgrad, maximize, grad_norm, max_grad_norm, grad_scale, found_inf):
    return None


keep_whole_under_functionalization(adamw_triton_)
