"""catapult::adamw_triton_: one fused AdamW step over lists of tensors.

Same schema and semantics as the C++ catapult::adamw_ (csrc/ops.cpp); the math
mirrors csrc/adamw_math.h operation for operation (grad_multiplier,
adamw_step_constants, adamw_element), in float32, with correctly rounded
division and square root (tl.div_rn, tl.sqrt_rn: what nvcc's default '/' and
sqrtf give), compiled with enable_fp_fusion=False so that no a*b+c is contracted
into an FMA: every operation rounds once, as written, so the compiled kernel, the
interpreter and a plain float32 evaluation of adamw_math.h agree bit for bit
(powf aside: libdevice's __nv_powf compiled, float64 exp/log under the interpreter).

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

from ..ops import same_layout
from .multi_tensor_table import (SUPPORTED_DTYPES, TL_DTYPE, address_table, can_bypass_dispatcher, check_runnable,
                                 get_plan, is_dense, is_fake, is_interpreted, keep_whole_under_functionalization,
                                 set_wrap_triton_enabled, tensor_ptr)



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
def _store_as(ptr, x, mask, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """Store float32 x as DTYPE, rounding to nearest even (as static_cast and torch do)."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        # The interpreter (triton 3.8) truncates float32 -> bfloat16; round by hand:
        # add 0x7FFF + the lowest kept bit, keep the high half; NaN stays a quiet NaN.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        tl.store(ptr, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(DTYPE), mask=mask)


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
        _store_as(vmax_ptr + idx, vmax, mask, DTYPE, INTERPRETED)
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    _store_as(p_ptr + idx, p, mask, DTYPE, INTERPRETED)
    _store_as(m_ptr + idx, m, mask, DTYPE, INTERPRETED)
    _store_as(v_ptr + idx, v, mask, DTYPE, INTERPRETED)


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
    max_grad_norm = tl.cast(max_grad_norm, tl.float32)
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

    # grad_multiplier (adamw_math.h)
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr)
    else:
        scale = tl.full([], 1.0, tl.float32)
    clip = tl.full([], 1.0, tl.float32)
    if CLIP:
        clip = tl.div_rn(max_grad_norm, tl.div_rn(tl.load(grad_norm_ptr), scale) + 1e-6)
        clip = tl.where(clip > 1.0, 1.0, clip)  # clip > 1 ? 1 : clip, so a NaN norm propagates
    mult = tl.div_rn(clip, scale)
    if MAXIMIZE:
        mult = -mult  # grad * (-mult) == -(grad * mult), bit for bit

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


