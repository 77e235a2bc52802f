"""The probe of the proposal (issue 15): does training at a high lr, in a wide net, with
strong regularization give high clean val accuracy, LOW memorization of noisy labels and
high robust accuracy? One sweep (width x lr x seed, label noise, adversarial evaluation) per
weight decay, each in a subfolder of its own; their rows in one table (probe.csv, with a
weight_decay column) and one figure (probe.png): the three metrics against the lr in units
of 2/lambda0, weight decay off and on, a line per width, mean and spread over seeds.

The figures draw a sweep's metrics that way: x = lr / (2 / lambda0), the lazy/catapult
boundary at x = 1. The catapult-generalization reproduction draws its final val accuracy so."""
from __future__ import annotations

import csv
import dataclasses
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from .config import TrainConfig
from .loop import StopSignals
from .plots import PHASE_COLORS, _pyplot
from .sweep import COLUMNS, check_cells_begun, check_grid, sweep
from .sweep_jobs import CellsFailed

# The documented probe (README): what `catapult-train probe` runs unless told otherwise.
# Digits with 20% of the training labels flipped; MSE in NTK parametrization with full-batch
# SGD, so that lr = K/lambda0 places each run in the lazy (K < 2) or catapult (K > 2) phase;
# PGD on the standardized pixels. Weight decay 1e-3 (L2 in SGD) is the strongest that still
# learns here: at 1e-2 every run ends at chance.
PROBE_CONFIG = dict(task="digits", n_train=500, loss="mse", parametrization="ntk", optimizer="sgd", steps=1000,
                    log_every=100, label_noise=0.2, adv_eval="pgd", adv_eps=0.25)
PROBE_GRID = dict(widths=[64, 256, 1024], lrs=["1/lambda0", "1.9/lambda0", "2.5/lambda0", "3/lambda0", "3.5/lambda0"],
                  seeds=[0, 1, 2], weight_decays=[0.0, 1e-3])
# (sweep.csv column, what it measures): the figure's columns, in the proposal's order
METRICS = (("final_val_acc", "clean val accuracy"),
           ("final_noisy_train_acc", "memorized noisy labels"),  # train acc on the flipped labels, against them
           ("final_robust_val_acc", "robust val accuracy"))
PROBE_COLUMNS = ("weight_decay",) + COLUMNS


@dataclass
class SeedBand:
    """One (width, lr) cell of a sweep over its seeds. mean, lo, hi: the mean, the least and the
    greatest value over the seeds that did not diverge (n of them); None when every seed diverged
    (a divergent run's metrics say nothing about what it learned)."""
    x: float
    mean: float | None
    lo: float | None
    hi: float | None
    n: int
    divergent: int


def seed_bands(rows: list[dict], metric: str) -> dict[int, list[SeedBand]]:
    """Per width, the bands of `metric` at each lr of the sweep, by x = lr / (2 / lambda0).
    Cells without a measured lambda0 have no x and are left out."""
    cells: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        if r.get("lr_over_2_over_lambda0") is not None:
            cells.setdefault((int(r["width"]), r["lr_spec"]), []).append(r)
    bands: dict[int, list[SeedBand]] = {}
    for (width, _), seeds in cells.items():
        kept = [float(r[metric]) for r in seeds if r["phase"] != "divergent" and _number(r.get(metric))]
        x = fmean(float(r["lr_over_2_over_lambda0"]) for r in seeds)  # K/lambda0: the same x for every seed
        band = SeedBand(x, fmean(kept) if kept else None, min(kept, default=None), max(kept, default=None),
                        len(kept), sum(r["phase"] == "divergent" for r in seeds))
        bands.setdefault(width, []).append(band)
    return {w: sorted(b, key=lambda band: band.x) for w, b in sorted(bands.items())}


def _number(v) -> bool:
    # a row read back from a csv holds '' where the run had no value
    try:
        return v is not None and v != "" and math.isfinite(float(v))
    except ValueError:
        return False


