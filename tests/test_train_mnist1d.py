"""--task mnist1d: MNIST-1D built locally from its templates (never downloaded), seeded by
--seed, the first --n-train of its 4000 training signals, its 1000 test signals for
validation, standardized with the training statistics; a clear message without the package."""
from __future__ import annotations

import builtins
import json
import random

import numpy as np
import pytest
import torch

from catapult_kernels.train import TrainConfig
from catapult_kernels.train.cli import main
from catapult_kernels.train.tasks import _mnist1d_arrays, make_task

pytest.importorskip("mnist1d")  # a dev requirement: present in CI


def test_shapes_and_the_split():
    data = make_task(TrainConfig(task="mnist1d", n_train=4000).validate())
    assert data.x_train.shape == (4000, 40) and data.x_val.shape == (1000, 40)
    assert (data.in_dim, data.out_dim, data.n_classes) == (40, 10, 10)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert set(data.y_train.tolist()) == set(range(10)) and set(data.y_val.tolist()) == set(range(10))
    smaller = make_task(TrainConfig(task="mnist1d", n_train=300).validate())
    assert torch.equal(smaller.y_train, data.y_train[:300]) and torch.equal(smaller.y_val, data.y_val)


def test_standardized_with_the_training_statistics():
    data = make_task(TrainConfig(task="mnist1d", n_train=500).validate())
    assert data.x_train.mean(0).abs().max() < 1e-5
    assert (data.x_train.std(0) - 1).abs().max() < 1e-5
    x_all, _, x_val, _ = _mnist1d_arrays(0)
    mean, std = x_all[:500].mean(0), x_all[:500].std(0)  # the 500 trained on, not the validation set's
    assert torch.allclose(data.x_val, (x_val - mean) / std, atol=1e-5)


def test_the_signals_come_from_the_seed_and_leave_the_global_rngs_alone():
    random.seed(7)
    np.random.seed(7)
    before = random.random(), np.random.rand()
    random.seed(7)
    np.random.seed(7)
    a = make_task(TrainConfig(task="mnist1d", seed=1).validate())
    assert (random.random(), np.random.rand()) == before
    b = make_task(TrainConfig(task="mnist1d", seed=1).validate())
    c = make_task(TrainConfig(task="mnist1d", seed=0).validate())
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, c.x_train)


def test_a_short_run(tmp_path):
    out = tmp_path / "r"
    assert main(["--task", "mnist1d", "--n-train", "200", "--width", "32", "--lr", "1e-2", "--steps", "3",
                 "--label-noise", "0.1", "--quiet", "--no-plots", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["final_val_acc"] <= 1.0 and summary["final_noisy_train_acc"] is not None


def test_more_training_signals_than_it_has_is_one_clear_error(tmp_path, capsys):
    assert main(["--task", "mnist1d", "--n-train", "4001", "--quiet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--n-train 4001: mnist1d has 4000 training signals" in err and len(err.splitlines()) == 1


def test_without_the_package_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_mnist1d(name, *a, **kw):
        if name.startswith("mnist1d"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mnist1d)
    # a seed no other test builds: a cached build would not import the package
    assert main(["--task", "mnist1d", "--seed", "987", "--quiet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "task 'mnist1d' needs the mnist1d package" in err and "pip install mnist1d" in err
    assert len(err.splitlines()) == 1


def test_a_seed_numpy_cannot_take_is_one_clear_error(tmp_path, capsys):
    assert main(["--task", "mnist1d", "--seed", str(2 ** 32), "--quiet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--seed {2 ** 32}: mnist1d builds its signals with numpy's global RNG" in err
    assert len(err.splitlines()) == 1
