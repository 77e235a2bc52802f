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

Storage and master weights, as the C++ CPU kernel (csrc/cpu/lamb.cpp's stored path):
m, v and the Grokfast ema share one storage dtype per param (csrc/state_storage.h;
S_DTYPE per (dtype, storage) group, None where it is the params' dtype: the kernel of
before), int8 blocks of 128 with their scales (m and the ema SQRT, v FOURTH_ROOT,
indexed [blocks, 128] as in elementwise_update.py); the master weights of 16-bit params
(csrc/master_weights.h; M_DTYPE, one kind per call) give p its value (the float32 copy,
the param plus its ecc correction, or the param) and take the new one (the copy and the
param rounded to nearest, ecc_code, or stochastic rounding with the counter read in
pass 2 and advanced after it with the step counts). Such a param takes the 16-bit
design: pass 1 reads the decoded old state and writes only its partials, pass 2
recomputes the same r and writes p, its master weights, m, v and the ema encoded.

Registered (``register``) with the registration helper of the elementwise ops
(op_registration.py), with the C++ lamb_'s schema.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .kernel_common import (QBLOCK, TL_MASTER_DTYPE, TL_STORAGE_DTYPE, GradPipeline, UpdateLaunch,
                            add_regularizer_lists, check_control_args, check_master_weights, check_storage_lists,
                            check_update_lists, grad_pipeline_setup, load_int8, load_master_params, master_setup,
                            pipeline_grad, powf, program_block, store_as, store_int8, store_master_params, to_float32)
from .multi_tensor_norm import reduce_block, reduce_segment
from .multi_tensor_table import is_fake, tensor_ptr
from .op_registration import register_update_op


@triton.jit
def _lamb_direction(p, m, v, eps, weight_decay, bc1, bc2):
    # lamb_direction: (m / bc1) / (sqrtf(v / bc2) + eps) + weight_decay * p
    return tl.div_rn(tl.div_rn(m, bc1), tl.sqrt_rn(tl.div_rn(v, bc2)) + eps) + weight_decay * p


@triton.jit
def _lamb_block(p_ptr, g_ptr, m_ptr, v_ptr, ema_ptr, agc_ptr, m_q_ptr, v_q_ptr, ema_q_ptr, w_ptr, lo, hi, row_len,
                start, idx, mask, qidx, qmask, mult, grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb, beta1,
                beta2, eps, weight_decay, bc1, bc2, lr_trust, DTYPE: tl.constexpr, STORAGE: tl.constexpr,
                M_DTYPE: tl.constexpr, PASS: tl.constexpr, AGC: tl.constexpr, GROKFAST: tl.constexpr,
                MAXIMIZE: tl.constexpr, INTERPRETED: tl.constexpr):
    """One block of either pass (see the module docstring); returns (r, p) for pass 1's sums.
    m, v and the ema are stored as STORAGE (int8: with their scales at *_q_ptr, idx of shape
    [quantization blocks, QBLOCK], qidx, qmask as load_int8's); p is the param's value:
    its float32 copy or its ecc value at w_ptr when M_DTYPE says so (the stochastic
    rounding counter's halves lo, hi in pass 2)."""
    # the stored path (states in another dtype than the params, or master weights) is the
    # 16-bit one: pass 1 writes nothing, pass 2 recomputes r from the same old state
    STORED: tl.constexpr = (STORAGE != DTYPE) or (M_DTYPE is not None)
    if M_DTYPE is None:
        p = to_float32(tl.load(p_ptr + idx, mask=mask), INTERPRETED)
    else:
        p = load_master_params(p_ptr, w_ptr, idx, mask, DTYPE, M_DTYPE, INTERPRETED)
    if PASS == 2 and DTYPE == tl.float32 and not STORED:
        # the new m, v as pass 1 stored them, exactly
        m = tl.load(m_ptr + idx, mask=mask)
        v = tl.load(v_ptr + idx, mask=mask)
        r = _lamb_direction(p, m, v, eps, weight_decay, bc1, bc2)
    else:
        # the grad pipeline and lamb_moments from the old state; the new state is stored
        # by pass 1 for float32, by pass 2 for 16-bit types and the stored path
        STORE: tl.constexpr = (PASS == 2) or (DTYPE == tl.float32 and not STORED)
        g = pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, mask, mult, grokfast_alpha,
                          grokfast_one_minus_alpha, grokfast_lamb, DTYPE, AGC, GROKFAST, MAXIMIZE, STORE, INTERPRETED,
                          STORAGE, ema_q_ptr, qidx, qmask)
        if STORAGE == tl.int8:
            m = load_int8(m_ptr, m_q_ptr, idx, mask, qidx, qmask, False)  # m's map: SQRT
            v = load_int8(v_ptr, v_q_ptr, idx, mask, qidx, qmask, True)  # v's (exp_avg_sqs): FOURTH_ROOT
        else:
            m = to_float32(tl.load(m_ptr + idx, mask=mask), INTERPRETED)
            v = to_float32(tl.load(v_ptr + idx, mask=mask), INTERPRETED)
        m = beta1 * m + (1.0 - beta1) * g  # lamb_moments; one_minus_beta = 1.0f - beta, in float32
        v = beta2 * v + (1.0 - beta2) * g * g
        r = _lamb_direction(p, m, v, eps, weight_decay, bc1, bc2)
        if STORE:
            if STORAGE == tl.int8:
                store_int8(m_ptr, m_q_ptr, m, idx, mask, qidx, qmask, False, INTERPRETED)
                store_int8(v_ptr, v_q_ptr, v, idx, mask, qidx, qmask, True, INTERPRETED)
            else:
                store_as(m_ptr + idx, m, mask, STORAGE, INTERPRETED)
                store_as(v_ptr + idx, v, mask, STORAGE, INTERPRETED)
    if PASS == 2:
        x = p - lr_trust * r
        if M_DTYPE is None:
            store_as(p_ptr + idx, x, mask, DTYPE, INTERPRETED)
        else:
            store_master_params(p_ptr, w_ptr, x, idx, mask, start, lo, hi, DTYPE, M_DTYPE, INTERPRETED)
    return r, p


