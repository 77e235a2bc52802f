"""fit() on models beyond a plain MLP: evaluation in eval mode (Dropout, BatchNorm), lambda0
through attention, the NTK parametrization's bias multiplier, and train metrics over the
whole DataLoader."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.data import DataLoader, TensorDataset

from catapult_kernels.host_syncs import HostSyncs
from catapult_kernels.train import TrainConfig, fit, run, top_hessian_eigenvalue
from catapult_kernels.train.cli import main
from catapult_kernels.train.loop import mse_loss, sharpness
from catapult_kernels.train.models import MLP
from catapult_kernels.train.sharpness import NoDoubleBackward


def noisy_net() -> nn.Module:
    """Dropout and BatchNorm: modules whose train and eval modes differ."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- item 18: evaluation in eval mode, modes restored, sharpness without side effects ----

def test_validation_runs_in_eval_mode_and_changes_nothing_the_training_sees():
    model = noisy_net()
    hand = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, y, xv, yv = torch.randn(24, 6, generator=g), torch.randn(24, 2, generator=g), \
        torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    steps = 4
    torch.manual_seed(5)  # the dropout masks of the training steps
    summary = fit(model, torch.optim.SGD(model.parameters(), lr=0.05), (x, y), (xv, yv), loss="mse",
                  steps=steps, log_every=1, quiet=True)
    # the same training by hand: one train-mode forward per step (the last without an update);
    # neither the validation passes nor lambda0 draw dropout masks or move BatchNorm's statistics
    torch.manual_seed(5)
    opt = torch.optim.SGD(hand.parameters(), lr=0.05)
    for t in range(steps + 1):
        opt.zero_grad()
        mse_loss(hand(x), y).backward()
        if t < steps:
            opt.step()
    assert_same_state(state(model), state(hand))
    hand.eval()
    with torch.no_grad():
        assert summary["final_val_loss"] == pytest.approx(mse_loss(hand(xv), yv).item(), rel=1e-6)
    assert summary["lambda0"] is not None and summary["lambda0"] > 0
    assert all(m.training for m in model.modules())  # the training mode is back


def test_evaluation_passes_see_eval_mode_and_each_module_gets_its_own_mode_back():
    model = noisy_net()
    model[1].eval()  # a frozen BatchNorm: the user's choice, kept
    seen = {True: set(), False: set()}  # grad enabled (a step, a sharpness) or not (an evaluation)
    for m in model:
        m.register_forward_hook(lambda m, i, o: seen[torch.is_grad_enabled()].add((type(m).__name__, m.training)))
    x, y = torch.randn(24, 6), torch.randn(24, 2)
    fit(model, torch.optim.SGD(model.parameters(), lr=0.01), (x, y), (x, y), loss="mse", steps=2,
        batch_size=8, log_every=1, sharpness_every=1, sharpness_iters=4, quiet=True)
    assert all(not training for _, training in seen[False])
    assert ("Dropout", True) in seen[True] and ("BatchNorm1d", True) not in seen[True]
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]


def test_sharpness_sees_the_training_function_and_leaves_the_model_as_it_was():
    model = noisy_net()
    x, y = torch.randn(24, 6), torch.randn(24, 2)
    before, rng = state(model), torch.get_rng_state()
    value = sharpness(model, mse_loss, (x, y), iters=10, seed=0, step=0)
    assert_same_state(state(model), before)  # BatchNorm's running statistics and batch count
    assert torch.equal(torch.get_rng_state(), rng) and all(m.training for m in model.modules())
    # the Hessian of the function the step descends: BatchNorm on the batch's statistics, no dropout
    reference = copy.deepcopy(model)
    reference[3].eval()
    params = list(reference.parameters())
    expected = top_hessian_eigenvalue(lambda: mse_loss(reference(x), y), params, iters=10, seed=0)
    assert value == pytest.approx(expected, rel=1e-6)


# ---- item 19: lambda0 through attention ----

