"""Run folders: one process at a time (an OS lock that dies with its holder), checkpoints
that load without running code, a full disk that stops a run cleanly and lets it resume, and
resumes that refuse, by name, any change to what the run computes."""
import csv
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from catapult_kernels.train.cli import main
from catapult_kernels.train.config import TrainConfig
from catapult_kernels.train.experiment import default_out
from catapult_kernels.train.run_folder import FolderLock, RunFolder
from catapult_kernels.train.sweep import cell_name, write_csv

TINY = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim", "4",
        "--width", "16", "--optimizer", "sgd", "--steps", "4", "--log-every", "2", "--sharpness-iters", "5",
        "--quiet", "--no-plots"]
SWEEP = ["sweep", "--widths", "8", "--lrs", "1e-3"] + TINY[:TINY.index("--width")] + TINY[TINY.index("--width") + 2:]


def steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def snapshot(out) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir()}


# ---- the lock ----

def start_holder(args: list, out):
    """`catapult-train <args> --out out` in a subprocess, stopped (SIGSTOP) once it holds the
    folder's lock: a stopped run keeps its folder."""
    proc = subprocess.Popen([sys.executable, "-m", "catapult_kernels.train", *args, "--steps", "100000",
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock, deadline = out / ".lock", time.monotonic() + 300  # a guard against a hang, not a timing check
    while not (lock.exists() and f"pid {proc.pid} on" in lock.read_text()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


def kill_9(proc) -> None:
    proc.kill()
    proc.wait()
    proc.stderr.close()


def test_a_second_run_is_refused_while_the_first_lives_and_kill_9_frees_the_folder(tmp_path, capsys):
    """Over 5 s: a subprocess run of catapult-train (4-8 s here, most of it importing torch)."""
    out = tmp_path / "r"
    holder = start_holder(TINY, out)
    try:
        holding = f"{out} is in use by pid {holder.pid} on {socket.gethostname()}"
        assert main(TINY + ["--out", str(out)]) == 2
        assert holding in one_line_error(capsys)
        assert main(TINY + ["--out", str(out), "--overwrite"]) == 2
        assert holding in one_line_error(capsys)
        assert main(["--resume", "--out", str(out), "--quiet"]) == 2
        assert holding in one_line_error(capsys)
    finally:
        kill_9(holder)
    # the lock died with its holder; the file it left names a dead process and counts as no run
    assert main(TINY + ["--out", str(out), "--overwrite"]) == 0
    assert steps_logged(out) == [0, 2, 4]
    assert not (out / ".lock").exists()  # a holder that ends removes it


def test_a_sweep_folder_is_locked_too(tmp_path, capsys):
    """About 5 s: a subprocess sweep of catapult-train (4-5 s here, most of it importing torch)."""
    out = tmp_path / "s"
    holder = start_holder(SWEEP, out)
    try:
        assert main(SWEEP + ["--out", str(out), "--resume"]) == 2
        assert f"{out} is in use by pid {holder.pid} on" in one_line_error(capsys)
    finally:
        kill_9(holder)
    assert main(SWEEP + ["--out", str(out), "--overwrite"]) == 0
    assert (out / "sweep.csv").exists() and not (out / ".lock").exists()


def test_the_lock_is_shared_within_a_process_and_its_file_is_no_run(tmp_path):
    out = tmp_path / "r"
    with FolderLock(out):
        assert (out / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        with RunFolder(out):  # this process holds it already (a trainer not yet collected, say)
            pass
        assert (out / ".lock").exists()  # still held: the outer user has not let go
    assert not (out / ".lock").exists()
    (out / ".lock").write_text("pid 4242 on a-machine-that-crashed\n")  # left by a killed holder
    with RunFolder(out):  # neither a run here nor a lock held
        assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} on")


def test_runs_started_at_once_get_their_own_default_folders(tmp_path, monkeypatch, capsys):
    cfg = TrainConfig(task="teacher-student", width=16)
    first, second = default_out(cfg, tmp_path), default_out(cfg, tmp_path)
    assert first != second and first.is_dir() and second.is_dir()  # each made by the call that picked it
    monkeypatch.chdir(tmp_path)
    assert main(TINY + ["--batch-size", "999"]) == 2  # bad input found inside run(): no folder left behind
    assert "exceeds the 32 training examples" in one_line_error(capsys)
    assert list((tmp_path / "runs").iterdir()) == []


# ---- checkpoints load without running code ----

class RunsCode:
    """Unpickling this calls open(marker, "w"): what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "r"
    assert main(TINY + ["--out", str(out)]) == 0
    return out


def test_a_crafted_checkpoint_runs_no_code_and_gets_one_line(finished_run, tmp_path, capsys):
    capsys.readouterr()
    marker = tmp_path / "code-ran"
    checkpoint = finished_run / "checkpoint.pt"
    real = torch.load(checkpoint, weights_only=True)
    torch.save({**real, "payload": RunsCode(marker)}, checkpoint)  # a checkpoint that would resume fine
    assert main(["--resume", "--out", str(finished_run), "--steps", "6", "--quiet"]) == 2
    err = one_line_error(capsys)
    assert f"{checkpoint} holds more than tensors and plain data" in err and "could run code" in err
    with pytest.raises(ValueError, match="so it is not loaded"):  # the trainer's own load, not only the CLI's
        RunFolder(finished_run, resume=True).load_checkpoint()
    assert not marker.exists()


def test_an_unreadable_checkpoint_gets_one_line(finished_run, capsys):
    capsys.readouterr()
    checkpoint = finished_run / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])  # cut short
    assert main(["--resume", "--out", str(finished_run), "--quiet"]) == 2
    assert f"{checkpoint} is not a readable checkpoint" in one_line_error(capsys)


# ---- a full disk ----

def full_disk_on(monkeypatch, is_victim) -> None:
    """os.write writes half of the data it is given and fails with ENOSPC, once is_victim(data)."""
    real_write = os.write

    def write(fd, data):
        if is_victim(bytes(data[:16])):
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_while_logging_stops_the_run_and_it_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    full_disk_on(monkeypatch, lambda head: head.startswith(b'{"step": 6,'))
    assert main(TINY + ["--steps", "8", "--checkpoint-every", "4", "--out", str(out)]) == 1
    monkeypatch.undo()
    err = one_line_error(capsys)
    assert f"could not write {out / 'metrics.jsonl'} (No space left on device)" in err
    assert f"{out / 'checkpoint.pt'} (step 4) is intact" in err
    assert steps_logged(out) == [0, 2, 4]  # the half-written record was taken back
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert main(["--resume", "--out", str(out), "--quiet"]) == 0
    assert steps_logged(out) == [0, 2, 4, 6, 8]


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    checkpoints = []

    def second_checkpoint(head: bytes) -> bool:
        if head.startswith(b"PK"):  # a zip: torch.save's format
            checkpoints.append(head)
        return len(checkpoints) == 2

    full_disk_on(monkeypatch, second_checkpoint)
    assert main(TINY + ["--steps", "8", "--checkpoint-every", "2", "--out", str(out)]) == 1
    monkeypatch.undo()
    err = one_line_error(capsys)
    assert f"could not write {out / 'checkpoint.pt'} (No space left on device)" in err
    assert "(step 2) is intact" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (out / "checkpoint.pt.tmp").exists()  # its space given back
    assert main(["--resume", "--out", str(out), "--quiet"]) == 0
    assert steps_logged(out) == [0, 2, 4, 6, 8]


def test_a_stop_during_a_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A second Ctrl-C or SIGTERM (KeyboardInterrupt) while a checkpoint or sweep.csv is written."""
    def interrupt(*args):
        raise KeyboardInterrupt
    with RunFolder(tmp_path / "r") as folder:
        monkeypatch.setattr(os, "fsync", interrupt)
        with pytest.raises(KeyboardInterrupt):
            folder.save_checkpoint({"step": 3})
        monkeypatch.undo()
    monkeypatch.setattr(csv.DictWriter, "writerows", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_csv([], tmp_path / "sweep.csv")
    assert [p.name for p in tmp_path.iterdir()] == ["r"] and list((tmp_path / "r").iterdir()) == []


def test_resume_drops_a_cut_last_line_and_saying_so(finished_run, capsys):
    capsys.readouterr()
    with open(finished_run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.4')  # the process died mid-record
    assert main(["--resume", "--out", str(finished_run), "--steps", "6"]) == 0
    err = capsys.readouterr().err
    assert f"{finished_run / 'metrics.jsonl'}: dropped its cut last line" in err
    assert steps_logged(finished_run) == [0, 2, 4, 6]


def test_resume_names_the_file_and_line_of_a_corrupt_record(finished_run, capsys):
    capsys.readouterr()
    metrics = finished_run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0] + "garbage\n" + "".join(lines[2:]))
    before = snapshot(finished_run)
    assert main(["--resume", "--out", str(finished_run), "--steps", "6", "--quiet"]) == 2
    assert f"{metrics} line 2 is not a metrics record: 'garbage'" in one_line_error(capsys)
    assert snapshot(finished_run) == before  # config.json too: nothing changed


# ---- what a resume may change ----

@pytest.mark.parametrize("option, value", [
    ("seed", 1), ("optimizer", "adam"), ("max_grad_norm", 1.0), ("weight_decay", 0.1), ("width", 32),
])
def test_an_edited_config_json_is_refused_by_name(finished_run, capsys, option, value):
    capsys.readouterr()
    config = json.loads((finished_run / "config.json").read_text())
    old = config[option]
    config[option] = value
    (finished_run / "config.json").write_text(json.dumps(config))
    before = snapshot(finished_run)
    assert main(["--resume", "--out", str(finished_run), "--steps", "6", "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "differ from the config it computed with (checkpoint.pt): " \
           f"--{option.replace('_', '-')} {old!r} -> {value!r}" in err
    assert snapshot(finished_run) == before


def test_options_compare_by_value(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(TINY + ["--lr", "1e-2", "--weight-decay", "0", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "lr": "0.01"}))  # the same lr, spelled otherwise
    assert main(["--resume", "--out", str(out), "--lr", "10e-3", "--weight-decay", "0.0", "--steps", "6",
                 "--quiet"]) == 0
    assert main(["--resume", "--out", str(out), "--lr", "2e-2", "--steps", "8"]) == 2
    assert "--lr '1e-2' -> '2e-2'" in one_line_error(capsys)


def test_resume_may_change_what_it_writes_and_for_how_long(finished_run, capsys):
    assert main(["--resume", "--out", str(finished_run), "--steps", "6", "--log-every", "1",
                 "--checkpoint-every", "5", "--plots", "--quiet"]) == 0
    config = json.loads((finished_run / "config.json").read_text())
    assert (config["steps"], config["log_every"], config["checkpoint_every"], config["plots"]) == (6, 1, 5, True)
    assert steps_logged(finished_run) == [0, 2, 4, 5, 6]
    assert (finished_run / "curves.png").exists()


def tree(out) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_sweep_resume_refuses_changed_options_for_every_cell_begun(tmp_path, capsys):
    """Finished cells (reused) and interrupted ones (continued) alike, before any cell runs."""
    out = tmp_path / "s"
    two_lrs = SWEEP[:SWEEP.index("1e-3") + 1] + ["2e-3"] + SWEEP[SWEEP.index("1e-3") + 1:]
    assert main(two_lrs + ["--out", str(out)]) == 0
    first, second = (out / cell_name(8, lr, 0) for lr in ("1e-3", "2e-3"))
    (second / "summary.json").write_text(json.dumps({"status": "interrupted"}))  # stopped after its checkpoint
    capsys.readouterr()
    before = tree(out)
    assert main(two_lrs + ["--weight-decay", "0.1", "--out", str(out), "--resume"]) == 2
    assert f"continues the run in {first} as it began; these options differ from the config it computed " \
           "with (config.json): --weight-decay 0.0 -> 0.1" in one_line_error(capsys)
    assert tree(out) == before
    for f in ("summary.json", "checkpoint.pt"):  # the first cell no longer begun: it would run afresh
        (first / f).unlink()
    before = tree(out)
    assert main(two_lrs + ["--weight-decay", "0.1", "--out", str(out), "--resume"]) == 2
    assert f"continues the run in {second} as it began" in one_line_error(capsys)
    assert tree(out) == before
    assert main(two_lrs + ["--out", str(out), "--resume"]) == 0


def test_a_run_stored_before_ntk_bias_scale_resumes_with_the_multiplier_it_computed_with(tmp_path):
    """Runs stored before --ntk-bias-scale existed computed with a bias multiplier of 1, not
    today's default 0.1: a config without the option means 1 when read back."""
    assert TrainConfig().ntk_bias_scale == 0.1 and TrainConfig.from_dict({}).ntk_bias_scale == 1.0
    ntk = TINY + ["--parametrization", "ntk", "--ntk-bias-scale", "1"]
    old, whole = tmp_path / "old", tmp_path / "whole"
    assert main(ntk + ["--out", str(old)]) == 0
    checkpoint = torch.load(old / "checkpoint.pt", weights_only=True)
    del checkpoint["config"]["ntk_bias_scale"]  # as written before the option existed
    torch.save(checkpoint, old / "checkpoint.pt")
    config = json.loads((old / "config.json").read_text())
    del config["ntk_bias_scale"]
    (old / "config.json").write_text(json.dumps(config))
    assert main(["--resume", "--out", str(old), "--steps", "6", "--quiet"]) == 0
    assert main(ntk + ["--steps", "6", "--out", str(whole)]) == 0
    assert (old / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    assert json.loads((old / "config.json").read_text())["ntk_bias_scale"] == 1.0


def test_resume_and_overwrite_together_are_refused(finished_run, capsys):
    capsys.readouterr()
    before = snapshot(finished_run)
    assert main(["--resume", "--overwrite", "--out", str(finished_run)]) == 2
    assert "pass one of them" in one_line_error(capsys)
    assert main(SWEEP + ["--resume", "--overwrite", "--out", str(finished_run)]) == 2
    assert "pass one of them" in one_line_error(capsys)
    assert snapshot(finished_run) == before



def test_fit_lets_go_of_its_folder_when_it_returns(tmp_path):
    """Another process may continue a fit() run as soon as fit() returns, even while the
    garbage collector has not yet collected the trainer."""
    import gc
    from catapult_kernels.train import fit
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    gc.disable()
    try:
        fit(model, torch.optim.SGD(model.parameters(), lr=0.01), (x, y), loss="mse", steps=2,
            out=tmp_path / "r", measure_lambda0=False, quiet=True)
        probe = subprocess.run([sys.executable, "-c", "import sys; from catapult_kernels.train.run_folder import "
                                "RunFolder; RunFolder(sys.argv[1], resume=True)", str(tmp_path / "r")],
                               capture_output=True, text=True)
    finally:
        gc.enable()
    assert probe.returncode == 0, probe.stderr


def tiny_fit(out, model=None, lr=0.01, **options) -> dict:
    from catapult_kernels.train import fit
    torch.manual_seed(0)
    model = model or torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return fit(model, torch.optim.SGD(model.parameters(), lr=lr), (x, y), loss="mse", out=out,
               measure_lambda0=False, quiet=True, plots=False, **options)


@pytest.mark.parametrize("case, message", [
    ("shorter", "would shorten the run"), ("diverged", "there is nothing to resume"),
    ("another model", "size mismatch"),
])
def test_a_resume_that_fails_to_load_lets_go_of_the_folder(tmp_path, case, message):
    out = tmp_path / "r"
    first = tiny_fit(out, lr=1e3 if case == "diverged" else 0.01, steps=40)
    assert first["status"] == ("divergent" if case == "diverged" else "finished")
    resumed = {"shorter": dict(steps=2), "diverged": dict(steps=50),
               "another model": dict(steps=50, model=torch.nn.Linear(3, 2))}[case]
    with pytest.raises((ValueError, RuntimeError), match=message) as failure:
        tiny_fit(out, resume=True, **resumed)
    assert not (out / ".lock").exists()  # let go, though the failure's traceback still holds the trainer
    del failure
