"""Figures: a run's curves, a sweep's phase diagram, the muP coordinate check, runs compared.
matplotlib is imported here only (and in plot_ticks, once set up here), with the file-only Agg
backend. Titles say the configuration (config_words.config_title); every axis gets plain,
readable ticks (plot_ticks.readable)."""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import LearningRate

PHASE_COLORS = {"lazy": "#4c72b0", "catapult": "#dd8452", "divergent": "#c44e52"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("figures need matplotlib (pip install matplotlib), or pass --no-plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finish(fig, axes, title: str, path, legend=None, **save) -> None:
    """Readable ticks on every panel, the title wrapped to the figure's width, the panels laid
    out above `legend` (a figure legend at the bottom), then saved."""
    from .plot_ticks import readable
    for ax in axes:
        readable(ax)
    if title:  # about 12 characters per inch at this size
        fig.suptitle(_wrapped(title, max(40, int(fig.get_figwidth() * 12))), fontsize=10)
    below = 0.0
    if legend is not None:
        fig.canvas.draw()  # the legend's size, out of the figure's
        below = legend.get_window_extent().height / fig.bbox.height
    fig.tight_layout(rect=(0, below, 1, 1))
    fig.savefig(path, dpi=110, **save)


def _wrapped(title: str, width: int) -> str:
    """The title in lines of at most `width` characters, broken between its " · " parts where
    it can be (config_title's), inside a part only where the part alone is too long."""
    lines: list[str] = []
    for part in title.split(" · "):
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
        else:
            lines += textwrap.wrap(part, width) or [part]
    return "\n".join(lines)


def _series(metrics: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in metrics if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


ACCURACIES = (("train_acc", "train"), ("val_acc", "val"), ("clean_train_acc", "train, clean labels"),
              ("noisy_train_acc", "train, noisy labels (memorized)"),  # --label-noise
              ("robust_val_acc", "val, adversarial"))  # --adv-eval


def accuracy_series(metrics: list[dict]) -> list[tuple[str, list, list]]:
    """The accuracy panel's lines, (label, steps, values), of the ACCURACIES the records hold."""
    series = [(label, *_series(metrics, key)) for key, label in ACCURACIES]
    return [(label, s, v) for label, s, v in series if s]


def plot_curves(metrics: list[dict], path, title: str = "") -> None:
    """Loss and accuracies (accuracy_series) over steps on log axes; sharpness beside 2/lr."""
    plt = _pyplot()
    accuracies = accuracy_series(metrics)
    has_acc = bool(accuracies)
    has_sharp = any("sharpness" in r for r in metrics)
    panels = 1 + has_acc + has_sharp
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    for key, label in (("loss", "train loss"), ("val_loss", "val loss")):
        s, v = _series(metrics, key)
        if any(x > 0 for x in v):
            ax.plot(s, v, label=label)
    ax.set(xscale="symlog", yscale="log", xlabel="step", ylabel="loss")
    ax.legend()
    if has_acc:
        ax = axes.pop(0)
        for label, s, v in accuracies:
            ax.plot(s, v, label=label)
        ax.set(xscale="symlog", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=8 if len(accuracies) > 2 else None)  # more, longer labels: smaller
    if has_sharp:
        ax = axes.pop(0)
        ax.plot(*_series(metrics, "sharpness"), marker=".", label="sharpness")
        steps_lrs = [(s, lr) for s, lr in zip(*_series(metrics, "lr")) if lr > 0]
        ax.plot([s for s, _ in steps_lrs], [2.0 / lr for _, lr in steps_lrs], "k--", label="2 / lr")
        ax.set(xscale="symlog", yscale="log", xlabel="step", ylabel="top Hessian eigenvalue")
        ax.legend()
    _finish(fig, fig.axes, title, path)
    plt.close(fig)


@dataclass
class SweepPanel:
    """What one width's panel of the sweep figure draws."""
    width: int
    points: list         # (x, y, phase) of the cells that did not diverge, at their measured y
    divergent_xs: list   # the x of divergent cells: markers on a band above the panel, no y


@dataclass
class SweepFigure:
    """What plot_sweep draws, apart from matplotlib. x: the lr in units of 2/lambda0 (the
    lazy/catapult boundary is at 1). y: the final val accuracy (classification), else the
    peak loss over the initial loss, the catapult's spike."""
    panels: list
    classification: bool
    log_x: bool


def sweep_figure(rows: list[dict]) -> SweepFigure:
    classification = any(r.get("final_val_acc") is not None for r in rows)
    cells = [r for r in rows if r.get("lr_times_lambda0")]
    panels = []
    for width in sorted({r["width"] for r in cells}):
        panel = SweepPanel(width, [], [])
        for r in (r for r in cells if r["width"] == width):
            x = r["lr_times_lambda0"] / 2
            if r["phase"] == "divergent":  # its loss has no meaningful height: marked, never placed
                panel.divergent_xs.append(x)
                continue
            y = r.get("final_val_acc") if classification else _spike(r)
            if y is not None:
                panel.points.append((x, y, r["phase"]))
        panels.append(panel)
    xs = [r["lr_times_lambda0"] / 2 for r in cells]
    plain_lrs = all(not LearningRate.parse(r["lr_spec"]).per_lambda0 for r in cells)
    log_x = bool(xs) and ((plain_lrs and len({r["lr"] for r in cells}) > 1) or max(xs) / min(xs) > 20)
    return SweepFigure(panels, classification, log_x)


def _spike(row: dict) -> Optional[float]:
    peak, loss0 = row.get("peak_loss"), row.get("loss0")
    return peak / loss0 if peak is not None and loss0 else None


def plot_sweep(rows: list[dict], path, title: str = "") -> None:
    """One panel per width, each cell colored by its phase (see SweepFigure); divergent
    cells as crosses on a band above the panels. No figure when no cell has an x (its
    lambda0 unmeasured or 0): there is nothing to place."""
    data = sweep_figure(rows)
    if not data.panels:
        return
    plt = _pyplot()
    band = any(p.divergent_xs for p in data.panels)
    n = len(data.panels)
    fig, axes = plt.subplots(1 + band, n, figsize=(4.2 * n, 3.6 + 0.5 * band), squeeze=False, sharex="col",
                             sharey="row", gridspec_kw={"height_ratios": [1, 7]} if band else None)
    for i, panel in enumerate(data.panels):
        ax = axes[-1][i]
        for x, y, phase in panel.points:
            ax.scatter([x], [y], color=PHASE_COLORS.get(phase, "gray"), marker="o", s=40)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set(xlabel="lr / (2 / lambda0)")
        if data.log_x:  # ticks at the cells: a log axis over less than a decade has no labels of its own
            ax.set_xscale("log")
            xs = sorted({x for x, _, _ in panel.points} | set(panel.divergent_xs))
            ax.set_xticks(xs, [f"{x:.3g}" for x in xs], rotation=45 if len(xs) > 4 else 0)
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
        if not data.classification and any(p.points for p in data.panels):
            ax.set_yscale("log")
        if band:
            top = axes[0][i]
            top.scatter(panel.divergent_xs, [0.5] * len(panel.divergent_xs), color=PHASE_COLORS["divergent"],
                        marker="x", s=40)
            top.axvline(1.0, color="k", lw=0.8, ls="--")
            top.set(ylim=(0, 1), yticks=[])
        axes[0][i].set_title(f"width {panel.width}")
    axes[-1][0].set_ylabel("final val accuracy" if data.classification else "peak loss / initial loss")
    if band:
        axes[0][0].set_ylabel("divergent", rotation=0, ha="right", va="center")
    handles = [plt.Line2D([], [], color=c, marker="x" if p == "divergent" else "o", ls="", label=p)
               for p, c in PHASE_COLORS.items()]
    axes[-1][-1].legend(handles=handles, loc="best")
    _finish(fig, axes[-1], title, path)
    plt.close(fig)


def plot_coord_check(results: dict, path, title: str = "") -> None:
    """results[parametrization][width][layer] = [mean |activation| at step 0, 1, ...]:
    one panel per (parametrization, step), activation scale against width. A row's panels
    share their y scale, so that a parametrization's growth over the steps reads at a glance."""
    plt = _pyplot()
    params = list(results)
    steps = len(next(iter(next(iter(results.values())).values()))[0])
    fig, axes = plt.subplots(len(params), steps, figsize=(3.4 * steps, 3.0 * len(params) + 0.4 * bool(title)),
                             squeeze=False, sharey="row")
    for i, pz in enumerate(params):
        widths = sorted(results[pz])
        layers = len(results[pz][widths[0]])
        for s in range(steps):
            ax = axes[i][s]
            for layer in range(layers):
                label = "output" if layer == layers - 1 else f"layer {layer + 1}"
                ax.plot(widths, [results[pz][w][layer][s] for w in widths], marker="o", label=label)
            ax.set(xscale="log", yscale="log", title=f"{pz}, step {s}", xlabel="width")
            shown = widths[::math.ceil(len(widths) / 6)]  # the widths themselves, at most 6 labelled
            ax.set_xticks(shown, [str(w) for w in shown], rotation=45 if len(shown) > 4 else 0)
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            if s == 0:
                ax.set_ylabel("mean |pre-activation|")
    axes[0][-1].legend(fontsize=7)
    _finish(fig, fig.axes, title, Path(path))
    plt.close(fig)


def plot_compare(runs: list[tuple[str, list[dict]]], metrics: list[str], path, title: str = "",
                 format: Optional[str] = None) -> None:
    """runs: (label, metrics records) each, drawn in the same color in every panel; one panel
    per metric over steps (log steps, as a run's curves). Accuracies on a linear 0-1 axis,
    positive metrics on a log axis. The legend goes below the panels: labels can be long."""
    plt = _pyplot()
    n = len(metrics)
    fig, axes = plt.subplots(1, n, figsize=(max(4.6 * n, 6.0), 3.6 + 0.25 * len(runs)), squeeze=False)
    for ax, key in zip(axes[0], metrics):
        values = []
        for i, (label, records) in enumerate(runs):
            s, v = _series(records, key)
            ax.plot(s, v, color=f"C{i}", label=label)
            values += v
        ax.set(xscale="symlog", xlabel="step", ylabel=METRIC_NAMES.get(key, key.replace("_", " ")))
        if key.endswith("_acc"):
            ax.set_ylim(-0.02, 1.02)
        elif values and min(values) > 0:
            ax.set_yscale("log")
    handles = [plt.Line2D([], [], color=f"C{i}", label=label) for i, (label, _) in enumerate(runs)]
    legend = fig.legend(handles=handles, loc="lower center", ncol=1 if len(runs) <= 4 else 2, fontsize=8,
                        frameon=False)
    _finish(fig, axes[0], title, path, legend=legend, format=format)
    plt.close(fig)


METRIC_NAMES = {"loss": "train loss", "train_acc": "train accuracy", "val_loss": "val loss",
                "val_acc": "val accuracy", "sharpness": "top Hessian eigenvalue"}


def plot_cyclic(metrics: list[dict], path, title: str = "") -> None:
    """A cyclic-lr run on a linear step axis (every cycle the same width): the loss above, its
    spikes; below, the sharpness against 2/lr, which steps down at each peak and up at each
    trough. Zhu et al.'s staircase: the sharpness falls below 2/lr after each spike."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.6), sharex=True)
    for key, label in (("loss", "train loss"), ("val_loss", "val loss")):
        s, v = _series(metrics, key)
        if any(x > 0 for x in v):
            top.plot(s, v, label=label, lw=1)
    top.set(yscale="log", ylabel="loss")
    top.legend()
    steps_lrs = [(s, lr) for s, lr in zip(*_series(metrics, "lr")) if lr > 0]
    bottom.step([s for s, _ in steps_lrs], [2.0 / lr for _, lr in steps_lrs], "k--", where="post", lw=1,
                label="2 / lr")
    bottom.plot(*_series(metrics, "sharpness"), ".", color="#dd8452", label="sharpness")
    bottom.set(yscale="log", xlabel="step", ylabel="top Hessian eigenvalue")
    bottom.legend()
    _finish(fig, fig.axes, title, Path(path))
    plt.close(fig)