@triton.jit
def _lamb_kernel(addrs, numels, blocks, row_lens, lr_ptr, grad_norm_ptr, grad_scale_ptr, skip_ptr,
                 max_grad_norm, grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb,
                 r_partials, p_partials, trust_ptr, beta1, beta2, eps, weight_decay,
                 DTYPE: tl.constexpr, PASS: tl.constexpr, BIAS_CORRECTION: tl.constexpr, MAXIMIZE: tl.constexpr,
                 CLIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr,
                 AGC: tl.constexpr, GROKFAST: tl.constexpr, INTERPRETED: tl.constexpr, ALIGNED: tl.constexpr,
                 STEP_COL: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                 S_DTYPE: tl.constexpr = None, M_DTYPE: tl.constexpr = None, MASTER_COL: tl.constexpr = -1):
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0.0:
            return  # a skipped step (GradScaler's inf, skip_nonfinite): write nothing
    # the float arguments in float32 (the interpreter passes Python floats as they are)
    beta1 = tl.cast(beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    STORAGE: tl.constexpr = DTYPE if S_DTYPE is None else S_DTYPE  # of m, v and the ema
    INT8: tl.constexpr = STORAGE == tl.int8
    # address table columns: p, g, m, v, [with int8 storage the block scales of m, v, the
    # ema,] [master weights (MASTER_COL),] step (STEP_COL), then the regularizers' (kernel_common)
    row, start, n = program_block(numels, blocks, CHUNK)
    p_ptr = tensor_ptr(addrs, row, L, 0, DTYPE, ALIGNED) + start
    g_ptr = tensor_ptr(addrs, row, L, 1, DTYPE, ALIGNED) + start
    m_ptr = tensor_ptr(addrs, row, L, 2, STORAGE, ALIGNED) + start
    v_ptr = tensor_ptr(addrs, row, L, 3, STORAGE, ALIGNED) + start
    mult, ema_ptr, agc_ptr, row_len = grad_pipeline_setup(
        addrs, row, start, row_lens, grad_norm_ptr, grad_scale_ptr, max_grad_norm,
        DTYPE, CLIP, HAS_GRAD_SCALE, AGC, GROKFAST, ALIGNED, L, STORAGE)
    if INT8:
        m_q_ptr = tensor_ptr(addrs, row, L, 4, tl.float32, False) + start // QBLOCK
        v_q_ptr = tensor_ptr(addrs, row, L, 5, tl.float32, False) + start // QBLOCK
        ema_q_ptr = tensor_ptr(addrs, row, L, 6, tl.float32, False) + start // QBLOCK if GROKFAST else lr_ptr
        qoffs = tl.arange(0, BLOCK // QBLOCK)
    else:
        m_q_ptr = None
        v_q_ptr = None
        ema_q_ptr = None
        qoffs = None
    # master weights: the chunk's first copy or correction, or (pass 2) a stochastic
    # rounding counter's halves; placeholders (p_ptr, None) without
    if M_DTYPE is None:
        w_ptr = p_ptr
        lo = None
        hi = None
    else:
        w_ptr, lo, hi = master_setup(addrs, row, start, MASTER_COL, M_DTYPE, ALIGNED, L)
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

    if INT8:
        # a block of elements as [quantization blocks, QBLOCK]: rows are whole blocks
        offs = qoffs[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    else:
        offs = tl.arange(0, BLOCK)
    r_acc = tl.zeros(offs.shape, dtype=tl.float64)  # pass 1: sums of r^2 and p^2, lane by lane
    p_acc = tl.zeros(offs.shape, dtype=tl.float64)
    rem = n - start
    if rem >= CHUNK:
        # a full chunk: no masks, so loads and stores vectorize
        for full_off in tl.range(0, CHUNK, BLOCK):
            qidx = qoffs + full_off // QBLOCK if INT8 else None  # its quantization blocks (from the chunk's)
            r, p = _lamb_block(p_ptr, g_ptr, m_ptr, v_ptr, ema_ptr, agc_ptr, m_q_ptr, v_q_ptr, ema_q_ptr, w_ptr, lo,
                               hi, row_len, start, full_off + offs, None, qidx, None, mult, grokfast_alpha,
                               grokfast_one_minus_alpha, grokfast_lamb, beta1, beta2, eps, weight_decay, bc1, bc2,
                               lr_trust, DTYPE, STORAGE, M_DTYPE, PASS, AGC, GROKFAST, MAXIMIZE, INTERPRETED)
            if PASS == 1:
                r64 = r.to(tl.float64)
                p64 = p.to(tl.float64)
                r_acc = r_acc + r64 * r64
                p_acc = p_acc + p64 * p64
    else:
        for tail_off in tl.range(0, rem, BLOCK):
            idx = tail_off + offs
            mask = idx < rem
            qidx = qoffs + tail_off // QBLOCK if INT8 else None
            r, p = _lamb_block(p_ptr, g_ptr, m_ptr, v_ptr, ema_ptr, agc_ptr, m_q_ptr, v_q_ptr, ema_q_ptr, w_ptr, lo,
                               hi, row_len, start, idx, mask, qidx, qidx * QBLOCK < rem if INT8 else None, mult,
                               grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb, beta1, beta2, eps,
                               weight_decay, bc1, bc2, lr_trust, DTYPE, STORAGE, M_DTYPE, PASS, AGC, GROKFAST,
                               MAXIMIZE, INTERPRETED)
            if PASS == 1:
                r64 = tl.where(mask, r, 0.0).to(tl.float64)
                p64 = tl.where(mask, p, 0.0).to(tl.float64)
                r_acc = r_acc + r64 * r64
                p_acc = p_acc + p64 * p64
    if PASS == 1:
        pid = tl.program_id(0)
        if INT8:
            tl.store(r_partials + pid, tl.sum(tl.sum(r_acc, 1), 0))
            tl.store(p_partials + pid, tl.sum(tl.sum(p_acc, 1), 0))
        else:
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
    """The body of catapult::lamb_triton_: checks (check_lamb_args: the lists, the step
    control, the storage of m, v and the emas, the master weights), then pass 1 per
    (dtype, storage) group, the trust ratios, pass 2 per group, and the step counts and
    stochastic rounding counters."""
    *pipeline_args, state_scales, master_weights = pipeline_and_storage
    pipeline = GradPipeline(*pipeline_args)
    others = [("grads", grads)]
    stored = [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]  # then the emas: one storage dtype per param
    agc_rows = add_regularizer_lists("lamb_triton_", params, pipeline.agc_scales, pipeline.grokfast_emas, others,
                                     ema_lists=stored)
    check_update_lists(params, others, state_steps)
    device = params[0].device if params else lr.device
    check_control_args("lamb_triton_", lr, pipeline, device)
    storage = check_storage_lists("lamb_triton_", params, stored, state_scales)
    master = check_master_weights("lamb_triton_", params, master_weights)
    if not params or is_fake(params[0], grads[0], exp_avgs[0], lr):
        return  # nothing to do, or tracing with tensors that carry no data
    n = len(params)
    # int8: the scales of m, v and the emas, list-major in state_scales, one table column per list
    scale_lists = [state_scales[k * n:(k + 1) * n] for k in range(len(stored))] if state_scales else []
    run = UpdateLaunch(_lamb_kernel, params, [params, grads, exp_avgs, exp_avg_sqs], state_steps, lr, pipeline,
                       agc_rows, scale_lists, storage, master_weights)
    plan = run.plan
    # per group: the storage, None where it is the params' dtype (the kernel of before)
    s_dtypes = {begin: None if s == t else TL_STORAGE_DTYPE[s] for (t, s), begin, _, _ in plan.groups}
    partials = torch.empty((2, max(plan.n_blocks, 1)), dtype=torch.float64, device=device)  # r^2, p^2 per block
    trust = torch.empty((len(params),), dtype=torch.float32, device=device)
    args = dict(trust_ptr=trust, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                weight_decay=float(weight_decay), BIAS_CORRECTION=bool(bias_correction),
                M_DTYPE=TL_MASTER_DTYPE[master] if master is not None else None, MASTER_COL=run.master_col)

    def per_group(begin: int) -> dict:
        return dict(r_partials=partials[0, begin:], p_partials=partials[1, begin:], S_DTYPE=s_dtypes[begin])

    run.launch(_lamb_kernel, per_group=per_group, PASS=1, **args)
    if plan.n_blocks:
        wrap_triton(_lamb_trust_kernel)[(len(params),)](
            partials[0], partials[1], plan.segments, trust, run.table["skip_ptr"], float(max_weight_norm),
            HAS_SKIP=run.table["HAS_SKIP"], BLOCK=reduce_block(run.interpreted), num_warps=4)
    run.launch(_lamb_kernel, per_group=per_group, PASS=2, **args)
    run.advance_steps()


def register(namespace: str = "catapult"):
    """Registers <namespace>::lamb_triton_ (with the schema of <namespace>::lamb_); returns
    its eager entry point."""
    return register_update_op("lamb_", _lamb, namespace)
