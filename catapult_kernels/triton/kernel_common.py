"""Pieces shared by the Triton update kernels (elementwise_update.py, lamb.py).

Device side (@triton.jit), the grad pipeline of csrc/grad_pipeline.h and what every
update kernel needs around it:
* ``program_block``: the tensor and chunk of one program, from the multi-tensor plan;
* the grad pipeline, one helper in two parts: ``grad_pipeline_setup`` (once per
  program: the factor every grad is multiplied by, ``grad_multiplier``, and the
  regularizers' pointers) and ``pipeline_grad`` (per block of elements: g = grad *
  (mult * agc_scale[row]), the Grokfast filter (its ema read and, unless a caller
  defers it, written), then maximize);
* ``powf``: the C library's powf (libdevice compiled; float64 under the interpreter);
* ``to_float32``: a loaded block widened to float32 (also under the interpreter, which
  widens bfloat16 subnormals wrongly);
* ``store_as``: a float32 value stored as the tensor's dtype, rounded to nearest even
  (also under the interpreter, which truncates to bfloat16);
* ``load_int8`` and ``store_int8``: a state stored as int8 blocks (csrc/state_storage.h,
  the reference catapult_kernels/int8_blocks.py) decoded to float32, and float32 values
  encoded with their blocks' scales, bit for bit as the C++ kernels; on elements indexed
  [blocks, QBLOCK], one quantization block per row, so that a block's absmax is a
  reduction along a row and its scale a value per row;
* the master weights of 16-bit params (csrc/master_weights.h, the reference
  catapult_kernels/master_weights.py), bit for bit as the C++ kernels: ``round_as`` (a
  float32 value rounded to nearest even into a dtype, kept as float32), ``ecc_value`` and
  ``ecc_code`` (int8 corrections), ``stochastic_round_bf16`` (with ``mix32``), and over a
  block of params: ``master_setup``, ``load_master_params``, ``store_master_params``.

A param's states and Grokfast EMA share one storage dtype S (kernels: S_DTYPE, one per
launch), which may differ from its DTYPE, int8 for every param of a call or for none
(``check_storage_lists``): float storage is loaded as float32 and stored with store_as,
int8 storage goes through load_int8 and store_int8 with each stored list's block scales.

The address table of an update kernel (``UpdateLaunch``) holds the op's element lists
first, then the block scales of int8 storage, then the master weights when a call has
them (column MASTER_COL), then state_steps when the op has them (column STEP_COL), then
the regularizer lists that are on: the Grokfast emas, then the AGC factors, so the ema
column is L - 1 - AGC and the AGC column L - 1.

Host side: ``GradPipeline``, the grad pipeline's arguments (the 9 after the op's own in
every update op's schema), the argument checks of csrc/multi_tensor_checks.h and
csrc/state_storage.h (``check_update_lists``, ``add_regularizer_lists``,
``check_control_args``, ``check_storage_lists``, ``check_master_weights``), the
block-size rule of the elementwise updates (``update_sizes``), and ``UpdateLaunch``: the
plan, address table and grad pipeline arguments of one op's launches, one per (dtype,
storage) group, and the launch that advances the step counts and stochastic rounding
counters after them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra import libdevice

from ..int8_blocks import BLOCK as QUANT_BLOCK  # elements per int8 block (kQuantBlock, csrc/state_storage.h)
from ..int8_blocks import num_blocks
from ..layout import SUPPORTED_DTYPES, is_dense, same_layout
from ..master_weights import ECC_MIN_EXPONENT, MANTISSA_BITS
from .multi_tensor_table import TL_DTYPE, address_table, check_runnable, get_plan, is_interpreted, tensor_ptr

QBLOCK = tl.constexpr(QUANT_BLOCK)  # the same, for the kernels
ROUNDING_SALT: tl.constexpr = tl.constexpr(0x7F4A7C15)  # kRoundingSalt (csrc/master_weights.h)
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)  # of the states and EMAs
TL_STORAGE_DTYPE = {**TL_DTYPE, torch.int8: tl.int8}
# a call's master weights by their dtype: float32 copies, int8 corrections (ecc),
# int64 stochastic rounding counters (csrc/master_weights.h's MasterKind)
MASTER_KINDS = {torch.float32: "float32 copies", torch.int8: "int8 corrections (ecc)",
                torch.int64: "stochastic rounding counters"}
TL_MASTER_DTYPE = {torch.float32: tl.float32, torch.int8: tl.int8, torch.int64: tl.int64}
ECC_MIN_EXPONENT_BF16 = tl.constexpr(ECC_MIN_EXPONENT[torch.bfloat16])
ECC_MIN_EXPONENT_HALF = tl.constexpr(ECC_MIN_EXPONENT[torch.float16])
MANTISSA_BITS_BF16 = tl.constexpr(MANTISSA_BITS[torch.bfloat16])
MANTISSA_BITS_HALF = tl.constexpr(MANTISSA_BITS[torch.float16])

__all__ = [
    "GradPipeline",
    "program_block",
    "grad_multiplier",
    "grad_pipeline_setup",
    "pipeline_grad",
    "powf",
    "to_float32",
    "store_as",
    "load_int8",
    "store_int8",
    "round_as",
    "ecc_value",
    "ecc_code",
    "mix32",
    "stochastic_round_bf16",
    "master_setup",
    "load_master_params",
    "store_master_params",
    "QUANT_BLOCK",
    "QBLOCK",
    "STORAGE_DTYPES",
    "TL_STORAGE_DTYPE",
    "MASTER_KINDS",
    "TL_MASTER_DTYPE",
    "check_scalar",
    "check_control_args",
    "check_update_lists",
    "add_regularizer_lists",
    "check_storage_lists",
    "check_master_weights",
    "nonzero_as_float32",
    "update_sizes",
    "UpdateLaunch",
]


# ------------------------------------------------------------------ device side

@triton.jit
def program_block(numels, blocks, CHUNK: tl.constexpr):
    """(row, start, n) of this program: its tensor's row in the tables, the first
    element of its chunk, and the tensor's numel."""
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(blocks + 2 * pid)
    start = tl.multiple_of(tl.load(blocks + 2 * pid + 1), CHUNK)
    return row, start, tl.load(numels + row)


