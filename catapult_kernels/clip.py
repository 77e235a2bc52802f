"""clip_grad_norm_: a drop-in for torch.nn.utils.clip_grad_norm_ on the fused norm op."""
from __future__ import annotations

import functools
from typing import Iterable, Optional, Union

import torch

from . import ops
from .distributed.sharding import is_dtensor, local


def clip_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: Optional[bool] = None, backend: str = "auto") -> torch.Tensor:
    """Scale the grads in place so that their total norm is at most max_norm; return the
    total norm before clipping, as torch does: a tensor on the first grad's device, in the
    dtype torch returns (the grads' dtypes promoted together: bfloat16 for bfloat16 grads,
    float32 for bfloat16 with float32, float64 once any grad is float64).

    norm_type 2 and inf over float32/bfloat16/float16 grads run on one fused multi-tensor
    pass per device, finite whenever the grads are and the norm fits a float32 (torch's is
    inf from one float32 element of 2e19); other norm types and float64 grads use torch's
    per-tensor norms. The clip coefficient, torch's min(1, max_norm / (norm + 1e-6)), is
    computed from the norm in float32 (float64 with float64 grads) before it is rounded
    to the returned dtype, so float16 grads whose norm exceeds 65504 are clipped rather
    than zeroed (the returned norm is inf there, as torch's). `foreach` is accepted for
    compatibility: the norm is always multi-tensor.

    DTensor grads (FSDP2, tensor parallel): the norm is of the whole grads, each rank summing
    its shards' with the other ranks' in one all-reduce per mesh (replicas counted once; a
    Partial grad is made whole first, one more collective), and
    each rank scales its own shards; the result is a plain tensor, the same on every rank
    (torch's is a DTensor: call .full_tensor() on it, not on ours)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    with_grads = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in with_grads]
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    ops.check_backend_name(backend)
    if any(map(is_dtensor, grads)):  # shards (FSDP2, tensor parallel): the norm of the whole grads
        from .distributed.norms import norm_of
        total = norm_of(grads, norm_type, backend)
        grads = list(map(local, grads))  # each rank scales its own shards (a Partial one's pieces too)
    else:
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
    for (device, _), gs in by_key.items():
        torch._foreach_mul_(gs, coef.to(device))  # as torch: the grads' dtype, the product in float32 or more
    return total.to(functools.reduce(torch.promote_types, (dtype for _, dtype in by_key)))


__all__ = ["clip_grad_norm_"]
