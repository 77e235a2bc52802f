"""Newton-Schulz orthogonalization (Muon).

torch.optim.Muon's math for one matrix G (m x n): X = G in bfloat16, transposed when
m > n (so that X X^T is the smaller Gram matrix); X /= max(|X|_F, eps); k times
A = X X^T, B = b A + c A A, X = a X + B X; transposed back.

On the CPU a large matrix runs that chain itself, op for op as torch's (mm and addmm): the
chain is bound by bfloat16 matmul there (over 90% of a GPT-2-small Muon step, at ~750
GFLOP/s on 2 cores, near the machine's peak), so batching gains nothing (measured: 0.85x
of torch's step batched, 0.98x one by one), and bmm may round a product one bfloat16 ulp
apart from mm. Small matrices of one shape (up to SMALL elements), whose chains are bound by
per-op overhead, are stacked and run as one chain of bmm/baddbmm (256 of 64 x 64: 8.9x
torch's step), as are the matrices of one shape on a GPU (three launches per step instead
of three per matrix).
"""
from __future__ import annotations

from typing import Sequence

import torch

SMALL = 128 * 128  # elements: below, a CPU batches the matrices of one shape


def _prepared(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, bool]:
    """x in bfloat16, wide (transposed when tall), divided by its Frobenius norm per matrix."""
    x = x.bfloat16()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    return x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps), tall


def newton_schulz_matrix(g: torch.Tensor, coefficients: Sequence[float], steps: int, eps: float) -> torch.Tensor:
    """One matrix orthogonalized (bfloat16), torch's chain op for op."""
    a, b, c = coefficients
    x, tall = _prepared(g, eps)
    for _ in range(steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x.T if tall else x


def newton_schulz(x: torch.Tensor, coefficients: Sequence[float], steps: int, eps: float) -> torch.Tensor:
    """A batch (batch, m, n) orthogonalized (bfloat16) as one bmm chain."""
    a, b, c = coefficients
    x, tall = _prepared(x, eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x.mT if tall else x


def orthogonalize(matrices: Sequence[torch.Tensor], coefficients: Sequence[float], steps: int,
                  eps: float) -> list[torch.Tensor]:
    """Each matrix orthogonalized (bfloat16; a tall one as a transposed view): the matrices of
    one shape and device in one batch, but for large ones on the CPU, one by one."""
    out: list = [None] * len(matrices)
    by_shape: dict = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault((tuple(m.shape), m.device), []).append(i)
    for (shape, device), idx in by_shape.items():
        if device.type == "cpu" and (len(idx) == 1 or shape[-2] * shape[-1] > SMALL):
            for i in idx:
                out[i] = newton_schulz_matrix(matrices[i], coefficients, steps, eps)
            continue
        batch = newton_schulz(torch.stack([matrices[i] for i in idx]), coefficients, steps, eps)
        for i, result in zip(idx, batch.unbind()):
            out[i] = result
    return out
