"""catapult::lion_triton_: one fused Lion step over lists of tensors.

Same schema and semantics as the C++ catapult::lion_ (csrc/ops.cpp); the math
mirrors csrc/grad_pipeline.h and csrc/lion_math.h operation for operation (the
grad pipeline, in kernel_common.py; sign_of, lion_element), in float32, compiled
with enable_fp_fusion=False so that no a*b+c is contracted into an FMA: every
operation rounds once, as written, so the compiled kernel, the interpreter and a
plain float32 evaluation of lion_math.h agree bit for bit.

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
from torch.library import triton_op

from ..ops import device_checked_fake
from .kernel_common import (UpdateLaunch, add_regularizer_lists, check_control_args, check_update_lists,
                            grad_pipeline_setup, pipeline_grad, program_block, store_as)
from .multi_tensor_table import (can_bypass_dispatcher, is_fake, keep_whole_under_functionalization,
                                 set_wrap_triton_enabled, tensor_ptr)


@triton.jit
def _lion_block(p_ptr, g, m_ptr, idx, mask, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    # lion_element of lion_math.h, same order of operations, float32; g is the grad
    # pipeline's output
    p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=mask).to(tl.float32)
    c = beta1 * m + one_minus_beta1 * g
    p = p * decay
    # sign_of: c > 0 ? 1 : (c < 0 ? -1 : c), so 0 stays 0 and NaN stays NaN (torch.sign)
    p = p - lr * tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, c))
    m = beta2 * m + one_minus_beta2 * g
    store_as(p_ptr + idx, p, mask, DTYPE, INTERPRETED)
    store_as(m_ptr + idx, m, mask, DTYPE, INTERPRETED)


@triton.jit
def _lion_kernel(addrs, numels, blocks, row_lens, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr,
                 max_grad_norm, grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb,
                 beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay,
                 DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, CLIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                 HAS_FOUND_INF: tl.constexpr, AGC: tl.constexpr, GROKFAST: tl.constexpr,
                 INTERPRETED: tl.constexpr, ALIGNED: tl.constexpr, L: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return  # an overflowed step (GradScaler): write nothing
    # the float arguments in float32 (the interpreter passes Python floats as they are)
    beta1 = tl.cast(beta1, tl.float32)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    # address table columns: p, g, m, then the regularizers' (kernel_common)
    row, start, n = program_block(numels, blocks, CHUNK)
    p_ptr = tensor_ptr(addrs, row, L, 0, DTYPE, ALIGNED) + start
    g_ptr = tensor_ptr(addrs, row, L, 1, DTYPE, ALIGNED) + start
    m_ptr = tensor_ptr(addrs, row, L, 2, DTYPE, ALIGNED) + start
    mult, ema_ptr, agc_ptr, row_len = grad_pipeline_setup(
        addrs, row, start, row_lens, grad_norm_ptr, grad_scale_ptr, max_grad_norm,
        DTYPE, CLIP, HAS_GRAD_SCALE, AGC, GROKFAST, ALIGNED, L)
    lr = tl.load(lr_ptr)
    decay = 1.0 - lr * weight_decay  # LionStep's decay, decoupled

    offs = tl.arange(0, BLOCK)
    rem = n - start
    if rem >= CHUNK:
        # a full chunk: no masks, so loads and stores vectorize
        for full_off in tl.range(0, CHUNK, BLOCK):
            idx = full_off + offs
            g = pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, None, mult, grokfast_alpha,
                              grokfast_one_minus_alpha, grokfast_lamb, DTYPE, AGC, GROKFAST, MAXIMIZE, True,
                              INTERPRETED)
            _lion_block(p_ptr, g, m_ptr, idx, None, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                        DTYPE, INTERPRETED)
    else:
        for tail_off in tl.range(0, rem, BLOCK):
            idx = tail_off + offs
            mask = idx < rem
            g = pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, mask, mult, grokfast_alpha,
                              grokfast_one_minus_alpha, grokfast_lamb, DTYPE, AGC, GROKFAST, MAXIMIZE, True,
                              INTERPRETED)
            _lion_block(p_ptr, g, m_ptr, idx, mask, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                        DTYPE, INTERPRETED)


def _lion(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize, grad_norm, max_grad_norm,
          grad_scale, found_inf, agc_scales, grokfast_emas, grokfast_alpha, grokfast_lamb) -> None:
    """The body of catapult::lion_triton_: checks (check_lion_args), then one launch per dtype group."""
    others = [("grads", grads), ("exp_avgs", exp_avgs)]
    agc_rows = add_regularizer_lists("lion_triton_", params, agc_scales, grokfast_emas, others)
    check_update_lists(params, others)
    device = params[0].device if params else lr.device
    check_control_args("lion_triton_", lr, grad_norm, max_grad_norm, grad_scale, found_inf, device)
    if not params or is_fake(params[0], grads[0], exp_avgs[0], lr):
        return  # nothing to do, or tracing with tensors that carry no data
    lists = [params, grads, exp_avgs]
    run = UpdateLaunch(_lion_kernel, params, lists, len(lists), lr, grad_norm, max_grad_norm, grad_scale,
                       found_inf, maximize, agc_scales, agc_rows, grokfast_emas, grokfast_alpha, grokfast_lamb)
    # 1 - beta in double, then rounded, as torch's alpha arguments (LionStep)
    run.launch(_lion_kernel, beta1=float(beta1), one_minus_beta1=float(1.0 - beta1), beta2=float(beta2),
               one_minus_beta2=float(1.0 - beta2), weight_decay=float(weight_decay))


@triton_op("catapult::lion_triton_", mutates_args={"params", "exp_avgs", "grokfast_emas"})
def lion_triton_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 lr: torch.Tensor, beta1: float, beta2: float, weight_decay: float, maximize: bool,
                 grad_norm: Optional[torch.Tensor], max_grad_norm: float, grad_scale: Optional[torch.Tensor],
                 found_inf: Optional[torch.Tensor], agc_scales: list[torch.Tensor],
                 grokfast_emas: list[torch.Tensor], grokfast_alpha: float, grokfast_lamb: float) -> None:
    _lion(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize, grad_norm, max_grad_norm, grad_scale,
          found_inf, agc_scales, grokfast_emas, grokfast_alpha, grokfast_lamb)


def lion_triton_eager(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize, grad_norm, max_grad_norm,
                      grad_scale, found_inf, agc_scales, grokfast_emas, grokfast_alpha, grokfast_lamb) -> None:
    """torch.ops.catapult.lion_triton_ without the dispatcher, for eager steps (see
    adamw.adamw_triton_eager); falls back to the op whenever that matters."""
    args = (params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize, grad_norm, max_grad_norm, grad_scale,
            found_inf, agc_scales, grokfast_emas, grokfast_alpha, grokfast_lamb)
    if not can_bypass_dispatcher([*params[:1], *grads[:1], *grokfast_emas[:1], lr]):
        return torch.ops.catapult.lion_triton_(*args)
    with set_wrap_triton_enabled(False):  # launch the kernels directly, as the op's backend does
        _lion(*args)
    torch._C._increment_version(list(params) + list(exp_avgs) + list(grokfast_emas))


lion_triton_.register_fake(device_checked_fake("lion_triton_"))


keep_whole_under_functionalization(lion_triton_)
