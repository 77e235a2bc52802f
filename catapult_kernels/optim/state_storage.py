"""How an optimizer stores a state tensor: its `state_dtype`.

None keeps each state in its param's dtype (torch's way). torch.float32 or torch.bfloat16
keep every state tensor (momenta, second moments, the Grokfast EMA) in that dtype, laid out
like its param; the kernels load it as float32 and round once when they store it. torch.int8
keeps, under the state's key, int8 codes laid out like the param and, under `<key>_scales`,
one float32 scale per block of int8_blocks.BLOCK elements in memory order: the blockwise
codec of int8_blocks.py, whose map is that of the op's list (map_of(key + "s"): second
moments FOURTH_ROOT, everything else SQRT). What a state_dict holds is the stored form;
loading converts a state stored otherwise (torch's float states included) into this one.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import int8_blocks
from ..master_weights import STATE_KEYS as MASTER_KEYS

STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.int8)
SCALES = "_scales"  # the suffix of an int8 state's scales key


def check_state_dtype(state_dtype) -> Optional[torch.dtype]:
    """state_dtype as given, or ValueError when it is not one of STATE_DTYPES."""
    if not any(state_dtype is allowed for allowed in STATE_DTYPES):
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (allowed: None (the param's dtype), "
                         "torch.float32, torch.bfloat16, torch.int8)")
    return state_dtype


def scales_key(key: str) -> str:
    """The key of the block scales of an int8 state."""
    return key + SCALES


def storage_dtype(state_dtype: Optional[torch.dtype], p: torch.Tensor) -> torch.dtype:
    """The dtype of p's state tensors (int8: the codes)."""
    return p.dtype if state_dtype is None else state_dtype


def codec_map(key: str) -> int8_blocks.Map:
    """The int8 map of a state key: that of the op's state list it fills."""
    return int8_blocks.map_of(key + "s")


def zeros(state: dict, key: str, like: torch.Tensor, state_dtype: Optional[torch.dtype]) -> None:
    """state[key] (and its scales for int8) as the zero state of a param laid out as `like`."""
    dtype = storage_dtype(state_dtype, like)
    state[key] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
    if dtype is torch.int8:
        state[scales_key(key)] = torch.zeros(int8_blocks.num_blocks(like.numel()), dtype=torch.float32,
                                             device=like.device)


def scales_problem(codes: torch.Tensor, scales, device: torch.device) -> Optional[str]:
    """What is wrong with the scales of int8 codes that live on device, or None."""
    blocks = int8_blocks.num_blocks(codes.numel())
    if not isinstance(scales, torch.Tensor):
        return f"is {scales!r}, not a tensor of {blocks} float32 block scales"
    if (scales.dtype is not torch.float32 or scales.dim() != 1 or scales.numel() != blocks
            or scales.device != device or not scales.is_contiguous()):
        return (f"is {tuple(scales.shape)} {scales.dtype} on {scales.device} (strides {scales.stride()}) but "
                f"must be ({blocks},) float32 on {device}, contiguous: one scale per {int8_blocks.BLOCK} codes")
    return None


def stored(state: dict, key: str, p: torch.Tensor, state_dtype: Optional[torch.dtype]) -> dict:
    """state[key] (and its scales when int8) of a loaded state, in the storage of p's state
    on p's device: {key: tensor} plus {key_scales: scales} for int8 storage. A float state
    into int8 storage is encoded, an int8 one into float storage decoded; float into float
    is cast (round to nearest even), as torch casts a loaded state."""
    value = state[key]
    target = storage_dtype(state_dtype, p)
    if value.dtype is torch.int8:
        scales = state[scales_key(key)]
        codes, scales = value.to(p.device), scales.to(p.device)
        if target is torch.int8:
            return {key: codes, scales_key(key): scales}
        return {key: int8_blocks.decode(codes, scales, codec_map(key), dtype=target)}
    if target is torch.int8:
        codes, scales = int8_blocks.encode(value.to(device=p.device, dtype=torch.float32), codec_map(key))
        return {key: codes, scales_key(key): scales}
    return {key: value.to(device=p.device, dtype=target)}


def torch_state_dict(state_dict: dict) -> dict:
    """A state_dict of a catapult_kernels optimizer as torch.optim's optimizers load it: each
    int8 state decoded to float32 (the values the kernels compute with) and its `_scales` key
    dropped; float states as saved (torch casts them to the params' dtype on load); master
    weights dropped (torch's params are their own values). E.g.
    torch.optim.AdamW(...).load_state_dict(torch_state_dict(AdamW(..., state_dtype=torch.int8).state_dict()))."""
    masters = set(MASTER_KEYS.values())
    state = {}
    for idx, param_state in state_dict["state"].items():
        quantized = [k for k, v in param_state.items()
                     if isinstance(v, torch.Tensor) and v.dtype is torch.int8 and k not in masters]
        dropped = set(map(scales_key, quantized)) | masters
        state[idx] = {k: int8_blocks.decode(v, param_state[scales_key(k)], codec_map(k)) if k in quantized else v
                      for k, v in param_state.items() if k not in dropped}
    return {**state_dict, "state": state}


def bytes_per_element(state: dict) -> float:
    """Bytes of state per element of the params that have state: every state tensor (scales
    and master weights included; 0-d step and rounding counters not), over those params' elements."""
    total = elements = 0
    for p, param_state in state.items():
        if not (param_state and isinstance(p, torch.Tensor)):  # torch keeps a loaded state of no param by its id
            continue
        elements += p.numel()
        total += sum(t.numel() * t.element_size() for t in param_state.values()
                     if isinstance(t, torch.Tensor) and t.dim() > 0)
    return total / elements if elements else 0.0
