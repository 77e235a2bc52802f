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
step, are the same run to run. Then one launch advances the step counts
(kernel_common.UpdateLaunch.advance_steps): t = state_steps[i] + 1 in the math, t
written back. skip nonzero: nothing at all is written, step counts included.

Registered (``register``) with the registration helper of the elementwise ops
(op_registration.py), with the C++ lamb_'s schema.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .kernel_common import (GradPipeline, UpdateLaunch, add_regularizer_lists, check_control_args,
                            check_update_lists, grad_pipeline_setup, pipeline_grad, powf, program_block, store_as)
from .multi_tensor_norm import reduce_block, reduce_segment
from .multi_tensor_table import is_fake, tensor_ptr
from .op_registration import register_update_op


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
def _lamb_kernel(addrs, numels, blocks, row_lens, lr_ptr, grad_norm_ptr, grad_scale_ptr, skip_ptr,
                 max_grad_norm, grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb,
                 r_partials, p_partials, trust_ptr, beta1, beta2, eps, weight_decay,
                 DTYPE: tl.constexpr, PASS: tl.constexpr, BIAS_CORRECTION: tl.constexpr, MAXIMIZE: tl.constexpr,
                 CLIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr,
                 AGC: tl.constexpr, GROKFAST: tl.constexpr, INTERPRETED: tl.constexpr, ALIGNED: tl.constexpr,
                 STEP_COL: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0.0:
            return  # a skipped step (GradScaler's inf, skip_nonfinite): write nothing
    # the float arguments in float32 (the interpreter passes Python floats as they are)
    beta1 = tl.cast(beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    # address table columns: p, g, m, v, step (STEP_COL), then the regularizers' (kernel_common)
    row, start, n = program_block(numels, blocks, CHUNK)
    p_ptr = tensor_ptr(addrs, row, L, 0, DTYPE, ALIGNED) + start
    g_ptr = tensor_ptr(addrs, row, L, 1, DTYPE, ALIGNED) + start
    m_ptr = tensor_ptr(addrs, row, L, 2, DTYPE, ALIGNED) + start
    v_ptr = tensor_ptr(addrs, row, L, 3, DTYPE, ALIGNED) + start
    mult, ema_ptr, agc_ptr, row_len = grad_pipeline_setup(
        addrs, row, start, row_lens, grad_norm_ptr, grad_scale_ptr, max_grad_norm,
        DTYPE, CLIP, HAS_GRAD_SCALE, AGC, GROKFAST, ALIGNED, L)
    # lamb_step_constants (lamb_math.h), with t = step + 1
    if BIAS_CORRECTION:
        t = tl.load(tensor_ptr(addrs, row, L, STEP_COL, tl.float32, False)) + 1.0
        bc1 = 1.0 - powf(beta1, t, INTERPRETED)
        bc2 = 1.0 - powf(beta2, t, INTERPRETED)
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
def _lamb_trust_kernel(r_partials, p_partials, segments, trust_out, skip_ptr, max_weight_norm,
                       HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0.0:
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
          max_weight_norm, *pipeline_and_storage) -> None:
    """The body of catapult::lamb_triton_: checks (check_lamb_args), then pass 1 per dtype
    group, the trust ratios, pass 2 per dtype group, and the step counts."""
    *pipeline_args, state_scales, master_weights = pipeline_and_storage
    pipeline = GradPipeline(*pipeline_args)
    if len(state_scales) or len(master_weights):
        raise RuntimeError("catapult: lamb_triton_: int8 states and master weights are not built for the Triton "
                           "LAMB kernel yet")
    others = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    agc_rows = add_regularizer_lists("lamb_triton_", params, pipeline.agc_scales, pipeline.grokfast_emas, others)
    check_update_lists(params, others, state_steps)
    device = params[0].device if params else lr.device
    check_control_args("lamb_triton_", lr, pipeline, device)
    if not params or is_fake(params[0], grads[0], exp_avgs[0], lr):
        return  # nothing to do, or tracing with tensors that carry no data
    run = UpdateLaunch(_lamb_kernel, params, [params, grads, exp_avgs, exp_avg_sqs], state_steps, lr, pipeline,
                       agc_rows)
    plan = run.plan
    partials = torch.empty((2, max(plan.n_blocks, 1)), dtype=torch.float64, device=device)  # r^2, p^2 per block
    trust = torch.empty((len(params),), dtype=torch.float32, device=device)
    args = dict(trust_ptr=trust, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                weight_decay=float(weight_decay), BIAS_CORRECTION=bool(bias_correction))
    group_partials = lambda begin: dict(r_partials=partials[0, begin:], p_partials=partials[1, begin:])  # noqa: E731
    run.launch(_lamb_kernel, per_group=group_partials, PASS=1, **args)
    if plan.n_blocks:
        wrap_triton(_lamb_trust_kernel)[(len(params),)](
            partials[0], partials[1], plan.segments, trust, run.table["skip_ptr"], float(max_weight_norm),
            HAS_SKIP=run.table["HAS_SKIP"], BLOCK=reduce_block(run.interpreted), num_warps=4)
    run.launch(_lamb_kernel, per_group=group_partials, PASS=2, **args)
    run.advance_steps()


def register(namespace: str = "catapult"):
    """Registers <namespace>::lamb_triton_ (with the schema of <namespace>::lamb_); returns
    its eager entry point."""
    return register_update_op("lamb_", _lamb, namespace)