@triton.jit
def grad_multiplier(grad_norm_ptr, grad_scale_ptr, max_grad_norm, CLIP: tl.constexpr,
                    HAS_GRAD_SCALE: tl.constexpr):
    """grad_multiplier of csrc/grad_pipeline.h in float32, correctly rounded divisions
    (tl.div_rn, as nvcc's default '/'). grad_norm_ptr is read only when CLIP,
    grad_scale_ptr only when HAS_GRAD_SCALE."""
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr)
    else:
        scale = tl.full([], 1.0, tl.float32)
    clip = tl.full([], 1.0, tl.float32)
    if CLIP:
        max_norm = tl.cast(max_grad_norm, tl.float32)  # the interpreter passes Python floats as they are
        clip = tl.div_rn(max_norm, tl.div_rn(tl.load(grad_norm_ptr), scale) + 1e-6)
        clip = tl.where(clip > 1.0, 1.0, clip)  # clip > 1 ? 1 : clip, so a NaN norm propagates
    return tl.div_rn(clip, scale)


@triton.jit
def grad_pipeline_setup(addrs, row, start, row_lens, grad_norm_ptr, grad_scale_ptr, max_grad_norm,
                        DTYPE: tl.constexpr, CLIP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                        AGC: tl.constexpr, GROKFAST: tl.constexpr, ALIGNED: tl.constexpr, L: tl.constexpr,
                        S_DTYPE: tl.constexpr = None):
    """The per-program part of the grad pipeline for tensor ``row``, chunk at ``start``:
    (mult, ema_ptr at the chunk, agc_ptr at the tensor's first factor, row_len). The
    pointers of a regularizer that is off are placeholders, never read. S_DTYPE: the
    emas' storage (None: DTYPE)."""
    mult = grad_multiplier(grad_norm_ptr, grad_scale_ptr, max_grad_norm, CLIP, HAS_GRAD_SCALE)
    ema_ptr = grad_scale_ptr
    agc_ptr = grad_scale_ptr
    row_len = start
    if GROKFAST:
        ema_ptr = tensor_ptr(addrs, row, L, L - 1 - AGC, DTYPE if S_DTYPE is None else S_DTYPE, ALIGNED) + start
    if AGC:
        agc_ptr = tensor_ptr(addrs, row, L, L - 1, tl.float32, False)
        row_len = tl.load(row_lens + row)
    return mult, ema_ptr, agc_ptr, row_len


