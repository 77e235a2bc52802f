"""--adv-eval fgsm|pgd: the attacks against a hand-computed linear case, PGD's ball and strength,
an evaluation that changes nothing it measures, the records, summary and sweep column of a
run, and bad options refused in one line."""
import csv
import json

import pytest
import torch
import torch.nn.functional as F

from catapult_kernels.train import TrainConfig, fit, run
from catapult_kernels.train.adversarial import Attack, default_step_size, fgsm, pgd, robust_accuracy
from catapult_kernels.train.cli import main
from catapult_kernels.train.models import MLP

# A linear 2-class model, logits W x: the cross-entropy's input gradient for label y is
# p_other * (W_other - W_y), so FGSM moves x by eps * sign(W_other - W_y): -eps (1, 1) for
# class 0 and +eps (1, 1) for class 1, cutting the margin (W_y - W_other) x by 6 eps.
W = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
X = torch.tensor([[1.0, 0.0], [0.25, 0.0], [-1.0, 0.0], [0.0, 0.5]])
Y = torch.tensor([0, 0, 1, 1])  # margins 2, 0.5, 2, -2 (the last one wrong); eps 0.25 takes 1.5 off each


def linear() -> torch.nn.Module:
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(W)
    return model


def test_fgsm_against_a_hand_computed_linear_case():
    x_adv = fgsm(linear(), F.cross_entropy, X, Y, 0.25)
    assert torch.equal(x_adv, torch.tensor([[0.75, -0.25], [0.0, -0.25], [-0.75, 0.25], [0.25, 0.75]]))
    # margins after: 0.5 (right), -1 (broken), 0.5 (right), -3.5 (wrong before and after)
    assert robust_accuracy(linear(), F.cross_entropy, (X, Y), Attack("fgsm", 0.25)) == 0.5
    assert robust_accuracy(linear(), F.cross_entropy, (X, Y), Attack("fgsm", 0.4)) == 0.0  # margin 2 - 2.4


def test_an_example_wrong_on_its_clean_input_is_never_robust():
    """The clean input lies in the ball: a perturbation that happens to fix an example does not count."""
    helpful = lambda model, loss_fn, x, y: torch.where(y[:, None] == 0, 10.0, -10.0) * torch.ones_like(x)  # noqa: E731
    assert robust_accuracy(linear(), F.cross_entropy, (X, Y), helpful) == 0.75  # the clean accuracy


