"""Pieces shared by the Triton update kernels (adamw.py, sgd.py).

Device side (@triton.jit):
* ``grad_multiplier``: csrc/grad_pipeline.h, the factor every grad is multiplied by
  (unscale, then the global-norm clip), negated for maximize;
* ``store_as``: a float32 value stored as the tensor's dtype, rounded to nearest even
  (also under the interpreter, which truncates to bfloat16).

Host side: the argument checks of csrc/multi_tensor_checks.h (``check_update_lists``,
``check_control_args``), the block-size rule of the elementwise updates
(``update_sizes``) and the plan of one launch per dtype group (``dtype_group_plan``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops import same_layout
from .multi_tensor_table import SUPPORTED_DTYPES, MultiTensorPlan, get_plan, is_dense

__all__ = [
    "grad_multiplier",
    "store_as",
    "check_scalar",
    "check_control_args",
    "check_update_lists",
    "update_sizes",
    "dtype_group_plan",
]


# ------------------------------------------------------------------ device side

@triton.jit
def grad_multiplier(grad_norm_ptr, grad_scale_ptr, max_grad_norm, CLIP: tl.constexpr,
                    HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    """grad_multiplier of csrc/grad_pipeline.h in float32, correctly rounded divisions
    (tl.div_rn, as nvcc's default '/'); negated when MAXIMIZE, since grad * (-mult) is
    bit for bit -(grad * mult). grad_norm_ptr is read only when CLIP, grad_scale_ptr
    only when HAS_GRAD_SCALE."""
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr)
    else:
        scale = tl.full([], 1.0, tl.float32)
    clip = tl.full([], 1.0, tl.float32)
    if CLIP:
        max_norm = tl.cast(max_grad_norm, tl.float32)  # the interpreter passes Python floats as they are
        clip = tl.div_rn(max_norm, tl.div_rn(tl.load(grad_norm_ptr), scale) + 1e-6)
        clip = tl.where(clip > 1.0, 1.0, clip)  # clip > 1 ? 1 : clip, so a NaN norm propagates
    mult = tl.div_rn(clip, scale)
    if MAXIMIZE:
        mult = -mult
    return mult


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


# -------------------------------------------------------------------- host side

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


def check_control_args(op_name: str, lr: torch.Tensor, grad_norm: Optional[torch.Tensor],
                       max_grad_norm: float, grad_scale: Optional[torch.Tensor],
                       found_inf: Optional[torch.Tensor], device: torch.device) -> None:
    """The checks of the control scalars that end check_adamw_args / check_sgd_args
    (csrc/multi_tensor_checks.h), in the same order."""
    check_scalar(lr, "lr", device)
    check_scalar(grad_norm, "grad_norm", device)
    check_scalar(grad_scale, "grad_scale", device)
    check_scalar(found_inf, "found_inf", device)
    if max_grad_norm > 0.0 and grad_norm is None:
        raise RuntimeError(f"catapult: {op_name} needs grad_norm when max_grad_norm > 0")


def _device_indices(tensors) -> list:
    return [t.get_device() for t in tensors]


def _devices(tensors) -> list:
    return [t.device for t in tensors]


def check_update_lists(params: Sequence[torch.Tensor], others, state_steps=None) -> None:
    """check_update_lists of csrc/multi_tensor_checks.h (same checks, same messages);
    ``others`` is a list of (name, list) pairs, state_steps None for an op without them.
    This is the per-tensor host cost of a step, so the common case compares whole lists
    of metadata (list comprehensions, C-level list equality); only when something is
    wrong does the element-by-element loop run to report the first bad entry."""
    n = len(params)
    for name, lst in others:
        if len(lst) != n:
            raise RuntimeError(f"catapult: {name} has {len(lst)} tensors but params has {n}")
    if state_steps is not None and len(state_steps) != n:
        raise RuntimeError(f"catapult: state_steps has {len(state_steps)} tensors but params has {n}")
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
        _check_update_lists_slow(params, others, state_steps)


def _check_update_lists_slow(params, others, state_steps) -> None:
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
        if state_steps is None:
            continue
        s = state_steps[i]
        if s.dtype != torch.float32 or s.numel() != 1:
            raise RuntimeError(f"catapult: state_steps[{i}] must be a one-element float32 tensor")
        if s.device != device:
            raise RuntimeError(f"catapult: state_steps[{i}] is on {s.device} but params are on {device}")


def update_sizes(dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, num_warps) of an elementwise update kernel: elements per vector
    step, elements per program, warps. A rule, not triton.autotune: autotuning runs a
    mutating kernel several times (it would need restore_value on every tensor of the
    lists, which live behind the address table), and the interpreter must run each
    config exactly once."""
    if interpreted:
        return 256, 1024, 4  # small, so that small test tensors still take every path
    # Measured with AdamW on an H100 (100M parameters in 100 tensors, kernel alone, d2d
    # copy = 3.0 TB/s): float32 (1024, 4096, 4 warps) 97% of the copy roof; bfloat16
    # (512, 2048, 4) 97%. torch's fused AdamW: 79% and 46%. Any BLOCK 512-2048, CHUNK
    # 1-4x BLOCK was within 4%. SGD uses the same rule (not measured separately).
    if dtype == torch.float32:
        return 1024, 4096, 4   # 8 floats (two 16-byte vectors) per thread per tensor
    return 512, 2048, 4        # 4 halves per thread per tensor


def dtype_group_plan(params: Sequence[torch.Tensor], device: torch.device,
                     interpreted: bool) -> tuple[MultiTensorPlan, dict]:
    """The cached plan of one launch per dtype group over params (and the lists that
    share their shapes), and {dtype: update_sizes(dtype)} for the groups present."""
    keys = [p.dtype for p in params]
    sizes = {dt: update_sizes(dt, interpreted) for dt in set(keys)}
    plan = get_plan(device, [p.numel() for p in params], keys, {dt: s[1] for dt, s in sizes.items()})
    return plan, sizes
