"""catapult-train probe: a sweep per weight decay (label noise, adversarial evaluation) into
wd<value>/, one table (probe.csv: a row per cell, with its weight decay) and one figure
(probe.png); the seed bands the figures draw; bad options refused before anything is made."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from catapult_kernels.train import TrainConfig
from catapult_kernels.train.cli import main
from catapult_kernels.train.probe import (METRICS, PROBE_COLUMNS, PROBE_CONFIG, format_bands, gain_over_lowest_lr,
                                          plot_probe, plot_val_acc_by_width, probe, seed_bands)
from catapult_kernels.train.sweep import COLUMNS

pytest.importorskip("sklearn")  # digits: a dev requirement, present in CI

# the documented probe's options on a tiny grid: 100 digits, 3 steps
TINY = ["--n-train", "100", "--steps", "3", "--log-every", "1", "--adv-steps", "2", "--quiet"]


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.mark.slow
def test_probe_writes_one_table_with_a_row_per_cell_and_weight_decay(tmp_path):
    base = TrainConfig(**{**PROBE_CONFIG, "n_train": 100, "steps": 3, "log_every": 1, "adv_steps": 2,
                          "plots": False})
    rows = probe(base, [8], ["1/lambda0", "3/lambda0"], [0, 1], [0.0, 0.01], tmp_path, quiet=True)
    heads, stored = _read(tmp_path / "probe.csv")
    assert tuple(heads) == PROBE_COLUMNS == ("weight_decay",) + COLUMNS
    assert len(rows) == len(stored) == 8
    assert [(float(r["weight_decay"]), r["lr_spec"], int(r["seed"])) for r in stored] == [
        (wd, lr, s) for wd in (0.0, 0.01) for lr in ("1/lambda0", "3/lambda0") for s in (0, 1)]
    for metric, _ in METRICS:  # label noise and the attack ran in every cell
        assert all(r[metric] != "" and 0.0 <= float(r[metric]) <= 1.0 for r in stored), metric
    for wd in ("wd0", "wd0.01"):  # each weight decay a sweep of its own, whose config says it
        assert len(_read(tmp_path / wd / "sweep.csv")[1]) == 4
    assert '"weight_decay": 0.01' in (tmp_path / "wd0.01" / "w8-lr3_lambda0-s1" / "config.json").read_text()
    assert not (tmp_path / "probe.png").exists()  # plots=False


# ~8 s: four cells with their figures, then a resume that reruns none
@pytest.mark.slow
def test_probe_command_prints_the_bands_and_writes_table_and_figure(tmp_path, capsys):
    out = tmp_path / "probe"
    args = ["probe", "--widths", "8", "--lrs", "1/lambda0", "3/lambda0", "--seeds", "0",
            "--weight-decays", "0", "0.01", "--out", str(out), *TINY]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "clean val accuracy" in printed and f"wrote {out / 'probe.csv'} and {out / 'probe.png'}" in printed
    assert len(_read(out / "probe.csv")[1]) == 4 and (out / "probe.png").stat().st_size > 0
    assert main(args) == 2  # a second probe into the same folder is refused
    assert "already holds a probe (probe.csv)" in capsys.readouterr().err
    assert main(args + ["--resume", "--no-plots"]) == 0  # every cell done: nothing reruns, the same table
    assert len(_read(out / "probe.csv")[1]) == 4


@pytest.mark.parametrize("args, message", [
    (["--weight-decay", "0.1"], "probe takes --weight-decays (one value per sweep or cell), not --weight-decay"),
    (["--width", "8"], "probe takes --widths"),
    (["--weight-decays", "0", "-1"], "--weight-decays takes numbers >= 0, got -1.0"),
    (["--weight-decays", "0", "0"], "--weight-decays lists a value twice: [0.0, 0.0]"),
    (["--label-noise", "0"], "it needs --label-noise F > 0"),
    (["--adv-eval", "none", "--adv-eps", "0"], "it needs --adv-eval fgsm or pgd"),
    (["--lrs", "fast"], "--lrs 'fast': expected a number > 0"),
])
def test_a_bad_option_is_refused_in_one_line_before_anything_is_made(tmp_path, capsys, args, message):
    out = tmp_path / "probe"
    assert main(["probe", "--widths", "8", "--out", str(out), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


ROWS = [dict(weight_decay=wd, width=w, lr_spec=f"{c}/lambda0", seed=s, lr_over_2_over_lambda0=c / 2,
             phase="divergent" if (c, s) == (4, 2) or c == 5 else "catapult" if c > 2 else "lazy",
             final_val_acc=0.8 + 0.01 * s + 0.02 * c, final_noisy_train_acc=0.5 - 0.1 * c,
             final_robust_val_acc=0.3 + 0.01 * s)
        for wd in (0.0, 1e-3) for w in (16, 64) for c in (1, 3, 4, 5) for s in (0, 1, 2)]


def test_seed_bands_give_mean_and_spread_over_the_seeds_that_did_not_diverge():
    bands = seed_bands([r for r in ROWS if r["weight_decay"] == 0.0], "final_val_acc")
    assert list(bands) == [16, 64]
    first, _, third, fourth = bands[16]
    assert (first.x, first.n, first.divergent) == (0.5, 3, 0)
    assert first.mean == pytest.approx(0.83) and (first.lo, first.hi) == pytest.approx((0.82, 0.84))
    assert (third.n, third.divergent) == (2, 1) and third.hi == pytest.approx(0.89)  # seed 2 diverged
    assert fourth.mean is None and fourth.divergent == 3  # every seed diverged: no value, a marker
    as_read = [{k: str(v) for k, v in r.items()} for r in ROWS[:3]]  # probe.csv read back: text
    assert seed_bands(as_read, "final_val_acc")[16][0].mean == pytest.approx(0.83)


def test_the_gain_is_over_the_same_width_and_seed_at_the_lowest_lr():
    gains = gain_over_lowest_lr([r for r in ROWS if r["weight_decay"] == 0.0], "final_val_acc")
    assert len(gains) == 2 * 4 * 3  # every cell with a value: its own seed's run at c = 1 did not diverge
    by_cell = {(g["width"], g["lr_spec"], g["seed"]): g["final_val_acc"] for g in gains}
    assert by_cell[(16, "1/lambda0", 2)] == 0.0 and by_cell[(64, "3/lambda0", 1)] == pytest.approx(0.04)
    band = seed_bands(gains, "final_val_acc")[64][1]  # the seeds' spread (0.01 per seed) cancels
    assert (band.lo, band.hi) == pytest.approx((0.04, 0.04))


def test_the_figures_are_written(tmp_path):
    plot_probe(ROWS, tmp_path / "probe.png", title="tiny")
    plot_val_acc_by_width([r for r in ROWS if r["weight_decay"] == 0.0], tmp_path / "gen.png", title="tiny")
    assert (tmp_path / "probe.png").stat().st_size > 0 and (tmp_path / "gen.png").stat().st_size > 0
    table = format_bands(ROWS).splitlines()
    assert len(table) == 1 + 2 * 2 * 4 and "0.830 [0.820, 0.840]" in table[1]
