"""Double descent (Belkin et al. 2019; Nakkiran et al. 2019) on sklearn's digits: n = 500
training images with 20% of their labels replaced by a uniformly random other class
(validation labels clean; the trainer's --label-noise), two ways.

- random features: min-norm least squares from N random ReLU features to one-hot targets.
  The validation error and MSE peak at N = n, where the features first interpolate the
  training set, and fall again as N grows.
- model-wise: a width sweep of a one-hidden-layer ReLU MLP trained by the trainer (full-batch
  Adam, cross-entropy, long enough to interpolate); the validation loss peaks at the width
  where the training error first reaches ~0.

    catapult-train double-descent random-features --out runs/double-descent-rf
    catapult-train double-descent mlp --out runs/double-descent-mlp

Each writes double_descent.csv (one row per N or width and seed) and double_descent.png:
validation error and loss against N or width, with the training error on the same axes
(mean over seeds, min-max band); mlp also the sweep's own sweep.csv and run folders."""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import signal
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .loop import mse_loss
from .sweep import sweep
from .tasks import make_task

N_FEATURES = (10, 20, 50, 100, 200, 300, 400, 450, 480, 490, 500, 510, 520, 550, 600, 700, 1000, 2000, 5000,
              10000)
SEEDS = (0, 1, 2, 3, 4)
WIDTHS = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 32, 64, 128, 256, 1024)
MLP_SEEDS = (0, 1, 2)
MLP_INTERPOLATED = 0.01  # the training error that counts as interpolated (the trainer's memorize_step: 99%)
METRICS = ("train_error", "train_loss", "val_error", "val_loss")


def min_norm_least_squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """argmin ||x|| among the minimizers of ||a x - b||: pinv(a) b, by LAPACK's gelsd, which
    decides the rank from the singular values as pinv does (gels, plain QR, is not min-norm on
    a rank-deficient a)."""
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def _error(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(-1) != y).double().mean())


def random_features(n_features, seed: int, n_train: int = 500, label_noise: float = 0.2) -> list[dict]:
    """One row per N in n_features: min-norm least squares on relu(x W[:, :N]), W ~ N(0, 1/d)
    drawn once per seed (the features of a smaller N are the first of a larger N's), in float64,
    on the trainer's digits task of that seed (the same split and noisy labels as its runs).
    Errors and losses (the trainer's mse: 0.5 * squared error summed over the 10 outputs) are
    against the noisy training labels and the clean validation labels."""
    data = make_task(TrainConfig(task="digits", n_train=n_train, label_noise=label_noise, seed=seed).validate())
    y_train = data.y_train
    x_train, x_val = data.x_train.double(), data.x_val.double()
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(data.in_dim, max(n_features), generator=gen, dtype=torch.float64) / math.sqrt(data.in_dim)
    targets = F.one_hot(y_train, data.n_classes).double()
    rows = []
    for n in n_features:
        phi_train, phi_val = torch.relu(x_train @ weights[:, :n]), torch.relu(x_val @ weights[:, :n])
        coef = min_norm_least_squares(phi_train, targets)
        out_train, out_val = phi_train @ coef, phi_val @ coef
        rows.append({"n_features": n, "seed": seed,
                     "train_error": _error(out_train, y_train), "train_loss": float(mse_loss(out_train, y_train)),
                     "val_error": _error(out_val, data.y_val), "val_loss": float(mse_loss(out_val, data.y_val)),
                     "coef_norm": float(coef.norm())})
    return rows


def summarize(rows: list[dict], x: str) -> list[dict]:
    """Per value of column x: the mean, min, max and std over seeds of each metric."""
    out = []
    for value in sorted({r[x] for r in rows}):
        group = [r for r in rows if r[x] == value]
        s = {x: value, "seeds": len(group)}
        for m in METRICS:
            v = torch.tensor([float(r[m]) for r in group], dtype=torch.float64)
            s.update({f"{m}_mean": float(v.mean()), f"{m}_min": float(v.min()), f"{m}_max": float(v.max()),
                      f"{m}_std": float(v.std()) if len(v) > 1 else 0.0})
        out.append(s)
    return out


def format_key_points(summary: list[dict], x: str) -> str:
    """For the validation error and loss (means over seeds): the first minimum (the first x
    whose mean is below the next one's), the peak after it, the largest x, and whether the
    largest ends below the first minimum; each as mean (min-max over seeds)."""
    value = lambda s, m: f"{s[f'{m}_mean']:.3g} ({s[f'{m}_min']:.3g}-{s[f'{m}_max']:.3g})"  # noqa: E731
    lines = []
    for m in ("val_error", "val_loss"):
        means = [s[f"{m}_mean"] for s in summary]
        k = next((k for k in range(len(means) - 1) if means[k] < means[k + 1]), len(means) - 1)
        first, last, name = summary[k], summary[-1], m.replace("_", " ")
        if k == len(means) - 1:
            lines.append(f"{name}: no peak, falling all the way to {x} {last[x]}: {value(last, m)}")
            continue
        peak = max(summary[k + 1:], key=lambda s: s[f"{m}_mean"])
        below = "below" if last[f"{m}_mean"] < first[f"{m}_mean"] else "not below"
        lines.append(f"{name}: first minimum at {x} {first[x]}: {value(first, m)}; peak at {peak[x]}: "
                     f"{value(peak, m)}; at {last[x]}: {value(last, m)} ({below} the first minimum)")
    return "\n".join(lines)


