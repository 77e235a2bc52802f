"""The trainer's loop and run folder: the same numbers as a hand-written loop, exact resume
(after a stop and after Ctrl-C), divergence handled, run folders never overwritten silently."""
import copy
import json
import signal

import pytest
import torch

from catapult_kernels.optim import SGD
from catapult_kernels.train import TrainConfig, fit, run
from catapult_kernels.train.loop import mse_loss
from catapult_kernels.train.models import MLP
from catapult_kernels.train.schedule import lr_factor


def small(**kw) -> TrainConfig:
    base = dict(task="teacher-student", loss="mse", n_train=64, n_val=32, input_dim=8, width=32, depth=3,
                optimizer="sgd", lr="0.5/lambda0", momentum=0.9, steps=20, log_every=3, sharpness_every=7,
                sharpness_iters=8, batch_size=16, schedule="cosine", warmup=3, plots=False)
    base.update(kw)
    return TrainConfig(**base)


def read(folder, name):
    path = folder / name
    return [json.loads(line) for line in path.read_text().splitlines()] if name.endswith(".jsonl") \
        else json.loads(path.read_text())


def params_of(folder) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=False)["model"]


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("torch_optim", [False, True])
def test_fit_runs_the_numbers_of_a_hand_written_loop(torch_optim):
    torch.manual_seed(0)
    model = MLP(8, 2, depth=3, width=16, activation="tanh")
    hand = copy.deepcopy(model)
    x, y = torch.randn(40, 8), torch.randn(40, 2)
    make = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) if torch_optim else \
        (lambda ps: SGD(ps, lr=0.1, momentum=0.9))
    opt, hand_opt = make(model.parameters()), make(hand.parameters())
    summary = fit(model, opt, (x, y), loss="mse", steps=12, log_every=5, quiet=True, measure_lambda0=False)
    losses = []
    for _ in range(12):
        hand_opt.zero_grad()
        loss = mse_loss(hand(x), y)
        losses.append(loss.item())
        loss.backward()
        hand_opt.step()
    for p, q in zip(model.parameters(), hand.parameters()):
        assert torch.equal(p, q)
    assert summary["loss0"] == losses[0] and summary["steps"] == 12
    assert summary["final_loss"] == mse_loss(hand(x), y).item()


def test_grad_norm_comes_from_the_optimizer_and_is_right(tmp_path):
    torch.manual_seed(0)
    model = MLP(8, 2, depth=2, width=16)
    x, y = torch.randn(40, 8), torch.randn(40, 2)
    opt = SGD(model.parameters(), lr=0.05, max_grad_norm=1e-3)
    fit(model, opt, (x, y), loss="mse", steps=4, log_every=1, out=tmp_path / "r", quiet=True, plots=False)
    recs = read(tmp_path / "r", "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    # replay: the logged norm is the norm of the grads at theta_t
    torch.manual_seed(0)
    replay = MLP(8, 2, depth=2, width=16)
    ropt = SGD(replay.parameters(), lr=0.05, max_grad_norm=1e-3)
    for r in recs[:4]:
        ropt.zero_grad()
        mse_loss(replay(x), y).backward()
        norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in replay.parameters()]))
        assert r["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
        w = torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for p in replay.parameters()]))
        assert r["weight_norm"] == pytest.approx(w.item(), rel=1e-5)
        ropt.step()


def test_resume_is_bit_identical(tmp_path):
    cfg = small()
    whole = run(cfg, tmp_path / "whole", quiet=True)
    run(small(steps=9, decay_steps=20), tmp_path / "split", quiet=True)  # the cosine horizon of the whole run
    from catapult_kernels.train.experiment import resolve_resume
    resumed = run(resolve_resume(tmp_path / "split", {"steps": 20}), tmp_path / "split", resume=True, quiet=True)
    assert read(tmp_path / "whole", "metrics.jsonl") == read(tmp_path / "split", "metrics.jsonl")
    assert_same_params(params_of(tmp_path / "whole"), params_of(tmp_path / "split"))
    timing = ("steps_per_s", "wall_s")
    assert {k: v for k, v in whole.items() if k not in timing} == {k: v for k, v in resumed.items() if k not in timing}


def test_ctrl_c_writes_a_checkpoint_and_the_run_resumes_exactly(tmp_path):
    cfg = small(steps=15, checkpoint_every=4)
    run(cfg, tmp_path / "whole", quiet=True)

    calls = {"n": 0}
    real_mse = mse_loss

    def mse_with_ctrl_c(out, y):
        calls["n"] += 1
        if calls["n"] == 20:  # some forward in the middle of the run (sharpness included)
            signal.raise_signal(signal.SIGINT)
        return real_mse(out, y)

    import catapult_kernels.train.loop as loop
    loop.LOSSES["mse"] = mse_with_ctrl_c
    try:
        stopped = run(cfg, tmp_path / "cut", quiet=True)
    finally:
        loop.LOSSES["mse"] = real_mse
    assert stopped["status"] == "interrupted" and 0 < stopped["steps"] < 15
    assert read(tmp_path / "cut", "summary.json")["status"] == "interrupted"
    with pytest.raises(ValueError, match="already holds a run"):
        run(cfg, tmp_path / "cut", quiet=True)
    run(cfg, tmp_path / "cut", resume=True, quiet=True)
    assert read(tmp_path / "whole", "metrics.jsonl") == read(tmp_path / "cut", "metrics.jsonl")
    assert_same_params(params_of(tmp_path / "whole"), params_of(tmp_path / "cut"))


