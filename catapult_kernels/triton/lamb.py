"""catapult::lamb_triton_: one fused LAMB step over lists of tensors, in two passes.

Same schema and semantics as the C++ catapult::lamb_ (csrc/ops.cpp); the math
mirrors csrc/grad_pipeline.h and csrc/lamb_math.h operation for operation (the
grad pipeline, in kernel_common.py; lamb_step_constants, lamb_moments,
lamb_direction, lamb_trust_ratio), in float32, with correctly rounded division and
square root (tl.div_rn, tl.sqrt_rn), compiled with enable_fp_fusion=False so that
no a*b+c is contracted into an FMA (powf aside, as in adamw.py).

Three launches (the passes once per dtype group), no atomics and no host sync:
1. ``_lamb_kernel`` pass 1: each program runs the grad pipeline and lamb_moments over
   one chunk of one tensor and writes the chunk's sums of r^2 and p^2 into its slots
   of two partials buffers (one float64 per block of the multi-tensor plan: summed in
   float64, they are finite for any finite r and p, as multi_tensor_norm's);
2. ``_lamb_trust_kernel``: program i reduces tensor i's partials in a fixed order
   (multi_tensor_norm.reduce_segment, as the per-tensor norms there) into |r| and
   |p|, and writes its trust ratio;
3. ``_lamb_kernel`` pass 2: p = p - (lr * trust) * r, with pass 1's r bit for bit.
Where the new m and v live between the passes depends on the dtype, as in the CUDA
kernel: float32 stores them exactly, so pass 1 writes m, v (and the Grokfast ema)
and pass 2 recomputes r from p, m, v as stored. A 16-bit type would round them, and
an r recomputed from rounded moments is not the r the trust ratio was measured on
(v = 1e-8 is 0 in float16), so for 16-bit types pass 1 writes only its partials and
pass 2 runs the grad pipeline and lamb_moments again from the old state (the same
float32 operations, so the same r), then writes p, m, v (and the ema).
The partials depend only on the chunk size (update_sizes), so the norms, and so the
step, are the same run to run. found_inf nonzero: neither pass writes anything.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..ops import device_checked_fake
from .kernel_common import (UpdateLaunch, add_regularizer_lists, check_control_args, check_update_lists,
                            grad_pipeline_setup, pipeline_grad, powf, program_block, store_as)
from .multi_tensor_norm import reduce_block, reduce_segment
from .multi_tensor_table import (can_bypass_dispatcher, is_fake, keep_whole_under_functionalization,
                                 set_wrap_triton_enabled, tensor_ptr)


@triton.jit
def _lamb_direction(p, m, v, eps, weight_decay, bc1, bc2):
    # lamb_direction: (m / bc1) / (sqrtf(v / bc2) + eps) + weight_decay * p
    return tl.div_rn(tl.div_rn(m, bc1), tl.sqrt_rn(tl.div_rn(v, bc2)) + eps) + weight_decay * p


@triton.jit
def _lamb_block(p_ptr, g_ptr, m_ptr, v_ptr, ema_ptr, agc_ptr, row_len, start, idx, mask, mult, grokfast_alpha,
                grokfast_one_minus_alpha, grokfast_lamb, beta1, beta2, eps, weight_decay, bc1, bc2, lr_trust,
                DTYPE: tl.constexpr, PASS: tl.constexpr, AGC: tl.constexpr, GROKFAST: tl.constexpr,
                MAXIMIZE: tl.constexpr, INTERPRETED: tl.constexpr):
    """One block of either pass (see the module docstring); returns (r, p) for pass 1's sums."""
    p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    if PASS == 2 and DTYPE == tl.float32:
        # the new m, v as pass 1 stored them, exactly
        m = tl.load(m_ptr + idx, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + idx, mask=mask).to(tl.float32)
        r = _lamb_direction(p, m, v, eps, weight_decay, bc1, bc2)
    else:
        # the grad pipeline and lamb_moments from the old state; the new state is stored
        # by pass 1 for float32, by pass 2 for 16-bit types
        STORE: tl.constexpr = (PASS == 2) or (DTYPE == tl.float32)
        g = pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, mask, mult, grokfast_alpha,
                          grokfast_one_minus_alpha, grokfast_lamb, DTYPE, AGC, GROKFAST, MAXIMIZE, STORE, INTERPRETED)
        m = tl.load(m_ptr + idx, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + idx, mask=mask).to(tl.float32)
        m = beta1 * m + (1.0 - beta1) * g  # lamb_moments; one_minus_beta = 1.0f - beta, in float32
        v = beta2 * v + (1.0 - beta2) * g * g
        r = _lamb_direction(p, m, v, eps, weight_decay, bc1, bc2)
        if STORE:
            store_as(m_ptr + idx, m, mask, DTYPE, INTERPRETED)
            store_as(v_ptr + idx, v, mask, DTYPE, INTERPRETED)
    if PASS == 2:
        store_as(p_ptr + idx, p - lr_trust * r, mask, DTYPE, INTERPRETED)
    return r, p


