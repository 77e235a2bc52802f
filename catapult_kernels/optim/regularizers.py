"""The host side of the fused regularizers: option checks, and the AGC row factors.

Every optimizer runs one grad pipeline inside its update kernel (csrc/grad_pipeline.h),
in this order: unscale and global-norm clip, AGC, Grokfast, maximize; then its own
weight decay and update.

* AGC (Brock et al. 2021, NFNets): g_i <- g_i * min(1, agc * max(|w_i|, 1e-3) / |g_i|)
  for each unit i: a row (dim 0 slice) of a param of 2+ dims, the whole tensor for
  1-D params. The row norms need a pass over w and g before the update, so AGC costs
  one extra read of both; the factors then ride into the update kernel.
* Grokfast EMA (Lee et al. 2024): ema <- alpha * ema + (1 - alpha) * g; g <- g + lamb * ema,
  fused into the update pass; state key `grokfast_ema`. A new ema starts at the grad
  (the paper's code), which the kernels do by taking alpha = 0 on its first step.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

AGC_EPS = 1e-3  # the floor of |w_i| (NFNets' eps): a unit at zero may still move
GROKFAST_DEFAULTS = {"alpha": 0.98, "lamb": 2.0}


def check_grokfast(grokfast) -> Optional[dict]:
    """None (off), or dict(alpha=..., lamb=...) (missing keys take the paper's defaults)."""
    if grokfast is None or grokfast is False:
        return None
    if grokfast is True:
        grokfast = {}
    if not isinstance(grokfast, dict) or set(grokfast) - set(GROKFAST_DEFAULTS):
        raise ValueError(f"Invalid grokfast: {grokfast!r}; use None or dict(alpha=0.98, lamb=2.0)")
    out = {**GROKFAST_DEFAULTS, **grokfast}
    if not 0.0 <= out["alpha"] < 1.0:
        raise ValueError(f"Invalid grokfast alpha: {out['alpha']} (must be in [0, 1))")
    if not (out["lamb"] >= 0.0 and math.isfinite(out["lamb"])):
        raise ValueError(f"Invalid grokfast lamb: {out['lamb']} (must be >= 0)")
    return {"alpha": float(out["alpha"]), "lamb": float(out["lamb"])}


def check_agc(agc) -> Optional[float]:
    """None (off) or the clipping ratio, a float > 0."""
    if agc is None:
        return None
    if isinstance(agc, bool) or not (isinstance(agc, (int, float)) and agc > 0 and math.isfinite(agc)):
        raise ValueError(f"Invalid agc: {agc!r} (must be a float > 0, or None for no AGC)")
    return float(agc)


def agc_rows(p: torch.Tensor) -> int:
    """The AGC units of p: its rows (dim 0) with 2+ dims, else the whole tensor."""
    return p.shape[0] if p.dim() >= 2 else 1


def rows_are_contiguous(p: torch.Tensor) -> bool:
    """Whether each dim-0 slice of p is one contiguous run of memory (dim 0 outermost),
    as the kernels assume when they find an element's AGC row from its offset."""
    if p.dim() < 2 or p.shape[0] == 1:
        return True
    return all(n == 1 or p.stride(0) >= s * n for n, s in zip(p.shape[1:], p.stride()[1:]))


def grad_multiplier(grad_norm: Optional[torch.Tensor], max_grad_norm: float,
                    grad_scale: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The factor the kernels multiply every grad by before AGC (csrc/grad_pipeline.h:
    unscale, global clip), as a 0-d float32 tensor on device, without a host sync."""
    mult = torch.ones((), dtype=torch.float32, device=device)
    scale = None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32).reshape(())
    if max_grad_norm > 0:
        norm = grad_norm.to(device).reshape(())
        unscaled = norm if scale is None else norm / scale
        mult = torch.clamp(max_grad_norm / (unscaled + 1e-6), max=1.0)
    return mult if scale is None else mult / scale


def row_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of every AGC unit of every tensor, concatenated (float32)."""
    # flatten(1), not reshape(rows, -1): a (0, N) tensor has no -1 to infer
    return torch.cat([torch.linalg.vector_norm(t.flatten(1) if t.dim() >= 2 else t.reshape(1, -1), dim=1,
                                               dtype=torch.float32) for t in tensors])


def agc_scales(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], clipping: float,
               mult: torch.Tensor, reduce_units: Optional[Callable] = None) -> list[torch.Tensor]:
    """Per param, the factor of each unit: min(1, clipping * max(|w_i|, 1e-3) / |mult * g_i|),
    where mult * g is the grad after unscaling and global clipping (the AGC input). A unit
    with a zero grad gets 1; a non-finite grad gives a non-finite factor (never hides it).
    reduce_units: (w, g) -> the same made whole where shards cut units (DTensors)."""
    if not params:
        return []
    w, g = row_norms(params), row_norms(grads)
    if reduce_units is not None:
        w, g = reduce_units(w, g)
    g = g * mult.abs()
    factors = torch.clamp(clipping * torch.clamp(w, min=AGC_EPS) / g, max=1.0)
    return list(factors.split([agc_rows(p) for p in params]))
