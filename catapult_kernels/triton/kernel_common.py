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
* ``store_as``: a float32 value stored as the tensor's dtype, rounded to nearest even
  (also under the interpreter, which truncates to bfloat16).

The address table of an update kernel (``UpdateLaunch``) holds the op's element lists
first, then state_steps when the op has them (column STEP_COL), then the regularizer
lists that are on: the Grokfast emas, then the AGC factors, so the ema column is
L - 1 - AGC and the AGC column L - 1.

Host side: ``GradPipeline``, the grad pipeline's arguments (the last 9 of every update
op's schema), the argument checks of csrc/multi_tensor_checks.h (``check_update_lists``,
``add_regularizer_lists``, ``check_control_args``), the block-size rule of the
elementwise updates (``update_sizes``), and ``UpdateLaunch``: the plan, address table
and grad pipeline arguments of one op's launches, one per dtype group, and the launch
that advances the step counts after them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra import libdevice

from ..layout import SUPPORTED_DTYPES, is_dense, same_layout
from .multi_tensor_table import TL_DTYPE, address_table, check_runnable, get_plan, is_interpreted, tensor_ptr

__all__ = [
    "GradPipeline",
    "program_block",
    "grad_multiplier",
    "grad_pipeline_setup",
    "pipeline_grad",
    "powf",
    "store_as",
    "check_scalar",
    "check_control_args",
    "check_update_lists",
    "add_regularizer_lists",
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
                        AGC: tl.constexpr, GROKFAST: tl.constexpr, ALIGNED: tl.constexpr, L: tl.constexpr):
    """The per-program part of the grad pipeline for tensor ``row``, chunk at ``start``:
    (mult, ema_ptr at the chunk, agc_ptr at the tensor's first factor, row_len). The
    pointers of a regularizer that is off are placeholders, never read."""
    mult = grad_multiplier(grad_norm_ptr, grad_scale_ptr, max_grad_norm, CLIP, HAS_GRAD_SCALE)
    ema_ptr = grad_scale_ptr
    agc_ptr = grad_scale_ptr
    row_len = start
    if GROKFAST:
        ema_ptr = tensor_ptr(addrs, row, L, L - 1 - AGC, DTYPE, ALIGNED) + start
    if AGC:
        agc_ptr = tensor_ptr(addrs, row, L, L - 1, tl.float32, False)
        row_len = tl.load(row_lens + row)
    return mult, ema_ptr, agc_ptr, row_len


