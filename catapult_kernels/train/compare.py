"""catapult-train compare: the curves (metrics.jsonl) of several run folders overlaid in one
figure, one panel per metric, each run labelled by the options in which it differs from the
others (config_words.run_labels). Reads the folders without locking them, so a run still
training can be compared (its cut last record left out). Writes one figure and nothing else,
never over an existing file unless asked."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config_words import config_title, differing_options, run_labels

DEFAULT_FIGURE = Path("compare.png")  # in the current folder
DEFAULT_METRICS = ("loss", "val_loss", "train_acc", "val_acc", "sharpness")  # those all the runs logged
METRIC_ALIASES = {"train_loss": "loss"}  # metrics.jsonl calls the train loss "loss"
FORMATS = ("png", "pdf", "svg")


@dataclass
class ComparedRun:
    folder: Path
    config: dict
    records: list

    @property
    def metrics(self) -> set:
        """What the run logged: the numeric keys of its records."""
        return {k for r in self.records for k, v in r.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_run(folder) -> ComparedRun:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist")
    config_file, metrics_file = folder / "config.json", folder / "metrics.jsonl"
    missing = [f.name for f in (config_file, metrics_file) if not f.is_file()]
    if missing:
        raise ValueError(f"{folder} is not a run folder: it has no {' and no '.join(missing)}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise ValueError(f"{config_file} is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds no run config")
    lines = metrics_file.read_text(errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif number < len(lines):  # the last piece may be a record being written: left out
            raise ValueError(f"{metrics_file} line {number} is not a metrics record: {line[:60]!r}")
    if not records:
        raise ValueError(f"{metrics_file} holds no records yet")
    return ComparedRun(folder, config, records)


def chosen_metrics(runs: list[ComparedRun], requested: Optional[list[str]]) -> list[str]:
    """The requested metrics (each logged by at least one run; a run without it is left out of
    its panel), or else those of DEFAULT_METRICS that every run logged."""
    logged = [r.metrics for r in runs]
    if requested:
        names = list(dict.fromkeys(METRIC_ALIASES.get(m, m) for m in requested))
        for name in names:
            if not any(name in m for m in logged):
                every = sorted(set().union(*logged))
                raise ValueError(f"--metrics {name}: no run logged it; they logged: {', '.join(every)}")
        return names
    common = set.intersection(*logged)
    names = [m for m in DEFAULT_METRICS if m in common]
    if not names:
        raise ValueError("the runs have no metric in common to compare ("
                         + "; ".join(f"{r.folder}: {', '.join(sorted(r.metrics & set(DEFAULT_METRICS))) or 'none'}"
                                     for r in runs) + "); name some with --metrics")
    return names


def check_figure_path(out: Path, overwrite: bool) -> str:
    """The figure's format, from its suffix; refused, before any work, where it would replace
    a file without overwrite, or cannot be a file."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the figure file (e.g. {out / DEFAULT_FIGURE})")
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"--out {out}: the figure's name must end in {', '.join('.' + f for f in FORMATS)}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it, or --out another file")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    return fmt


def compare(folders: list, out=None, metrics: Optional[list[str]] = None, overwrite: bool = False) -> tuple:
    """Draws the runs in `folders` into `out` (default DEFAULT_FIGURE); returns (the figure's
    path, the labels of the runs). Every check comes before the figure is written."""
    from .plots import plot_compare
    out = Path(out) if out is not None else DEFAULT_FIGURE
    fmt = check_figure_path(out, overwrite)
    if len(folders) < 2:
        raise ValueError("compare needs at least two run folders")
    resolved = [Path(f).resolve() for f in folders]
    twice = next((f for i, f in enumerate(folders) if resolved[i] in resolved[:i]), None)
    if twice is not None:
        raise ValueError(f"{twice} is given twice")
    runs = [read_run(f) for f in folders]
    names = chosen_metrics(runs, metrics)
    configs = [r.config for r in runs]
    labels = run_labels(configs)
    if len(set(labels)) < len(labels):  # runs alike in every option (a rerun): told apart by folder
        labels = [f"{r.folder.name}" + (f": {label}" if label else "") for r, label in zip(runs, labels)]
    title = config_title(configs[0], omit=differing_options(configs)) or ""
    figure = io.BytesIO()  # drawn whole first: a failed drawing leaves no file behind
    plot_compare([(label, r.records) for label, r in zip(labels, runs)], names, figure, title=title, format=fmt)
    with open(out, "wb" if overwrite else "xb") as f:  # "xb": a file made meanwhile is never replaced
        f.write(figure.getbuffer())
    return out, labels
