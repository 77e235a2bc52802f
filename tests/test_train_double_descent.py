"""catapult-train double-descent: the min-norm solver, interpolation from N = n random
features, and the command's CSV and figure on a tiny grid."""
import csv

import pytest
import torch

from catapult_kernels.train.cli import main
from catapult_kernels.train.double_descent import format_key_points, min_norm_least_squares, random_features


def test_min_norm_least_squares_equals_the_pseudo_inverse_on_a_rank_deficient_system():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    x = min_norm_least_squares(a, b)
    assert torch.allclose(x, torch.linalg.pinv(a) @ b, rtol=0, atol=1e-12)
    # a least-squares solution that is not min-norm (gels, plain QR) is far from it
    other = torch.linalg.lstsq(a, b, driver="gels").solution
    assert not torch.allclose(other, x, atol=1e-3)


def test_random_features_interpolate_the_noisy_labels_from_n_features_equal_n():
    rows = random_features([10, 30, 60], seed=0, n_train=30, label_noise=0.2)
    by_n = {r["n_features"]: r for r in rows}
    assert by_n[10]["train_loss"] > 0.01  # fewer features than examples: no exact fit
    for n in (30, 60):
        assert by_n[n]["train_error"] == 0.0
        assert by_n[n]["train_loss"] < 1e-12
    assert by_n[30]["coef_norm"] > by_n[60]["coef_norm"]  # the min norm falls past N = n


def test_command_writes_the_csv_and_the_figure_on_a_tiny_grid(tmp_path, capsys):
    out = tmp_path / "rf"
    args = ["double-descent", "random-features", "--n-features", "5", "40", "--seeds", "0", "1",
            "--n-train", "30", "--out", str(out)]
    assert main(args) == 0
    with open(out / "double_descent.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["n_features"], r["seed"]) for r in rows] == [("5", "0"), ("40", "0"), ("5", "1"), ("40", "1")]
    assert {"train_error", "train_loss", "val_error", "val_loss"} <= set(rows[0])
    assert (out / "double_descent.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 2  # results there: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_the_mlp_sweep_writes_the_csv_and_the_figure_on_a_tiny_grid(tmp_path, capsys):
    out = tmp_path / "mlp"
    assert main(["double-descent", "mlp", "--widths", "2", "8", "--seeds", "0", "--steps", "20", "--n-train", "30",
                 "--quiet", "--out", str(out)]) == 0
    with open(out / "double_descent.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["width"] for r in rows] == ["2", "8"]
    assert {"train_error", "train_loss", "val_error", "val_loss", "noisy_train_acc"} <= set(rows[0])
    assert (out / "double_descent.png").stat().st_size > 0
    assert (out / "sweep.csv").exists() and len(list(out.glob("w*-s0/summary.json"))) == 2  # the trainer's runs
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("kind, option, value, message", [
    ("random-features", "--label-noise", "1.5", "--label-noise must be a fraction in [0, 1)"),
    ("random-features", "--n-features", "0", "--n-features takes integers >= 1"),
    ("mlp", "--steps", "0", "--steps must be an integer >= 1"),
    ("mlp", "--n-train", "1797", "--n-train 1797: digits has 1797 images"),
    ("mlp", "--resume", "--overwrite", "--resume continues what is in --out and --overwrite replaces it"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, kind, option, value, message):
    out = tmp_path / "dd"
    assert main(["double-descent", kind, option, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_key_points_are_the_first_minimum_the_peak_after_it_and_the_largest():
    def point(x, error, loss):
        return {"width": x, **{f"{m}_{k}": v for m, v in (("val_error", error), ("val_loss", loss))
                               for k in ("mean", "min", "max")}}
    summary = [point(1, 0.9, 3.0), point(2, 0.3, 1.0), point(4, 0.6, 9.0), point(8, 0.2, 2.0)]
    error, loss = format_key_points(summary, "width").splitlines()
    # the underfit start (0.9) is not the peak: the peak comes after the first minimum
    assert error.startswith("val error: first minimum at width 2: 0.3") and "peak at 4: 0.6" in error
    assert error.endswith("at 8: 0.2 (0.2-0.2) (below the first minimum)")
    assert "first minimum at width 2: 1" in loss and loss.endswith("(not below the first minimum)")
