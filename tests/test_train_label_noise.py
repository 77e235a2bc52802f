"""--label-noise F: round(F n) training labels replaced by another class, fixed by the seed;
validation untouched; noisy_train_acc / clean_train_acc in every record, the steps they reach
0.99 in the summary, new sweep.csv columns after today's; the same under --parallel ddp."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from catapult_kernels.train import TrainConfig, fit, run
from catapult_kernels.train.cli import main
from catapult_kernels.train.label_noise import corrupt_labels
from catapult_kernels.train.models import make_model
from catapult_kernels.train.tasks import clean_task, make_task

ROOT = Path(__file__).parent.parent
# a 2-layer MLP on 160 digits that fits its 30% noise within 60 full-batch Adam steps
DIGITS = dict(task="digits", n_train=160, width=64, lr="1e-2", steps=60, log_every=10, label_noise=0.3,
              plots=False)


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_the_corrupted_set_is_fixed_by_the_seed():
    labels = torch.arange(500) % 10
    a, mask_a = corrupt_labels(labels, 10, 0.2, seed=3)
    b, mask_b = corrupt_labels(labels, 10, 0.2, seed=3)
    c, mask_c = corrupt_labels(labels, 10, 0.2, seed=4)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a, mask_c)
    assert torch.equal(labels, torch.arange(500) % 10)  # the labels given are left as they were


@pytest.mark.parametrize("n, fraction", [(500, 0.2), (97, 0.5), (10, 0.05), (7, 0.0), (1000, 0.999)])
def test_exactly_round_f_n_labels_each_replaced_by_another_class(n, fraction):
    labels = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(n))
    noisy, mask = corrupt_labels(labels, 7, fraction, seed=0)
    assert mask.dtype == torch.bool and int(mask.sum()) == round(fraction * n)
    assert (noisy[mask] != labels[mask]).all() and torch.equal(noisy[~mask], labels[~mask])
    assert noisy.dtype == labels.dtype and 0 <= int(noisy.min()) and int(noisy.max()) < 7


def test_the_new_class_is_uniform_over_the_others():
    labels = torch.zeros(18_000, dtype=torch.int64)
    noisy, mask = corrupt_labels(labels, 10, 0.5, seed=1)
    counts = torch.bincount(noisy[mask], minlength=10)
    assert counts[0] == 0 and ((counts[1:] - 1000).abs() < 120).all(), counts  # 9000 draws: 1000 +- 32 each


@pytest.mark.parametrize("task", [dict(task="digits", n_train=300), dict(task="modular", p=23),
                                  dict(task="modular", p=23, model="transformer"),
                                  dict(task="mnist1d", n_train=500)])
def test_only_the_training_labels_change(task):
    cfg = TrainConfig(**task, label_noise=0.25, seed=0).validate()
    noisy, clean = make_task(cfg), clean_task(cfg)
    for name in ("x_train", "x_val", "y_val"):  # the split is the clean task's: the noise draws from its own generator
        assert torch.equal(getattr(noisy, name), getattr(clean, name)), name
    assert int(noisy.noisy_mask.sum()) == round(0.25 * len(clean.y_train))
    assert torch.equal(noisy.y_train != clean.y_train, noisy.noisy_mask)
    assert make_task(TrainConfig(**task).validate()).noisy_mask is None


def _accuracies_by_hand(cfg: TrainConfig, folder: Path) -> tuple[float, float]:
    """The final params (the checkpoint at the end), evaluated on the task rebuilt here."""
    data = make_task(cfg)
    model = make_model(cfg, data.in_dim, data.out_dim)
    model.load_state_dict(torch.load(folder / "checkpoint.pt", weights_only=False)["model"])
    with torch.no_grad():
        hits = model(data.x_train).argmax(-1) == data.y_train
    return hits[data.noisy_mask].float().mean().item(), hits[~data.noisy_mask].float().mean().item()


@pytest.mark.parametrize("batch_size", [None, 40], ids=["full-batch", "minibatch"])
def test_records_and_summary_measure_the_noise_memorized(tmp_path, batch_size):
    cfg = TrainConfig(**DIGITS, batch_size=batch_size)
    summary = run(cfg, tmp_path / "r", quiet=True)
    records = _records(tmp_path / "r")
    n_noisy = round(0.3 * 160)
    for r in records:
        assert r["train_acc"] == pytest.approx((r["noisy_train_acc"] * n_noisy + r["clean_train_acc"] * (160 - n_noisy))
                                               / 160)
    noisy_acc, clean_acc = _accuracies_by_hand(cfg, tmp_path / "r")
    assert (records[-1]["noisy_train_acc"], records[-1]["clean_train_acc"]) == pytest.approx((noisy_acc, clean_acc))
    assert (summary["final_noisy_train_acc"], summary["final_clean_train_acc"]) == pytest.approx((noisy_acc, clean_acc))
    for key, step in (("noisy_train_acc", "noisy_memorize_step"), ("clean_train_acc", "clean_memorize_step")):
        reached = [r["step"] for r in records if r[key] >= 0.99]
        assert summary[step] == (reached[0] if reached else None)
    if batch_size is None:  # full batch Adam fits the noise here; the first records have not yet
        assert records[0]["noisy_train_acc"] < 0.5 and summary["noisy_memorize_step"] is not None


@pytest.mark.slow
def test_a_resumed_run_continues_with_the_same_noise_and_steps(tmp_path):
    cfg = TrainConfig(**{**DIGITS, "batch_size": 40})
    straight = run(cfg, tmp_path / "straight", quiet=True)
    run(TrainConfig(**{**DIGITS, "batch_size": 40, "steps": 40}), tmp_path / "resumed", quiet=True)
    resumed = run(cfg, tmp_path / "resumed", resume=True, quiet=True)
    assert _records(tmp_path / "resumed") == _records(tmp_path / "straight")
    for key in ("clean_memorize_step", "noisy_memorize_step", "final_noisy_train_acc", "final_clean_train_acc"):
        assert resumed[key] == straight[key], key
    assert straight["clean_memorize_step"] < 40  # reached before the checkpoint: the trackers carried it over


def test_without_label_noise_the_summary_keys_are_null(tmp_path):
    summary = run(TrainConfig(**{**DIGITS, "label_noise": 0.0, "steps": 4}), tmp_path / "r", quiet=True)
    assert not any("noisy" in k or "clean" in k for r in _records(tmp_path / "r") for k in r)
    assert all(summary[k] is None for k in ("noisy_memorize_step", "clean_memorize_step", "final_noisy_train_acc",
                                            "final_clean_train_acc"))


def test_fit_takes_the_mask_and_refuses_a_wrong_one(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    y_noisy, mask = corrupt_labels(y, 3, 0.4, seed=0)
    model = torch.nn.Linear(5, 3)
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    summary = fit(model, opt, (x, y_noisy), steps=2, log_every=1, measure_lambda0=False, quiet=True,
                  noisy_mask=mask)
    assert summary["final_noisy_train_acc"] is not None and summary["final_clean_train_acc"] is not None
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y_noisy), batch_size=10)
    for train, bad, message in [
        ((x, y_noisy), mask[:-1], r"noisy_mask must be a bool tensor of shape \(30,\)"),
        ((x, y_noisy), mask.float(), r"noisy_mask must be a bool tensor"),
        ((x, torch.randn(30, 3)), mask, "these training targets are floats"),
        (loader, mask, "pass train as \\(inputs, targets\\), not a DataLoader"),
    ]:
        with pytest.raises(ValueError, match=message):
            fit(model, opt, train, steps=1, out=tmp_path / "r", noisy_mask=bad)
        assert not (tmp_path / "r").exists()


# what sweep.csv had before label noise, in order: scripts index these
COLUMNS_BEFORE = ["width", "lr_spec", "seed", "lambda0", "lr", "lr_times_lambda0", "lr_over_2_over_lambda0",
                  "phase", "loss0", "peak_loss", "final_step", "final_loss", "sharpness_final",
                  "sharpness_final_step", "two_over_lr", "final_train_acc", "final_val_acc", "final_val_loss",
                  "memorize_step", "grok_step", "steps_per_s", "wall_s"]
NEW_COLUMNS = ["final_noisy_train_acc", "final_clean_train_acc", "noisy_memorize_step", "clean_memorize_step"]


def test_sweep_csv_keeps_its_columns_and_adds_the_new_ones_after(tmp_path):
    out = tmp_path / "s"
    assert main(["sweep", "--task", "modular", "--modulus", "11", "--widths", "16", "--lrs", "1e-2",
                 "--steps", "3", "--label-noise", "0.2", "--quiet", "--no-plots", "--out", str(out)]) == 0
    with open(out / "sweep.csv") as f:
        header = next(csv.reader(f))
        f.seek(0)
        [row] = list(csv.DictReader(f))
    assert header[:len(COLUMNS_BEFORE)] == COLUMNS_BEFORE
    assert NEW_COLUMNS == [c for c in header[len(COLUMNS_BEFORE):] if c in NEW_COLUMNS]
    assert 0.0 <= float(row["final_noisy_train_acc"]) <= 1.0 and 0.0 <= float(row["final_clean_train_acc"]) <= 1.0


@pytest.mark.parametrize("args, message", [
    (["--label-noise", "1"], "--label-noise must be a fraction in [0, 1), got 1.0"),
    (["--label-noise", "-0.1"], "--label-noise must be a fraction in [0, 1), got -0.1"),
    (["--label-noise", "nan"], "--label-noise must be a fraction in [0, 1), got nan"),
    (["--label-noise", "0.1", "--task", "teacher-student", "--loss", "mse"],
     "--label-noise replaces class labels; task 'teacher-student' is a regression"),
])
def test_bad_label_noise_is_one_clear_error(tmp_path, capsys, args, message):
    assert main(args + ["--quiet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


# --- under torchrun: what one process logs (tests/test_train_distributed.py's comparison, in brief)

PARALLEL_TASK = ["--task", "modular", "--modulus", "11", "--train-frac", "0.4", "--width", "32", "--lr", "3e-2",
                 "--label-noise", "0.3", "--log-every", "1", "--steps", "4", "--quiet", "--no-plots"]
PARALLEL_RUNS = {"full": PARALLEL_TASK, "minibatch": PARALLEL_TASK + ["--batch-size", "33"]}


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_parallel_ddp_logs_the_noisy_and_clean_accuracies_of_one_process(tmp_path):
    """One torchrun launch of this file (2 gloo ranks, both runs in it): 8-20 s, nearly all of
    it torchrun's start and the imports on two ranks; the one check that the mask is sliced as
    the batch is (full batch) and the passes over its two parts add up (minibatch) on ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           __file__, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    for name, argv in PARALLEL_RUNS.items():
        assert main(argv + ["--out", str(tmp_path / f"single-{name}")]) == 0
        got, want = _records(tmp_path / f"ddp-{name}"), _records(tmp_path / f"single-{name}")
        assert [r["step"] for r in got] == [r["step"] for r in want] and "noisy_train_acc" in want[-1]
        for g, w in zip(got, want):  # counts over the same examples: equal, not close
            assert (g["noisy_train_acc"], g["clean_train_acc"], g["train_acc"]) == \
                (w["noisy_train_acc"], w["clean_train_acc"], w["train_acc"]), name


def _run_parallel(root: str) -> None:
    dist.init_process_group("gloo")
    try:
        for name, argv in PARALLEL_RUNS.items():
            if main(argv + ["--parallel", "ddp", "--out", str(Path(root) / f"ddp-{name}")]) != 0:
                raise SystemExit(f"ddp-{name} failed")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _run_parallel(sys.argv[1])
    sys.stdout.flush()  # leave without the interpreter's teardown, where gloo's threads can abort
    sys.stderr.flush()
    os._exit(0)
