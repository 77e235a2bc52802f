"""torch.compile traces a training step with opt.step() inside (C++ ops on CPU: the
Triton interpreter cannot be compiled), and gives the eager numbers."""
import copy

import pytest
import torch
from torch import nn

from catapult_kernels.optim import LAMB, LARS, SGD, AdamW, Lion


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


OPTIMIZERS = {
    "adamw": lambda ps: AdamW(ps, lr=1e-2, max_grad_norm=0.5, skip_nonfinite=True, backend="cpu"),
    "sgd_grokfast_agc": lambda ps: SGD(ps, lr=1e-2, momentum=0.9, grokfast=dict(alpha=0.9), agc=0.05,
                                       max_grad_norm=0.5, backend="cpu"),
    "lion_grokfast": lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1, grokfast=dict(alpha=0.9), backend="cpu"),
    "lamb": lambda ps: LAMB(ps, lr=1e-2, max_grad_norm=0.5, backend="cpu"),
    "lars": lambda ps: LARS(ps, lr=0.1, weight_decay=1e-3, backend="cpu"),
}


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_step_compiles_into_one_graph(make):
    """opt.step() alone traces without a graph break (fullgraph=True), and gives the
    eager numbers (three steps: new state and EMAs on the first, updated after)."""
    torch._dynamo.reset()  # each optimizer compiles torch's step wrapper anew: keep under the recompile limit
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in [(16, 8), (16,), (3, 16)]]
    eager_params = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, eager_params):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt, eager_opt = make(params), make(eager_params)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    for _ in range(3):
        compiled_step()
        eager_opt.step()
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
