"""The figures read at a glance: titles give the run's configuration, axes carry a handful of
plain labels at every scale, and the coordinate check's panels share a y scale per row."""
import math

import pytest

from catapult_kernels.train.cli import main
from catapult_kernels.train.plot_ticks import log_ticks, plain
from catapult_kernels.train.plots import plot_coord_check, plot_curves

GRID = ["--task", "teacher-student", "--loss", "mse", "--n-train", "32", "--n-val", "16", "--input-dim", "4",
        "--optimizer", "sgd", "--steps", "4", "--log-every", "2", "--sharpness-iters", "5", "--quiet"]


def labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


def test_coord_check_panels_share_the_y_scale_per_row(tmp_path, saved):
    widths = [128, 512, 2048]  # standard grows 100x over the steps, muP stays flat: different scales per panel
    results = {"standard": {w: [[1.0, w / 128, (w / 128) ** 2], [0.1, 0.1 * w / 64, 0.1 * (w / 64) ** 2]]
                            for w in widths},
               "mup": {w: [[1.0, 1.1, 1.2], [0.1, 0.12, 0.13]] for w in widths}}
    plot_coord_check(results, tmp_path / "c.png", title="digits")
    fig, = saved
    rows = [fig.axes[0:3], fig.axes[3:6]]
    for row in rows:
        assert len({ax.get_ylim() for ax in row}) == 1
    assert rows[0][0].get_ylim() != rows[1][0].get_ylim()  # per row: each parametrization at its own scale
    assert labels(rows[0][0].xaxis) == ["128", "512", "2048"]  # the widths themselves
    assert fig._suptitle.get_text() == "digits"


@pytest.mark.parametrize("lo, hi", [(1e-9, 1e3), (0.5, 0.52), (1.0, 10.0), (3e-4, 2e-3), (0.9, 1.1),
                                    (1e-15, 1.0), (2.0, 400.0), (1e3, 1e7), (128.0, 4096.0)])
def test_log_ticks_are_a_few_plain_numbers_at_every_scale(lo, hi):
    ticks = log_ticks(lo, hi)
    assert 2 <= len(ticks) <= 7 and all(lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) for t in ticks), ticks
    texts = [plain(t, 1e-6 * t) for t in ticks]
    assert len(set(texts)) == len(texts)
    assert all(len(x) <= 6 and "+" not in x and "e-0" not in x for x in texts), texts
    assert all(math.isclose(float(x), t, rel_tol=1e-6) for x, t in zip(texts, ticks))


@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e9])
@pytest.mark.parametrize("spread", [1.02, 1e12])
def test_a_runs_figure_has_plain_labels_at_tiny_and_huge_ranges(tmp_path, saved, scale, spread):
    records = [{"step": s, "loss": scale * spread ** (-s / 1000), "val_loss": scale, "train_acc": s / 1000,
                "sharpness": scale * (1 + s), "lr": 1.0 / scale} for s in range(0, 1001, 50)]
    plot_curves(records, tmp_path / "f.png", title="t")
    fig, = saved
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            texts = labels(axis)
            assert 2 <= len(texts) <= 8, texts
            assert not any(c in x for x in texts for c in "$\\×+"), texts  # no 10^k, no x10^k
            assert axis.get_offset_text().get_text() == ""  # no offset or factor in the corner


def test_a_sweep_and_its_runs_are_titled_by_their_configuration(tmp_path, monkeypatch):
    from catapult_kernels.train import plots
    titles = {}
    for name in ("plot_curves", "plot_sweep"):
        monkeypatch.setattr(plots, name, lambda *a, title="", _name=name, **kw: titles.setdefault(_name, title))
    out = tmp_path / "s"
    assert main(["sweep", "--widths", "8", "--lrs", "0.5/lambda0", "--momentum", "0.9", "--out", str(out)] + GRID) == 0
    run, sweep = titles["plot_curves"], titles["plot_sweep"]
    assert run.startswith("teacher-student, 32 x 4, 16 val · MLP depth 2, width 8, relu, standard ·"), run
    assert "sgd lr 0.5/lambda0, MSE · full batch, 4 steps, seed 0 · momentum=0.9" in run
    assert "w8-lr" not in run  # not the folder's name
    assert "MLP depth 2, relu" in sweep and "width" not in sweep and "lr " not in sweep  # the grid's own axes
    assert "momentum=0.9" in sweep