def draw_bands(ax, rows: list[dict], metric: str, ylabel: str) -> None:
    """A line per width through the seed means, the band from the least to the greatest seed;
    an x marker on the axis where every seed diverged."""
    for i, (width, bands) in enumerate(seed_bands(rows, metric).items()):
        color = f"C{i}"
        drawn = [b for b in bands if b.mean is not None]
        xs = [b.x for b in drawn]
        ax.plot(xs, [b.mean for b in drawn], marker="o", ms=4, color=color, label=f"width {width}")
        ax.fill_between(xs, [b.lo for b in drawn], [b.hi for b in drawn], color=color, alpha=0.2, lw=0)
        lost = [b.x for b in bands if b.mean is None]
        ax.scatter(lost, [0.0] * len(lost), marker="x", color=color, clip_on=False, zorder=3)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set(xlabel="lr / (2 / lambda0)", ylabel=ylabel)


def gain_over_lowest_lr(rows: list[dict], metric: str) -> list[dict]:
    """rows with `metric` replaced by its gain over the same width and seed's run at the lowest
    lr: the seed's split and init are the same, so the spread between seeds' splits cancels."""
    lowest: dict[tuple, dict] = {}
    for r in rows:
        key, x = (int(r["width"]), int(r["seed"])), r.get("lr_over_2_over_lambda0")
        if _number(x) and (key not in lowest or float(x) < float(lowest[key]["lr_over_2_over_lambda0"])):
            lowest[key] = r
    gains = []
    for r in rows:
        ref = lowest.get((int(r["width"]), int(r["seed"])))
        if ref is not None and ref["phase"] != "divergent" and _number(r.get(metric)) and _number(ref.get(metric)):
            gains.append({**r, metric: float(r[metric]) - float(ref[metric])})
    return gains


def plot_val_acc_by_width(rows: list[dict], path, title: str = "") -> None:
    """The final val accuracy of a sweep against the lr in units of 2/lambda0 (left of the
    dashed line the lazy phase, right of it the catapult), and beside it the same seed's gain
    over its run at the lowest lr."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    draw_bands(axes[0], rows, "final_val_acc", "final val accuracy")
    draw_bands(axes[1], gain_over_lowest_lr(rows, "final_val_acc"), "final_val_acc",
               "gain over the same seed at the lowest lr")
    for ax in axes:
        ax.axvspan(1.0, ax.get_xlim()[1], color=PHASE_COLORS["catapult"], alpha=0.06, lw=0)
    axes[1].axhline(0.0, color="gray", lw=0.8)
    axes[0].legend(title="mean, min-max over seeds", fontsize=8, title_fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe(base: TrainConfig, widths: list[int], lrs: list[str], seeds: list[int], weight_decays: list[float], out,
          *, resume: bool = False, overwrite: bool = False, quiet: bool = False, jobs: int = 1) -> list[dict]:
    """One sweep per weight decay into out/wd<value>, then probe.csv and probe.png in out. The
    rows of the cells done: all of them, unless a signal stopped a sweep (then the later weight
    decays are not begun, and resume=True finishes the probe)."""
    out = Path(out)
    bases = check_probe(base, widths, lrs, seeds, weight_decays)
    if (out / "probe.csv").exists() and not (resume or overwrite):
        raise ValueError(f"{out} already holds a probe (probe.csv); pass --resume to finish it "
                         "or --overwrite to replace it")
    if resume:  # every sweep's cells checked now: a refusal comes before any cell runs
        for b in bases:
            check_cells_begun([dataclasses.replace(b, width=w, lr=lr, seed=s).validate()
                               for w in widths for lr in lrs for s in seeds], out / wd_folder(b.weight_decay))
    rows = []
    with StopSignals() as signals:  # shared with the sweeps: one signal stops the probe
        for b in bases:
            if signals.requested:
                break
            try:
                cells = sweep(b, widths, lrs, seeds, out / wd_folder(b.weight_decay), resume=resume,
                              overwrite=overwrite, quiet=quiet, jobs=jobs)
            except CellsFailed as e:  # jobs > 1: the other cells are done; the table and figure first
                rows += with_weight_decay(b, e.rows)
                write_probe(rows, base, out)
                raise CellsFailed(rows, e.failures) from None
            rows += with_weight_decay(b, cells)
            if len(cells) < len(widths) * len(lrs) * len(seeds):  # stopped: the rest waits for resume=True
                break
    write_probe(rows, base, out)
    return rows


def with_weight_decay(base: TrainConfig, rows: list[dict]) -> list[dict]:
    return [{"weight_decay": base.weight_decay, **r} for r in rows]


def write_probe(rows: list[dict], base: TrainConfig, out: Path) -> None:
    """probe.csv and (base.plots) probe.png in out; nothing without rows, as sweep does: a
    probe.csv without rows would refuse the rerun."""
    if not rows:
        return
    write_probe_csv(rows, out / "probe.csv")
    if base.plots:
        from .config_words import config_title
        plot_probe(rows, out / "probe.png",
                   title=config_title(base.to_dict(), omit=("width", "lr", "seed", "weight_decay")) or "")


def check_probe(base: TrainConfig, widths: list[int], lrs: list[str], seeds: list[int],
                weight_decays: list[float]) -> list[TrainConfig]:
    """The base config of each weight decay's sweep, every bad value refused by name first."""
    check_grid(widths, lrs, seeds)
    if not weight_decays:
        raise ValueError("--weight-decays needs at least one value")
    if len(set(weight_decays)) < len(weight_decays):
        raise ValueError(f"--weight-decays lists a value twice: {weight_decays}")
    bases = []
    for wd in weight_decays:
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not (math.isfinite(wd) and wd >= 0):
            raise ValueError(f"--weight-decays takes numbers >= 0, got {wd!r}")
        bases.append(dataclasses.replace(base, weight_decay=float(wd)).validate())
    if not base.label_noise:
        raise ValueError("the probe measures how much label noise is memorized: it needs --label-noise F > 0")
    if base.adv_eval == "none":
        raise ValueError("the probe measures robust accuracy: it needs --adv-eval fgsm or pgd (with --adv-eps)")
    return bases


