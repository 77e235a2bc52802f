"""The trainer under stops and bad output paths: SIGTERM and Ctrl-C checkpoint and resume
exactly (a run and a sweep, in a subprocess that gets the real signal), output and device
errors are one line before any work, and the summary and the sweep figure report only what
was measured."""
import csv
import importlib
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from catapult_kernels.optim import SGD
from catapult_kernels.train import fit
from catapult_kernels.train.cli import main
from catapult_kernels.train.models import MLP
from catapult_kernels.train.plots import plot_sweep, sweep_figure

# minibatches and momentum, so that a resume must restore the batch order and the optimizer state
GRID = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim", "4",
        "--optimizer", "sgd", "--momentum", "0.9", "--batch-size", "8", "--log-every", "1",
        "--sharpness-iters", "5", "--quiet", "--no-plots"]
RUN = GRID + ["--width", "16", "--lr", "0.5/lambda0"]
ENDLESS = ["--steps", "1000000"]  # runs until the test stops it


def start_and_wait_for_metrics(args: list, metrics) -> subprocess.Popen:
    """catapult-train in a subprocess, returned once `metrics` has its first line (the loop runs)."""
    proc = subprocess.Popen([sys.executable, "-m", "catapult_kernels.train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a guard against a hang, not a speed check
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None:
            pytest.fail(f"ended before its first metrics line: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no metrics line")
        time.sleep(0.02)
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"did not stop: {proc.communicate()}")
    return proc.returncode, err


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_identical(a, b) -> None:
    """Nested state (dicts, lists, tensors, numbers) equal bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a == b


# ~10 s: three runs, one of them in a subprocess that imports torch
def test_sigterm_checkpoints_and_the_run_resumes_bit_exactly(tmp_path):
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    proc = start_and_wait_for_metrics(RUN + ENDLESS + ["--out", str(cut)], cut / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err
    assert "--resume --out" in err
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "interrupted" and (cut / "checkpoint.pt").exists()
    stopped = summary["steps"]
    assert stopped >= 1  # the first record is logged after update 0
    steps = ["--steps", str(stopped + 3)]
    assert main(["--resume", "--out", str(cut), "--quiet"] + steps) == 0
    assert main(RUN + steps + ["--out", str(whole)]) == 0
    assert read_jsonl(cut / "metrics.jsonl") == read_jsonl(whole / "metrics.jsonl")
    resumed, reference = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (cut, whole))
    assert_identical(resumed["model"], reference["model"])
    assert_identical(resumed["optimizer"]["state"], reference["optimizer"]["state"])


def test_sigterm_in_process_stops_the_loop_and_the_handlers_come_back(tmp_path):
    """The loop's handlers replace the previous ones only while it runs, in the main thread;
    a loop in another thread installs none (Python allows it no handler) and still trains."""
    calls = []

    def mine(signum, frame):
        calls.append(signum)
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        torch.manual_seed(0)
        model = MLP(4, 2, depth=2, width=8)
        x, y = torch.randn(16, 4), torch.randn(16, 2)
        seen = {"forwards": 0}

        def loss_then_sigterm(out, target):
            seen["forwards"] += 1
            if seen["forwards"] == 3:
                signal.raise_signal(signal.SIGTERM)
            return ((out - target) ** 2).mean()

        summary = fit(model, SGD(model.parameters(), lr=0.01), (x, y), loss=loss_then_sigterm, steps=50,
                      log_every=1, measure_lambda0=False, quiet=True, out=tmp_path / "r", plots=False)
        assert summary["status"] == "interrupted" and summary["steps"] == 3
        assert calls == []  # the loop's handler, not the previous one
        assert signal.getsignal(signal.SIGTERM) is mine  # restored
        signal.raise_signal(signal.SIGTERM)
        assert len(calls) == 1

        results = []
        thread = threading.Thread(target=lambda: results.append(
            fit(model, SGD(model.parameters(), lr=0.01), (x, y), loss="mse", steps=3, measure_lambda0=False,
                quiet=True)))
        thread.start()
        thread.join()
        assert results[0]["status"] == "finished"
    finally:
        signal.signal(signal.SIGTERM, previous)


SWEEP = ["sweep", "--widths", "8", "--lrs", "100/lambda0", "0.5/lambda0"] + GRID  # cell 1 diverges at once


# ~10 s: a sweep in a subprocess, then its resume
def test_ctrl_c_stops_the_sweep_after_checkpointing_and_resume_finishes_it(tmp_path):
    out = tmp_path / "s"
    second = out / "w8-lr0.5_lambda0-s0"
    proc = start_and_wait_for_metrics(SWEEP + ENDLESS + ["--out", str(out)], second / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 128 + signal.SIGINT and "Traceback" not in err
    assert "interrupted after 1 of 2 cells" in err
    with open(out / "sweep.csv") as f:
        assert [(r["lr_spec"], r["phase"]) for r in csv.DictReader(f)] == [("100/lambda0", "divergent")]
    summary = json.loads((second / "summary.json").read_text())
    assert summary["status"] == "interrupted" and (second / "checkpoint.pt").exists()
    steps = ["--steps", str(summary["steps"] + 2)]
    assert main(SWEEP + steps + ["--out", str(out), "--resume"]) == 0
    with open(out / "sweep.csv") as f:
        assert [r["lr_spec"] for r in csv.DictReader(f)] == ["100/lambda0", "0.5/lambda0"]
    assert json.loads((second / "summary.json").read_text())["status"] == "finished"


# ~15 s: a sweep with figures in a subprocess, then its resume
def test_a_second_ctrl_c_while_stopping_ends_the_sweep_without_a_traceback(tmp_path):
    out = tmp_path / "s"
    second = out / "w8-lr0.5_lambda0-s0"
    with_plots = [a for a in SWEEP if a != "--no-plots"]  # the cell's figure: seconds of stopping to hit
    proc = start_and_wait_for_metrics(with_plots + ENDLESS + ["--out", str(out)], second / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    summary = second / "summary.json"
    while not summary.exists() and proc.poll() is None:  # written just before the figure
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # two signals sent at once would arrive as one
    code, err = finish(proc)
    assert code == 128 + signal.SIGINT
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "stopped at once" in err and "interrupted after" not in err  # not the first signal's stop
    with open(out / "sweep.csv") as f:  # the cell done is in the table
        assert [r["lr_spec"] for r in csv.DictReader(f)] == ["100/lambda0"]
    assert main(SWEEP + ["--steps", str(json.loads(summary.read_text())["steps"] + 2), "--out", str(out),
                         "--resume"]) == 0


def test_a_sweep_that_fails_leaves_no_sweep_csv_to_refuse_its_rerun(tmp_path, capsys):
    out = tmp_path / "s"
    command = ["sweep", "--widths", "8", "--lrs", "0.1"] + GRID + ["--steps", "2", "--out", str(out)]
    assert main(command + ["--batch-size", "999"]) == 2  # found inside the first cell's run
    assert "exceeds the 32 training examples" in capsys.readouterr().err
    assert not (out / "sweep.csv").exists()
    assert main(command) == 0


@pytest.fixture
def no_work(monkeypatch):
    """Any run or sweep cell that starts fails the test: the checks come first."""
    def started(*a, **kw):
        raise AssertionError("work started before the check")
    for module in ("experiment", "sweep"):  # the package's `sweep` is the function: import the module
        monkeypatch.setattr(importlib.import_module(f"catapult_kernels.train.{module}"), "run", started)


def bad_outputs(tmp_path) -> list:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    return [(a_file, "is a file, not a folder"),
            (a_file / "run", "a_file is a file, not a folder"),
            ("/proc/catapult-read-only/run", "cannot write there")]  # read-only even for root


@pytest.mark.parametrize("command", [["--width", "16"], ["sweep", "--widths", "16"]], ids=["run", "sweep"])
def test_output_and_device_errors_are_one_line_before_any_work(command, tmp_path, capsys, no_work):
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [(["--out", str(path)], message) for path, message in bad_outputs(tmp_path)]
    cases += [(["--device", "tpu", "--out", str(tmp_path / "r")], "--device tpu: expected cpu, cuda or cuda:N"),
              (["--device", f"cuda:{torch.cuda.device_count()}", "--out", str(tmp_path / "r")], "visible")]
    for extra, message in cases:
        assert main(command + GRID + ["--lr" if command[0] != "sweep" else "--lrs", "0.1"] + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before + ["a_file"]


@pytest.mark.parametrize("grid, message", [
    (["--widths", "8", "--lrs", "0.1", "--width", "16"], "sweep takes --widths (one cell per value), not --width"),
    (["--widths", "8", "--lrs", "0.1", "--lr", "0.1"], "sweep takes --lrs (one cell per value), not --lr"),
    (["--widths", "8", "--lrs", "0.1", "--seed", "1"], "sweep takes --seeds (one cell per value), not --seed"),
    (["--widths", "8", "0", "--lrs", "0.1"], "--widths takes integers >= 1, got 0"),
    (["--widths", "8", "--lrs", "fast"], "--lrs 'fast': expected a number > 0 (3e-3) or K/lambda0 with K > 0"),
    (["--widths", "8", "--lrs=-2/lambda0"], "--lrs '-2/lambda0': expected a number > 0"),
])
def test_sweep_refuses_single_run_options_and_names_its_own(grid, message, tmp_path, capsys, no_work):
    assert main(["sweep", *grid, *GRID, "--out", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def small_fit(tmp_path, **options) -> tuple[dict, list[dict]]:
    torch.manual_seed(0)
    model = MLP(4, 2, depth=2, width=16)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    summary = fit(model, SGD(model.parameters(), lr=options.pop("lr")), (x, y), loss="mse", quiet=True,
                  out=tmp_path / "r", plots=False, **options)
    return summary, read_jsonl(tmp_path / "r" / "metrics.jsonl")


def test_divergent_summary_reports_the_last_sharpness_and_its_step(tmp_path):
    summary, metrics = small_fit(tmp_path, lr=50.0, steps=200, log_every=1, sharpness_every=50,
                                 sharpness_iters=5)
    assert summary["status"] == "divergent" and summary["steps"] < 50
    assert summary["sharpness_final_step"] == 0 and summary["sharpness_final"] == metrics[0]["sharpness"]
    assert summary["final_step"] == metrics[-1]["step"] == summary["steps"]


def test_interrupted_summary_reports_the_last_record_and_its_step(tmp_path):
    torch.manual_seed(0)
    model = MLP(4, 2, depth=2, width=16)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    seen = {"forwards": 0}

    def mse_then_ctrl_c(out, target):
        seen["forwards"] += 1
        if seen["forwards"] == 8:  # the forward of step 7
            signal.raise_signal(signal.SIGINT)
        return 0.5 * (out - target).square().sum(-1).mean()

    summary = fit(model, SGD(model.parameters(), lr=0.01), (x, y), loss=mse_then_ctrl_c, steps=50, log_every=5,
                  measure_lambda0=False, quiet=True, out=tmp_path / "r", plots=False)
    metrics = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert summary["status"] == "interrupted" and summary["steps"] == 8
    assert [r["step"] for r in metrics] == [0, 5]
    assert summary["final_step"] == 5 and summary["final_loss"] == metrics[-1]["loss"]
    assert summary["sharpness_final"] is None and summary["sharpness_final_step"] is None  # never measured


def cell(width, lr_spec, lr, x, phase, peak=None, loss0=1.0, val_acc=None) -> dict:
    return {"width": width, "lr_spec": lr_spec, "lr": lr, "lr_times_lambda0": 2 * x, "phase": phase,
            "peak_loss": peak, "loss0": loss0, "final_val_acc": val_acc}


def test_sweep_figure_marks_divergence_on_a_band_never_at_a_made_up_height(tmp_path):
    rows = [cell(8, "0.5/lambda0", 0.1, 0.25, "lazy", peak=1.0),
            cell(8, "3/lambda0", 0.6, 1.5, "catapult", peak=700.0),
            cell(8, "9/lambda0", 1.8, 4.5, "divergent", peak=2e9),
            cell(16, "0.5/lambda0", 0.05, 0.25, "lazy", peak=1.0),
            cell(16, "3/lambda0", 0.3, 1.5, "divergent", peak=None)]
    fig = sweep_figure(rows)
    assert [p.width for p in fig.panels] == [8, 16]
    assert fig.panels[0].points == [(0.25, 1.0, "lazy"), (1.5, 700.0, "catapult")]
    assert fig.panels[0].divergent_xs == [4.5]
    assert fig.panels[1].points == [(0.25, 1.0, "lazy")] and fig.panels[1].divergent_xs == [1.5]
    assert not fig.classification and not fig.log_x  # K/lambda0 over a small range: linear
    plot_sweep(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000

    classified = [cell(8, "1/lambda0", 0.1, 0.5, "lazy", val_acc=0.9),
                  cell(8, "9/lambda0", 0.9, 4.5, "divergent", val_acc=0.01)]
    fig = sweep_figure(classified)
    assert fig.classification and fig.panels[0].points == [(0.5, 0.9, "lazy")]
    assert fig.panels[0].divergent_xs == [4.5]


def test_sweep_figure_spans_plain_lrs_on_a_log_axis():
    plain = [cell(8, "0.01", 0.01, 0.3, "lazy", peak=1.0), cell(8, "0.03", 0.03, 0.9, "lazy", peak=1.0)]
    assert sweep_figure(plain).log_x
    assert not sweep_figure(plain[:1]).log_x  # one lr: nothing to span
    per_lambda0 = [cell(8, "0.5/lambda0", 0.1, 0.25, "lazy", peak=1.0),
                   cell(8, "2/lambda0", 0.4, 1.0, "catapult", peak=9.0)]
    assert not sweep_figure(per_lambda0).log_x


def test_sweep_figure_without_any_lambda0_draws_nothing(tmp_path):
    rows = [{**cell(8, "0.01", 0.01, 0.3, "lazy", peak=1.0), "lr_times_lambda0": None},
            {**cell(16, "0.01", 0.01, 0.3, "divergent"), "lr_times_lambda0": None}]  # lambda0 null: no x
    assert sweep_figure(rows).panels == []
    plot_sweep(rows, tmp_path / "sweep.png")
    assert not (tmp_path / "sweep.png").exists()


@pytest.mark.parametrize("option, message", [(["--width", "64"], "coord-check takes --widths, not --width"),
                                             (["--parametrization", "ntk"], "not --parametrization")])
def test_coord_check_refuses_the_options_it_would_ignore(option, message, capsys, tmp_path):
    assert main(["coord-check", "--widths", "8", *option, "--out", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_fit_with_a_zero_lr_finishes_with_no_edge_of_stability():
    """lr 0 (a run that only measures) has no 2/lr: null, not a crash."""
    import torch
    from catapult_kernels.train import fit
    model = torch.nn.Linear(3, 1)
    summary = fit(model, torch.optim.SGD(model.parameters(), lr=0.0), (torch.randn(8, 3), torch.randn(8, 1)),
                  loss="mse", steps=2, measure_lambda0=False, quiet=True)
    assert summary["status"] == "finished" and summary["two_over_lr"] is None
