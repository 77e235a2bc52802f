"""catapult-train --parallel ddp|fsdp under torchrun (2 gloo ranks): the metrics equal a
single-process run of the same options, rank 0 alone writes and prints, and --resume
continues bit for bit. Three torchrun launches (about 8 s each here, nearly all of it
torchrun's start and the imports on two ranks), shared by every test through one fixture:
two of `-m catapult_kernels.train` (the trainer makes the process group and ends it), and
one of this file as a script, which runs several trainings in one group it made itself.

The tolerance: a parallel run computes each rank's slice's mean loss and sums the ranks'
shares (DDP averages the grads, FSDP2 reduce-scatters them), where one process takes one
mean; float32 rounds the two orders differently, by ~6e-8 relative per operation. Measured
over these 6 steps: at most 1.1e-7 relative (loss, val_loss, grad_norm, sharpness, DDP
and FSDP alike). rel=1e-5 leaves room for other BLAS thread counts without hiding a wrong
weighting (a rank's slice weighted 1/2 instead of 17/33 moves the loss by ~1e-3)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).parent.parent
RUN_FILES = {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# 231 training pairs: batch 33 splits 17 + 16 over 2 ranks, the evaluation passes 116 + 115
TASK = ["--task", "modular", "--modulus", "11", "--train-frac", "0.4", "--width", "32", "--lr", "1e-2",
        "--optimizer", "adamw", "--max-grad-norm", "0.5", "--log-every", "1", "--sharpness-iters", "5", "--quiet"]
MINIBATCH = TASK + ["--batch-size", "33", "--steps", "6", "--sharpness-every", "3", "--no-plots"]
FULL_BATCH = TASK + ["--steps", "4", "--sharpness-every", "2", "--no-plots"]
TOLERANCE = dict(rel=1e-5, abs=1e-7)
UNTIMED = ("wall_s", "steps_per_s")


def _torchrun(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _single(tmp_path: Path, name: str, argv: list) -> Path:
    from catapult_kernels.train.cli import main
    out = tmp_path / name
    assert main(argv + ["--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every parallel run, and the single-process runs they are compared with."""
    tmp = tmp_path_factory.mktemp("parallel")
    runs = {}
    for mode in ("ddp", "fsdp"):  # no --out: rank 0 alone picks and makes runs/<name>-0, and writes the plots
        cwd = tmp / f"cli-{mode}"
        cwd.mkdir()
        argv = [a for a in MINIBATCH if a != "--no-plots"] + ["--parallel", mode]
        runs[f"cli-{mode}"] = (_torchrun(["-m", "catapult_kernels.train", *argv], cwd), cwd)
    plan = {  # this file under torchrun: each argv a training in turn, in the group the script made
        "full-ddp": [FULL_BATCH + ["--parallel", "ddp"]],
        "full-fsdp": [FULL_BATCH + ["--parallel", "fsdp"]],
        "resumed-ddp": [MINIBATCH + ["--parallel", "ddp", "--steps", "3"],
                        ["--resume", "--steps", "6", "--quiet"]],
        "resumed-fsdp": [MINIBATCH + ["--parallel", "fsdp", "--steps", "3"],
                         ["--resume", "--steps", "6", "--quiet"]],
        "fit-ddp": [], "fit-fsdp": [],
    }
    (tmp / "plan.json").write_text(json.dumps(plan))
    runs["script"] = (_torchrun([__file__, str(tmp / "plan.json"), str(tmp)], tmp), tmp)
    single = {"minibatch": _single(tmp, "single-minibatch", MINIBATCH),
              "full": _single(tmp, "single-full", FULL_BATCH)}
    return tmp, runs, single


def _cli_folder(cwd: Path) -> Path:
    [folder] = (cwd / "runs").iterdir()  # one folder: no other rank made one
    return folder


def _assert_same_metrics(parallel: Path, single: Path) -> None:
    got, want = _records(parallel), _records(single)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        _assert_close(g, w, f"step {w['step']}")
    _assert_close(_summary(parallel), _summary(single), "summary")


def _assert_close(got: dict, want: dict, where: str) -> None:
    """Numbers within TOLERANCE, anything else (steps, counts, the phase, nulls) equal."""
    assert got.keys() == want.keys(), where
    for k, w in want.items():
        assert got[k] == (pytest.approx(w, **TOLERANCE) if isinstance(w, float) else w), f"{where}: {k}"


