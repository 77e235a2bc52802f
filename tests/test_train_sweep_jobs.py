"""sweep --jobs N: the cells in N spawned processes write the rows one process writes (each cell
is deterministic given its config), in one sweep.csv and one figure; a failed cell is reported
and the others kept; Ctrl-C checkpoints every running cell and --resume finishes the sweep."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from catapult_kernels.train.cli import main

OPTIONS = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim", "4",
           "--optimizer", "sgd", "--momentum", "0.9", "--batch-size", "8", "--steps", "4", "--log-every", "1",
           "--sharpness-iters", "5", "--quiet"]
GRID = ["sweep", "--widths", "8", "16", "--lrs", "0.5/lambda0", "3/lambda0"] + OPTIONS
NO_PLOTS = GRID + ["--no-plots"]
TIMING = ("steps_per_s", "wall_s")  # how fast, not what was computed


def read_rows(folder) -> list[dict]:
    with open(folder / "sweep.csv") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


# ~10 s: two spawned workers import torch
@pytest.mark.slow
def test_jobs_2_writes_the_rows_of_jobs_1_in_one_table_and_one_figure(tmp_path):
    assert main(NO_PLOTS + ["--out", str(tmp_path / "one")]) == 0
    assert main(GRID + ["--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    assert read_rows(tmp_path / "two") == read_rows(tmp_path / "one")
    assert [(r["width"], r["lr_spec"]) for r in read_rows(tmp_path / "two")] == \
        [("8", "0.5/lambda0"), ("8", "3/lambda0"), ("16", "0.5/lambda0"), ("16", "3/lambda0")]
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == ["sweep.png"]


# ~10 s: two spawned workers, then a resume in this process
@pytest.mark.slow
def test_a_failed_cell_is_reported_and_the_others_kept(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    blocked = out / "w8-lr3_lambda0-s0"
    blocked.write_text("a file where the cell's folder goes")
    assert main(NO_PLOTS + ["--jobs", "2", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "cell w8-lr3_lambda0-s0 failed" in captured.err and "Traceback" not in captured.err
    assert "1 cell(s) failed (w8-lr3_lambda0-s0:" in captured.err and "--resume" in captured.err
    assert "width" in captured.out  # the table of the others
    assert [(r["width"], r["lr_spec"]) for r in read_rows(out)] == \
        [("8", "0.5/lambda0"), ("16", "0.5/lambda0"), ("16", "3/lambda0")]
    kept = (out / "w16-lr3_lambda0-s0" / "metrics.jsonl").read_text()
    blocked.unlink()
    assert main(NO_PLOTS + ["--out", str(out), "--resume"]) == 0
    assert len(read_rows(out)) == 4
    assert (out / "w16-lr3_lambda0-s0" / "metrics.jsonl").read_text() == kept  # done cells are not rerun


def test_jobs_must_be_a_positive_count_before_any_work(tmp_path, capsys):
    assert main(NO_PLOTS + ["--jobs", "0", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--jobs takes an integer >= 1 (processes), got 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def metrics_lines(path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


# ~15 s: a sweep with two workers in a subprocess, stopped, then resumed in two workers
@pytest.mark.slow
def test_ctrl_c_checkpoints_every_running_cell_and_resume_finishes_the_sweep(tmp_path):
    out = tmp_path / "s"
    grid = ["sweep", "--widths", "8", "--lrs", "0.1", "0.2"] + OPTIONS + ["--no-plots"]
    cells = [out / "w8-lr0.1-s0", out / "w8-lr0.2-s0"]
    endless = ["--steps", "1000000", "--jobs", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "catapult_kernels.train", *grid, *endless],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300  # a guard against a hang, not a speed check
    while not all(metrics_lines(c / "metrics.jsonl") >= 2 for c in cells):  # both cells in their loops
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the cells did not start: {proc.communicate()}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: to every process; the parent relays it
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"did not stop: {proc.communicate()}")
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    assert "interrupted after 0 of 2 cells" in err
    steps = []
    for cell in cells:
        summary = json.loads((cell / "summary.json").read_text())
        assert summary["status"] == "interrupted" and (cell / "checkpoint.pt").exists()
        steps.append(summary["steps"])
    # each cell continued from its checkpoint, in the workers
    assert main(grid + ["--steps", str(max(steps) + 2), "--jobs", "2", "--out", str(out), "--resume"]) == 0
    assert [r["lr_spec"] for r in read_rows(out)] == ["0.1", "0.2"]
    for cell in cells:
        summary = json.loads((cell / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps"] == max(steps) + 2
