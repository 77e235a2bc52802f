"""Master weights of 16-bit params, in plain torch: the reference every backend's update
kernels match bit for bit (csrc/master_weights.h, the Triton kernels), and what the
optimizers use to make, convert and check them.

An optimizer with bfloat16 or float16 params keeps, per param, one of:

* "fp32": a float32 copy (4 bytes per element). The update reads it and writes it; the
  param is its rounding to nearest even.
* "ecc": an int8 correction per element (1 byte): the value is P + c * q, P the param as
  float32 and q = 2^(e - M - 8), e = max(P's exponent, the format's ECC_MIN_EXPONENT), M the
  format's explicit mantissa bits (bfloat16 7, float16 10), c = rint((x - P) / q) clamped to
  [-127, 127]. So the pair keeps the value to 16 significant bits (19 for float16; within
  q / 2, or q where the code 128 is clamped), against the param's 8 (bfloat16) or 11.
* "stochastic" (bfloat16 only): no copy; the new value is rounded up or down at random,
  with probability proportional to its distance (unbiased), from a counter-based stream:
  the random bits of element i (memory order) at a step whose counter is k are
  mix32(mix32(i) ^ key(k)), key(k) = mix32(lo(k) ^ mix32(hi(k) + ROUNDING_SALT)) (both sides
  mixed: no two steps give the same bits to nearby elements). The counter (a one-element int64 per param) advances
  by one per step that is not skipped, so a resumed run rounds as the uninterrupted one.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import same_layout

MODES = (None, "fp32", "ecc", "stochastic")
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
# bfloat16's lowest is raised from -126 so that 1 / q stays a normal float32.
ECC_MIN_EXPONENT = {torch.bfloat16: -111, torch.float16: -14}
MASK32 = 0xFFFFFFFF
ROUNDING_SALT = 0x7F4A7C15  # kRoundingSalt (csrc/master_weights.h)


def check_mode(master_weights) -> None:
    """ValueError unless master_weights is one of MODES."""
    if not any(master_weights == m and type(master_weights) is type(m) for m in MODES):
        raise ValueError(f"Invalid master_weights: {master_weights!r} (allowed: None (round to nearest into the "
                         "param), 'fp32', 'ecc', 'stochastic')")


def check_param_dtype(master_weights, dtype: torch.dtype, where: str) -> None:
    """ValueError unless params of `dtype` can take master_weights."""
    if master_weights is None:
        return
    allowed = (torch.bfloat16,) if master_weights == "stochastic" else (torch.bfloat16, torch.float16)
    if dtype not in allowed:
        names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"master_weights={master_weights!r} is for {names} params; {where} has "
                         f"{str(dtype).removeprefix('torch.')} params")


def _quantum_exponent(P: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e - M - 8 of each finite float32 param value P (int32)."""
    e = ((P.view(torch.int32) >> 23) & 0xFF) - 127
    return torch.clamp(e, min=ECC_MIN_EXPONENT[dtype]) - MANTISSA_BITS[dtype] - 8


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k as float32, k int32 in [-126, 127]."""
    return ((k + 127).to(torch.int32) << 23).view(torch.float32)


def ecc_correction(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The int8 corrections of float32 values x over params p (bfloat16 / float16) laid out
    alike: rint((x - P) / q) clamped to [-127, 127], 0 where P is not finite (or x is NaN:
    a loaded NaN master over a finite param)."""
    x = x.to(torch.float32)
    P = p.to(torch.float32)
    finite = torch.isfinite(P)
    safe = torch.where(finite, P, torch.zeros_like(P))
    c = torch.round((x - safe) * _pow2(-_quantum_exponent(safe, p.dtype)))  # exact up to the rounding
    c = torch.where(finite & ~torch.isnan(c), c.clamp(-127, 127), torch.zeros_like(c))
    return c.to(torch.int8)


