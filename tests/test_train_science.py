"""The trainer's science against closed forms: Lanczos sharpness against an explicit Hessian,
the catapult's solvable model (Lewkowycz et al. 2020), Gromov's analytic solution of modular
addition, and the muP learning-rate rules."""
import math

import pytest
import torch

from catapult_kernels.train import TrainConfig, fit, top_hessian_eigenvalue
from catapult_kernels.train.loop import mse_loss
from catapult_kernels.train.models import MLP, make_model
from catapult_kernels.train.tasks import modular, modular_table


def test_lanczos_matches_the_explicit_hessian():
    torch.manual_seed(0)
    model = MLP(5, 3, depth=3, width=7, activation="tanh", parametrization="ntk").double()
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, 3, dtype=torch.float64)
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat):
        chunks = flat.split([p.numel() for p in params])
        return mse_loss(torch.func.functional_call(
            model, {n: c.view(s) for (n, _), c, s in zip(model.named_parameters(), chunks, shapes)}, (x,)), y)

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat0))[-1].item()
    got = top_hessian_eigenvalue(lambda: mse_loss(model(x), y), params, iters=40)
    assert got == pytest.approx(exact, rel=1e-8)


def test_lanczos_finds_the_largest_eigenvalue_not_the_largest_magnitude():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([-5.0, 1.0, 2.0], dtype=torch.float64)
    got = top_hessian_eigenvalue(lambda: 0.5 * (a * w * w).sum(), [w], iters=3)
    assert got == pytest.approx(2.0, rel=1e-12)  # power iteration would give -5


class SolvableModel(torch.nn.Module):
    """f = v.u x / sqrt(n): the catapult's solvable model."""

    def __init__(self, n: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.u = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
        self.v = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
        self.n = n

    def forward(self, x):
        return (self.u @ self.v) * x / math.sqrt(self.n)

    def ntk(self) -> float:
        return float((self.u.detach().square().sum() + self.v.detach().square().sum()) / self.n)


@pytest.mark.parametrize("c, phase", [(1.0, "lazy"), (3.0, "catapult"), (5.0, "divergent")])
def test_solvable_model_phases_and_exact_updates(c, phase, tmp_path):
    n = 1000
    model = SolvableModel(n, seed=1)
    lam0 = model.ntk()
    lr = c / lam0
    x, y = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    # the closed form: f' = (1 - lr lam + lr^2 f^2 / n) f and lam' = lam + (lr f^2 / n)(lr lam - 4)
    f, lam, expected = float(model(x).detach()), lam0, []
    for _ in range(6):
        expected.append(0.5 * f * f)
        f, lam = (1 - lr * lam + lr * lr * f * f / n) * f, lam + (lr * f * f / n) * (lr * lam - 4)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    summary = fit(model, opt, (x, y), loss="mse", steps=300, log_every=1, out=tmp_path / "run", quiet=True,
                  plots=False)
    from catapult_kernels.train.run_folder import RunFolder
    losses = [r["loss"] for r in RunFolder(tmp_path / "run", resume=True).read_metrics()[:6]]
    assert losses == pytest.approx(expected, rel=1e-9)
    assert summary["phase"] == phase
    assert summary["lambda0"] == pytest.approx(lam0, rel=0.05)  # the Hessian's top eigenvalue ~ the NTK
    if phase == "catapult":
        assert summary["peak_loss"] > 100 * summary["loss0"]
        assert model.ntk() < 2 / lr  # the catapult lands where the step is stable
    if phase == "divergent":
        assert summary["status"] == "divergent" and summary["steps"] < 300


def test_gromov_cosine_solution_solves_modular_addition():
    """Gromov 2023: a quadratic-activation MLP with cosine weights computes (a + b) mod p."""
    p, n = 97, 2000
    g = torch.Generator().manual_seed(0)
    sigma = torch.arange(n) % ((p - 1) // 2) + 1
    phi1, phi2 = torch.rand(n, generator=g) * 2 * math.pi, torch.rand(n, generator=g) * 2 * math.pi
    k = torch.arange(p)
    model = MLP(2 * p, p, depth=2, width=n, activation="quadratic", bias=False)
    with torch.no_grad():
        angle = 2 * math.pi * sigma[:, None] * k[None, :] / p
        model.layers[0].weight.copy_(torch.cat([torch.cos(angle + phi1[:, None]), torch.cos(angle + phi2[:, None])], 1))
        model.layers[1].weight.copy_(torch.cos(angle + (phi1 + phi2)[:, None]).t())
    data = modular(p, "add", 0.5, torch.Generator().manual_seed(0))
    x = torch.cat([data.x_train, data.x_val])
    y = torch.cat([data.y_train, data.y_val])
    assert len(y) == p * p
    assert (model(x).argmax(-1) == y).all()


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_modular_table(op):
    p = 13
    a, b, c = modular_table(p, op)
    assert len(c) == (p * (p - 1) if op == "div" else p * p)
    check = {"add": (a + b) % p == c, "sub": (a - b - c) % p == 0, "mul": a * b % p == c, "div": c * b % p == a}[op]
    assert check.all()


def test_modular_split_and_tokens():
    data = modular(11, "add", 0.3, torch.Generator().manual_seed(0), tokens=True)
    assert data.x_train.shape == (36, 3) and len(data.y_val) == 121 - 36
    assert (data.x_train[:, 2] == 11).all() and data.in_dim == 12
    pairs = {tuple(r[:2].tolist()) for r in torch.cat([data.x_train, data.x_val])}
    assert len(pairs) == 121  # train and val partition the table


@pytest.mark.parametrize("optimizer, rules", [
    ("adamw", {"input": 1.0, "hidden": 0.25, "output": 0.25, "bias": 1.0}),
    ("sgd", {"input": 4.0, "hidden": 1.0, "output": 0.25, "bias": 4.0}),
])
def test_mup_lr_multipliers(optimizer, rules):
    model = make_model(TrainConfig(task="teacher-student", loss="mse", parametrization="mup", width=512,
                                   base_width=128, depth=3), 16, 1)
    mult = {id(p): g["lr_mult"] for g in model.param_groups(optimizer) for p in g["params"]}
    first, hidden, last = model.layers
    assert mult[id(first.weight)] == rules["input"]
    assert mult[id(hidden.weight)] == rules["hidden"]
    assert mult[id(last.weight)] == rules["output"]
    assert mult[id(hidden.bias)] == rules["bias"]
    assert last.weight.std().item() == pytest.approx(1 / math.sqrt(512 * 4), rel=0.2)  # var 1/(fan_in m)


def test_ntk_parametrization_keeps_the_output_scale_in_width():
    x = torch.randn(64, 16)
    scales = []
    for width in (256, 4096):
        model = make_model(TrainConfig(task="teacher-student", loss="mse", parametrization="ntk", width=width), 16, 1)
        scales.append(model(x).std().item())
    assert 0.5 < scales[1] / scales[0] < 2.0
