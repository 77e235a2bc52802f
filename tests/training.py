"""A tiny model, its data and a full-batch training loop, shared by the optimizer tests:
torch's optimizers clip with clip_grad_norm_, ours inside the step."""
import torch
from torch import nn

from catapult_kernels.optim.base import FusedOptimizer

STEPS = 20


def make_model(device, dtype=torch.float32, width=32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.LayerNorm(width), nn.Linear(width, 3))
    model[0].bias.requires_grad_(False)  # frozen: grad stays None
    return model.to(device=device, dtype=dtype)


def param_groups(model, lr):
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim != 2]
    return [dict(params=decay), dict(params=no_decay, weight_decay=0.0, lr=lr * 0.5)]


def make_data(device, dtype=torch.float32, n=64):
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, 7, generator=g).to(device, dtype), torch.randn(n, 3, generator=g).to(device, dtype)


def train(model, opt, steps, device, dtype=torch.float32, max_grad_norm=None, scheduler=None,
           loss_scale=1.0):
    """Full-batch steps; torch's path clips with clip_grad_norm_ when max_grad_norm is set."""
    x, y = make_data(device, dtype)
    norms = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean() * loss_scale
        opt.zero_grad()
        loss.backward()
        if max_grad_norm is not None and not isinstance(opt, FusedOptimizer):
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        opt.step()
        if isinstance(opt, FusedOptimizer) and opt.grad_norm is not None:
            norms.append(opt.grad_norm.clone())
        if scheduler is not None:
            scheduler.step()
    return norms


def assert_same_params(a, b, **tol):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=lambda m: f"{name}: {m}", **tol)
