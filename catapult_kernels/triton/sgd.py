"""catapult::sgd_triton_: one fused SGD step over lists of tensors.

Same schema and semantics as the C++ catapult::sgd_ (csrc/ops.cpp); the math
mirrors csrc/grad_pipeline.h and csrc/sgd_math.h operation for operation (the
grad pipeline, in kernel_common.py; sgd_element), in float32, compiled with
enable_fp_fusion=False so that no a*b+c is contracted into an FMA: every
operation rounds once, as written, so the compiled kernel, the interpreter and a
plain float32 evaluation of sgd_math.h agree bit for bit.

Without momentum, momentum_buffers is empty and is not in the address table at
all: a program reads p and g and writes p (12 B/param in float32). With momentum,
the first step (first_step) writes the buffers without reading them. LARS's
trust_ratios (one float32 per param) are read by the kernel, one per program.

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
                            grad_pipeline_setup, nonzero_as_float32, pipeline_grad, program_block, store_as)
from .multi_tensor_table import (can_bypass_dispatcher, is_fake, keep_whole_under_functionalization,
                                 set_wrap_triton_enabled, tensor_ptr)


@triton.jit
def _sgd_block(p_ptr, g, buf_ptr, idx, mask, lr, momentum, one_minus_dampening, weight_decay, trust,
               DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
               DECAY: tl.constexpr, TRUST: tl.constexpr, INTERPRETED: tl.constexpr):
    # sgd_element of sgd_math.h, same order of operations, float32; g is the grad
    # pipeline's output
    p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    if DECAY:
        g = g + weight_decay * p  # coupled L2, as torch
    if TRUST:
        g = trust * g  # LARS; without trust ratios trust is 1, and 1 * g == g
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
def _sgd_kernel(addrs, numels, blocks, row_lens, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr,
                max_grad_norm, grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb,
                trust_ptr, momentum, one_minus_dampening, weight_decay,
                DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                FIRST_STEP: tl.constexpr, DECAY: tl.constexpr, TRUST: tl.constexpr, MAXIMIZE: tl.constexpr,
                CLIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                AGC: tl.constexpr, GROKFAST: tl.constexpr, INTERPRETED: tl.constexpr, ALIGNED: tl.constexpr,
                L: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return  # an overflowed step (GradScaler): write nothing
    # the float arguments in float32 (the interpreter passes Python floats as they are)
    momentum = tl.cast(momentum, tl.float32)
    one_minus_dampening = tl.cast(one_minus_dampening, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    # address table columns: p, g, [buf,] then the regularizers' (kernel_common)
    row, start, n = program_block(numels, blocks, CHUNK)
    p_ptr = tensor_ptr(addrs, row, L, 0, DTYPE, ALIGNED) + start
    g_ptr = tensor_ptr(addrs, row, L, 1, DTYPE, ALIGNED) + start
    if MOMENTUM:
        buf_ptr = tensor_ptr(addrs, row, L, 2, DTYPE, ALIGNED) + start
    else:
        buf_ptr = p_ptr  # no buffers, not in the table: never read nor written
    mult, ema_ptr, agc_ptr, row_len = grad_pipeline_setup(
        addrs, row, start, row_lens, grad_norm_ptr, grad_scale_ptr, max_grad_norm,
        DTYPE, CLIP, HAS_GRAD_SCALE, AGC, GROKFAST, ALIGNED, L)
    lr = tl.load(lr_ptr)
    if TRUST:
        trust = tl.load(trust_ptr + row)
    else:
        trust = lr  # no trust ratios: never used

    offs = tl.arange(0, BLOCK)
    rem = n - start
    if rem >= CHUNK:
        # a full chunk: no masks, so loads and stores vectorize
        for full_off in tl.range(0, CHUNK, BLOCK):
            idx = full_off + offs
            g = pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, None, mult, grokfast_alpha,
                              grokfast_one_minus_alpha, grokfast_lamb, DTYPE, AGC, GROKFAST, MAXIMIZE, True,
                              INTERPRETED)
            _sgd_block(p_ptr, g, buf_ptr, idx, None, lr, momentum, one_minus_dampening, weight_decay, trust,
                       DTYPE, MOMENTUM, NESTEROV, FIRST_STEP, DECAY, TRUST, INTERPRETED)
    else:
        for tail_off in tl.range(0, rem, BLOCK):
            idx = tail_off + offs
            mask = idx < rem
            g = pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, mask, mult, grokfast_alpha,
                              grokfast_one_minus_alpha, grokfast_lamb, DTYPE, AGC, GROKFAST, MAXIMIZE, True,
                              INTERPRETED)
            _sgd_block(p_ptr, g, buf_ptr, idx, mask, lr, momentum, one_minus_dampening, weight_decay, trust,
                       DTYPE, MOMENTUM, NESTEROV, FIRST_STEP, DECAY, TRUST, INTERPRETED)


def _check_trust_ratios(trust_ratios: Optional[torch.Tensor], n: int, device: torch.device) -> None:
    """check_sgd_args' check of trust_ratios (csrc/multi_tensor_checks.h)."""
    if trust_ratios is None:
        return
    t = trust_ratios
    if not (t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous() and t.numel() == n):
        raise RuntimeError(f"catapult: sgd_triton_: trust_ratios must be a contiguous float32 tensor of {n} "
                           f"elements (one per param), got {t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        raise RuntimeError(f"catapult: sgd_triton_: trust_ratios is on {t.device} but the params are on {device}")


def _sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
         first_step, trust_ratios, grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas,
         grokfast_alpha, grokfast_lamb) -> None:
    """The body of catapult::sgd_triton_: checks (check_sgd_args), then one launch per dtype group."""
    use_momentum = momentum != 0.0  # check_sgd_args' test: momentum_buffers given iff momentum != 0
    others = [("grads", grads)]
    if use_momentum:
        others.append(("momentum_buffers", momentum_buffers))
    elif len(momentum_buffers) != 0:
        raise RuntimeError("catapult: sgd_triton_: momentum_buffers must be empty when momentum is 0 "
                           f"(got {len(momentum_buffers)} tensors)")
    agc_rows = add_regularizer_lists("sgd_triton_", params, agc_scales, grokfast_emas, others)
    check_update_lists(params, others)
    device = params[0].device if params else lr.device
    check_control_args("sgd_triton_", lr, grad_norm, max_grad_norm, grad_scale, found_inf, device)
    _check_trust_ratios(trust_ratios, len(params), device)
    if not params or is_fake(params[0], grads[0], momentum_buffers[0] if use_momentum else None, lr):
        return  # nothing to do, or tracing with tensors that carry no data
    lists = [params, grads] + ([momentum_buffers] if use_momentum else [])
    run = UpdateLaunch(_sgd_kernel, params, lists, len(lists), lr, grad_norm, max_grad_norm, grad_scale,
                       found_inf, maximize, agc_scales, agc_rows, grokfast_emas, grokfast_alpha, grokfast_lamb)
    run.launch(
        _sgd_kernel, trust_ptr=trust_ratios if trust_ratios is not None else lr,  # lr: a placeholder, never read
        # 1 - dampening in double, then rounded: the alpha torch.optim.SGD passes to add_
        momentum=float(momentum), one_minus_dampening=float(1.0 - dampening), weight_decay=float(weight_decay),
        MOMENTUM=use_momentum, NESTEROV=bool(nesterov) and use_momentum, FIRST_STEP=bool(first_step) and use_momentum,
        DECAY=nonzero_as_float32(float(weight_decay)),  # sgd_element's weight_decay != 0.0f
        TRUST=trust_ratios is not None)


