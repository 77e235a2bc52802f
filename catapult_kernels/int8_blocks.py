"""The blockwise int8 codec of optimizer state (state_dtype=torch.int8): the pure-torch
reference that every backend's kernels match bit for bit.

A tensor is cut into blocks of BLOCK consecutive elements in MEMORY order (the last block
may be partial). A block stores one float32 scale, its largest |x|, and per element an int8
code c = sign(x) rint(127 (|x| * (1 / scale))^p); decoding inverts the power:
x = c|c| * (scale / 127^2) for SQRT, (c|c|)^2 sign(c) * ((scale / 127^2) / 127^2) for
FOURTH_ROOT. Per element a multiplication by a per-block factor, not a division: on the
CPU the divisions were half the time of an int8 step. The power p is the
list's MAP: SQRT (p = 1/2) for signed states (first moments, momentum, EMAs) and FOURTH_ROOT
(p = 1/4) for second moments (lists named "*_sqs"). Why: Adam's second moments span many
decades inside one block, and a code rounds to 0 below u = (1/254)^(1/p): 4e-3 of the block's
largest for a linear code, 1.6e-5 for SQRT, 2.4e-10 for FOURTH_ROOT. A v decoded to 0 under a
nonzero m turns the step into m / eps: on real AdamW moments (bench/int8_maps.py) linear or
SQRT v made training NaN within tens of steps, FOURTH_ROOT v did not; SQRT m under it matches
v's resolution (at Adam's first step m's SQRT code and v's FOURTH_ROOT code are the same).
Even so a v of 1e-13 of its block's largest (after a catapult spike) rounded to 0 and a
run diverged: a nonzero FOURTH_ROOT value takes code 1 at least (it then decodes larger,
which makes the step smaller, the safe side).

All arithmetic is float32 with each step rounded once (IEEE multiplication, division and
sqrt, round half to even), so that a C++ or Triton kernel can reproduce it exactly. |x| *
(1 / scale) may exceed 1 by an ulp; its code is still 127. A block holding a NaN or an
infinity gets scale NaN/inf and codes 0, and decodes to NaN everywhere: a non-finite state
is not hidden.
"""
from __future__ import annotations

import enum

import torch

BLOCK = 128
CODE_MAX = 127.0
CODE_MAX_SQUARED = 16129.0  # 127 * 127


class Map(enum.Enum):
    SQRT = "sqrt"                # p = 1/2
    FOURTH_ROOT = "fourth_root"  # p = 1/4


SQRT = Map.SQRT
FOURTH_ROOT = Map.FOURTH_ROOT


def map_of(list_name: str) -> Map:
    """A state list's map from its op schema name (for a state key: map_of(key + "s"))."""
    return FOURTH_ROOT if list_name.endswith("_sqs") else SQRT


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def encode(x: torch.Tensor, map: Map) -> tuple[torch.Tensor, torch.Tensor]:
    """x (a dense floating tensor) -> (int8 codes laid out like x, float32 scales of
    num_blocks(x.numel()) elements)."""
    _check_map(map, "encode")
    if not x.is_floating_point():
        raise ValueError(f"int8_blocks.encode: x has dtype {x.dtype}; it takes a floating tensor")
    order = _memory_order(x, "encode", "x")
    flat = x.permute(order).reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = _blocks(flat)  # the 0-padding leaves every amax as it is
    magnitude = blocks.abs()
    scales = magnitude.amax(dim=1)  # NaN if any element is NaN
    encodable = (scales > 0) & (scales < float("inf"))  # False for NaN
    safe_scales = torch.where(encodable, scales, torch.ones_like(scales))
    inverse = torch.div(torch.ones_like(safe_scales), safe_scales)  # one division per block
    u = magnitude * inverse[:, None]
    root = _sqrt(u) if map is SQRT else _sqrt(_sqrt(u))
    codes = torch.round(root * CODE_MAX)
    if map is FOURTH_ROOT:  # a nonzero second moment never decodes to 0 (an Adam step m / eps)
        codes = torch.where(magnitude > 0, codes.clamp_min(1.0), codes)
    codes = torch.where(blocks < 0, -codes, codes)
    codes = torch.where(encodable[:, None], codes, torch.zeros_like(codes)).to(torch.int8)
    return _unflatten(codes.view(-1)[:n], x, order), scales


def decode(codes: torch.Tensor, scales: torch.Tensor, map: Map, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes, scales) from encode -> the values, laid out like codes, in `dtype` (computed in
    float32, then rounded to nearest even)."""
    _check_map(map, "decode")
    if codes.dtype != torch.int8:
        raise ValueError(f"int8_blocks.decode: codes has dtype {codes.dtype}; it takes int8")
    n = codes.numel()
    if scales.dtype != torch.float32 or scales.dim() != 1 or scales.numel() != num_blocks(n):
        raise ValueError(f"int8_blocks.decode: scales is {scales.dtype} of shape {tuple(scales.shape)}; codes of "
                         f"{n} elements need float32 of shape ({num_blocks(n)},)")
    if scales.device != codes.device:
        raise ValueError(f"int8_blocks.decode: scales is on {scales.device}, codes on {codes.device}")
    order = _memory_order(codes, "decode", "codes")
    c = _blocks(codes.permute(order).reshape(-1).to(torch.float32))
    q = c * c.abs()  # exact
    factor = torch.div(scales, CODE_MAX_SQUARED)  # per block
    if map is FOURTH_ROOT:
        q = q * q.abs()
        factor = torch.div(factor, CODE_MAX_SQUARED)
    values = q * factor[:, None]
    return _unflatten(values.view(-1)[:n], codes, order).to(dtype)


def _sqrt(u: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt. torch.sqrt of float32 on CPU is not (MKL's vsSqrt is off
    by one ulp on ~20% of inputs); a float64 sqrt within one ulp rounds to the correct float32,
    since sqrt of a float32 stays 2^-50 (relative) away from any float32 midpoint."""
    return torch.sqrt(u.double()).float()


def _check_map(map, fn: str) -> None:
    if not isinstance(map, Map):
        raise ValueError(f"int8_blocks.{fn}: map is {map!r}; it takes int8_blocks.SQRT or int8_blocks.FOURTH_ROOT")


def _memory_order(t: torch.Tensor, fn: str, name: str) -> list[int]:
    """The permutation of t's dims that walks its storage outermost first (identity for a
    contiguous t, NHWC for channels_last)."""
    order = sorted(range(t.dim()), key=t.stride, reverse=True)
    if not t.permute(order).is_contiguous():
        raise ValueError(f"int8_blocks.{fn}: {name} of shape {tuple(t.shape)} and strides {t.stride()} is not dense; "
                         "blocks run over a dense tensor's memory order")
    return order


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    """flat, zero-padded to whole blocks, as (num_blocks, BLOCK)."""
    n = flat.numel()
    return torch.nn.functional.pad(flat, (0, num_blocks(n) * BLOCK - n)).view(-1, BLOCK)


def _unflatten(flat: torch.Tensor, like: torch.Tensor, order: list[int]) -> torch.Tensor:
    """flat (memory order) -> a tensor with like's shape and strides."""
    permuted = flat.view([like.shape[d] for d in order])
    return permuted.permute(sorted(range(like.dim()), key=order.__getitem__))