def _sizes(dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, num_warps): elements per vector step, elements per program, warps.
    A rule, not triton.autotune: autotuning runs a mutating kernel several times (it
    would need restore_value on every tensor of the lists, which live behind the
    address table), and the interpreter must run each config exactly once."""
    if interpreted:
        return 256, 1024, 4  # small, so that small test tensors still take every path
    # Measured on an H100 (100M parameters in 100 tensors, kernel alone, d2d copy = 3.0 TB/s):
    # float32 (1024, 4096, 4 warps) 97% of the copy roof; bfloat16 (512, 2048, 4) 97%.
    # torch's fused AdamW: 79% and 46%. Any BLOCK 512-2048, CHUNK 1-4x BLOCK was within 4%.
    if dtype == torch.float32:
        return 1024, 4096, 4   # 8 floats (two 16-byte vectors) per thread per tensor
    return 512, 2048, 4        # 4 halves per thread per tensor


def _check_scalar(t: Optional[torch.Tensor], name: str, device: torch.device) -> None:
    if t is None:
        return
    if t.numel() != 1:
        raise RuntimeError(f"catapult: {name} must have one element, got {t.numel()}")
    if t.dtype != torch.float32:
        raise RuntimeError(f"catapult: {name} must be float32, got {t.dtype}")
    if t.device != device:
        raise RuntimeError(f"catapult: {name} is on {t.device} but the tensors are on {device}")


def _check_lists(params, others, state_steps) -> None:
    """check_update_lists of csrc/multi_tensor_checks.h (same checks, same messages).
    This is the per-tensor host cost of a step, so the common case compares whole lists
    of metadata (list comprehensions, C-level list equality); only when something is
    wrong does the element-by-element loop run to report the first bad entry."""
    n = len(params)
    for name, lst in others:
        if len(lst) != n:
            raise RuntimeError(f"catapult: {name} has {len(lst)} tensors but params has {n}")
    if len(state_steps) != n:
        raise RuntimeError(f"catapult: state_steps has {len(state_steps)} tensors but params has {n}")
    if n == 0:
        return
    devs = [p.get_device() for p in params]
    dts = [p.dtype for p in params]
    shapes = [p.shape for p in params]
    strides = [p.stride() for p in params]
    ok = (devs.count(devs[0]) == n and all(dt in SUPPORTED_DTYPES for dt in set(dts))
          and (all([p.is_contiguous() for p in params]) or all(is_dense(p) for p in params)))
    for _, lst in others:
        ok = ok and ([t.get_device() for t in lst] == devs and [t.dtype for t in lst] == dts
                     and [t.shape for t in lst] == shapes and [t.stride() for t in lst] == strides)
    ok = ok and (all(s.dtype == torch.float32 for s in state_steps) and [s.get_device() for s in state_steps] == devs
                 and all(s.numel() == 1 for s in state_steps))
    if not ok:
        _check_lists_slow(params, others, state_steps)


def _check_lists_slow(params, others, state_steps) -> None:
    device = params[0].device
    for i, p in enumerate(params):
        dt = p.dtype
        if p.device != device:
            raise RuntimeError(f"catapult: params[{i}] is on {p.device} but params[0] is on {device}")
        if dt not in SUPPORTED_DTYPES:
            raise RuntimeError(f"catapult: params[{i}] has dtype {dt}; supported: float32, bfloat16, float16")
        if not is_dense(p):
            raise RuntimeError(f"catapult: params[{i}] is not dense in memory (strides {tuple(p.stride())})")
        shape, stride = p.shape, p.stride()
        for name, lst in others:
            t = lst[i]
            if t.device != device:
                raise RuntimeError(f"catapult: {name}[{i}] is on {t.device} but params are on {device}")
            if t.dtype != dt:
                raise RuntimeError(f"catapult: {name}[{i}] has dtype {t.dtype} but params[{i}] has {dt}")
            if not same_layout(t, p):
                raise RuntimeError(f"catapult: {name}[{i}] has shape {tuple(t.shape)} strides {tuple(t.stride())} "
                                   f"but params[{i}] has shape {tuple(shape)} strides {tuple(stride)}")
        s = state_steps[i]
        if s.dtype != torch.float32 or s.numel() != 1:
            raise RuntimeError(f"catapult: state_steps[{i}] must be a one-element float32 tensor")
        if s.device != device:
            raise RuntimeError(f"catapult: state_steps[{i}] is on {s.device} but params are on {device}")


def _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
           weight_decay, amsgrad, maximize, grad_norm, max_grad_norm, grad_scale, found_inf) -> None:
    """The body of catapult::adamw_triton_: checks, then one launch per dtype group."""
    others = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    if amsgrad:
        others.append(("max_exp_avg_sqs", max_exp_avg_sqs))
    _check_lists(params, others, state_steps)
    device = params[0].device if params else lr.device
    _check_scalar(lr, "lr", device)
    _check_scalar(grad_norm, "grad_norm", device)
    _check_scalar(grad_scale, "grad_scale", device)
    _check_scalar(found_inf, "found_inf", device)
    if max_grad_norm > 0.0 and grad_norm is None:
        raise RuntimeError("catapult: adamw_triton_ needs grad_norm when max_grad_norm > 0")
    if not params or is_fake(params[0], grads[0], exp_avgs[0], lr):
        return  # nothing to do, or tracing with tensors that carry no data
    check_runnable(device, _adamw_kernel)
    interpreted = is_interpreted(_adamw_kernel)

    keys = [p.dtype for p in params]
    sizes = {dt: _sizes(dt, interpreted) for dt in set(keys)}
    plan = get_plan(device, [p.numel() for p in params], keys, {dt: s[1] for dt, s in sizes.items()})
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