@triton.jit
def pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, mask, mult, grokfast_alpha,
                  grokfast_one_minus_alpha, grokfast_lamb, DTYPE: tl.constexpr, AGC: tl.constexpr,
                  GROKFAST: tl.constexpr, MAXIMIZE: tl.constexpr, STORE_EMA: tl.constexpr,
                  INTERPRETED: tl.constexpr, S_DTYPE: tl.constexpr = None, ema_scales=None, qidx=None, qmask=None):
    """The grad pipeline (csrc/grad_pipeline.h) on the elements start + idx of one tensor
    (g_ptr and ema_ptr point at start): g = grad * (mult * agc_scale[row]), the Grokfast
    filter (ema = alpha * ema + (1 - alpha) * g, stored when STORE_EMA; g = g + lamb * ema),
    then maximize: g = -g. Returns g in float32. The ema is stored as S_DTYPE (None: DTYPE);
    int8 with its scales at ema_scales (at start's block), idx then of shape [blocks,
    QBLOCK] as load_int8's, the blocks qidx, qmask."""
    g = to_float32(tl.load(g_ptr + idx, mask=mask), INTERPRETED)
    if AGC:
        g = g * (mult * tl.load(agc_ptr + (start + idx) // row_len, mask=mask))
    else:
        g = g * mult
    if GROKFAST:
        if S_DTYPE == tl.int8:
            ema = load_int8(ema_ptr, ema_scales, idx, mask, qidx, qmask, False)  # the ema's map: SQRT
        else:
            ema = to_float32(tl.load(ema_ptr + idx, mask=mask), INTERPRETED)
        ema = tl.cast(grokfast_alpha, tl.float32) * ema + tl.cast(grokfast_one_minus_alpha, tl.float32) * g
        g = g + tl.cast(grokfast_lamb, tl.float32) * ema
        if STORE_EMA:
            if S_DTYPE == tl.int8:
                store_int8(ema_ptr, ema_scales, ema, idx, mask, qidx, qmask, False, INTERPRETED)
            else:
                store_as(ema_ptr + idx, ema, mask, DTYPE if S_DTYPE is None else S_DTYPE, INTERPRETED)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def powf(base, exponent, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        # the interpreter has no libdevice: powf through float64, rounded once
        b = base.to(tl.float64)
        e = exponent.to(tl.float64)
        return tl.exp(e * tl.log(b)).to(tl.float32)
    else:
        return libdevice.pow(base, exponent)  # __nv_powf, as the CUDA kernel's powf


@triton.jit
def fma(a, b, c, INTERPRETED: tl.constexpr):
    """a * b + c rounded once (csrc/lanes.h lane_fma). The interpreter's tl.fma rounds
    twice: there through float64, where a * b of two float32 is exact, rounded at the end
    (a double rounding: an ulp from the fused result in rare ties)."""
    if INTERPRETED:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def to_float32(x, INTERPRETED: tl.constexpr):
    """x (a loaded block of float32, bfloat16 or float16) as float32, exactly."""
    if INTERPRETED and x.dtype == tl.bfloat16:
        # The interpreter (triton 3.8) widens bfloat16 subnormals wrongly (0x8001 to -0.0):
        # widen by the bits, as the hardware does
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def store_as(ptr, x, mask, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
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
def load_int8(ptr, scales, idx, mask, qidx, qmask, FOURTH_ROOT: tl.constexpr):
    """The float32 values of the int8 codes at ptr + idx, idx of shape [blocks, QBLOCK]
    (row b: quantization block qidx[b], at scales + qidx; mask and qmask as store_int8's):
    q = c |c| (exact), then q * (scale / 127^2) (SQRT) or (q |q|) * ((scale / 127^2) / 127^2)
    (FOURTH_ROOT), the factor per block, each step rounded once."""
    c = tl.load(ptr + idx, mask=mask).to(tl.float32)
    q = c * tl.abs(c)
    factor = tl.div_rn(tl.load(scales + qidx, mask=qmask), 16129.0)
    if FOURTH_ROOT:
        q = q * tl.abs(q)
        factor = tl.div_rn(factor, 16129.0)
    return q * factor[:, None]


@triton.jit
def store_int8(ptr, scales, x, idx, mask, qidx, qmask, FOURTH_ROOT: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 x of shape [blocks, QBLOCK] (row b: the elements ptr + idx[b] of
    quantization block qidx[b]; valid where mask, None: all) stored as int8 codes, and
    each block's scale, its absmax over the valid elements (NaN if one is NaN), at
    scales + qidx (where qmask: the blocks holding valid elements; None: all).
    Codes rint(127 sqrt(|x| * (1 / amax))) (FOURTH_ROOT: sqrt of the sqrt) with x's sign,
    the inverse per block, each step rounded once (|x| * (1 / amax) may exceed 1 by an
    ulp: its code is still 127); a nonzero FOURTH_ROOT value's code at least 1; all 0 in a
    block whose amax is 0, inf or NaN."""
    # |x| by its bits: for non-negative floats the integer order is the float order, and a
    # NaN's bits exceed inf's, so the integer max is the absmax with NaN propagated
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if mask is not None:
        bits = tl.where(mask, bits, 0)  # the elements past the tensor's end count as 0
    amax_bits = tl.max(bits, axis=1)
    encodable = (amax_bits > 0) & (amax_bits < 0x7F800000)
    amax_bits = tl.where(amax_bits > 0x7F800000, 0x7FC00000, amax_bits)  # one NaN: the C++ kernels' quiet NaN
    amax = amax_bits.to(tl.float32, bitcast=True)
    # the divisor 1 where nothing is encoded: no 1 / 0
    inverse = tl.div_rn(tl.full(amax.shape, 1.0, tl.float32), tl.where(encodable, amax, 1.0))
    f = tl.sqrt_rn(bits.to(tl.float32, bitcast=True) * inverse[:, None])
    if FOURTH_ROOT:
        f = tl.sqrt_rn(f)
    y = f * 127.0  # in [0, 127] (127 and a few ulps)
    if INTERPRETED:
        # the interpreter has no libdevice: below 2^23, adding 2^23 rounds to an integer
        # (ties to even) and subtracting it is exact
        c = (y + 8388608.0) - 8388608.0
    else:
        c = libdevice.rint(y)
    if FOURTH_ROOT:
        c = tl.where(bits > 0, tl.maximum(c, 1.0), c)  # a nonzero value never code 0 (state_storage.h)
    c = tl.where(x < 0.0, -c, c)
    c = tl.where(encodable[:, None], c, 0.0)
    tl.store(ptr + idx, c.to(tl.int8), mask=mask)
    tl.store(scales + qidx, amax, mask=qmask)


@triton.jit
def round_as(x, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 x rounded to nearest even into DTYPE, as float32 (store_as's rounding)."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        # the interpreter truncates to bfloat16: round by hand as store_as does
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _ecc_quantum_exponent(P, DTYPE: tl.constexpr):
    """e - M - 8 of float32 param values P (int32), e = max(P's exponent, the format's
    smallest), M its explicit mantissa bits (csrc/master_weights.h)."""
    M: tl.constexpr = MANTISSA_BITS_BF16 if DTYPE == tl.bfloat16 else MANTISSA_BITS_HALF
    MIN_E: tl.constexpr = ECC_MIN_EXPONENT_BF16 if DTYPE == tl.bfloat16 else ECC_MIN_EXPONENT_HALF
    e = ((P.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return tl.maximum(e, MIN_E) - M - 8


@triton.jit
def ecc_value(P, code, DTYPE: tl.constexpr):
    """P + code * q of float32 param values P of DTYPE and their int8 corrections (P where
    P is not finite), as csrc/cpu/master_io.h's EccLanes::value."""
    finite = (P.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000
    q = ((_ecc_quantum_exponent(P, DTYPE) + 127) << 23).to(tl.float32, bitcast=True)  # 2^k, exact
    return tl.where(finite, P + code.to(tl.float32) * q, P)


@triton.jit
def ecc_code(x, P, DTYPE: tl.constexpr):
    """The int8 corrections of float32 values x whose rounding into DTYPE is P (float32):
    rint((x - P) / q) clamped to [-127, 127], 0 where P is not finite (as csrc/cpu/master_io.h's
    EccLanes::code; x - P and the scaling by 1 / q are exact)."""
    finite = (P.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000
    inverse_q = ((127 - _ecc_quantum_exponent(P, DTYPE)) << 23).to(tl.float32, bitcast=True)
    y = (x - P) * inverse_q  # |y| <= 128
    # rint, ties to even, on both backends: below 2^22 in magnitude, adding 1.5 * 2^23 lands
    # where the spacing is 1 (the sum rounds to an integer) and subtracting it is exact
    c = (y + 12582912.0) - 12582912.0
    c = tl.minimum(tl.maximum(c, -127.0), 127.0)
    return tl.where(finite, c, 0.0).to(tl.int8)


@triton.jit
def mix32(x):
    """master_weights.h's 32-bit mixer on uint32 (products wrap modulo 2^32)."""
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def stochastic_round_bf16(x, i, lo, hi):
    """float32 x of the elements i (uint32: their memory-order index in the param) rounded
    stochastically to bfloat16 (as float32) under a counter whose halves are lo, hi
    (uint32): x's bits plus the low 16 of mix32(mix32(i) ^ key), cut to the upper 16, with
    key = mix32(lo ^ mix32(hi + ROUNDING_SALT)); NaN as it is (master_weights.h's
    rounding_key, rounding_bits and stochastic_round_bf16)."""
    key = mix32(lo ^ mix32(hi + ROUNDING_SALT))
    r = mix32(mix32(i) ^ key)
    cut = ((x.to(tl.uint32, bitcast=True) + (r & 0xFFFF)) >> 16) << 16
    return tl.where(x != x, x, cut.to(tl.float32, bitcast=True))


@triton.jit
def master_setup(addrs, row, start, MASTER_COL: tl.constexpr, M_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                 L: tl.constexpr):
    """A program's view of its tensor's master weights (M_DTYPE not None): the chunk's first
    float32 copy or int8 correction (the stochastic kind: a placeholder, never read) and the
    halves lo, hi of its stochastic rounding counter (else 0)."""
    lo = tl.full([], 0, tl.uint32)
    hi = tl.full([], 0, tl.uint32)
    if M_DTYPE == tl.int64:
        counter = tl.load(tensor_ptr(addrs, row, L, MASTER_COL, tl.int64, False))
        lo = (counter & 0xFFFFFFFF).to(tl.uint32)
        hi = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
        m_ptr = tensor_ptr(addrs, row, L, MASTER_COL, tl.int64, False)
    else:
        m_ptr = tensor_ptr(addrs, row, L, MASTER_COL, M_DTYPE, ALIGNED) + start
    return m_ptr, lo, hi


@triton.jit
def load_master_params(p_ptr, m_ptr, idx, mask, DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                       INTERPRETED: tl.constexpr):
    """The float32 values of the params at p_ptr + idx with master weights M_DTYPE (not
    None): their float32 copies, their values with their ecc corrections, or themselves."""
    if M_DTYPE == tl.float32:
        return tl.load(m_ptr + idx, mask=mask)
    elif M_DTYPE == tl.int8:
        return ecc_value(to_float32(tl.load(p_ptr + idx, mask=mask), INTERPRETED), tl.load(m_ptr + idx, mask=mask),
                         DTYPE)
    else:
        return to_float32(tl.load(p_ptr + idx, mask=mask), INTERPRETED)


@triton.jit
def store_master_params(p_ptr, m_ptr, x, idx, mask, start, lo, hi, DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    """The new float32 values x into the params at p_ptr + idx (start + idx their indices in
    the param) and their master weights M_DTYPE (not None): the copy and the param rounded to
    nearest; the param rounded to nearest and its correction; the param rounded stochastically."""
    if M_DTYPE == tl.float32:
        tl.store(m_ptr + idx, x, mask=mask)
    elif M_DTYPE == tl.int8:
        rounded = round_as(x, DTYPE, INTERPRETED)
        tl.store(m_ptr + idx, ecc_code(x, rounded, DTYPE), mask=mask)
        x = rounded  # stored exactly
    else:
        x = stochastic_round_bf16(x, (start + idx).to(tl.uint32), lo, hi)  # exact in bfloat16
    store_as(p_ptr + idx, x, mask, DTYPE, INTERPRETED)


@triton.jit
def _advance_steps_kernel(addrs, n, skip_ptr, HAS_SKIP: tl.constexpr, STEP_COL: tl.constexpr,
                          COUNTER_COL: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr):
    """state_steps[i] += 1 (column STEP_COL) and the stochastic rounding counters += 1
    (column COUNTER_COL), each where its column is not -1, for the n rows of an address
    table, unless skipped."""
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0.0:
            return  # a skipped step is not counted
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n
    if STEP_COL >= 0:
        steps = tl.load(addrs + rows * L + STEP_COL, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        tl.store(steps, tl.load(steps, mask=mask) + 1.0, mask=mask)
    if COUNTER_COL >= 0:
        counters = tl.load(addrs + rows * L + COUNTER_COL, mask=mask, other=0).to(tl.pointer_type(tl.int64))
        tl.store(counters, tl.load(counters, mask=mask) + 1, mask=mask)


# -------------------------------------------------------------------- host side

class GradPipeline(NamedTuple):
    """The grad pipeline's arguments, the last 9 of every update op's schema, in order
    (kPipelineSchema, csrc/update_op.h)."""

    grad_norm: Optional[torch.Tensor]
    max_grad_norm: float
    grad_scale: Optional[torch.Tensor]
    skip: Optional[torch.Tensor]
    agc_scales: Sequence[torch.Tensor]
    grokfast_emas: Sequence[torch.Tensor]
    grokfast_alpha: float
    grokfast_lamb: float
    maximize: bool


def check_scalar(t: Optional[torch.Tensor], name: str, device: torch.device) -> None:
    """check_scalar_tensor of csrc/multi_tensor_checks.h (None: an absent optional)."""
    if t is None:
        return
    if t.numel() != 1:
        raise RuntimeError(f"catapult: {name} must have one element, got {t.numel()}")
    if t.dtype != torch.float32:
        raise RuntimeError(f"catapult: {name} must be float32, got {t.dtype}")
    if t.device != device:
        raise RuntimeError(f"catapult: {name} is on {t.device} but the tensors are on {device}")


def check_control_args(op_name: str, lr: torch.Tensor, pipeline: GradPipeline, device: torch.device) -> None:
    """The checks of the control scalars that check_step_control makes for every update
    op (csrc/multi_tensor_checks.h), in the same order."""
    check_scalar(lr, "lr", device)
    check_scalar(pipeline.grad_norm, "grad_norm", device)
    check_scalar(pipeline.grad_scale, "grad_scale", device)
    check_scalar(pipeline.skip, "skip", device)
    if pipeline.max_grad_norm > 0.0 and pipeline.grad_norm is None:
        raise RuntimeError(f"catapult: {op_name} needs grad_norm when max_grad_norm > 0 "
                           f"(got {pipeline.max_grad_norm:g})")


def _device_indices(tensors) -> list:
    return [t.get_device() for t in tensors]


def _devices(tensors) -> list:
    return [t.device for t in tensors]


def check_update_lists(params: Sequence[torch.Tensor], others, state_steps=None, first: str = "params") -> None:
    """check_update_lists of csrc/multi_tensor_checks.h (same checks, same messages);
    ``others`` is a list of (name, list) pairs, state_steps None for an op without them,
    ``first`` the name of ``params`` in the op's schema (grad_pipeline_'s is "out").
    This is the per-tensor host cost of a step, so the common case compares whole lists
    of metadata (list comprehensions, C-level list equality); only when something is
    wrong does the element-by-element loop run to report the first bad entry."""
    n = len(params)
    for name, lst in others:
        if len(lst) != n:
            raise RuntimeError(f"catapult: {name} has {len(lst)} tensors but {first} has {n}")
    if state_steps is not None and len(state_steps) != n:
        raise RuntimeError(f"catapult: state_steps has {len(state_steps)} tensors but {first} has {n}")
    if n == 0:
        return
    # A CUDA device index tells the devices apart (CPU and meta tensors give -1); -1 itself
    # does not (a CPU param beside a meta grad), so there the devices are compared.
    devices_of = _device_indices if params[0].get_device() >= 0 else _devices
    devs = devices_of(params)
    dts = [p.dtype for p in params]
    shapes = [p.shape for p in params]
    strides = [p.stride() for p in params]
    ok = (devs.count(devs[0]) == n and all(dt in SUPPORTED_DTYPES for dt in set(dts))
          and (all([p.is_contiguous() for p in params]) or all(is_dense(p) for p in params)))
    for _, lst in others:
        ok = ok and (devices_of(lst) == devs and [t.dtype for t in lst] == dts
                     and [t.shape for t in lst] == shapes and [t.stride() for t in lst] == strides)
    if state_steps is not None:
        ok = ok and (all(s.dtype == torch.float32 for s in state_steps)
                     and devices_of(state_steps) == devs
                     and all(s.numel() == 1 for s in state_steps))
    if not ok:
        _check_update_lists_slow(params, others, state_steps, first)


def _check_update_lists_slow(params, others, state_steps, first) -> None:
    device = params[0].device
    for i, p in enumerate(params):
        dt = p.dtype
        if p.device != device:
            raise RuntimeError(f"catapult: {first}[{i}] is on {p.device} but {first}[0] is on {device}")
        if dt not in SUPPORTED_DTYPES:
            raise RuntimeError(f"catapult: {first}[{i}] has dtype {dt}; supported: float32, bfloat16, float16")
        if not is_dense(p):
            raise RuntimeError(f"catapult: {first}[{i}] is not dense in memory (strides {tuple(p.stride())})")
        shape, stride = p.shape, p.stride()
        for name, lst in others:
            t = lst[i]
            if t.device != device:
                raise RuntimeError(f"catapult: {name}[{i}] is on {t.device} but {first} are on {device}")
            if t.dtype != dt:
                raise RuntimeError(f"catapult: {name}[{i}] has dtype {t.dtype} but {first}[{i}] has {dt}")
            if not same_layout(t, p):
                raise RuntimeError(f"catapult: {name}[{i}] has shape {tuple(t.shape)} strides {tuple(t.stride())} "
                                   f"but {first}[{i}] has shape {tuple(shape)} strides {tuple(stride)}")
        if state_steps is None:
            continue
        s = state_steps[i]
        if s.dtype != torch.float32 or s.numel() != 1:
            raise RuntimeError(f"catapult: state_steps[{i}] must be a one-element float32 tensor")
        if s.device != device:
            raise RuntimeError(f"catapult: state_steps[{i}] is on {s.device} but {first} are on {device}")


def add_regularizer_lists(op_name: str, params: Sequence[torch.Tensor], agc_scales: Sequence[torch.Tensor],
                          grokfast_emas: Sequence[torch.Tensor], others: list,
                          first: str = "params", ema_lists: Optional[list] = None) -> Optional[list]:
    """add_regularizer_lists of csrc/multi_tensor_checks.h (same checks, same messages):
    appends ("grokfast_emas", grokfast_emas) to ``others`` (for check_update_lists), or to
    ``ema_lists`` when given (an op that stores its emas like its states:
    check_storage_lists), when Grokfast is on, checks agc_scales, and returns the AGC rows
    of each param (None when AGC is off). As in check_update_lists, the common case
    compares whole lists; the loop that names the first bad entry runs only when
    something is wrong."""
    n = len(params)
    if grokfast_emas and len(grokfast_emas) != n:
        raise RuntimeError(f"catapult: {op_name}: grokfast_emas has {len(grokfast_emas)} tensors but {first} has "
                           f"{n} (give none to switch Grokfast off)")
    if grokfast_emas:
        (others if ema_lists is None else ema_lists).append(("grokfast_emas", grokfast_emas))
    if not agc_scales:
        return None
    if len(agc_scales) != n:
        raise RuntimeError(f"catapult: {op_name}: agc_scales has {len(agc_scales)} tensors but {first} has {n} "
                           "(give none to switch AGC off)")
    rows = [p.shape[0] if p.dim() >= 2 else 1 for p in params]
    devices_of = _device_indices if params[0].get_device() >= 0 else _devices
    ok = ([a.numel() for a in agc_scales] == rows
          and all([a.dtype == torch.float32 and a.dim() == 1 and a.is_contiguous() for a in agc_scales])
          and devices_of(agc_scales) == devices_of(params)
          and all([p.is_contiguous() for p in params]))  # contiguous: rows are contiguous runs
    if not ok:
        _check_agc_scales_slow(op_name, params, agc_scales, rows, first)
    return rows


def _check_agc_scales_slow(op_name, params, agc_scales, rows, first) -> None:
    for i, (a, p, r) in enumerate(zip(agc_scales, params, rows)):
        if not (a.dtype == torch.float32 and a.dim() == 1 and a.is_contiguous()):
            raise RuntimeError(f"catapult: {op_name}: agc_scales[{i}] must be a contiguous 1-D float32 tensor, "
                               f"got {a.dtype} of shape {tuple(a.shape)}")
        if a.numel() != r:
            raise RuntimeError(f"catapult: {op_name}: agc_scales[{i}] has {a.numel()} factors but {first}[{i}] "
                               f"has {r} rows")
        if a.device != p.device:
            raise RuntimeError(f"catapult: {op_name}: agc_scales[{i}] is on {a.device} but {first}[{i}] is on "
                               f"{p.device}")
        # dim 0 has the largest stride among dims of size > 1
        size, stride = p.shape, p.stride()
        if not all(size[0] == 1 or size[d] == 1 or stride[0] >= stride[d] * size[d] for d in range(1, p.dim())):
            raise RuntimeError(f"catapult: {op_name}: {first}[{i}] (strides {tuple(stride)}) does not keep its rows "
                               "contiguous, as AGC needs")


def check_storage_lists(op_name: str, params: Sequence[torch.Tensor], stored: Sequence,
                        state_scales: Sequence[torch.Tensor], first: str = "params") -> Optional[list]:
    """check_storage_lists of csrc/state_storage.h (same checks, same messages, same
    order): ``stored`` (name, list) pairs, the states a call uses then the Grokfast emas,
    entry i of each laid out like params[i] on its device, in one storage dtype per param
    (STORAGE_DTYPES), int8 for every param or for none; with int8, state_scales holds,
    list-major, one contiguous 1-D float32 tensor of ceil(numel / QUANT_BLOCK) block
    scales per stored tensor, else it is empty. Returns each param's storage dtype (None
    when nothing is stored). As in check_update_lists, the common case compares whole
    lists; the loop that names the first bad entry runs only when something is wrong."""
    n = len(params)
    for name, lst in stored:
        if len(lst) != n:
            raise RuntimeError(f"catapult: {name} has {len(lst)} tensors but {first} has {n}")
    storage = [t.dtype for t in stored[0][1]] if stored and n else None
    int8 = storage is not None and storage[0] == torch.int8
    if storage is not None:
        devices_of = _device_indices if params[0].get_device() >= 0 else _devices
        devs = devices_of(params)
        shapes = [p.shape for p in params]
        strides = [p.stride() for p in params]
        kinds = set(storage)
        ok = kinds <= set(STORAGE_DTYPES) and (kinds == {torch.int8} if int8 else torch.int8 not in kinds)
        for _, lst in stored:
            ok = ok and ([t.dtype for t in lst] == storage and devices_of(lst) == devs
                         and [t.shape for t in lst] == shapes and [t.stride() for t in lst] == strides)
        if not ok:
            _check_stored_lists_slow(op_name, params, stored, int8, first)
    if not int8:
        if state_scales:
            raise RuntimeError(f"catapult: {op_name}: state_scales must be empty: no state is stored as int8")
        return storage
    if len(state_scales) != len(stored) * n:
        raise RuntimeError(f"catapult: {op_name}: state_scales has {len(state_scales)} tensors but int8 storage needs "
                           f"{len(stored) * n} (one per param for each of {len(stored)} stored lists)")
    blocks = [num_blocks(p.numel()) for p in params] * len(stored)
    ok = (all([s.dtype == torch.float32 and s.dim() == 1 and s.is_contiguous() for s in state_scales])
          and [s.numel() for s in state_scales] == blocks and devices_of(state_scales) == devs * len(stored))
    if not ok:
        _check_state_scales_slow(op_name, params, stored, state_scales, first)
    return storage


def _check_stored_lists_slow(op_name, params, stored, int8, first) -> None:
    first_stored, first_list = stored[0]
    for i, p in enumerate(params):
        storage = first_list[i].dtype
        for name, lst in stored:
            t = lst[i]
            if t.dtype not in STORAGE_DTYPES:
                raise RuntimeError(f"catapult: {op_name}: {name}[{i}] has dtype {t.dtype}; state storage: float32, "
                                   "bfloat16, float16 or int8")
            if t.dtype != storage:
                raise RuntimeError(f"catapult: {op_name}: {name}[{i}] has dtype {t.dtype} but {first_stored}[{i}] has "
                                   f"{storage} (one storage dtype per param)")
            if (storage == torch.int8) != int8:
                raise RuntimeError(f"catapult: {op_name}: {name}[{i}] has dtype {storage} but {first_stored}[0] has "
                                   f"{first_list[0].dtype} (int8 storage for every param of a call or for none)")
            if t.device != p.device:
                raise RuntimeError(f"catapult: {name}[{i}] is on {t.device} but {first} are on {p.device}")
            if not same_layout(t, p):
                raise RuntimeError(f"catapult: {name}[{i}] has shape {tuple(t.shape)} strides {tuple(t.stride())} "
                                   f"but {first}[{i}] has shape {tuple(p.shape)} strides {tuple(p.stride())}")


def _check_state_scales_slow(op_name, params, stored, state_scales, first) -> None:
    n = len(params)
    for j, s in enumerate(state_scales):
        p = params[j % n]
        if not (s.dtype == torch.float32 and s.dim() == 1 and s.is_contiguous()):
            raise RuntimeError(f"catapult: {op_name}: state_scales[{j}] must be a contiguous 1-D float32 tensor, "
                               f"got {s.dtype} of shape {tuple(s.shape)}")
        blocks = num_blocks(p.numel())
        if s.numel() != blocks:
            raise RuntimeError(f"catapult: {op_name}: state_scales[{j}] has {s.numel()} scales but "
                               f"{stored[j // n][0]}[{j % n}] has {blocks} blocks of {QUANT_BLOCK}")
        if s.device != p.device:
            raise RuntimeError(f"catapult: {op_name}: state_scales[{j}] is on {s.device} but {first} are on "
                               f"{p.device}")


# torch dtypes as C++ prints their ScalarType, for messages that match the C++ checks
_SCALAR_TYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                      torch.bfloat16: "BFloat16", torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short",
                      torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool",
                      torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _scalar_type_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _sizes(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"  # as C++ prints an IntArrayRef


def check_master_weights(op_name: str, params: Sequence[torch.Tensor], masters: Sequence[torch.Tensor],
                         first: str = "params") -> Optional[torch.dtype]:
    """check_master_weights of csrc/master_weights.h (same checks, same messages, same
    order): none, or one per param of one kind (MASTER_KINDS, by masters[0]'s dtype):
    float32 copies or int8 corrections laid out like their params, or one-element int64
    counters; bfloat16 or float16 params (stochastic rounding: bfloat16), on the params'
    devices. Returns the kind's dtype, None without master weights. As in
    check_update_lists, the common case compares whole lists; the loop that names the
    first bad entry runs only when something is wrong."""
    if not masters:
        return None
    n = len(params)
    if len(masters) != n:
        raise RuntimeError(f"catapult: {op_name}: master_weights has {len(masters)} tensors but {first} has {n}")
    kind = masters[0].dtype
    if kind not in MASTER_KINDS:
        raise RuntimeError(f"catapult: {op_name}: master_weights[0] has dtype {_scalar_type_name(kind)}; master "
                           "weights: float32 (copies), int8 (ecc corrections) or one-element int64 (stochastic "
                           "rounding counters)")
    allowed = {torch.bfloat16} if kind == torch.int64 else {torch.bfloat16, torch.float16}
    devices_of = _device_indices if params[0].get_device() >= 0 else _devices
    ok = ([m.dtype for m in masters] == [kind] * n and {p.dtype for p in params} <= allowed
          and devices_of(masters) == devices_of(params))
    if kind == torch.int64:
        ok = ok and all([m.numel() == 1 for m in masters])
    else:
        ok = ok and ([m.shape for m in masters] == [p.shape for p in params]
                     and [m.stride() for m in masters] == [p.stride() for p in params])
    if not ok:
        _check_master_weights_slow(op_name, params, masters, allowed, first)
    return kind


def _check_master_weights_slow(op_name, params, masters, allowed, first) -> None:
    kind = masters[0].dtype
    for i, (m, p) in enumerate(zip(masters, params)):
        if m.dtype != kind:
            raise RuntimeError(f"catapult: {op_name}: master_weights[{i}] has dtype {_scalar_type_name(m.dtype)} but "
                               f"master_weights[0] has {_scalar_type_name(kind)} (one kind per call)")
        if p.dtype not in allowed:
            need = "bfloat16" if kind == torch.int64 else "bfloat16 or float16"
            raise RuntimeError(f"catapult: {op_name}: master_weights as {MASTER_KINDS[kind]} need {need} {first}; "
                               f"{first}[{i}] is {_scalar_type_name(p.dtype)}")
        if m.device != p.device:
            raise RuntimeError(f"catapult: {op_name}: master_weights[{i}] is on {m.device} but {first} are on "
                               f"{p.device}")
        if kind == torch.int64:
            if m.numel() != 1:
                raise RuntimeError(f"catapult: {op_name}: master_weights[{i}] (a stochastic rounding counter) must "
                                   f"have one element, got shape {_sizes(m.shape)}")
        elif not same_layout(m, p):
            raise RuntimeError(f"catapult: {op_name}: master_weights[{i}] has shape {_sizes(m.shape)} strides "
                               f"{_sizes(m.stride())} but {first}[{i}] has shape {_sizes(p.shape)} strides "
                               f"{_sizes(p.stride())}")


def nonzero_as_float32(x: float) -> bool:
    """float(x) rounded to float32 != 0, without a tensor: |x| <= 2**-150 rounds to
    zero (2**-150 is halfway to the least subnormal and ties to even); NaN is nonzero."""
    return not abs(x) <= 2.0 ** -150


def update_sizes(dtype: torch.dtype, interpreted: bool, storage: Optional[torch.dtype] = None) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, num_warps) of an elementwise update kernel over params of ``dtype``
    with states stored as ``storage`` (None: dtype): elements per vector step, elements
    per program, warps. BLOCK is a multiple of QUANT_BLOCK and CHUNK of
    BLOCK, so that a block of int8 storage is updated whole by one program in one vector
    step (elementwise_update.py). A rule, not triton.autotune: autotuning runs a
    mutating kernel several times (it would need restore_value on every tensor of the
    lists, which live behind the address table), and the interpreter must run each
    config exactly once."""
    if interpreted:
        # small, so that small test tensors take every path (a full chunk of two blocks, a
        # tail); not smaller: the interpreter's cost is per block
        return 512, 1024, 4
    # Measured with AdamW on an H100 (100M parameters in 100 tensors, kernel alone, d2d
    # copy = 3.0 TB/s): float32 (1024, 4096, 4 warps) 97% of the copy roof; bfloat16
    # (512, 2048, 4) 97%. torch's fused AdamW: 79% and 46%. Any BLOCK 512-2048, CHUNK
    # 1-4x BLOCK was within 4%. SGD, Lion and LAMB use the same rule (not measured separately).
    if dtype == torch.float32 and storage in (None, torch.float32):
        return 1024, 4096, 4   # 8 floats (two 16-byte vectors) per thread per tensor
    # 4 halves per thread per tensor. Lists of other widths (float32 params, bfloat16 or
    # int8 states) too: loads of one element count per thread share a layout, where at
    # 1024 the compiler converts between the two through shared memory (sm_90 PTX of
    # AdamW, float32 params, int8 states: 4 KiB of shared memory and 20 barriers per
    # block against none; not measured on a GPU)
    return 512, 2048, 4


class UpdateLaunch:
    """The launches of one update op's kernels over params (at least one tensor): one
    per dtype group, each covering the group through the multi-tensor tables (the
    cached plan, with the AGC row lengths when AGC is on, and the address table), then
    ``advance_steps``. Every update kernel takes the same named arguments for the
    tables, the step control and the grad pipeline; ``launch`` passes them, with the op's own.
    A group is the tensors of one (params' dtype, storage dtype) pair, the plan's group
    key; ``storage`` gives each param's (check_storage_lists; None: the params' dtype).

    The address table: ``lists`` (element lists: params, grads, then the stored lists
    the kernel walks as flat arrays of their dtype), then ``scale_lists`` (int8 storage's
    block scales, float32), then ``masters`` when given (master weights: float32 copies
    or int8 corrections walked as flat arrays like the params, or int64 counters; column
    ``master_col``, -1 without), then state_steps when given (float32 scalars, column
    STEP_COL; -1 without), then grokfast_emas when Grokfast is on, then agc_scales when
    AGC is on (agc_rows: add_regularizer_lists' result)."""

    def __init__(self, kernel, params, lists, state_steps, lr, pipeline: GradPipeline, agc_rows, scale_lists=(),
                 storage: Optional[Sequence[torch.dtype]] = None, masters: Sequence[torch.Tensor] = ()):
        device = params[0].device
        check_runnable(device, kernel)
        self.interpreted = is_interpreted(kernel)
        self.n_tensors = len(params)
        dtypes = [p.dtype for p in params]
        keys = list(zip(dtypes, dtypes if storage is None else storage))
        self.sizes = {key: update_sizes(key[0], self.interpreted, key[1]) for key in set(keys)}
        self.plan = get_plan(device, [p.numel() for p in params], keys,
                             {key: s[1] for key, s in self.sizes.items()}, agc_rows)
        agc, grokfast = agc_rows is not None, bool(pipeline.grokfast_emas)
        steps = [state_steps] if state_steps is not None else []
        regularizers = ([pipeline.grokfast_emas] if grokfast else []) + ([pipeline.agc_scales] if agc else [])
        master = [masters] if masters else []
        table_lists = list(lists) + list(scale_lists) + master + steps + regularizers
        addrs, aligned = address_table(table_lists, device)
        self.master_col = len(lists) + len(scale_lists) if master else -1
        self.counters = bool(master) and masters[0].dtype == torch.int64  # stochastic rounding's
        ema_col = len(lists) + len(scale_lists) + len(master) + len(steps)
        clip = pipeline.max_grad_norm > 0.0
        skip, grad_scale = pipeline.skip, pipeline.grad_scale
        self.table = dict(
            addrs=addrs, numels=self.plan.numels, lr_ptr=lr,
            skip_ptr=skip if skip is not None else lr,  # lr: a placeholder, never read
            HAS_SKIP=skip is not None, INTERPRETED=self.interpreted,
            # the scales are loaded one per quantization block, a counter one per program:
            # their alignment does not matter
            ALIGNED=(all(aligned[:len(lists)]) and (not grokfast or aligned[ema_col])
                     and (not master or self.counters or aligned[self.master_col])),
            STEP_COL=len(lists) + len(scale_lists) + len(master) if steps else -1, L=len(table_lists))
        self.pipeline = dict(
            row_lens=self.plan.row_lens if agc else self.plan.numels,
            grad_norm_ptr=pipeline.grad_norm if clip else lr,
            grad_scale_ptr=grad_scale if grad_scale is not None else lr,
            max_grad_norm=float(pipeline.max_grad_norm), grokfast_alpha=float(pipeline.grokfast_alpha),
            # 1 - alpha in double, then rounded (grad_pipeline.h's Grokfast)
            grokfast_one_minus_alpha=float(1.0 - pipeline.grokfast_alpha),
            grokfast_lamb=float(pipeline.grokfast_lamb), CLIP=clip, HAS_GRAD_SCALE=grad_scale is not None,
            AGC=agc, GROKFAST=grokfast, MAXIMIZE=bool(pipeline.maximize))

    def launch(self, kernel, per_group: Optional[Callable[[int], dict]] = None, **op_args) -> None:
        """kernel over every group: the table and grad pipeline arguments, op_args, and
        per_group(first block of the group)'s."""
        for key, begin, end, chunk in self.plan.groups:
            if end == begin:
                continue
            dt = key[0]
            block, _, warps = self.sizes[key]
            wrap_triton(kernel)[(end - begin,)](
                blocks=self.plan.group_blocks(begin), **self.table, **self.pipeline,
                **op_args, **(per_group(begin) if per_group is not None else {}),
                DTYPE=TL_DTYPE[dt], BLOCK=block, CHUNK=chunk, num_warps=warps, enable_fp_fusion=False)

    def advance_steps(self) -> None:
        """state_steps[i] += 1 and the stochastic rounding counters += 1 for every tensor
        (numel 0 too), unless skipped. Called after the update launches: in its own launch,
        so that every program of those has read the counts from before the step."""
        counter_col = self.master_col if self.counters else -1
        if self.table["STEP_COL"] < 0 and counter_col < 0:
            return
        block = 256 if self.interpreted else 1024
        wrap_triton(_advance_steps_kernel)[(triton.cdiv(self.n_tensors, block),)](
            self.table["addrs"], self.n_tensors, self.table["skip_ptr"], HAS_SKIP=self.table["HAS_SKIP"],
            STEP_COL=self.table["STEP_COL"], COUNTER_COL=counter_col, L=self.table["L"], BLOCK=block, num_warps=4)
