"""--amp bf16|fp16 and --grad-accum K: the forward pass under autocast with the loss in float32
and the sharpness in float32; fp16 through the fused optimizers' GradScaler path, its state
checkpointed so that a resume is exact; K micro-batches equal the unaccumulated step up to
float rounding, in one process and under DDP/FSDP (no_sync until the last micro-batch).

The tolerance of the K-against-1 comparisons: the grads of K weighted micro-batch means are
summed where one mean is taken; float32 rounds the two orders differently, ~6e-8 relative per
operation (measured over these 6 steps: at most 2e-7 relative). rel=1e-5 leaves room for
other BLAS thread counts, and a wrong weighting (3 + 3 + 2 examples weighted 1/3 each)
moves the loss by ~1e-3."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from catapult_kernels.optim import AdamW
from catapult_kernels.train import fit
from catapult_kernels.train import loop
from catapult_kernels.train.cli import main
from catapult_kernels.train.grad_accum import gradient_sync, micro_batches
from catapult_kernels.train.models import MLP

TINY = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim", "4",
        "--width", "16", "--optimizer", "adamw", "--lr", "1e-2", "--steps", "6", "--log-every", "1",
        "--sharpness-every", "3", "--sharpness-iters", "5", "--quiet", "--no-plots"]
DIGITS = ["--task", "digits", "--n-train", "64", "--width", "32", "--lr", "1e-2", "--steps", "6", "--log-every", "2",
          "--quiet", "--no-plots"]
TOLERANCE = dict(rel=1e-5, abs=1e-7)
UNTIMED = ("wall_s", "steps_per_s")


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _summary(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / "summary.json").read_text()).items() if k not in UNTIMED}


def _assert_close(got: dict, want: dict, where: str) -> None:
    """Numbers within TOLERANCE, anything else (steps, counts, the phase, nulls) equal."""
    assert got.keys() == want.keys(), where
    for k, w in want.items():
        assert got[k] == (pytest.approx(w, **TOLERANCE) if isinstance(w, float) else w), f"{where}: {k}"


def _assert_same_metrics(got: Path, want: Path) -> None:
    for g, w in zip(_records(got), _records(want), strict=True):
        _assert_close(g, w, f"step {w['step']}")
    _assert_close(_summary(got), _summary(want), "summary")


def _run(tmp_path: Path, name: str, argv: list) -> Path:
    out = tmp_path / name
    assert main(argv + ["--out", str(out)]) == 0
    return out


# ---- --grad-accum ----

@pytest.mark.parametrize("batch, k", [([], 2), (["--batch-size", "8"], 3)], ids=["full-batch", "minibatch-3+3+2"])
def test_accumulated_steps_equal_the_unaccumulated_ones(tmp_path, batch, k):
    one = _run(tmp_path, "k1", TINY + batch)
    many = _run(tmp_path, f"k{k}", TINY + batch + ["--grad-accum", str(k)])
    _assert_same_metrics(many, one)
    assert json.loads((many / "config.json").read_text())["grad_accum"] == k


def test_micro_batches_split_the_batch_and_weigh_each_by_its_share():
    x, y = torch.arange(16.0).view(8, 2), torch.arange(8)
    parts = micro_batches(x, y, 3)
    assert [yi.tolist() for _, yi, _ in parts] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [share for *_, share in parts] == [3 / 8, 3 / 8, 2 / 8]
    with pytest.raises(ValueError, match="a batch of 2 examples cannot be split into --grad-accum 3 micro-batches"):
        micro_batches(x[:2], y[:2], 3)


def test_a_batch_smaller_than_k_is_one_clear_line(tmp_path, capsys):
    assert main(TINY + ["--batch-size", "2", "--grad-accum", "3", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "grad_accum 3: a batch of 2 leaves a micro-batch without examples" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
    assert main(TINY + ["--grad-accum", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--grad-accum must be an integer >= 1, got 0" in capsys.readouterr().err


class _Wrapped(torch.nn.Module):
    """What gradient_sync calls on DDP (no_sync) and on an FSDP2 module (set_requires_gradient_sync)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @contextlib.contextmanager
    def no_sync(self):
        self.calls.append("no_sync")
        yield

    def set_requires_gradient_sync(self, sync: bool) -> None:
        self.calls.append(sync)


@pytest.mark.parametrize("parallel, k, calls", [("ddp", 3, ["no_sync", "no_sync"]), ("fsdp", 3, [False, False, True]),
                                                ("ddp", 1, []), ("fsdp", 1, []), ("none", 3, [])])
def test_the_grads_are_reduced_with_the_last_micro_batch_only(parallel, k, calls):
    model = _Wrapped()
    for i in range(k):
        with gradient_sync(model, parallel, i, k):
            pass
    assert model.calls == calls


# ---- --amp ----

