"""Figures: a run's curves, a sweep's phase diagram, the muP coordinate check.
matplotlib is imported here only, with the file-only Agg backend."""
from __future__ import annotations

import math
from pathlib import Path

PHASE_COLORS = {"lazy": "#4c72b0", "catapult": "#dd8452", "divergent": "#c44e52"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("figures need matplotlib (pip install matplotlib), or pass --no-plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(metrics: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in metrics if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_curves(metrics: list[dict], path, title: str = "") -> None:
    """Loss and accuracies over steps on log axes; sharpness beside 2/lr."""
    plt = _pyplot()
    has_acc = any("val_acc" in r or "train_acc" in r for r in metrics)
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
        for key, label in (("train_acc", "train"), ("val_acc", "val")):
            ax.plot(*_series(metrics, key), label=label)
        ax.set(xscale="symlog", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.legend()
    if has_sharp:
        ax = axes.pop(0)
        ax.plot(*_series(metrics, "sharpness"), marker=".", label="sharpness")
        steps_lrs = [(s, lr) for s, lr in zip(*_series(metrics, "lr")) if lr > 0]
        ax.plot([s for s, _ in steps_lrs], [2.0 / lr for _, lr in steps_lrs], "k--", label="2 / lr")
        ax.set(xscale="symlog", yscale="log", xlabel="step", ylabel="top Hessian eigenvalue")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: list[dict], path, title: str = "") -> None:
    """One panel per width, lr in units of 2/lambda0 (the lazy/catapult boundary is at 1),
    each cell colored by its phase. y: the final val accuracy (classification), else the
    peak loss over the initial loss, the catapult's spike (divergent runs drawn at the top)."""
    plt = _pyplot()
    widths = sorted({r["width"] for r in rows})
    classification = any(r.get("final_val_acc") is not None for r in rows)
    xs = [r["lr_times_lambda0"] / 2 for r in rows if r.get("lr_times_lambda0")]
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 3.6), squeeze=False, sharey=True)
    for ax, width in zip(axes[0], widths):
        cells = [r for r in rows if r["width"] == width and r.get("lr_times_lambda0")]
        spikes = [r["peak_loss"] / r["loss0"] for r in cells
                  if r["phase"] != "divergent" and r.get("peak_loss") and r.get("loss0")]
        top = max(spikes, default=1.0) * 3
        for r in cells:
            if classification:
                y = r.get("final_val_acc") if r["phase"] != "divergent" else 0.0
            else:
                y = top if r["phase"] == "divergent" else r["peak_loss"] / r["loss0"]
            ax.scatter([r["lr_times_lambda0"] / 2], [y], color=PHASE_COLORS.get(r["phase"], "gray"),
                       marker="x" if r["phase"] == "divergent" else "o", s=40)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set(xlabel="lr / (2 / lambda0)", title=f"width {width}")
        if xs and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        if not classification:
            ax.set_yscale("log")
    axes[0][0].set_ylabel("final val accuracy (divergent at 0)" if classification
                          else "peak loss / initial loss (divergent at the top)")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=p) for p, c in PHASE_COLORS.items()]
    axes[0][-1].legend(handles=handles, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coord_check(results: dict, path) -> None:
    """results[parametrization][width][layer] = [mean |activation| at step 0, 1, ...]:
    one panel per (parametrization, step), activation scale against width."""
    plt = _pyplot()
    params = list(results)
    steps = len(next(iter(next(iter(results.values())).values()))[0])
    fig, axes = plt.subplots(len(params), steps, figsize=(3.4 * steps, 3.0 * len(params)), squeeze=False)
    for i, pz in enumerate(params):
        widths = sorted(results[pz])
        layers = len(results[pz][widths[0]])
        for s in range(steps):
            ax = axes[i][s]
            for layer in range(layers):
                label = "output" if layer == layers - 1 else f"layer {layer + 1}"
                ax.plot(widths, [results[pz][w][layer][s] for w in widths], marker="o", label=label)
            ax.set(xscale="log", yscale="log", title=f"{pz}, step {s}", xlabel="width")
            if s == 0:
                ax.set_ylabel("mean |pre-activation|")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110)
    plt.close(fig)
