"""torch.compile traces a training step with opt.step() inside (C++ ops on CPU: the
Triton interpreter cannot be compiled), and gives the eager numbers."""
import copy

import torch
from torch import nn

from catapult_kernels.optim import AdamW


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    eager_model = copy.deepcopy(model)
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def make_step(m, opt):
        def step():
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss
        return step

    opt = AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5, backend="cpu")
    eager_opt = AdamW(eager_model.parameters(), lr=1e-2, max_grad_norm=0.5, backend="cpu")
    compiled = torch.compile(make_step(model, opt))
    eager = make_step(eager_model, eager_opt)
    for _ in range(3):
        torch.testing.assert_close(compiled(), eager(), rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.grad_norm, eager_opt.grad_norm)


def test_step_compiles_into_one_graph():
    """opt.step() alone traces without a graph break (fullgraph=True)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in [(16, 8), (16,), (3, 16)]]
    eager_params = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, eager_params):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt = AdamW(params, lr=1e-2, max_grad_norm=0.5, skip_nonfinite=True, backend="cpu")
    eager_opt = AdamW(eager_params, lr=1e-2, max_grad_norm=0.5, skip_nonfinite=True, backend="cpu")
    compiled_step = torch.compile(opt.step, fullgraph=True)
    for _ in range(3):
        compiled_step()
        eager_opt.step()
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