def wd_folder(weight_decay: float) -> str:
    return f"wd{weight_decay:g}"


def write_probe_csv(rows: list[dict], path) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PROBE_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def format_bands(rows: list[dict]) -> str:
    """The probe's table in short: per weight decay, width and lr, each metric's mean and
    [least, greatest] over the seeds that did not diverge, and how many diverged."""
    heads = ("weight decay", "width", "lr/(2/l0)", "seeds", "divergent") + tuple(label for _, label in METRICS)
    table = [heads]
    for wd in sorted({float(r["weight_decay"]) for r in rows}):
        cells = [r for r in rows if float(r["weight_decay"]) == wd]
        per_metric = [seed_bands(cells, metric) for metric, _ in METRICS]
        for width, bands in per_metric[0].items():
            for k, band in enumerate(bands):
                shown = [m[width][k] for m in per_metric]
                table.append((f"{wd:g}", str(width), f"{band.x:.3g}", str(band.n + band.divergent), str(band.divergent),
                              *("-" if b.mean is None else f"{b.mean:.3f} [{b.lo:.3f}, {b.hi:.3f}]" for b in shown)))
    widths = [max(len(line[i]) for line in table) for i in range(len(heads))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table)


def plot_probe(rows: list[dict], path, title: str = "") -> None:
    """A column per metric (METRICS), a row per weight decay, x = lr / (2 / lambda0), a line per
    width with its band over the seeds. Every panel is an accuracy, on one [0, 1] y axis."""
    plt = _pyplot()
    decays = sorted({float(r["weight_decay"]) for r in rows})
    fig, axes = plt.subplots(len(decays), len(METRICS), figsize=(4.2 * len(METRICS), 3.3 * len(decays) + 0.5),
                             squeeze=False, sharex=True, sharey=True)
    for i, wd in enumerate(decays):
        cells = [r for r in rows if float(r["weight_decay"]) == wd]
        for j, (metric, label) in enumerate(METRICS):
            ax = axes[i][j]
            draw_bands(ax, cells, metric, "accuracy" if j == 0 else "")
            ax.set_title(f"{label}, weight decay {wd:g}", fontsize=9)
            ax.set_ylim(-0.03, 1.03)
            if i < len(decays) - 1:
                ax.set_xlabel("")
    axes[0][-1].legend(title="mean, min-max over seeds", fontsize=7, title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """catapult-train probe: the documented probe, every option of a sweep overridable."""
    from .cli import (_check_one_process, _check_resume_or_overwrite, _overrides, _parser, _remove_if_empty,
                      add_run_options, add_train_options, check_device, check_out)
    from .config_file import parse_args
    from .run_folder import FolderLock
    grid_help = {k: " ".join(map(str, v)) for k, v in PROBE_GRID.items()}
    p = _parser("catapult-train probe", "The proposal's probe: a sweep of widths x lrs x seeds per weight decay, "
                "with label noise and an adversarial evaluation; writes one sweep per weight decay (wd<value>/), "
                "probe.csv and probe.png. Its own defaults, over those shown per option: "
                + ", ".join(f"{k}={v}" for k, v in PROBE_CONFIG.items()) + ".")
    p.add_argument("--widths", type=int, nargs="+", default=PROBE_GRID["widths"],
                   help=f"(default: {grid_help['widths']})")
    p.add_argument("--lrs", nargs="+", default=PROBE_GRID["lrs"], help=f"(default: {grid_help['lrs']})")
    p.add_argument("--seeds", type=int, nargs="+", default=PROBE_GRID["seeds"], help=f"(default: {grid_help['seeds']})")
    p.add_argument("--weight-decays", type=float, nargs="+", default=PROBE_GRID["weight_decays"],
                   help=f"one sweep each (default: {grid_help['weight_decays']})")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="cells run at once, each in its own process")
    add_train_options(p)
    add_run_options(p, "probe")
    ns = parse_args(p, argv, {"widths": list[int], "lrs": list[str], "seeds": list[int],
                              "weight_decays": list[float]})
    overrides = _overrides(ns)
    _check_resume_or_overwrite(ns)
    _check_one_process(overrides, "probe")
    for name in ("width", "lr", "seed", "weight_decay"):  # the grid sets these: a single value would be ignored
        if name in overrides:
            raise ValueError(f"probe takes --{name.replace('_', '-')}s (one value per sweep or cell), "
                             f"not --{name.replace('_', '-')}")
    base = TrainConfig(**{**PROBE_CONFIG, **overrides})
    out = Path(ns.out) if ns.out else Path("runs") / "probe"
    check_out(out)
    check_device(base.device)
    made, failed = not out.exists(), None
    try:
        with FolderLock(out), StopSignals() as signals:  # one probe at a time in a folder
            rows = probe(base, ns.widths, ns.lrs, ns.seeds, ns.weight_decays, out, resume=ns.resume,
                         overwrite=ns.overwrite, quiet=ns.quiet, jobs=ns.jobs)
    except CellsFailed as e:  # the other cells are done: their table first, then the failures
        rows, failed = e.rows, e
    except BaseException:
        if made:
            _remove_if_empty(out)
        raise
    if rows:
        print(format_bands(rows))
        print(f"wrote {out / 'probe.csv'}" + (f" and {out / 'probe.png'}" if base.plots else ""))
    if failed is not None:
        print(f"catapult-train: error: {failed}", file=sys.stderr)
        return 1
    cells = len(ns.widths) * len(ns.lrs) * len(ns.seeds) * len(ns.weight_decays)
    if len(rows) < cells:
        print(f"catapult-train: probe interrupted after {len(rows)} of {cells} cells; finish it with "
              "the same command and --resume", file=sys.stderr)
        return 128 + (signals.signum or signal.SIGINT)
    return 0
