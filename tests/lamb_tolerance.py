"""How close LAMB's new params must be to a reference whose trust ratio was summed in
another order: the stored path (states stored otherwise than the params, master
weights) against the float32 path, or the 16-bit path against the stored one. LAMB's
states do not depend on the trust ratio (they match bit for bit); its params do.

The Triton kernel sums r^2 and p^2 in float64 on every path: the ratios differ by an
ulp or two at most. The C++ kernel sums the stored path in double but the float32 and
16-bit paths in float lanes (csrc/cpu/square_sum.h's FloatSquareSum, a fused
multiply-add chain per lane of 8 or 16), whose sums are exact only to about (terms per
lane) 2^-24. So an update is held to a relative tolerance of 1e-6, on the C++ kernel
(ceil(numel / 8) + 8) 2^-24 where that is more, plus an ulp of float32 for the rounding
of p - lr * trust * r."""
from __future__ import annotations

import torch


def update_tolerance(backend: str, numel: int) -> float:
    """How far (relative) a param's update may be from the reference's on `backend`."""
    return max(1e-6, (-(-numel // 8) + 8) * 2.0 ** -24) if backend == "cpu" else 1e-6


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` above |x| (as float32)."""
    a = x.abs().to(dtype)
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).float()


def assert_close_value(name: str, got: torch.Tensor, want: torch.Tensor, before: torch.Tensor, rel: float,
                       resolution: torch.Tensor | float = 0.0) -> None:
    """|got - want| <= rel |want - before| + ulp32(want) + resolution (the encoding's: a
    rounding of got to a coarser type, say), elementwise; want and before float32."""
    want, before = want.detach().float(), before.detach().float()
    tolerance = rel * (want - before).abs() + ulp(want, torch.float32) + resolution
    error = (got.detach().float() - want).abs()
    bad = ~(error <= tolerance)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {got.numel()} off, the worst by "
                           f"{float((error - tolerance).max()):.3g} past the tolerance")