def _summary(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / "summary.json").read_text()).items() if k not in UNTIMED}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_minibatches_split_unevenly_log_what_one_process_logs(launched, mode):
    tmp, runs, single = launched
    folder = _cli_folder(tmp / f"cli-{mode}")
    _assert_same_metrics(folder, single["minibatch"])
    config = json.loads((folder / "config.json").read_text())
    assert (config["parallel"], config["world_size"], config["p"], config["impl"]) == (mode, 2, 11, "catapult")
    assert any("sharpness" in r for r in _records(folder))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_full_batch_logs_what_one_process_logs(launched, mode):
    tmp, runs, single = launched
    _assert_same_metrics(tmp / f"full-{mode}", single["full"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_rank_0_alone_writes_and_prints(launched, mode):
    tmp, runs, single = launched
    result, cwd = runs[f"cli-{mode}"]
    folder = _cli_folder(cwd)
    assert {p.name for p in folder.iterdir()} == RUN_FILES | {"curves.png"}  # no lock or temporary file left
    assert {p.name for p in cwd.iterdir()} == {"runs"}
    assert result.stdout.count(": finished") == 1  # one summary: rank 0's
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_continues_bit_for_bit(launched, mode):
    tmp, runs, single = launched
    resumed, whole = tmp / f"resumed-{mode}", _cli_folder(tmp / f"cli-{mode}")
    assert _records(resumed) == _records(whole)  # exact: the same ranks, slices and checkpointed state
    assert _summary(resumed) == _summary(whole)
    assert json.loads((resumed / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_resume_needs_as_many_processes(launched, capsys):
    from catapult_kernels.train.cli import main
    tmp, runs, single = launched
    folder = tmp / "resumed-ddp"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert main(["--resume", "--out", str(folder), "--steps", "8"]) == 2
    assert "--parallel needs a process group: launch with torchrun --nproc-per-node N" in capsys.readouterr().err
    assert main(["--resume", "--out", str(folder), "--steps", "8", "--parallel", "none"]) == 2
    assert "trained on 2 process(es), this one has 1: resume it with torchrun --nproc-per-node 2" in \
        capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_fit_takes_parallel(launched, tmp_path, mode):
    tmp, runs, single = launched
    _fit(None, tmp_path / "single")
    _assert_same_metrics(tmp / f"fit-{mode}", tmp_path / "single")


@pytest.mark.parametrize("parallel, message", [
    ("ddp", "parallel='ddp' needs a process group: launch with torchrun --nproc-per-node N"),
    ("fsdp", "parallel='fsdp' needs a process group: launch with torchrun --nproc-per-node N"),
    ("zero", "unknown parallel 'zero'; choose one of: none, ddp, fsdp"),
])
def test_fit_without_a_process_group_is_one_clear_error(parallel, message, tmp_path, monkeypatch):
    from catapult_kernels.train import fit
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=f"^{message}"):
        fit(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            (torch.randn(8, 3), torch.randint(0, 2, (8,))), steps=1, out=tmp_path / "r", parallel=parallel)
    assert not (tmp_path / "r").exists()


def _fit(parallel, out: Path) -> None:
    """fit() from Python: a model and data of its own, 45 examples in batches of 7 (4 + 3 on
    2 ranks), the optimizer given as a function of the model (FSDP replaces its params)."""
    from catapult_kernels.optim import AdamW
    from catapult_kernels.train import fit
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(65, 6, generator=gen), torch.randint(0, 3, (65,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    make_optimizer = lambda m: AdamW(m.parameters(), lr=3e-2, max_grad_norm=1.0)  # noqa: E731
    if parallel == "fsdp":  # an optimizer made before the sharding holds the replaced params: refused
        with pytest.raises(ValueError, match="pass optimizer as a function of the sharded model"):
            fit(model, make_optimizer(model), (x[:45], y[:45]), parallel="fsdp", steps=1)
    fit(model, make_optimizer, (x[:45], y[:45]), (x[45:], y[45:]), steps=4, batch_size=7, log_every=1,
        sharpness_every=2, sharpness_iters=5, out=out, quiet=True, plots=False, parallel=parallel)


def _run_plan(plan_file: str, root: str) -> None:
    """Under torchrun: the trainings of the plan, each folder's argvs in turn (fit-<mode>: _fit)."""
    from catapult_kernels.train.cli import main
    dist.init_process_group("gloo")
    try:
        for name, argvs in json.loads(Path(plan_file).read_text()).items():
            if name.startswith("fit-"):
                _fit(name.removeprefix("fit-"), Path(root) / name)
            for argv in argvs:
                code = main(argv + ["--out", str(Path(root) / name)])
                if code != 0:
                    raise SystemExit(f"{name}: {argv} exited with {code}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _run_plan(*sys.argv[1:3])
    sys.stdout.flush()  # leave without the interpreter's teardown, where gloo's threads can abort
    sys.stderr.flush()
    os._exit(0)
