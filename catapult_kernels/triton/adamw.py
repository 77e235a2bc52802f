"""catapult::adamw_triton_: one fused AdamW step over lists of tensors.

Same schema and semantics as the C++ catapult::adamw_ (csrc/ops.cpp): AdamW, or
with decoupled_weight_decay false Adam's coupled L2 (g = g + weight_decay * p, and
no decay of p). The math mirrors csrc/grad_pipeline.h and csrc/adamw_math.h
operation for operation (the grad pipeline, in kernel_common.py;
adamw_step_constants, adamw_element), in float32, with correctly rounded division
and square root (tl.div_rn, tl.sqrt_rn: what nvcc's default '/' and sqrtf give),
compiled with enable_fp_fusion=False so that no a*b+c is contracted into an FMA:
every operation rounds once, as written, so the compiled kernel, the interpreter
and a plain float32 evaluation of adamw_math.h agree bit for bit (powf aside:
libdevice's __nv_powf compiled, float64 exp/log under the interpreter).

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
from torch.library import triton_op

from ..ops import device_checked_fake
from .kernel_common import (UpdateLaunch, add_regularizer_lists, check_control_args, check_update_lists,
                            grad_pipeline_setup, nonzero_as_float32, pipeline_grad, powf, program_block, store_as)
from .multi_tensor_table import (can_bypass_dispatcher, is_fake, keep_whole_under_functionalization,
                                 set_wrap_triton_enabled, tensor_ptr)


@triton.jit
def _adamw_block(p_ptr, g, m_ptr, v_ptr, vmax_ptr, idx, mask, decay, l2, beta1, beta2, eps, step_size, bc2_sqrt,
                 DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, L2: tl.constexpr,
                 INTERPRETED: tl.constexpr):
    # adamw_element of adamw_math.h, same order of operations, float32; g is the grad
    # pipeline's output
    p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask).to(tl.float32)
    if L2:
        g = g + l2 * p  # coupled (Adam): s.l2 != 0
    if DECOUPLED:
        p = p * decay  # coupled: decay is 1, and p * 1 == p
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
def _adamw_kernel(addrs, numels, blocks, row_lens, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr,
                  max_grad_norm, grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb,
                  beta1, beta2, eps, weight_decay,
                  DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, L2: tl.constexpr,
                  MAXIMIZE: tl.constexpr, CLIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  HAS_FOUND_INF: tl.constexpr, AGC: tl.constexpr, GROKFAST: tl.constexpr,
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
    # address table columns: p, g, m, v, [vmax,] step, then the regularizers' (kernel_common)
    row, start, n = program_block(numels, blocks, CHUNK)
    p_ptr = tensor_ptr(addrs, row, L, 0, DTYPE, ALIGNED) + start
    g_ptr = tensor_ptr(addrs, row, L, 1, DTYPE, ALIGNED) + start
    m_ptr = tensor_ptr(addrs, row, L, 2, DTYPE, ALIGNED) + start
    v_ptr = tensor_ptr(addrs, row, L, 3, DTYPE, ALIGNED) + start
    vmax_ptr = tensor_ptr(addrs, row, L, 4, DTYPE, ALIGNED) + start  # vmax when AMSGRAD, else unused
    step = tl.load(tensor_ptr(addrs, row, L, 4 + AMSGRAD, tl.float32, False))
    mult, ema_ptr, agc_ptr, row_len = grad_pipeline_setup(
        addrs, row, start, row_lens, grad_norm_ptr, grad_scale_ptr, max_grad_norm,
        DTYPE, CLIP, HAS_GRAD_SCALE, AGC, GROKFAST, ALIGNED, L)

    # adamw_step_constants (adamw_math.h)
    lr = tl.load(lr_ptr)
    decay = 1.0 - lr * weight_decay
    step_size = tl.div_rn(lr, 1.0 - powf(beta1, step, INTERPRETED))
    bc2_sqrt = tl.sqrt_rn(1.0 - powf(beta2, step, INTERPRETED))

    offs = tl.arange(0, BLOCK)
    rem = n - start
    if rem >= CHUNK:
        # a full chunk: no masks, so loads and stores vectorize
        for full_off in tl.range(0, CHUNK, BLOCK):
            idx = full_off + offs
            g = pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, None, mult, grokfast_alpha,
                              grokfast_one_minus_alpha, grokfast_lamb, DTYPE, AGC, GROKFAST, MAXIMIZE, True,
                              INTERPRETED)
            _adamw_block(p_ptr, g, m_ptr, v_ptr, vmax_ptr, idx, None, decay, weight_decay, beta1, beta2, eps,
                         step_size, bc2_sqrt, DTYPE, AMSGRAD, DECOUPLED, L2, INTERPRETED)
    else:
        for tail_off in tl.range(0, rem, BLOCK):
            idx = tail_off + offs
            mask = idx < rem
            g = pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, mask, mult, grokfast_alpha,
                              grokfast_one_minus_alpha, grokfast_lamb, DTYPE, AGC, GROKFAST, MAXIMIZE, True,
                              INTERPRETED)
            _adamw_block(p_ptr, g, m_ptr, v_ptr, vmax_ptr, idx, mask, decay, weight_decay, beta1, beta2, eps,
                         step_size, bc2_sqrt, DTYPE, AMSGRAD, DECOUPLED, L2, INTERPRETED)


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
           weight_decay, decoupled_weight_decay, amsgrad, maximize, grad_norm, max_grad_norm, grad_scale,
           found_inf, agc_scales, grokfast_emas, grokfast_alpha, grokfast_lamb) -> None:
    """The body of catapult::adamw_triton_: checks (check_adamw_args), then one launch per dtype group."""
    others = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    if amsgrad:
        others.append(("max_exp_avg_sqs", max_exp_avg_sqs))
    agc_rows = add_regularizer_lists("adamw_triton_", params, agc_scales, grokfast_emas, others)
    check_update_lists(params, others, state_steps)
    device = params[0].device if params else lr.device
    check_control_args("adamw_triton_", lr, grad_norm, max_grad_norm, grad_scale, found_inf, device)
    if not params or is_fake(params[0], grads[0], exp_avgs[0], lr):
        return  # nothing to do, or tracing with tensors that carry no data
    element_lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    run = UpdateLaunch(_adamw_kernel, params, element_lists + [state_steps], len(element_lists), lr, grad_norm,
                       max_grad_norm, grad_scale, found_inf, maximize, agc_scales, agc_rows, grokfast_emas,
                       grokfast_alpha, grokfast_lamb)
    decoupled = bool(decoupled_weight_decay)
    run.launch(_adamw_kernel, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
               weight_decay=float(weight_decay), AMSGRAD=bool(amsgrad), DECOUPLED=decoupled,
               L2=not decoupled and nonzero_as_float32(float(weight_decay)))  # adamw_element's s.l2 != 0.0f


@triton_op("catapult::adamw_triton_",
           mutates_args={"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "grokfast_emas"})
def adamw_triton_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                  state_steps: list[torch.Tensor], lr: torch.Tensor, beta1: float, beta2: float,
                  eps: float, weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
                  grad_norm: Optional[torch.Tensor], max_grad_norm: float,
                  grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                  agc_scales: list[torch.Tensor], grokfast_emas: list[torch.Tensor], grokfast_alpha: float,
                  grokfast_lamb: float) -> None:
    _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
           weight_decay, decoupled_weight_decay, amsgrad, maximize, grad_norm, max_grad_norm, grad_scale,
           found_inf, agc_scales, grokfast_emas, grokfast_alpha, grokfast_lamb)


def adamw_triton_eager(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                       beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, grad_norm,
                       max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas, grokfast_alpha,
                       grokfast_lamb) -> None:
    """torch.ops.catapult.adamw_triton_ without the dispatcher, for eager steps.

    Same arguments and effect. Going through the dispatcher costs a few microseconds
    per tensor in Python (torch.library's version-counter bumps and alias checks,
    list by list), which dominates a step over thousands of small tensors; this
    calls the implementation directly and bumps the version counters in one C++
    call. Under torch.compile, a dispatch mode (fake tensors, tracing) or autograd
    it falls back to the op, so it is always safe to call."""
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
            weight_decay, decoupled_weight_decay, amsgrad, maximize, grad_norm, max_grad_norm, grad_scale,
            found_inf, agc_scales, grokfast_emas, grokfast_alpha, grokfast_lamb)
    if not can_bypass_dispatcher([*params[:1], *grads[:1], *grokfast_emas[:1], lr]):
        return torch.ops.catapult.adamw_triton_(*args)
    with set_wrap_triton_enabled(False):  # launch the kernels directly, as the op's backend does
        _adamw(*args)
    mutated = (list(params) + list(exp_avgs) + list(exp_avg_sqs) + (list(max_exp_avg_sqs) if amsgrad else [])
               + list(grokfast_emas))
    torch._C._increment_version(mutated)


adamw_triton_.register_fake(device_checked_fake("adamw_triton_"))


keep_whole_under_functionalization(adamw_triton_)