def interpolation_threshold(summary: list[dict], x: str, tolerance: float = 0.0) -> Optional[int]:
    """The smallest x from which every seed's training error is at most `tolerance` at every
    larger x."""
    threshold = None
    for s in reversed(summary):
        if s["train_error_max"] > tolerance:
            break
        threshold = s[x]
    return threshold


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def format_table(summary: list[dict], x: str) -> str:
    lines = [f"{x:>10}  {'train error':>15}  {'val error':>15}  {'val loss':>17}  seeds"]
    for s in summary:
        lines.append(f"{s[x]:>10}  {s['train_error_mean']:>7.3f} +- {s['train_error_std']:.3f}"
                     f"  {s['val_error_mean']:>7.3f} +- {s['val_error_std']:.3f}"
                     f"  {s['val_loss_mean']:>8.3g} +- {s['val_loss_std']:<6.3g}  {s['seeds']:>5}")
    return "\n".join(lines)


def plot(summary: list[dict], x: str, path: Path, *, title: str, xlabel: str, ticks, loss_label: str,
         threshold: Optional[float], threshold_label: str) -> None:
    """Two panels against x on a log axis, each the mean over seeds with a min-max band: the
    training and validation error, and the validation loss (the training loss is in the CSV:
    at exact interpolation, ~1e-30, it would squash a log axis); a dashed line at the
    interpolation threshold."""
    from .plots import _pyplot
    plt = _pyplot()
    from matplotlib.ticker import LogFormatter
    xs = [s[x] for s in summary]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.9))
    panels = ((axes[0], ("train_error", "val_error"), "error (1 - accuracy)"), (axes[1], ("val_loss",), loss_label))
    for ax, metrics, ylabel in panels:
        for m in metrics:
            color = "#4c72b0" if m.startswith("train") else "#dd8452"
            ax.plot(xs, [s[f"{m}_mean"] for s in summary], marker=".", color=color, label=m.replace("_", " "))
            ax.fill_between(xs, [s[f"{m}_min"] for s in summary], [s[f"{m}_max"] for s in summary],
                            color=color, alpha=0.25, lw=0)
        if threshold is not None:
            ax.axvline(threshold, color="k", lw=0.8, ls="--", label=threshold_label)
        ax.set_xscale("log")
        if metrics == ("val_loss",):
            ax.set_yscale("log")
            # plain numbers (2, 3, 10, 1e+05), and minor labels only where the axis spans under two decades
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.4g}"))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        shown = [t for t in ticks if min(xs) <= t <= max(xs)]
        ax.set_xticks(shown, [f"{t:g}" for t in shown])  # plain numbers, not 10^k
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_random_features(n_features, seeds, out: Path, n_train: int = 500, label_noise: float = 0.2,
                        plots: bool = True) -> list[dict]:
    """The whole grid: double_descent.csv and double_descent.png in out; the summary's rows."""
    rows = [r for seed in seeds for r in random_features(n_features, seed, n_train, label_noise)]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "double_descent.csv")
    summary = summarize(rows, "n_features")
    if plots:
        plot(summary, "n_features", out / "double_descent.png",
             title=f"random ReLU features, min-norm least squares: digits, n = {n_train}, "
                   f"{label_noise:.0%} label noise, {len(seeds)} seeds",
             xlabel="N (random features)", ticks=(10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000),
             loss_label="mse (0.5 * sum of squares)",
             threshold=n_train, threshold_label=f"N = n = {n_train}")
    return summary


def run_mlp(widths, seeds, out: Path, steps: int = 10000, n_train: int = 500, label_noise: float = 0.2, *,
            resume: bool = False, overwrite: bool = False, quiet: bool = False, plots: bool = True) -> list[dict]:
    """The width sweep, one trainer run per width and seed (sweep.csv and a folder per cell in
    out), then double_descent.csv and double_descent.png; the summary's rows, of the cells done
    (all of them unless a signal stopped the sweep: resume=True finishes it)."""
    base = mlp_config(steps, n_train, label_noise)
    rows = [{"width": r["width"], "seed": r["seed"],
             "train_error": 1 - r["final_train_acc"], "train_loss": r["final_loss"],
             "val_error": 1 - r["final_val_acc"], "val_loss": r["final_val_loss"],
             "noisy_train_acc": r["final_noisy_train_acc"], "clean_train_acc": r["final_clean_train_acc"]}
            for r in sweep(base, widths, [base.lr], seeds, out, resume=resume, overwrite=overwrite, quiet=quiet)]
    if not rows:
        return []
    write_csv(rows, out / "double_descent.csv")
    summary = summarize(rows, "width")
    if plots:
        plot(summary, "width", out / "double_descent.png",
             title=f"one-hidden-layer ReLU MLP, full-batch Adam lr {base.lr}, {steps} steps: digits, n = {n_train}, "
                   f"{label_noise:.0%} label noise, {len(seeds)} seeds",
             xlabel="hidden width", ticks=[2 ** k for k in range(1, 16)], loss_label="cross-entropy",
             threshold=interpolation_threshold(summary, "width", MLP_INTERPOLATED),
             threshold_label=f"train error <= {MLP_INTERPOLATED:g} from here on")
    return summary


