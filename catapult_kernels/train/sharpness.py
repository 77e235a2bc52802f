"""Sharpness: the top eigenvalue of the loss Hessian, by Lanczos on Hessian-vector products.

Lanczos, not power iteration: power iteration finds the eigenvalue of largest magnitude,
which after a catapult can be a negative one; Lanczos's tridiagonal matrix gives the
largest algebraic eigenvalue, and in far fewer products (20 is plenty for the top one)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Keep the Lanczos basis (for full reorthogonalization) only while it stays this small;
# beyond, the three-term recurrence alone still gets the top eigenvalue right, with
# possible repeated copies of it that do not move the maximum.
_BASIS_BYTES = 1 << 30


class NoDoubleBackward(RuntimeError):
    """The loss cannot be differentiated twice: a custom autograd.Function whose backward
    autograd cannot differentiate (none defined, once_differentiable), a compiled model."""


def top_hessian_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                           iters: int = 20, seed: int = 0) -> float:
    """The largest eigenvalue of d^2 loss / d params^2 at the params' current values.
    loss_fn builds the loss on a fixed batch; the start vector comes from `seed`, so the
    answer is a deterministic function of the params. Attention runs on the math backend:
    the fused kernels (flash, memory-efficient) have no double backward. Raises
    NoDoubleBackward where the loss has none."""
    params = [p for p in params if p.requires_grad]
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True)
    # a param the loss does not use has no grad: its row (and column) of the Hessian is zero.
    # A grad without a graph came from a backward that autograd did not record (one marked
    # once_differentiable): differentiating it again would see a constant, a made-up zero
    if any(g is not None and not g.requires_grad for g in grads):
        raise NoDoubleBackward("a param's grad has no graph to differentiate again (a backward marked "
                               "once_differentiable?)")
    curved = [i for i, g in enumerate(grads) if g is not None]
    if not curved:
        return 0.0
    n = sum(p.numel() for p in params)
    device, dtype = params[0].device, params[0].dtype

    def hvp(flat: torch.Tensor) -> torch.Tensor:
        vs = [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in params]), params)]
        try:
            hv = torch.autograd.grad([grads[i] for i in curved], params, grad_outputs=[vs[i] for i in curved],
                                     retain_graph=True, allow_unused=True)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # the graph's backward has no backward of its own, or refuses one
            raise NoDoubleBackward(str(e)) from e
        return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)])

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q /= q.norm()
    keep_basis = n * min(iters, n) * q.element_size() <= _BASIS_BYTES
    basis = [q] if keep_basis else None
    q_prev, beta = torch.zeros_like(q), 0.0
    alphas, betas = [], []
    for _ in range(min(iters, n)):
        w = hvp(q)
        alpha = float(torch.dot(w.double(), q.double()))
        w = w - alpha * q - beta * q_prev
        if basis is not None:
            for _pass in range(2):  # twice is enough (Kahan-Parlett)
                for b in basis:
                    w -= torch.dot(w, b) * b
        alphas.append(alpha)
        beta = float(w.double().norm())
        if beta <= 1e-10 * max(1.0, abs(alpha)):  # an invariant subspace: T is exact
            break
        betas.append(beta)
        q_prev, q = q, w / beta
        if basis is not None:
            basis.append(q)
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(t)[-1])
