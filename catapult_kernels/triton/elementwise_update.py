"""The generic Triton update kernel: every elementwise update op runs through it (the
Triton twin of csrc/cpu/elementwise_update.h), with its math from its module in
optimizers/ (the contract is in optimizers/__init__.py).

``register_elementwise_ops(names)`` (run when catapult_kernels.triton is imported, with
every update op of the C++ extension, ops.UPDATE_OPS) registers catapult::<base>_triton_
for each that has a module optimizers/<base>.py (op_registration.py); adding an
optimizer adds that module and nothing here.

One call: the checks of csrc/update_op.h's check_update_args (same checks, same
messages; the spec's own first, such as trust_ratios'), then one launch per dtype
group covering all its tensors through the multi-tensor tables (multi_tensor_table.py),
each program updating one chunk of one tensor: per program, the grad pipeline's
factor and the optimizer's ``constants`` (from lr, t = state_steps[i] + 1 and its
scalars); per block of elements, the grad pipeline (kernel_common.pipeline_grad) and
its ``element``. Then one launch writes the step counts t back (kernel_common.
UpdateLaunch.advance_steps), after every program has read them. Nothing is read on
the host: lr, grad_norm, grad_scale, skip and the steps are read by the kernels, so a
step costs no host sync; a nonzero skip writes nothing at all, step counts included.

Storage (csrc/state_storage.h): a param's states and Grokfast ema share one dtype S,
which may differ from the param's (S_DTYPE, a launch per (dtype, S) group; None where
S is the params' dtype: the kernel of before), int8 for every param of a call or none.
int8 storage: each block of elements covers whole 128-element quantization blocks
(BLOCK and CHUNK are multiples of 128: update_sizes), indexed [BLOCK // 128, 128], a
row per quantization block, so that its codes and scale are decoded, updated and
encoded in one pass (the absmax a reduction along the row), each scale written once by
the program that owns its block. A state list's map is FOURTH_ROOT when its schema
name ends in "_sqs" (second moments), else SQRT, as the emas'.

Master weights of 16-bit params (csrc/master_weights.h; M_DTYPE, one kind per call;
None: the kernel of before): float32 copies (the element function's p, written back
beside the param rounded to nearest even), int8 corrections (p = ecc_value(param, code);
then param, code = its rounding and ecc_code), or int64 stochastic rounding counters
(bfloat16: the param rounded by stochastic_round_bf16 with element i = its offset from
the param's first element in memory, and the counter every program of the call read;
advance_steps then adds one to each counter, as to the step counts).

Numerics: float32 math, compiled with enable_fp_fusion=False so that no a*b+c is
contracted into an FMA: every operation rounds once, as written, so the compiled
kernel, the interpreter and the CPU kernels (which do not contract either) agree bit
for bit, powf aside (libdevice's __nv_powf compiled, float64 exp/log under the
interpreter: kernel_common.powf).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Iterable, Optional

import torch
import triton
import triton.language as tl

from ..int8_blocks import FOURTH_ROOT, map_of
from .kernel_common import (QBLOCK, TL_MASTER_DTYPE, TL_STORAGE_DTYPE, GradPipeline, UpdateLaunch,
                            add_regularizer_lists, check_control_args, check_master_weights, check_storage_lists,
                            check_update_lists, grad_pipeline_setup, load_int8, load_master_params, master_setup,
                            pipeline_grad, program_block, store_as, store_int8, store_master_params, to_float32)
from .multi_tensor_table import is_fake, tensor_ptr
from .op_registration import UpdateSchema, register_update_op, update_schema
from .optimizers import MAX_FLAGS, MAX_SCALARS, MAX_STATES

__all__ = ["register_elementwise_ops", "optimizer_module"]


@triton.jit
def _update_block(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, ema_ptr, agc_ptr, q0_ptr, q1_ptr, q2_ptr, q3_ptr,
                  ema_q_ptr, m_ptr, lo, hi, row_len, start, idx, mask, qidx, qmask, mult,
                  grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb, c,
                  ELEMENT: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                  P_READ: tl.constexpr, S0_COL: tl.constexpr, S1_COL: tl.constexpr, S2_COL: tl.constexpr,
                  S3_COL: tl.constexpr, S0_READ: tl.constexpr, S1_READ: tl.constexpr, S2_READ: tl.constexpr,
                  S3_READ: tl.constexpr, DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                  FOURTH_ROOTS: tl.constexpr, AGC: tl.constexpr, GROKFAST: tl.constexpr, MAXIMIZE: tl.constexpr,
                  INTERPRETED: tl.constexpr):
    # Loads and stores inline (constexpr branches), not in helper functions: the interpreter
    # pays for each nested jit call, and this runs once per block (to_float32, which mends
    # its widening of bfloat16, costs ~5% of an interpreted test run). int8
    # storage takes the codec's helpers (kernel_common), with idx of shape [quantization
    # blocks, QBLOCK], qidx, qmask the blocks, q*_ptr the lists' scales at the chunk's first;
    # master weights (M_DTYPE) theirs: m_ptr at the chunk's first copy or correction, lo
    # and hi the halves of a stochastic rounding counter.
    g = pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, mask, mult, grokfast_alpha,
                      grokfast_one_minus_alpha, grokfast_lamb, DTYPE, AGC, GROKFAST, MAXIMIZE, True, INTERPRETED,
                      S_DTYPE, ema_q_ptr, qidx, qmask)
    zero = tl.full(idx.shape, 0.0, tl.float32)  # a list the call does not read
    if M_DTYPE is None:
        p = to_float32(tl.load(p_ptr + idx, mask=mask), INTERPRETED) if P_READ else zero
    else:
        p = load_master_params(p_ptr, m_ptr, idx, mask, DTYPE, M_DTYPE, INTERPRETED) if P_READ else zero
    if S_DTYPE == tl.int8:
        s0 = load_int8(s0_ptr, q0_ptr, idx, mask, qidx, qmask, FOURTH_ROOTS & 1) if S0_READ else zero
        s1 = load_int8(s1_ptr, q1_ptr, idx, mask, qidx, qmask, FOURTH_ROOTS & 2) if S1_READ else zero
        s2 = load_int8(s2_ptr, q2_ptr, idx, mask, qidx, qmask, FOURTH_ROOTS & 4) if S2_READ else zero
        s3 = load_int8(s3_ptr, q3_ptr, idx, mask, qidx, qmask, FOURTH_ROOTS & 8) if S3_READ else zero
    else:
        s0 = to_float32(tl.load(s0_ptr + idx, mask=mask), INTERPRETED) if S0_READ else zero
        s1 = to_float32(tl.load(s1_ptr + idx, mask=mask), INTERPRETED) if S1_READ else zero
        s2 = to_float32(tl.load(s2_ptr + idx, mask=mask), INTERPRETED) if S2_READ else zero
        s3 = to_float32(tl.load(s3_ptr + idx, mask=mask), INTERPRETED) if S3_READ else zero
    p, s0, s1, s2, s3 = ELEMENT(p, g, s0, s1, s2, s3, c, F0, F1, F2, F3)
    if M_DTYPE is None:
        store_as(p_ptr + idx, p, mask, DTYPE, INTERPRETED)
    else:
        store_master_params(p_ptr, m_ptr, p, idx, mask, start, lo, hi, DTYPE, M_DTYPE, INTERPRETED)
    if S_DTYPE == tl.int8:
        if S0_COL >= 0:
            store_int8(s0_ptr, q0_ptr, s0, idx, mask, qidx, qmask, FOURTH_ROOTS & 1, INTERPRETED)
        if S1_COL >= 0:
            store_int8(s1_ptr, q1_ptr, s1, idx, mask, qidx, qmask, FOURTH_ROOTS & 2, INTERPRETED)
        if S2_COL >= 0:
            store_int8(s2_ptr, q2_ptr, s2, idx, mask, qidx, qmask, FOURTH_ROOTS & 4, INTERPRETED)
        if S3_COL >= 0:
            store_int8(s3_ptr, q3_ptr, s3, idx, mask, qidx, qmask, FOURTH_ROOTS & 8, INTERPRETED)
    else:
        if S0_COL >= 0:
            store_as(s0_ptr + idx, s0, mask, S_DTYPE, INTERPRETED)
        if S1_COL >= 0:
            store_as(s1_ptr + idx, s1, mask, S_DTYPE, INTERPRETED)
        if S2_COL >= 0:
            store_as(s2_ptr + idx, s2, mask, S_DTYPE, INTERPRETED)
        if S3_COL >= 0:
            store_as(s3_ptr + idx, s3, mask, S_DTYPE, INTERPRETED)


@triton.jit
def _update_kernel(addrs, numels, blocks, row_lens, lr_ptr, grad_norm_ptr, grad_scale_ptr, skip_ptr, factors_ptr,
                   max_grad_norm, grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb, h0, h1, h2, h3, h4, h5,
                   CONSTANTS: tl.constexpr, ELEMENT: tl.constexpr,
                   F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr, HAS_FACTORS: tl.constexpr,
                   P_READ: tl.constexpr, S0_COL: tl.constexpr, S1_COL: tl.constexpr, S2_COL: tl.constexpr,
                   S3_COL: tl.constexpr, S0_READ: tl.constexpr, S1_READ: tl.constexpr, S2_READ: tl.constexpr,
                   S3_READ: tl.constexpr, STEP_COL: tl.constexpr, S_DTYPE: tl.constexpr, SCALES_COL: tl.constexpr,
                   FOURTH_ROOTS: tl.constexpr, M_DTYPE: tl.constexpr, MASTER_COL: tl.constexpr,
                   DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, CLIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                   HAS_SKIP: tl.constexpr, AGC: tl.constexpr, GROKFAST: tl.constexpr, INTERPRETED: tl.constexpr,
                   ALIGNED: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0.0:
            return  # a skipped step (GradScaler's inf, skip_nonfinite): write nothing
    # address table columns: params, grads, the used states (S*_COL), with int8 storage
    # their block scales then the emas' (from SCALES_COL), [master weights (MASTER_COL),]
    # [state_steps,] then the regularizers' (kernel_common)
    STORAGE: tl.constexpr = DTYPE if S_DTYPE is None else S_DTYPE  # of the states and emas
    INT8: tl.constexpr = STORAGE == tl.int8
    row, start, n = program_block(numels, blocks, CHUNK)
    p_ptr = tensor_ptr(addrs, row, L, 0, DTYPE, ALIGNED) + start
    g_ptr = tensor_ptr(addrs, row, L, 1, DTYPE, ALIGNED) + start
    # each state list's chunk (column S*_COL), or for a list the call does not use (-1) a
    # placeholder, p_ptr, never read nor written
    s0_ptr = tensor_ptr(addrs, row, L, S0_COL, STORAGE, ALIGNED) + start if S0_COL >= 0 else p_ptr
    s1_ptr = tensor_ptr(addrs, row, L, S1_COL, STORAGE, ALIGNED) + start if S1_COL >= 0 else p_ptr
    s2_ptr = tensor_ptr(addrs, row, L, S2_COL, STORAGE, ALIGNED) + start if S2_COL >= 0 else p_ptr
    s3_ptr = tensor_ptr(addrs, row, L, S3_COL, STORAGE, ALIGNED) + start if S3_COL >= 0 else p_ptr
    mult, ema_ptr, agc_ptr, row_len = grad_pipeline_setup(
        addrs, row, start, row_lens, grad_norm_ptr, grad_scale_ptr, max_grad_norm,
        DTYPE, CLIP, HAS_GRAD_SCALE, AGC, GROKFAST, ALIGNED, L, STORAGE)
    if INT8:
        # the scales of the state in column c are in column c + N_STORED, the emas' last
        N_STORED: tl.constexpr = SCALES_COL - 2
        q0_ptr = tensor_ptr(addrs, row, L, S0_COL + N_STORED, tl.float32, False) + start // QBLOCK \
            if S0_COL >= 0 else lr_ptr
        q1_ptr = tensor_ptr(addrs, row, L, S1_COL + N_STORED, tl.float32, False) + start // QBLOCK \
            if S1_COL >= 0 else lr_ptr
        q2_ptr = tensor_ptr(addrs, row, L, S2_COL + N_STORED, tl.float32, False) + start // QBLOCK \
            if S2_COL >= 0 else lr_ptr
        q3_ptr = tensor_ptr(addrs, row, L, S3_COL + N_STORED, tl.float32, False) + start // QBLOCK \
            if S3_COL >= 0 else lr_ptr
        ema_q_ptr = tensor_ptr(addrs, row, L, SCALES_COL + N_STORED, tl.float32, False) + start // QBLOCK \
            if GROKFAST else lr_ptr
        qoffs = tl.arange(0, BLOCK // QBLOCK)
    else:
        q0_ptr = None
        q1_ptr = None
        q2_ptr = None
        q3_ptr = None
        ema_q_ptr = None
        qoffs = None

    # master weights: the chunk's first copy or correction, or a stochastic rounding
    # counter's halves; placeholders (p_ptr, None) without
    if M_DTYPE is None:
        m_ptr = p_ptr
        lo = None
        hi = None
    else:
        m_ptr, lo, hi = master_setup(addrs, row, start, MASTER_COL, M_DTYPE, ALIGNED, L)

    lr = tl.load(lr_ptr)
    if STEP_COL >= 0:
        t = tl.load(tensor_ptr(addrs, row, L, STEP_COL, tl.float32, False)) + 1.0
    else:
        t = tl.full([], 0.0, tl.float32)  # an op without steps
    if HAS_FACTORS:
        factor = tl.load(factors_ptr + row)
    else:
        factor = tl.full([], 1.0, tl.float32)
    # the float arguments in float32 (the interpreter passes Python floats as they are)
    c = CONSTANTS(lr, t, factor, tl.cast(h0, tl.float32), tl.cast(h1, tl.float32), tl.cast(h2, tl.float32),
                  tl.cast(h3, tl.float32), tl.cast(h4, tl.float32), tl.cast(h5, tl.float32), F0, F1, F2, F3,
                  INTERPRETED)

    if INT8:
        # a block of elements as [quantization blocks, QBLOCK]: rows are whole blocks
        offs = qoffs[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    else:
        offs = tl.arange(0, BLOCK)
    rem = n - start
    if rem >= CHUNK:
        # a full chunk: no masks, so loads and stores vectorize
        for full_off in tl.range(0, CHUNK, BLOCK):
            qidx = qoffs + full_off // QBLOCK if INT8 else None  # its quantization blocks (from the chunk's)
            _update_block(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, ema_ptr, agc_ptr, q0_ptr, q1_ptr, q2_ptr,
                          q3_ptr, ema_q_ptr, m_ptr, lo, hi, row_len, start, full_off + offs, None, qidx, None, mult,
                          grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb, c,
                          ELEMENT, F0, F1, F2, F3, P_READ, S0_COL, S1_COL, S2_COL, S3_COL,
                          S0_READ, S1_READ, S2_READ, S3_READ, DTYPE, STORAGE, M_DTYPE, FOURTH_ROOTS, AGC, GROKFAST,
                          MAXIMIZE, INTERPRETED)
    else:
        for tail_off in tl.range(0, rem, BLOCK):
            idx = tail_off + offs
            qidx = qoffs + tail_off // QBLOCK if INT8 else None
            _update_block(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, ema_ptr, agc_ptr, q0_ptr, q1_ptr, q2_ptr,
                          q3_ptr, ema_q_ptr, m_ptr, lo, hi, row_len, start, idx, idx < rem, qidx,
                          qidx * QBLOCK < rem if INT8 else None, mult,
                          grokfast_alpha, grokfast_one_minus_alpha, grokfast_lamb, c,
                          ELEMENT, F0, F1, F2, F3, P_READ, S0_COL, S1_COL, S2_COL, S3_COL,
                          S0_READ, S1_READ, S2_READ, S3_READ, DTYPE, STORAGE, M_DTYPE, FOURTH_ROOTS, AGC, GROKFAST,
                          MAXIMIZE, INTERPRETED)


def _check_per_param(op: str, name: str, t: Optional[torch.Tensor], n: int, device: torch.device) -> None:
    """Hyper::per_param's checks (csrc/update_op.h): one float32 per param (None: absent)."""
    if t is None:
        return
    if not (t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous() and t.numel() == n):
        raise RuntimeError(f"catapult: {op}: {name} must be a contiguous float32 tensor of {n} elements "
                           f"(one per param), got {t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        raise RuntimeError(f"catapult: {op}: {name} is on {t.device} but the params are on {device}")


def _pad(values: tuple, size: int, fill, what: str, op: str) -> list:
    if len(values) > size:
        raise RuntimeError(f"catapult: {op}: the generic Triton kernel takes at most {size} {what}, "
                           f"got {len(values)}")
    return list(values) + [fill] * (size - len(values))


def _update(schema: UpdateSchema, optimizer: ModuleType, args: tuple) -> None:
    """One call of the update op ``schema`` with ``optimizer``'s math: checks, then the launches."""
    op = schema.triton_name
    params, grads = args[0], args[1]
    states = args[2:2 + len(schema.states)]
    state_steps = args[schema.lr_index - 1] if schema.has_step else None
    lr = args[schema.lr_index]
    n_pipeline = len(GradPipeline._fields)
    end = len(args) - len(schema.storage_args)  # where the grad pipeline ends
    hyper = dict(zip(schema.hyper, args[schema.lr_index + 1:end - n_pipeline]))
    pipeline = GradPipeline(*args[end - n_pipeline:end])
    storage_args = dict(zip(schema.storage_args, args[end:]))
    state_scales = storage_args.get("state_scales", ())
    masters = storage_args.get("master_weights", ())
    device = params[0].device if params else lr.device

    run = optimizer.launch_args(hyper, len(params), device)
    factors = None
    if run.per_param is not None:
        factors = hyper[run.per_param]
        _check_per_param(op, run.per_param, factors, len(params), device)
    others = [("grads", grads)]
    stored = []  # the used states, then the emas: one storage dtype
    used = [i for i in range(len(states)) if run.uses >> i & 1]
    for i, (name, lst) in enumerate(zip(schema.states, states)):
        if i in used:
            stored.append((name, lst))
        elif len(lst) != 0:
            raise RuntimeError(f"catapult: {op}: {name} must be empty: this call does not use it")
    agc_rows = add_regularizer_lists(op, params, pipeline.agc_scales, pipeline.grokfast_emas, others, schema.first,
                                     ema_lists=stored)
    check_update_lists(params, others, state_steps, schema.first)
    check_control_args(op, lr, pipeline, device)
    storage = check_storage_lists(op, params, stored, state_scales, schema.first)
    master = check_master_weights(op, params, masters, schema.first)
    if not params or is_fake(params[0], grads[0], lr):
        return  # nothing to do, or tracing with tensors that carry no data

    n = len(params)
    # int8: each stored list's scales, list-major in state_scales, one table column per list
    scale_lists = [state_scales[k * n:(k + 1) * n] for k in range(len(stored))] if state_scales else []
    launch = UpdateLaunch(_update_kernel, params, [params, grads] + [states[i] for i in used], state_steps, lr,
                          pipeline, agc_rows, scale_lists, storage, masters)
    # per group: the storage, None where it is the params' dtype (today's kernel)
    s_dtypes = {begin: None if s == t else TL_STORAGE_DTYPE[s] for (t, s), begin, _, _ in launch.plan.groups}
    cols = [2 + used.index(i) if i in used else -1 for i in range(MAX_STATES)]
    reads = [i in used and bool(run.reads >> i & 1) for i in range(MAX_STATES)]
    fourth_roots = sum(1 << i for i in used if map_of(schema.states[i]) == FOURTH_ROOT)
    h = _pad(tuple(float(x) for x in run.scalars), MAX_SCALARS, 0.0, "scalars", op)
    f = _pad(tuple(run.flags), MAX_FLAGS, False, "flags", op)
    launch.launch(
        _update_kernel, per_group=lambda begin: dict(S_DTYPE=s_dtypes[begin]),
        factors_ptr=factors if factors is not None else lr,  # lr: a placeholder, never read
        h0=h[0], h1=h[1], h2=h[2], h3=h[3], h4=h[4], h5=h[5],
        CONSTANTS=optimizer.constants, ELEMENT=optimizer.element, F0=f[0], F1=f[1], F2=f[2], F3=f[3],
        HAS_FACTORS=factors is not None, P_READ=run.reads_params,
        S0_COL=cols[0], S1_COL=cols[1], S2_COL=cols[2], S3_COL=cols[3],
        S0_READ=reads[0], S1_READ=reads[1], S2_READ=reads[2], S3_READ=reads[3],
        SCALES_COL=2 + len(used) if scale_lists else -1, FOURTH_ROOTS=fourth_roots,
        M_DTYPE=TL_MASTER_DTYPE[master] if master is not None else None, MASTER_COL=launch.master_col)
    launch.advance_steps()


def optimizer_module(name: str) -> Optional[ModuleType]:
    """optimizers/<base>.py for the update op ``name`` (e.g. "adopt_"), or None without one."""
    module_name = f"{__package__}.optimizers.{name.rstrip('_')}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise  # the module exists but imports something missing


def register_elementwise_ops(names: Iterable[str], namespace: str = "catapult") -> dict[str, Callable]:
    """Registers the Triton twin of each update op ``names`` of ``namespace`` that has a
    module in optimizers/; returns their eager entry points by C++ op name."""
    registered = {}
    for name in names:
        optimizer = optimizer_module(name)
        if optimizer is None:
            continue  # not elementwise (lamb_: lamb.py), or no Triton math yet
        schema = update_schema(getattr(getattr(torch.ops, namespace), name).default._schema)
        if len(schema.states) > MAX_STATES:
            raise RuntimeError(f"catapult: {name} has {len(schema.states)} state lists; the generic Triton kernel "
                               f"takes at most {MAX_STATES}")
        registered[name] = register_update_op(name, _body(schema, optimizer), namespace)
    return registered


def _body(schema: UpdateSchema, optimizer: ModuleType) -> Callable:
    def body(*args) -> None:
        _update(schema, optimizer, args)
    return body
