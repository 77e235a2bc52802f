"""Params, grads and steps shared by the optimizer tests of state storage and master weights."""
import torch
from torch import nn

from catapult_kernels.optim import Muon


def make_params(shapes, dtype: torch.dtype, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in shapes]


def give_grads(params: list, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def run_steps(opt, params: list, steps) -> None:
    for t in steps:
        give_grads(params, t)
        opt.step()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().contiguous().view(-1).view(torch.uint8), b.detach().contiguous().view(-1).view(torch.uint8))


def muon_split(params, **kw):
    """Muon over the matrices, its AdamW groups over the rest."""
    matrices = [p for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() != 2]
    return Muon([{"params": matrices}, {"params": rest, "use_muon": False, "lr": 1e-2}], lr=0.02, **kw)


def snapshot(opt, params: list) -> list:
    """Each param and its state, cloned."""
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]


def assert_same_snapshot(a: list, b: list) -> None:
    for (p, state), (q, other) in zip(a, b):
        assert same_bits(p, q)
        assert state.keys() == other.keys()
        for key in state:
            assert same_bits(state[key], other[key]), key