def test_bf16_autocasts_the_forward_pass_not_the_loss_nor_the_sharpness(tmp_path, monkeypatch):
    """The training's and evaluation's forwards run in bfloat16, the loss takes float32
    outputs, the sharpness (lambda0 and sharpness_every) sees float32 throughout. (No biases:
    a float32 bias added to a bfloat16 matmul promotes the sum to float32.)"""
    torch.manual_seed(0)
    model = MLP(8, 3, depth=2, width=16, bias=False)
    measuring, forwards, losses = [False], [], []
    model.register_forward_hook(lambda m, i, out: forwards.append((measuring[0], out.dtype)))
    real = loop.top_hessian_eigenvalue

    def measured(*a, **kw):
        measuring[0] = True
        try:
            return real(*a, **kw)
        finally:
            measuring[0] = False

    monkeypatch.setattr(loop, "top_hessian_eigenvalue", measured)

    def loss(out, y):
        losses.append(out.dtype)
        return F.cross_entropy(out, y)

    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    summary = fit(model, AdamW(model.parameters(), lr=1e-2), (x[:48], y[:48]), (x[48:], y[48:]), loss=loss, steps=20,
                  batch_size=16, log_every=5, sharpness_every=10, sharpness_iters=5, amp="bf16", quiet=True)
    assert {dtype for m, dtype in forwards if not m} == {torch.bfloat16}
    assert {dtype for m, dtype in forwards if m} == {torch.float32}
    assert set(losses) == {torch.float32}
    assert summary["final_loss"] < summary["loss0"] and summary["sharpness_final"] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_run_trains_and_records(tmp_path):
    pytest.importorskip("sklearn")  # a dev requirement: present in CI
    out = _run(tmp_path, "bf16", DIGITS + ["--amp", "bf16"])
    records, summary = _records(out), _summary(out)
    assert json.loads((out / "config.json").read_text())["amp"] == "bf16"
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert summary["final_loss"] < summary["loss0"] and summary["final_val_acc"] > 0.3
    assert "grad_scaler" in torch.load(out / "checkpoint.pt", weights_only=True)  # None: no scaler under bf16


@pytest.mark.parametrize("clip", [[], ["--max-grad-norm", "0.05"]], ids=["unclipped", "clipped"])
def test_fp16_takes_the_fused_grad_scaler_path_and_logs_unscaled_grad_norms(tmp_path, clip):
    """catapult's AdamW reads the scale in its kernel (and clips the unscaled grads there) and
    leaves .grad scaled; torch's AdamW gets .grad unscaled by GradScaler (before
    clip_grad_norm_): the same steps, the same logged grad norms."""
    fused = _run(tmp_path, "catapult", TINY + clip + ["--amp", "fp16"])
    unfused = _run(tmp_path, "torch", TINY + clip + ["--amp", "fp16", "--impl", "torch"])
    _assert_same_metrics(fused, unfused)
    state = torch.load(fused / "checkpoint.pt", weights_only=True)["grad_scaler"]
    assert state["scale"] == 65536.0 and state["_growth_tracker"] == 6  # six steps, none overflowed
    plain = _run(tmp_path, "fp32", TINY + clip)
    assert _records(fused)[0]["grad_norm"] == pytest.approx(_records(plain)[0]["grad_norm"], rel=1e-2)


def _fit_overflowing(out: Path, steps: int, resume: bool = False) -> dict:
    """fp16 with targets of 30: the loss scale 65536 overflows the fp16 grads of the outputs,
    so GradScaler skips steps and backs off (the scale then differs from its initial value)."""
    torch.manual_seed(0)
    model = MLP(4, 2, depth=2, width=16)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=gen), 30 + torch.randn(32, 2, generator=gen)
    return fit(model, AdamW(model.parameters(), lr=1e-2), (x, y), loss="mse", steps=steps, batch_size=8,
               log_every=1, amp="fp16", grad_accum=2, out=out, resume=resume, quiet=True, plots=False,
               measure_lambda0=False, checkpoint_every=3)


def test_an_accumulated_fp16_run_resumes_bit_for_bit(tmp_path):
    whole = _fit_overflowing(tmp_path / "whole", 8)
    _fit_overflowing(tmp_path / "split", 4)
    scaler = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["grad_scaler"]
    assert scaler["scale"] < 65536.0  # the state a resume must restore: steps were skipped and the scale fell
    resumed = _fit_overflowing(tmp_path / "split", 8, resume=True)
    assert _records(tmp_path / "split") == _records(tmp_path / "whole")
    assert {k: v for k, v in resumed.items() if k not in UNTIMED} == {k: v for k, v in whole.items() if k not in UNTIMED}
    ours = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    theirs = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert ours["grad_scaler"] == theirs["grad_scaler"]
    for k, v in theirs["model"].items():
        assert torch.equal(ours["model"][k], v), k


def test_a_resume_keeps_the_precision_the_run_began_with(tmp_path, capsys):
    out = _run(tmp_path, "r", TINY + ["--amp", "bf16", "--grad-accum", "2"])
    assert main(["--resume", "--out", str(out), "--steps", "8", "--amp", "fp16"]) == 2
    assert "--amp 'bf16' -> 'fp16'" in capsys.readouterr().err
    assert main(["--resume", "--out", str(out), "--steps", "8", "--grad-accum", "1"]) == 2
    assert "--grad_accum 2 -> 1" in capsys.readouterr().err.replace("grad-accum", "grad_accum")
    assert main(["--resume", "--out", str(out), "--steps", "8", "--quiet"]) == 0


# ---- under torchrun ----

PLAN = {"ddp-k2": TINY + ["--batch-size", "9", "--grad-accum", "2", "--parallel", "ddp"],
        "fsdp-k2": TINY + ["--batch-size", "9", "--grad-accum", "2", "--parallel", "fsdp"]}


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.slow
def test_accumulation_under_ddp_and_fsdp_equals_one_process_without_it(tmp_path):
    """One torchrun launch of this file (2 gloo ranks, ~8 s: torchrun's start and the imports),
    which trains PLAN's runs in turn: batch 9 is 5 + 4 on the ranks, each split 3 + 2 and 2 + 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           __file__, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    single = _run(tmp_path, "single", TINY + ["--batch-size", "9"])
    for name in PLAN:
        _assert_same_metrics(tmp_path / name, single)


def _run_plan(root: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    try:
        for name, argv in PLAN.items():
            if main(argv + ["--out", str(Path(root) / name)]) != 0:
                raise SystemExit(f"{name} failed")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _run_plan(sys.argv[1])
    sys.stdout.flush()  # leave without the interpreter's teardown, where gloo's threads can abort
    sys.stderr.flush()
    os._exit(0)
