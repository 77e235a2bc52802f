"""clip_grad_norm_: a drop-in for torch.nn.utils.clip_grad_norm_ on the fused norm op."""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch

from . import ops


def clip_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: Optional[bool] = None, backend: str = "auto") -> torch.Tensor:
    """Scale the grads in place so that their total norm is at most max_norm; return
    the total norm before clipping (a tensor, in the grads' dtype as torch returns it).
    norm_type 2 and inf run on one fused multi-tensor pass per device; others on torch.
    `foreach` is accepted for compatibility: the norm is always multi-tensor."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    ops.check_backend_name(backend)
    total = ops.global_norm(grads, norm_type, backend)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_key: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_key.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), gs in by_key.items():
        torch._foreach_mul_(gs, coef.to(device=device, dtype=dtype))
    dtypes = {g.dtype for g in grads}
    return total.to(dtypes.pop()) if len(dtypes) == 1 else total


__all__ = ["clip_grad_norm_"]