@pytest.fixture(scope="module")
def trained():
    """A small ReLU net fitted to 3 Gaussian blobs in 10 dimensions, and its val set."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=gen)
    y = torch.randint(0, 3, (600,), generator=gen)
    x = centers[y] + torch.randn(600, 10, generator=gen)
    torch.manual_seed(0)
    model = MLP(10, 3, depth=2, width=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x[:400]), y[:400]).backward()
        opt.step()
    return model, x[400:], y[400:]


def test_pgd_stays_in_the_ball_and_reaches_its_edge(trained):
    model, x, y = trained
    eps = 0.3
    x_adv = pgd(model, F.cross_entropy, x, y, eps, steps=10, step_size=default_step_size(eps, 10))
    assert bool(((x - eps <= x_adv) & (x_adv <= x + eps)).all())
    assert (x_adv - x).abs().max().item() == pytest.approx(eps)


def test_pgd_with_one_step_of_eps_is_fgsm(trained):
    model, x, y = trained
    assert torch.equal(pgd(model, F.cross_entropy, x, y, 0.3, steps=1, step_size=0.3),
                       fgsm(model, F.cross_entropy, x, y, 0.3))


def test_pgd_is_at_least_as_strong_as_fgsm(trained):
    model, x, y = trained
    clean = robust_accuracy(model, F.cross_entropy, (x, y), lambda m, l, x, y: x)
    by_fgsm = robust_accuracy(model, F.cross_entropy, (x, y), Attack("fgsm", 0.5))
    by_pgd = robust_accuracy(model, F.cross_entropy, (x, y), Attack("pgd", 0.5))
    assert by_pgd <= by_fgsm < clean - 0.1  # measured: 0.715, 0.74, 0.965
    fgsm_loss = F.cross_entropy(model(fgsm(model, F.cross_entropy, x, y, 0.5)), y)
    pgd_loss = F.cross_entropy(model(Attack("pgd", 0.5)(model, F.cross_entropy, x, y)), y)
    assert pgd_loss > fgsm_loss


def test_an_evaluation_leaves_params_grads_modes_and_the_rng_as_they_were(trained):
    model, x, y = trained
    model = torch.nn.Sequential(model, torch.nn.Dropout(0.5))  # Dropout: the RNG, unless in eval mode
    params = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.train()
    rng = torch.get_rng_state()
    x_adv = Attack("pgd", 0.3, steps=3)(model, F.cross_entropy, x, y)
    first = robust_accuracy(model, F.cross_entropy, (x, y), Attack("pgd", 0.3, steps=3))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert not x_adv.requires_grad and x_adv.grad_fn is None  # no graph kept
    assert robust_accuracy(model, F.cross_entropy, (x, y), Attack("pgd", 0.3, steps=3)) == first  # Dropout off


def small(**kw) -> TrainConfig:
    base = dict(task="modular", p=11, width=32, steps=8, log_every=3, lr="1e-2", batch_size=16,
                adv_eval="pgd", adv_eps=0.3, adv_steps=3, plots=False)
    base.update(kw)
    return TrainConfig(**base)


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_run_records_robust_val_acc_and_trains_as_without_it(tmp_path):
    summary = run(small(), tmp_path / "adv", quiet=True)
    logged = records(tmp_path / "adv")
    assert [r["step"] for r in logged] == [0, 3, 6, 8]
    assert all(0.0 <= r["robust_val_acc"] <= r["val_acc"] for r in logged)
    assert summary["final_robust_val_acc"] == logged[-1]["robust_val_acc"]
    plain = run(small(adv_eval="none", adv_eps=0.0), tmp_path / "plain", quiet=True)
    assert plain["final_robust_val_acc"] is None
    assert [{k: v for k, v in r.items() if k != "robust_val_acc"} for r in logged] == records(tmp_path / "plain")
    assert summary["final_loss"] == plain["final_loss"]


def test_fit_takes_an_attack_and_needs_val_for_it():
    model = linear()
    still = torch.optim.SGD(model.parameters(), lr=0.0)  # the hand-computed case at every step
    summary = fit(model, still, (X, Y), (X, Y), steps=1, quiet=True, measure_lambda0=False,
                  attack=Attack("fgsm", 0.25))
    assert summary["final_robust_val_acc"] == 0.5
    with pytest.raises(ValueError, match="robust accuracy is measured on the val data"):
        fit(model, still, (X, Y), steps=1, quiet=True, measure_lambda0=False, attack=Attack("fgsm", 0.25))


def test_sweep_csv_has_the_robust_column(tmp_path):
    args = ["sweep", "--widths", "16", "--lrs", "1e-2", "--task", "modular", "--modulus", "11", "--steps", "2",
            "--adv-eval", "fgsm", "--adv-eps", "0.2", "--quiet", "--no-plots", "--out", str(tmp_path / "s")]
    assert main(args) == 0
    with open(tmp_path / "s" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-1] == "final_robust_val_acc"
    assert 0.0 <= float(rows[0]["final_robust_val_acc"]) <= float(rows[0]["final_val_acc"])


@pytest.mark.parametrize("args, message", [
    (["--adv-eval", "cw", "--adv-eps", "0.1"], "unknown adv_eval 'cw'; choose one of: none, fgsm, pgd"),
    (["--adv-eval", "pgd"], "--adv-eval pgd needs --adv-eps > 0 (the L-inf radius), got 0.0"),
    (["--adv-eval", "fgsm", "--adv-eps", "nan"], "--adv-eval fgsm needs --adv-eps > 0"),
    (["--adv-eps", "0.1"], "--adv-eps and --adv-step-size apply with --adv-eval fgsm or pgd"),
    (["--adv-eval", "fgsm", "--adv-eps", "0.1", "--adv-step-size", "0.1"], "--adv-step-size is pgd's"),
    (["--adv-eval", "pgd", "--adv-eps", "0.1", "--adv-step-size", "-1"], "--adv-step-size is pgd's and must be"),
    (["--adv-eval", "pgd", "--adv-eps", "0.1", "--adv-steps", "0"], "--adv-steps must be an integer >= 1, got 0"),
    (["--adv-eval", "pgd", "--adv-eps", "0.5"], "--adv-eps must be < 0.5 on one-hot operands"),
    (["--adv-eval", "pgd", "--adv-eps", "0.1", "--model", "transformer"], "the transformer reads tokens"),
    (["--adv-eval", "pgd", "--adv-eps", "0.1", "--task", "teacher-student", "--loss", "mse"],
     "task 'teacher-student' is a regression (no accuracy)"),
])
def test_bad_options_are_one_clear_line(args, message, capsys, tmp_path):
    assert main(args + ["--modulus", "11", "--steps", "1", "--quiet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("call, message", [
    (lambda: Attack("pgd", 0.0), "attack radius eps must be a finite number > 0, got 0.0"),
    (lambda: Attack("deepfool", 0.1), "unknown attack 'deepfool'"),
    (lambda: Attack("fgsm", 0.1, step_size=0.1), "step_size is PGD's"),
    (lambda: pgd(linear(), F.cross_entropy, X, Y, 0.1, steps=0, step_size=0.1), "PGD steps must be an integer"),
    (lambda: robust_accuracy(torch.nn.Embedding(3, 2), F.cross_entropy, (torch.tensor([0, 1]), torch.tensor([0, 1])),
                             Attack("fgsm", 0.1)), "these are torch.int64 (tokens have no ball"),
    (lambda: robust_accuracy(linear(), F.mse_loss, (X, X), Attack("fgsm", 0.1)), "these targets are floats"),
])
def test_the_library_refuses_what_has_no_robust_accuracy(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call()