class Attention(nn.Module):
    """Tokens -> one attention layer -> a linear read-out of the last position; `kind` picks
    nn.MultiheadAttention through the fused kernel (need_weights=False), through its explicit
    softmax (need_weights=True), or F.scaled_dot_product_attention."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.embed = nn.Embedding(7, 8)
        if kind != "sdpa":
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 7)

    def forward(self, tokens):
        h = self.embed(tokens)
        if self.kind == "sdpa":
            q = h.view(*h.shape[:2], 2, 4).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(h.shape)
        else:
            a, _ = self.mha(h, h, h, need_weights=self.kind == "explicit")
        return self.out(a[:, -1])


@pytest.mark.parametrize("kind", ["mha", "sdpa"])
def test_lambda0_is_measured_through_fused_attention(kind):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 7, (32, 3), generator=g), torch.randint(0, 7, (32,), generator=g)
    model = Attention(kind).double()
    summary = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), (x, y), steps=3, quiet=True)
    assert summary["status"] == "finished" and math.isfinite(summary["lambda0"]) and summary["lambda0"] > 0
    if kind == "mha":  # the same function through plain ops: the same Hessian
        explicit = Attention("explicit").double()
        expected = sharpness(explicit, F.cross_entropy, (x, y), iters=20, seed=0, step=0)
        assert summary["lambda0"] == pytest.approx(expected, rel=1e-8)


def test_params_the_loss_does_not_use_have_zero_curvature():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    expected = sharpness(model, mse_loss, (x, y), iters=20, seed=0, step=0)
    model.unused = nn.Parameter(torch.randn(4))  # 12 params <= 20 Lanczos steps: both exact
    assert sharpness(model, mse_loss, (x, y), iters=20, seed=0, step=0) == pytest.approx(expected, rel=1e-6)


class Doubled(torch.autograd.Function):
    """Forward only, as a kernel without a derivative."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x