@triton.jit
def pipeline_grad(g_ptr, ema_ptr, agc_ptr, row_len, start, idx, mask, mult, grokfast_alpha,
                  grokfast_one_minus_alpha, grokfast_lamb, DTYPE: tl.constexpr, AGC: tl.constexpr,
                  GROKFAST: tl.constexpr, MAXIMIZE: tl.constexpr, STORE_EMA: tl.constexpr,
                  INTERPRETED: tl.constexpr):
    """The grad pipeline (csrc/grad_pipeline.h) on the elements start + idx of one tensor
    (g_ptr and ema_ptr point at start): g = grad * (mult * agc_scale[row]), the Grokfast
    filter (ema = alpha * ema + (1 - alpha) * g, stored when STORE_EMA; g = g + lamb * ema),
    then maximize: g = -g. Returns g in float32."""
    g = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
    if AGC:
        g = g * (mult * tl.load(agc_ptr + (start + idx) // row_len, mask=mask))
    else:
        g = g * mult
    if GROKFAST:
        ema = tl.load(ema_ptr + idx, mask=mask).to(tl.float32)
        ema = tl.cast(grokfast_alpha, tl.float32) * ema + tl.cast(grokfast_one_minus_alpha, tl.float32) * g
        g = g + tl.cast(grokfast_lamb, tl.float32) * ema
        if STORE_EMA:
            store_as(ema_ptr + idx, ema, mask, DTYPE, INTERPRETED)
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
def _advance_steps_kernel(addrs, n, skip_ptr, HAS_SKIP: tl.constexpr, STEP_COL: tl.constexpr, L: tl.constexpr,
                          BLOCK: tl.constexpr):
    """state_steps[i] += 1 for the n rows of an address table (column STEP_COL), unless skipped."""
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0.0:
            return  # a skipped step is not counted
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n
    steps = tl.load(addrs + rows * L + STEP_COL, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    tl.store(steps, tl.load(steps, mask=mask) + 1.0, mask=mask)


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
                          first: str = "params") -> Optional[list]:
    """add_regularizer_lists of csrc/multi_tensor_checks.h (same checks, same messages):
    appends ("grokfast_emas", grokfast_emas) to ``others`` (for check_update_lists) when
    Grokfast is on, checks agc_scales, and returns the AGC rows of each param (None
    when AGC is off). As in check_update_lists, the common case compares whole lists;
    the loop that names the first bad entry runs only when something is wrong."""
    n = len(params)
    if grokfast_emas and len(grokfast_emas) != n:
        raise RuntimeError(f"catapult: {op_name}: grokfast_emas has {len(grokfast_emas)} tensors but {first} has "
                           f"{n} (give none to switch Grokfast off)")
    if grokfast_emas:
        others.append(("grokfast_emas", grokfast_emas))
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


def nonzero_as_float32(x: float) -> bool:
    """float(x) rounded to float32 != 0, without a tensor: |x| <= 2**-150 rounds to
    zero (2**-150 is halfway to the least subnormal and ties to even); NaN is nonzero."""
    return not abs(x) <= 2.0 ** -150


def update_sizes(dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, num_warps) of an elementwise update kernel: elements per vector
    step, elements per program, warps. A rule, not triton.autotune: autotuning runs a
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
    if dtype == torch.float32:
        return 1024, 4096, 4   # 8 floats (two 16-byte vectors) per thread per tensor
    return 512, 2048, 4        # 4 halves per thread per tensor


class UpdateLaunch:
    """The launches of one update op's kernels over params (at least one tensor): one
    per dtype group, each covering the group through the multi-tensor tables (the
    cached plan, with the AGC row lengths when AGC is on, and the address table), then
    ``advance_steps``. Every update kernel takes the same named arguments for the
    tables, the step control and the grad pipeline; ``launch`` passes them, with the op's own.

    The address table: ``lists`` (element lists, walked as flat arrays of the params'
    dtype), then state_steps when given (float32 scalars, column STEP_COL; -1 without),
    then grokfast_emas when Grokfast is on, then agc_scales when AGC is on (agc_rows:
    add_regularizer_lists' result)."""

    def __init__(self, kernel, params, lists, state_steps, lr, pipeline: GradPipeline, agc_rows):
        device = params[0].device
        check_runnable(device, kernel)
        self.interpreted = is_interpreted(kernel)
        self.n_tensors = len(params)
        keys = [p.dtype for p in params]
        self.sizes = {dt: update_sizes(dt, self.interpreted) for dt in set(keys)}
        self.plan = get_plan(device, [p.numel() for p in params], keys,
                             {dt: s[1] for dt, s in self.sizes.items()}, agc_rows)
        agc, grokfast = agc_rows is not None, bool(pipeline.grokfast_emas)
        steps = [state_steps] if state_steps is not None else []
        regularizers = ([pipeline.grokfast_emas] if grokfast else []) + ([pipeline.agc_scales] if agc else [])
        table_lists = list(lists) + steps + regularizers
        addrs, aligned = address_table(table_lists, device)
        clip = pipeline.max_grad_norm > 0.0
        skip, grad_scale = pipeline.skip, pipeline.grad_scale
        self.table = dict(
            addrs=addrs, numels=self.plan.numels, lr_ptr=lr,
            skip_ptr=skip if skip is not None else lr,  # lr: a placeholder, never read
            HAS_SKIP=skip is not None, INTERPRETED=self.interpreted,
            ALIGNED=all(aligned[:len(lists)]) and (not grokfast or aligned[len(lists) + len(steps)]),
            STEP_COL=len(lists) if steps else -1, L=len(table_lists))
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
        """kernel over every dtype group: the table and grad pipeline arguments, op_args,
        and per_group(first block of the group)'s."""
        for dt, begin, end, chunk in self.plan.groups:
            if end == begin:
                continue
            block, _, warps = self.sizes[dt]
            wrap_triton(kernel)[(end - begin,)](
                blocks=self.plan.group_blocks(begin), **self.table, **self.pipeline,
                **op_args, **(per_group(begin) if per_group is not None else {}),
                DTYPE=TL_DTYPE[dt], BLOCK=block, CHUNK=chunk, num_warps=warps, enable_fp_fusion=False)

    def advance_steps(self) -> None:
        """state_steps[i] += 1 for every tensor (numel 0 too), unless skipped. Called after
        the update launches: in its own launch, so that every program of those has read
        the count from before the step."""
        if self.table["STEP_COL"] < 0:
            return
        block = 256 if self.interpreted else 1024
        wrap_triton(_advance_steps_kernel)[(triton.cdiv(self.n_tensors, block),)](
            self.table["addrs"], self.n_tensors, self.table["skip_ptr"], HAS_SKIP=self.table["HAS_SKIP"],
            STEP_COL=self.table["STEP_COL"], L=self.table["L"], BLOCK=block, num_warps=4)
