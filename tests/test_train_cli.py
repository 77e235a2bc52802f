"""catapult-train on the command line: bad input gets one clear line; runs, sweeps and the
coordinate check write what they promise."""
import csv
import json
import subprocess
import sys

import pytest

from catapult_kernels.train.cli import main
from catapult_kernels.train.config import LearningRate

SWEEP_TINY = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim",
              "4", "--optimizer", "sgd", "--steps", "4", "--log-every", "2", "--sharpness-iters", "5", "--quiet",
              "--no-plots"]  # a sweep takes --widths, never --width
TINY = SWEEP_TINY + ["--width", "16"]


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "adamz"], "unknown optimizer 'adamz'; choose one of: adopt, adam, adamw, adan, lamb, lars, lion, muon, sgd"),
    (["--task", "mnist"], "unknown task 'mnist'; choose one of: modular, teacher-student, digits"),
    (["--model", "resnet"], "unknown model 'resnet'; choose one of: mlp, transformer"),
    (["--activation", "gelu"], "choose one of: relu, tanh, quadratic, linear"),
    (["--width", "-3"], "--width must be an integer >= 1, got -3"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lr=-1/lambda0"], "K in K/lambda0 must be a finite number > 0, got -1.0"),
    (["--lr", "fast"], "expected a number (3e-3) or K/lambda0"),
    (["--p", "91"], "--modulus must be a prime"),
    (["--modulus", "91"], "--modulus must be a prime"),
    (["--parallel", "zero"], "unknown parallel 'zero'; choose one of: none, ddp, fsdp"),
    (["--parallel", "ddp"], "--parallel needs a process group: launch with torchrun --nproc-per-node N"),
    (["--parallel", "fsdp", "--device", "cuda:1"], "pass --device cuda, not cuda:1"),
    (["--train-frac", "1.5"], "--train-frac must lie in (0, 1)"),
    (["--momentum", "0.9", "--optimizer", "adamw"], "--momentum applies to sgd, lars and muon, not adamw"),
    (["--impl", "torch", "--optimizer", "lion"], "--impl torch has sgd, adam and adamw"),
    (["--grokfast", "ma"], "unknown grokfast 'ma'; choose one of: none, ema"),
])
def test_bad_input_is_one_clear_line(args, message, capsys, tmp_path):
    assert main(args + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing written


def test_lr_parsing():
    assert LearningRate.parse("2.5/lambda0") == LearningRate(2.5, True)
    assert LearningRate.parse(" 3 / lambda0 ").resolve(1.5) == 2.0
    assert LearningRate.parse("3e-3").resolve(None) == 3e-3
    with pytest.raises(ValueError, match="lambda0 is 0"):
        LearningRate.parse("1/lambda0").resolve(0.0)


def test_run_writes_the_folder_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(TINY + ["--lr", "1/lambda0", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr_times_lambda0"] == pytest.approx(1.0)
    assert "phase" in capsys.readouterr().out
    assert main(TINY + ["--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["--resume", "--out", str(out), "--steps", "6", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert main(["--resume", "--out", str(out), "--steps", "8", "--width", "32"]) == 2
    assert "--width 16 -> 32" in capsys.readouterr().err


def test_digits_needs_scikit_learn_or_says_so(tmp_path, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_sklearn(name, *a, **kw):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    assert main(["--task", "digits", "--quiet", "--out", str(tmp_path / "r")]) == 2
    assert "needs scikit-learn" in capsys.readouterr().err


def test_digits_task(tmp_path):
    pytest.importorskip("sklearn")  # a dev requirement: present in CI
    args = ["--task", "digits", "--n-train", "200", "--width", "32", "--lr", "1e-2", "--steps", "3",
            "--quiet", "--no-plots", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert 0.0 <= summary["final_val_acc"] <= 1.0


def test_sweep_table_and_figure(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sweep", "--widths", "8", "16", "--lrs", "0.5/lambda0", "3/lambda0", "--out", str(out)]
    assert main(args + [a for a in SWEEP_TINY if a != "--no-plots"]) == 0
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["width"], r["lr_spec"]) for r in rows] == [("8", "0.5/lambda0"), ("8", "3/lambda0"),
                                                         ("16", "0.5/lambda0"), ("16", "3/lambda0")]
    assert [float(r["lr_over_2_over_lambda0"]) for r in rows] == pytest.approx([0.25, 1.5, 0.25, 1.5])
    assert (out / "sweep.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "phase" in printed and "3/lambda0" in printed
    assert main(args + SWEEP_TINY) == 2  # the sweep exists
    assert main(args + SWEEP_TINY + ["--resume"]) == 0  # every cell done: nothing reruns


def test_coord_check(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["coord-check", "--widths", "64", "512", "--task", "teacher-student", "--loss", "mse",
            "--optimizer", "adamw", "--lr", "0.05", "--n-train", "64", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "coord_check.json").read_text())["results"]
    assert set(results) == {"standard", "mup"}
    from catapult_kernels.train.coord_check import growth
    ratios = growth({pz: {int(w): v for w, v in by_w.items()} for pz, by_w in results.items()})
    # after two Adam steps the standard output layer has grown with width; muP's has not
    assert ratios["standard"][-1] > 2 * ratios["mup"][-1]
    assert "coord_check.png" in capsys.readouterr().out


def test_console_entry_point_runs_as_a_module(tmp_path):
    done = subprocess.run([sys.executable, "-m", "catapult_kernels.train", "--optimizer", "nope"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "choose one of" in done.stderr


def test_sweep_resume_with_more_steps_extends_its_finished_cells(tmp_path):
    """As a resumed run: --resume --steps N continues every finished cell to N steps, bit for
    bit as a sweep run to N at once."""
    grid = ["sweep", "--widths", "8", "--lrs", "0.5/lambda0", "1/lambda0"]
    first, straight = tmp_path / "first", tmp_path / "straight"
    assert main(grid + SWEEP_TINY + ["--out", str(first)]) == 0
    at = SWEEP_TINY.index("--steps") + 1
    longer = SWEEP_TINY[:at] + ["6"] + SWEEP_TINY[at + 1:]
    assert main(grid + longer + ["--out", str(first), "--resume"]) == 0
    assert main(grid + longer + ["--out", str(straight)]) == 0
    for cell in ("w8-lr0.5_lambda0-s0", "w8-lr1_lambda0-s0"):
        assert json.loads((first / cell / "summary.json").read_text())["steps"] == 6
        assert (first / cell / "metrics.jsonl").read_text().count("\n") == \
            (straight / cell / "metrics.jsonl").read_text().count("\n")
    with open(first / "sweep.csv") as f, open(straight / "sweep.csv") as g:
        ours, theirs = list(csv.DictReader(f)), list(csv.DictReader(g))
    drop = ("steps_per_s", "wall_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ours] == \
        [{k: v for k, v in r.items() if k not in drop} for r in theirs]


@pytest.mark.parametrize("optimizer, betas, eps", [
    ("adopt", [0.9, 0.9999, None], 1e-6), ("adan", [0.98, 0.92, 0.99], 1e-8), ("adamw", [0.9, 0.999, None], 1e-8),
    ("sgd", [None, None, None], None), ("muon", [0.9, 0.95, None], 1e-8)])
def test_every_optimizer_runs_and_its_defaults_are_recorded(tmp_path, optimizer, betas, eps):
    """Each optimizer of catapult_kernels.optim is a --optimizer; betas and eps left out are the
    optimizer's own defaults, written into config.json (a resume reads them back)."""
    out = tmp_path / "r"
    base = list(TINY)
    base[base.index("--optimizer") + 1] = optimizer
    assert main(base + ["--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert [cfg["beta1"], cfg["beta2"], cfg["beta3"]] == betas and cfg["eps"] == eps
    assert main(["--resume", "--out", str(out), "--steps", "6", "--quiet"]) == 0