class Square(torch.autograd.Function):
    """x^2 whose backward autograd cannot differentiate (it goes through Doubled)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return Doubled.apply(x) * grad


def test_lambda0_of_a_model_without_double_backward_is_null_with_a_warning():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    model = nn.Sequential(lin)
    model.forward = lambda x: Square.apply(lin(x))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    with pytest.warns(RuntimeWarning, match="lambda0 not measured, recorded as null: You must implement"):
        summary = fit(model, torch.optim.SGD(model.parameters(), lr=0.01), (x, y), loss="mse", steps=2,
                      quiet=True)
    assert summary["lambda0"] is None and summary["status"] == "finished" and summary["steps"] == 2


class OnceDifferentiableMSE(torch.autograd.Function):
    """mse_loss whose backward autograd does not record: the grads it starts have no graph."""

    @staticmethod
    def forward(ctx, out, target):
        ctx.save_for_backward(out, target)
        return 0.5 * (out - target).square().sum(-1).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        out, target = ctx.saved_tensors
        return grad * (out - target) / len(out), None


def test_lambda0_of_a_loss_whose_grads_have_no_graph_is_null_not_zero():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    with pytest.raises(NoDoubleBackward, match="no graph to differentiate again"):
        top_hessian_eigenvalue(lambda: OnceDifferentiableMSE.apply(model(x), y), list(model.parameters()))
    with pytest.warns(RuntimeWarning, match="lambda0 not measured, recorded as null: a param's grad has no graph"):
        summary = fit(model, torch.optim.SGD(model.parameters(), lr=0.01), (x, y), loss=OnceDifferentiableMSE.apply,
                      steps=2, quiet=True)
    assert summary["lambda0"] is None and summary["status"] == "finished"


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("mat1 and mat2 shapes cannot be multiplied")], ids=["oom", "bug"])
def test_lambda0_raises_what_is_not_a_missing_double_backward(error):
    """Only a loss without double backward makes lambda0 null; out of memory or a bug in
    the model is the error it is, not a null lambda0."""
    model = nn.Linear(4, 2)
    calls = []

    def failing_first(out, target):  # the first call measures lambda0
        calls.append(1)
        if len(calls) == 1:
            raise error
        return mse_loss(out, target)
    with pytest.raises(type(error), match=str(error)):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.01), (torch.randn(8, 4), torch.randn(8, 2)),
            loss=failing_first, steps=2, quiet=True)


# ---- item 20: the NTK parametrization's bias multiplier ----

def test_default_ntk_net_with_biases_catapults_at_3_over_lambda0():
    # with beta = 1 this net diverges: its lambda0 is ~1.45, mostly the output bias's curvature 1
    cfg = TrainConfig(task="teacher-student", loss="mse", n_train=64, n_val=16, input_dim=16, width=256,
                      depth=2, parametrization="ntk", optimizer="sgd", lr="3/lambda0", steps=150,
                      log_every=1, plots=False)
    assert cfg.bias and cfg.ntk_bias_scale == 0.1
    summary = run(cfg, None, quiet=True)
    assert summary["phase"] == "catapult", summary
    assert summary["peak_loss"] > 5 * summary["loss0"] and summary["final_loss"] < 0.1 * summary["loss0"]


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ntk_bias_scale_scales_the_bias_contribution(beta):
    torch.manual_seed(0)
    model = MLP(5, 3, depth=3, width=16, parametrization="ntk", ntk_bias_scale=beta)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    last = model.layers[-1]
    # the output moves by beta * (the change of the bias)
    with torch.no_grad():
        before = model(x)
        last.bias += 1.0
        assert torch.allclose(model(x) - before, torch.full_like(before, beta), atol=1e-6)
    # and the output bias's curvature under MSE (0.5 x sum over outputs) is beta^2
    curvature = top_hessian_eigenvalue(lambda: mse_loss(model(x), y), [last.bias], iters=3)
    assert curvature == pytest.approx(beta ** 2, rel=1e-5)


def test_ntk_bias_scale_option(tmp_path, capsys):
    tiny = ["--task", "teacher-student", "--loss", "mse", "--n-train", "16", "--n-val", "8", "--input-dim", "4",
            "--width", "8", "--optimizer", "sgd", "--steps", "1", "--sharpness-iters", "3", "--quiet",
            "--no-plots", "--parametrization", "ntk"]
    assert main(tiny + ["--ntk-bias-scale", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--ntk-bias-scale must be a finite number > 0 (--no-bias: no biases), got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(tiny + ["--ntk-bias-scale", "0.5", "--out", str(tmp_path / "ok")]) == 0
    assert '"ntk_bias_scale": 0.5' in (tmp_path / "ok" / "config.json").read_text()


# ---- item 24: train metrics over the whole DataLoader ----

def classification_data(n=48):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_dataloader_train_metrics_are_those_of_the_whole_training_set(tmp_path):
    x, y = classification_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = MLP(32, 3, depth=2, width=64)
    summary = fit(model, torch.optim.Adam(model.parameters(), lr=0.02), loader, steps=30, log_every=3,
                  out=tmp_path / "r", quiet=True, plots=False, measure_lambda0=False)
    with torch.no_grad():
        out = model(x)
        loss, acc = F.cross_entropy(out, y).item(), (out.argmax(-1) == y).double().mean().item()
    assert summary["final_loss"] == pytest.approx(loss, rel=1e-6)
    assert summary["final_train_acc"] == acc
    from catapult_kernels.train.run_folder import RunFolder
    records = RunFolder(tmp_path / "r", resume=True).read_metrics()
    assert all(r["train_examples"] == 48 for r in records)
    # memorize_step: the first record whose whole-set accuracy reached 0.99
    memorized = [r["step"] for r in records if r["train_acc"] >= 0.99]
    assert memorized and summary["memorize_step"] == memorized[0]


def test_lambda0_from_a_dataloader_uses_sharpness_batch_examples():
    x, y = classification_data()
    model = MLP(32, 3, depth=2, width=16)
    expected = sharpness(model, F.cross_entropy, (x[:20], y[:20]), iters=20, seed=0, step=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # the first 20 examples span 3 batches
    summary = fit(model, torch.optim.SGD(model.parameters(), lr=0.01), loader, steps=1, sharpness_batch=20,
                  quiet=True)
    assert summary["lambda0"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seeded", [False, True], ids=["global-rng", "own-generator"])
def test_measuring_does_not_change_the_training(seeded):
    """Iterating a DataLoader draws from the global RNG, or from the generator it was given;
    the measurements must not move the training's shuffles: logging every step or never gives
    the same params."""
    x, y = classification_data(32)
    finals = []
    for log_every in (1, 100):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        generator = torch.Generator().manual_seed(0) if seeded else None
        train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=generator)
        val = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), train, val, steps=12, log_every=log_every,
            quiet=True)
        finals.append(state(model))
    assert_same_state(*finals)


def batches_trained_on(loader, val=None, steps=10) -> list[int]:
    """The first target of each training step's batch (the targets are the example indices)."""
    seen = []

    def loss(out, target):
        if torch.is_grad_enabled():  # the step's forward, not a measurement
            seen.append(int(target[0]))
        return (out.squeeze(-1) - target).square().mean()
    model = nn.Linear(1, 1)
    fit(model, torch.optim.SGD(model.parameters(), lr=1e-3), loader, val, loss=loss, steps=steps, log_every=3,
        measure_lambda0=False, quiet=True)
    return seen


def test_a_loader_with_persistent_workers_trains_on_every_batch_in_order():
    """About 1 s: one worker process. iter() of such a loader returns its one iterator, reset:
    a measurement pass over it would rewind the training's batches."""
    indices = torch.arange(8.0)
    loader = DataLoader(TensorDataset(indices[:, None], indices), batch_size=1, num_workers=1,
                        persistent_workers=True)
    assert batches_trained_on(loader, val=loader) == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]


def test_no_host_sync_between_log_steps():
    x, y = classification_data(256)  # 32 batches: one loader iterator for the whole run
    counts = []
    for steps in (10, 20):  # log steps 0 and `steps` in both: the same measurements
        torch.manual_seed(0)
        model = MLP(32, 3, depth=2, width=16)
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        with HostSyncs() as syncs:
            fit(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, (x, y), steps=steps,
                log_every=steps, quiet=True, measure_lambda0=False)
        counts.append(syncs.count)
    assert counts[0] == counts[1]