def mlp_config(steps: int, n_train: int, label_noise: float) -> TrainConfig:
    """Nakkiran et al.'s model-wise setting at toy scale: digits with label noise, one hidden
    ReLU layer, full-batch Adam at lr 1e-3, cross-entropy; only the final values are read."""
    return TrainConfig(task="digits", n_train=n_train, label_noise=label_noise, model="mlp", depth=2,
                       activation="relu", optimizer="adam", lr="1e-3", loss="ce", steps=steps,
                       log_every=max(1, steps // 100), plots=False).validate()


def _positive_ints(name: str, values, least: int = 1) -> None:
    bad = [v for v in values if v < least]
    if bad:
        raise ValueError(f"{name} takes integers >= {least}, got {bad[0]}")


def main(argv: list[str]) -> int:
    from .cli import check_out
    from .loop import StopSignals
    from .run_folder import FolderLock
    p = argparse.ArgumentParser(prog="catapult-train double-descent", description=__doc__.split("\n\n")[0])
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{random-features,mlp}")
    rf = kinds.add_parser("random-features", help="min-norm least squares on N random ReLU features")
    rf.add_argument("--n-features", type=int, nargs="+", default=list(N_FEATURES), metavar="N",
                    help="the numbers of features (default: 10 to 10000, dense around 500)")
    rf.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="default: 0 1 2 3 4")
    mlp = kinds.add_parser("mlp", help="a width sweep of a one-hidden-layer ReLU MLP, trained by catapult-train")
    mlp.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS),
                     help="hidden units (default: 2 to 16 in small steps, then 24 to 1024)")
    mlp.add_argument("--seeds", type=int, nargs="+", default=list(MLP_SEEDS), help="default: 0 1 2")
    mlp.add_argument("--steps", type=int, default=10000, help="full-batch Adam steps (default: 10000)")
    mlp.add_argument("--resume", action="store_true", help="finish the sweep in --out")
    mlp.add_argument("--quiet", action="store_true", help="no line per cell")
    for kind in (rf, mlp):
        kind.add_argument("--n-train", type=int, default=500, help="training digits (default: 500)")
        kind.add_argument("--label-noise", type=float, default=0.2,
                          help="the fraction of training labels replaced by a random other class (default: 0.2)")
        kind.add_argument("--out", help="the folder for double_descent.csv and .png "
                          "(default: runs/double-descent-KIND)")
        kind.add_argument("--overwrite", action="store_true", help="replace the results in --out")
        kind.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                          help="write double_descent.png (--no-plots: none)")
    ns = p.parse_args(argv)
    _positive_ints("--seeds", ns.seeds, least=0)
    out = Path(ns.out or f"runs/double-descent-{ns.kind}")
    if ns.kind == "random-features":
        _positive_ints("--n-features", ns.n_features)
        TrainConfig(task="digits", n_train=ns.n_train, label_noise=ns.label_noise).validate()
        check_out(out)
        if (out / "double_descent.csv").exists() and not ns.overwrite:
            raise ValueError(f"{out} already holds results (double_descent.csv); pass --overwrite to replace them")
        summary = run_random_features(sorted(set(ns.n_features)), ns.seeds, out, ns.n_train, ns.label_noise,
                                      ns.plots)
    else:
        mlp_config(ns.steps, ns.n_train, ns.label_noise)  # bad values named before any folder is made
        if ns.resume and ns.overwrite:
            raise ValueError("--resume continues what is in --out and --overwrite replaces it: pass one of them")
        check_out(out)
        made = not out.exists()
        try:
            with FolderLock(out), StopSignals() as signals:  # one sweep at a time in a folder
                summary = run_mlp(sorted(set(ns.widths)), ns.seeds, out, ns.steps, ns.n_train, ns.label_noise,
                                  resume=ns.resume, overwrite=ns.overwrite, quiet=ns.quiet, plots=ns.plots)
        except BaseException:
            if made:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if the sweep failed before writing in it
            raise
    x = "n_features" if ns.kind == "random-features" else "width"
    if summary:
        print(format_table(summary, x))
        print(format_key_points(summary, x))
        print(f"wrote {out / 'double_descent.csv'}" + (f" and {out / 'double_descent.png'}" if ns.plots else ""))
    cells = len(set(ns.widths)) * len(ns.seeds) if ns.kind == "mlp" else 0
    if sum(s["seeds"] for s in summary) < cells:
        print("catapult-train: double-descent interrupted; finish it with the same command and --resume",
              file=sys.stderr)
        return 128 + (signals.signum or signal.SIGINT)
    return 0