@triton_op("catapult::sgd_triton_", mutates_args={"params", "momentum_buffers", "grokfast_emas"})
def sgd_triton_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                lr: torch.Tensor, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                maximize: bool, first_step: bool, trust_ratios: Optional[torch.Tensor],
                grad_norm: Optional[torch.Tensor], max_grad_norm: float, grad_scale: Optional[torch.Tensor],
                found_inf: Optional[torch.Tensor], agc_scales: list[torch.Tensor],
                grokfast_emas: list[torch.Tensor], grokfast_alpha: float, grokfast_lamb: float) -> None:
    _sgd(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
         first_step, trust_ratios, grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas,
         grokfast_alpha, grokfast_lamb)


def sgd_triton_eager(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                     maximize, first_step, trust_ratios, grad_norm, max_grad_norm, grad_scale, found_inf,
                     agc_scales, grokfast_emas, grokfast_alpha, grokfast_lamb) -> None:
    """torch.ops.catapult.sgd_triton_ without the dispatcher, for eager steps.

    Same arguments and effect. Going through the dispatcher costs a few microseconds
    per tensor in Python (torch.library's version-counter bumps and alias checks,
    list by list), which dominates a step over thousands of small tensors; this
    calls the implementation directly and bumps the version counters in one C++
    call. Under torch.compile, a dispatch mode (fake tensors, tracing) or autograd
    it falls back to the op, so it is always safe to call."""
    args = (params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
            first_step, trust_ratios, grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas,
            grokfast_alpha, grokfast_lamb)
    if not can_bypass_dispatcher([*params[:1], *grads[:1], *momentum_buffers[:1], *grokfast_emas[:1], lr]):
        return torch.ops.catapult.sgd_triton_(*args)
    with set_wrap_triton_enabled(False):  # launch the kernels directly, as the op's backend does
        _sgd(*args)
    torch._C._increment_version(list(params) + list(momentum_buffers) + list(grokfast_emas))


sgd_triton_.register_fake(device_checked_fake("sgd_triton_"))


keep_whole_under_functionalization(sgd_triton_)