def ecc_encode(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(param of `dtype`, int8 correction) of float32 values x: the param is x rounded to nearest even."""
    p = x.to(torch.float32).to(dtype)
    return p, ecc_correction(x, p)


def ecc_decode(p: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The float32 values P + c * q of params p (bfloat16 / float16) and their corrections."""
    P = p.to(torch.float32)
    finite = torch.isfinite(P)
    safe = torch.where(finite, P, torch.zeros_like(P))
    value = P + codes.to(torch.float32) * _pow2(_quantum_exponent(safe, p.dtype))
    return torch.where(finite, value, P)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """csrc/master_weights.h's mixer on int64 tensors holding uint32 values, or on a Python int."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32  # the low 32 bits of the product (int64 wraps, they stay right)
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def random_bits(numel: int, counter: int, device=None) -> torch.Tensor:
    """The 32 random bits (int64 holding uint32) of elements 0..numel-1 at counter value `counter`."""
    lo, hi = counter & MASK32, (counter >> 32) & MASK32
    key = mix32(lo ^ mix32((hi + ROUNDING_SALT) & MASK32))
    i = torch.arange(numel, dtype=torch.int64, device=device) & MASK32
    return mix32(mix32(i) ^ key)


def stochastic_round(x: torch.Tensor, counter: int) -> torch.Tensor:
    """float32 x (laid out in memory order as its param) rounded stochastically to bfloat16
    with the stream at `counter` (an int, the counter's value before the step)."""
    x = x.to(torch.float32).contiguous()
    r = random_bits(x.numel(), counter, x.device).view(x.shape) & 0xFFFF
    bits = x.view(torch.int32).to(torch.int64) & MASK32
    cut = (bits + r) & 0xFFFF0000
    cut = (cut - ((cut >> 31) << 32)).to(torch.int32).view(torch.float32)  # as signed int32 bits
    return torch.where(torch.isnan(x), x, cut).to(torch.bfloat16)


def initial_counter(seed: int, index: int) -> int:
    """The counter (as a signed int64 value) a param starts from: its stream's high half is
    mix32(seed's low 32 bits ^ mix32(its high 32 bits)) + index (the param's place in the
    optimizer), its low half 0."""
    mixed = mix32((seed & MASK32) ^ mix32((seed >> 32) & MASK32))  # of Python ints: exact, no tensor made
    hi = (mixed + index) & MASK32
    value = hi << 32
    return value - (1 << 64) if value >= 1 << 63 else value


# ---- what an optimizer keeps: one state key per mode, made, checked and converted here ----
# The state key under which an optimizer keeps each mode's master weights of a param.
STATE_KEYS = {"fp32": "master", "ecc": "master_ecc", "stochastic": "rounding_counter"}
# The dtype of each key's tensor (the kernels tell the kind of a call by it).
STATE_DTYPES = {"master": torch.float32, "master_ecc": torch.int8, "rounding_counter": torch.int64}


def new_state(mode: str, p: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """The master weights of param p (of a 16-bit dtype) on its first step: a float32 copy
    laid out like p ("fp32"), zero corrections laid out like p ("ecc": the value is p), or
    the 0-d counter of p's stream at `index`, its place in the optimizer ("stochastic")."""
    if mode == "fp32":
        return torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format).copy_(p.detach())
    if mode == "ecc":
        return torch.zeros_like(p, dtype=torch.int8, memory_format=torch.preserve_format)
    return torch.tensor(initial_counter(seed, index), dtype=torch.int64, device=p.device)


def state_problem(key: str, t, p: torch.Tensor) -> Optional[str]:
    """What is wrong with state[key] (a master weights key) of param p as the kernels take it
    (same dtype of its kind, device and layout as p; a counter: one element), or None."""
    dtype = STATE_DTYPES[key]
    if not isinstance(t, torch.Tensor):
        return f"is {t!r}, not a {dtype} tensor"
    if key == "rounding_counter":
        if t.dtype is not dtype or t.numel() != 1 or t.device != p.device:
            return f"is {tuple(t.shape)} {t.dtype} on {t.device} but must be one int64 on {p.device}"
    elif t.dtype is not dtype or t.device != p.device or not same_layout(t, p):
        return (f"is {tuple(t.shape)} {t.dtype} on {t.device} (strides {t.stride()}) but must be {dtype} laid out "
                f"like the param, {tuple(p.shape)} on {p.device} (strides {p.stride()})")
    return None


def loaded_problem(state: dict, p: torch.Tensor) -> Optional[str]:
    """What is wrong with the master weights keys of a loaded state of param p, or None:
    a master is a float tensor and a correction an int8 one, each shaped like p; a counter
    an integer tensor of one element."""
    for key in STATE_KEYS.values():
        t = state.get(key)
        if t is None:
            continue
        if key == "rounding_counter":
            fits = isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() \
                and t.numel() == 1
        else:
            fits = isinstance(t, torch.Tensor) and t.shape == p.shape and (
                t.dtype is torch.int8 if key == "master_ecc" else t.is_floating_point())
        if not fits:
            what = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)
            return f"{key!r} is {what}; the param is {tuple(p.shape)} {p.dtype}"
    return None


def value_of(state: dict, p: torch.Tensor) -> torch.Tensor:
    """The float32 value that a (loaded) state of any master kind gives param p: its
    float32 master, else p decoded with its corrections, else p itself."""
    if state.get("master") is not None:
        return state["master"].to(device=p.device, dtype=torch.float32)
    if state.get("master_ecc") is not None:
        return ecc_decode(p.detach(), state["master_ecc"].to(p.device))
    return p.detach().to(torch.float32)


def converted_state(state: dict, mode: Optional[str], p: torch.Tensor, seed: int, index: int) -> dict:
    """{key: tensor}: the master weights of `mode` for param p from a loaded state that may
    hold any kind or none (torch's): kept as saved when of that kind, else made from
    value_of(state, p) (p left as it is): the value ("fp32"), its corrections over p
    ("ecc"), or a new counter ("stochastic"). Empty for mode None."""
    if mode is None:
        return {}
    key = STATE_KEYS[mode]
    saved = state.get(key)
    like_p = dict(memory_format=torch.preserve_format)
    if mode == "stochastic":
        if saved is None:
            return {key: new_state(mode, p, seed, index)}
        return {key: saved.to(device=p.device, dtype=torch.int64).reshape(()).clone()}
    if mode == "ecc" and saved is not None:
        return {key: torch.empty_like(p, dtype=torch.int8, **like_p).copy_(saved)}
    value = value_of(state, p)
    if mode == "fp32":
        return {key: torch.empty_like(p, dtype=torch.float32, **like_p).copy_(value)}
    return {key: torch.empty_like(p, dtype=torch.int8, **like_p).copy_(ecc_correction(value, p.detach()))}