def test_divergence_ends_cleanly_with_a_summary_and_a_checkpoint(tmp_path):
    cfg = small(lr="50/lambda0", momentum=0.0, schedule="constant", warmup=0, batch_size=None, steps=200,
                log_every=5, sharpness_every=0)
    summary = run(cfg, tmp_path / "r", quiet=True)
    assert summary["phase"] == "divergent" and summary["status"] == "divergent"
    assert summary["steps"] < 200
    assert (tmp_path / "r" / "checkpoint.pt").exists()
    assert read(tmp_path / "r", "summary.json")["phase"] == "divergent"
    with pytest.raises(ValueError, match="diverged"):
        run(cfg, tmp_path / "r", resume=True, quiet=True)


def test_existing_run_is_refused_unless_asked(tmp_path):
    cfg = small(steps=3, sharpness_every=0)
    run(cfg, tmp_path / "r", quiet=True)
    before = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds a run"):
        run(cfg, tmp_path / "r", quiet=True)
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == before
    run(small(steps=4, sharpness_every=0), tmp_path / "r", overwrite=True, quiet=True)
    assert read(tmp_path / "r", "metrics.jsonl")[-1]["step"] == 4
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"  # not ours: left alone


def test_resume_refuses_changed_options_and_shorter_runs(tmp_path):
    from catapult_kernels.train.experiment import resolve_resume
    run(small(steps=6, sharpness_every=0), tmp_path / "r", quiet=True)
    before = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    refused = f"continues the run in {tmp_path / 'r'} as it began; .* --width 32 -> 64"
    with pytest.raises(ValueError, match=refused):  # the CLI's path
        run(resolve_resume(tmp_path / "r", {"width": 64, "steps": 8}), tmp_path / "r", resume=True, quiet=True)
    with pytest.raises(ValueError, match=refused):  # and Python's: run() itself compares
        run(small(steps=8, sharpness_every=0, width=64), tmp_path / "r", resume=True, quiet=True)
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == before
    assert run(small(steps=8, sharpness_every=0), tmp_path / "r", resume=True, quiet=True)["steps"] == 8
    with pytest.raises(ValueError, match="shorten"):
        run(resolve_resume(tmp_path / "r", {"steps": 4}), tmp_path / "r", resume=True, quiet=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        resolve_resume(tmp_path / "nothing", {})


def test_run_checks_the_device_as_the_cli_does():
    with pytest.raises(ValueError, match="--device tpu: expected cpu, cuda or cuda:N"):
        run(small(device="tpu"))


def test_a_resume_reads_the_metrics_and_writes_config_json_once(tmp_path, monkeypatch):
    from catapult_kernels.train.experiment import resolve_resume
    from catapult_kernels.train.loop import StopSignals
    from catapult_kernels.train.run_folder import RunFolder
    out = tmp_path / "r"
    with StopSignals() as signals:  # the run's loop shares it: a stop already requested
        signals.signum = signal.SIGINT
        assert run(small(steps=4, sharpness_every=0), out, quiet=True)["steps"] == 0  # checkpoint at step 0
    calls = []
    for method in ("_parse_metrics", "write_json"):
        real = getattr(RunFolder, method)
        monkeypatch.setattr(RunFolder, method, lambda self, *a, real=real, method=method, **kw:
                            calls.append((method, *a[:1])) or real(self, *a, **kw))
    assert run(resolve_resume(out, {}), out, resume=True, quiet=True)["steps"] == 4
    assert calls.count(("_parse_metrics",)) == 1 and calls.count(("write_json", "config.json")) == 1


def test_summary_and_metrics_fields(tmp_path):
    summary = run(small(task="modular", p=7, loss="ce", optimizer="adamw", lr="1e-2", momentum=0.0,
                        batch_size=None, plots=True, steps=6), tmp_path / "r", quiet=True)
    for key in ("lambda0", "lr", "phase", "peak_loss", "final_loss", "sharpness_final", "memorize_step",
                "grok_step", "final_train_acc", "final_val_acc", "steps_per_s", "wall_s"):
        assert key in summary
    recs = read(tmp_path / "r", "metrics.jsonl")
    assert recs[0]["step"] == 0 and recs[-1]["step"] == 6
    for r in recs:
        assert {"step", "loss", "lr", "grad_norm", "weight_norm", "train_acc", "val_acc"} <= r.keys()
    assert [r["step"] for r in recs if "sharpness" in r] == [0, 6]
    assert recs[0]["sharpness"] == summary["lambda0"]
    assert (tmp_path / "r" / "curves.png").stat().st_size > 10_000
    assert read(tmp_path / "r", "config.json")["optimizer"] == "adamw"


def test_schedule():
    cfg = small(warmup=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(t, cfg, 14) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(14, cfg, 14) == pytest.approx(0.1) and lr_factor(99, cfg, 14) == pytest.approx(0.1)
    assert lr_factor(7, small(warmup=0, schedule="constant"), 14) == 1.0


def test_minibatches_cover_each_epoch_once():
    from catapult_kernels.train.loop import TensorBatches
    x = torch.arange(10.0)[:, None]
    b = TensorBatches(x, torch.arange(10), 3, seed=0)
    seen = torch.cat([b(t)[1] for t in range(3)])
    assert len(set(seen.tolist())) == 9
    assert torch.equal(b(4)[1], TensorBatches(x, torch.arange(10), 3, seed=0)(4)[1])  # stateless in step
