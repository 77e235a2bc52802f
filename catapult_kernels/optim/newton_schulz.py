"""Newton-Schulz orthogonalization (Muon), batched: every matrix of one shape at once.

torch.optim.Muon's math for one matrix G (m x n): X = G in bfloat16, transposed when
m > n (so that X X^T is the smaller Gram matrix); X /= max(|X|_F, eps); k times
A = X X^T, B = b A + c A A, X = a X + B X; transposed back. Here the matrices of one
shape are stacked and run as one chain of bmm/baddbmm (three batched products per step
instead of three per matrix), in bfloat16 as torch's, so each matrix gets torch's numbers
up to the batched products' own rounding.
"""
from __future__ import annotations

from typing import Sequence

import torch


def newton_schulz(x: torch.Tensor, coefficients: Sequence[float], steps: int, eps: float) -> torch.Tensor:
    """The orthogonalized x: a batch (batch, m, n), in bfloat16, contiguous."""
    a, b, c = coefficients
    x = x.bfloat16()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return (x.mT if tall else x).contiguous()


def orthogonalize(matrices: Sequence[torch.Tensor], coefficients: Sequence[float], steps: int,
                  eps: float) -> list[torch.Tensor]:
    """Each matrix orthogonalized (bfloat16, contiguous), the matrices of one shape and device
    in one batch."""
    by_shape: dict = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault((tuple(m.shape), m.device), []).append(i)
    out: list = [None] * len(matrices)
    for idx in by_shape.values():
        batch = newton_schulz(torch.stack([matrices[i] for i in idx]), coefficients, steps, eps)
        for i, result in zip(idx, batch.unbind()):
            out[i] = result
    return out