@triton.jit
def _lamb_kernel(addrs, numels, blocks, row_lens, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr,
                 max_grad_norm, grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb,
                 r_partials, p_partials, trust_ptr, beta1, beta2, eps, weight_decay,
                 DTYPE: tl.constexpr, PASS: tl.constexpr, BIAS_CORRECTION: tl.constexpr, MAXIMIZE: tl.constexpr,
                 CLIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 AGC: tl.constexpr, GROKFAST: tl.constexpr, INTERPRETED: tl.constexpr,
                 ALIGNED: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return  # an overflowed step (GradScaler): write nothing
    # the float arguments in float32 (the interpreter passes Python floats as they are)
    beta1 = tl.cast(beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    # address table columns: p, g, m, v, step, then the regularizers' (kernel_common)
    row, start, n = program_block(numels, blocks, CHUNK)
    p_ptr = tensor_ptr(addrs, row, L, 0, DTYPE, ALIGNED) + start
    g_ptr = tensor_ptr(addrs, row, L, 1, DTYPE, ALIGNED) + start
    m_ptr = tensor_ptr(addrs, row, L, 2, DTYPE, ALIGNED) + start
    v_ptr = tensor_ptr(addrs, row, L, 3, DTYPE, ALIGNED) + start
    mult, ema_ptr, agc_ptr, row_len = grad_pipeline_setup(
        addrs, row, start, row_lens, grad_norm_ptr, grad_scale_ptr, max_grad_norm,
        DTYPE, CLIP, HAS_GRAD_SCALE, AGC, GROKFAST, ALIGNED, L)
    # lamb_step_constants (lamb_math.h)
    if BIAS_CORRECTION:
        step = tl.load(tensor_ptr(addrs, row, L, 4, tl.float32, False))
        bc1 = 1.0 - powf(beta1, step, INTERPRETED)
        bc2 = 1.0 - powf(beta2, step, INTERPRETED)
    else:
        bc1 = tl.full([], 1.0, tl.float32)
        bc2 = tl.full([], 1.0, tl.float32)
    if PASS == 2:
        lr_trust = tl.load(lr_ptr) * tl.load(trust_ptr + row)  # p - lr * trust * r = p - (lr * trust) * r
    else:
        lr_trust = bc1  # unused in pass 1

    offs = tl.arange(0, BLOCK)
    r_acc = tl.zeros([BLOCK], dtype=tl.float64)  # pass 1: sums of r^2 and p^2, lane by lane
    p_acc = tl.zeros([BLOCK], dtype=tl.float64)
    rem = n - start
    if rem >= CHUNK:
        # a full chunk: no masks, so loads and stores vectorize
        for full_off in tl.range(0, CHUNK, BLOCK):
            r, p = _lamb_block(p_ptr, g_ptr, m_ptr, v_ptr, ema_ptr, agc_ptr, row_len, start, full_off + offs, None,
                               mult, grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb, beta1, beta2, eps,
                               weight_decay, bc1, bc2, lr_trust, DTYPE, PASS, AGC, GROKFAST, MAXIMIZE, INTERPRETED)
            if PASS == 1:
                r64 = r.to(tl.float64)
                p64 = p.to(tl.float64)
                r_acc = r_acc + r64 * r64
                p_acc = p_acc + p64 * p64
    else:
        for tail_off in tl.range(0, rem, BLOCK):
            idx = tail_off + offs
            mask = idx < rem
            r, p = _lamb_block(p_ptr, g_ptr, m_ptr, v_ptr, ema_ptr, agc_ptr, row_len, start, idx, mask,
                               mult, grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb, beta1, beta2, eps,
                               weight_decay, bc1, bc2, lr_trust, DTYPE, PASS, AGC, GROKFAST, MAXIMIZE, INTERPRETED)
            if PASS == 1:
                r64 = tl.where(mask, r, 0.0).to(tl.float64)
                p64 = tl.where(mask, p, 0.0).to(tl.float64)
                r_acc = r_acc + r64 * r64
                p_acc = p_acc + p64 * p64
    if PASS == 1:
        pid = tl.program_id(0)
        tl.store(r_partials + pid, tl.sum(r_acc, 0))
        tl.store(p_partials + pid, tl.sum(p_acc, 0))


@triton.jit
def _lamb_trust_kernel(r_partials, p_partials, segments, trust_out, found_inf_ptr, max_weight_norm,
                       HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return  # pass 1 wrote no partials, and pass 2 writes nothing
    i = tl.program_id(0).to(tl.int64)
    # float64 sqrt (correctly rounded), then float32, as the C++ kernels
    r_norm = tl.sqrt(reduce_segment(r_partials, segments, i, False, BLOCK)).to(tl.float32)
    p_norm = tl.sqrt(reduce_segment(p_partials, segments, i, False, BLOCK)).to(tl.float32)
    # lamb_trust_ratio (lamb_math.h)
    max_norm = tl.cast(max_weight_norm, tl.float32)
    w = tl.where((max_norm > 0.0) & (p_norm > max_norm), max_norm, p_norm)
    tl.store(trust_out + i, tl.where((w > 0.0) & (r_norm > 0.0), tl.div_rn(w, r_norm), 1.0))


def _lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay, bias_correction,
          max_weight_norm, maximize, grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas,
          grokfast_alpha, grokfast_lamb) -> None:
    """The body of catapult::lamb_triton_: checks (check_lamb_args), then pass 1 per dtype
    group, the trust ratios, and pass 2 per dtype group."""
    others = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    agc_rows = add_regularizer_lists("lamb_triton_", params, agc_scales, grokfast_emas, others)
    check_update_lists(params, others, state_steps)
    device = params[0].device if params else lr.device
    check_control_args("lamb_triton_", lr, grad_norm, max_grad_norm, grad_scale, found_inf, device)
    if not params or is_fake(params[0], grads[0], exp_avgs[0], lr):
        return  # nothing to do, or tracing with tensors that carry no data
    run = UpdateLaunch(_lamb_kernel, params, [params, grads, exp_avgs, exp_avg_sqs, state_steps], 4, lr, grad_norm,
                       max_grad_norm, grad_scale, found_inf, maximize, agc_scales, agc_rows, grokfast_emas,
                       grokfast_alpha, grokfast_lamb)
    plan = run.plan
    if plan.n_blocks == 0:
        return
    partials = torch.empty((2, plan.n_blocks), dtype=torch.float64, device=device)  # r^2 and p^2 per block
    trust = torch.empty((len(params),), dtype=torch.float32, device=device)
    args = dict(trust_ptr=trust, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                weight_decay=float(weight_decay), BIAS_CORRECTION=bool(bias_correction))
    group_partials = lambda begin: dict(r_partials=partials[0, begin:], p_partials=partials[1, begin:])  # noqa: E731
    run.launch(_lamb_kernel, per_group=group_partials, PASS=1, **args)
    wrap_triton(_lamb_trust_kernel)[(len(params),)](
        partials[0], partials[1], plan.segments, trust, run.table["found_inf_ptr"], float(max_weight_norm),
        HAS_FOUND_INF=run.table["HAS_FOUND_INF"], BLOCK=reduce_block(run.interpreted), num_warps=4)
    run.launch(_lamb_kernel, per_group=group_partials, PASS=2, **args)


@triton_op("catapult::lamb_triton_", mutates_args={"params", "exp_avgs", "exp_avg_sqs", "grokfast_emas"})
def lamb_triton_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], state_steps: list[torch.Tensor], lr: torch.Tensor, beta1: float,
                 beta2: float, eps: float, weight_decay: float, bias_correction: bool, max_weight_norm: float,
                 maximize: bool, grad_norm: Optional[torch.Tensor], max_grad_norm: float,
                 grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                 agc_scales: list[torch.Tensor], grokfast_emas: list[torch.Tensor], grokfast_alpha: float,
                 grokfast_lamb: float) -> None:
    _lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay, bias_correction,
          max_weight_norm, maximize, grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas,
          grokfast_alpha, grokfast_lamb)


def lamb_triton_eager(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
                      bias_correction, max_weight_norm, maximize, grad_norm, max_grad_norm, grad_scale, found_inf,
                      agc_scales, grokfast_emas, grokfast_alpha, grokfast_lamb) -> None:
    """torch.ops.catapult.lamb_triton_ without the dispatcher, for eager steps (see
    adamw.adamw_triton_eager); falls back to the op whenever that matters."""
    args = (params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay, bias_correction,
            max_weight_norm, maximize, grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas,
            grokfast_alpha, grokfast_lamb)
    if not can_bypass_dispatcher([*params[:1], *grads[:1], *grokfast_emas[:1], lr]):
        return torch.ops.catapult.lamb_triton_(*args)
    with set_wrap_triton_enabled(False):  # launch the kernels directly, as the op's backend does
        _lamb(*args)
    torch._C._increment_version(list(params) + list(exp_avgs) + list(exp_avg_sqs) + list(grokfast_emas))


lamb_triton_.register_fake(device_checked_fake("lamb_triton_"))


keep_whole_under_functionalization(lamb_triton_)
