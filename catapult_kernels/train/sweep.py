"""A grid of runs: widths x learning rates (numbers or K/lambda0) x seeds. One run folder
per cell, then one table (sweep.csv, printed) and one figure (sweep.png). Ctrl-C or SIGTERM
stops the sweep once the cell in progress has checkpointed; sweep.csv then holds the cells
done, and resume=True finishes the rest. jobs=N runs the cells in N processes (sweep_jobs)."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import re
from pathlib import Path

from .config import LearningRate, TrainConfig
from .experiment import continuation, run
from .loop import StopSignals
from .sweep_jobs import CellsFailed, check_jobs, run_cells

COLUMNS = ("width", "lr_spec", "seed", "lambda0", "lr", "lr_times_lambda0", "lr_over_2_over_lambda0",
           "phase", "loss0", "peak_loss", "final_step", "final_loss", "sharpness_final", "sharpness_final_step",
           "two_over_lr", "final_train_acc", "final_val_acc", "final_val_loss", "memorize_step", "grok_step",
           "steps_per_s", "wall_s",
           # label noise (None without it): after today's columns, so that scripts reading them keep working
           "final_noisy_train_acc", "final_clean_train_acc", "noisy_memorize_step", "clean_memorize_step",
           "final_robust_val_acc")  # --adv-eval (None without it)


def cell_name(width: int, lr: str, seed: int) -> str:
    return f"w{width}-lr{re.sub(r'[^0-9A-Za-z.]+', '_', lr)}-s{seed}"


def sweep(base: TrainConfig, widths: list[int], lrs: list[str], seeds: list[int], out, *,
          resume: bool = False, overwrite: bool = False, quiet: bool = False, jobs: int = 1) -> list[dict]:
    """The rows of the cells done: all of them, unless a signal stopped the sweep. jobs > 1:
    the cells in that many processes (sweep_jobs), the same rows; a cell that fails there
    does not stop the others, and CellsFailed follows the table and figure of the rest."""
    check_grid(widths, lrs, seeds)
    check_jobs(jobs)
    cells = [dataclasses.replace(base, width=w, lr=lr, seed=s).validate()
             for w in widths for lr in lrs for s in seeds]
    out = Path(out)
    if (out / "sweep.csv").exists() and not (resume or overwrite):
        raise ValueError(f"{out} already holds a sweep (sweep.csv); pass --resume to finish it "
                         "or --overwrite to replace it")
    if resume:
        check_cells_begun(cells, out)
    out.mkdir(parents=True, exist_ok=True)
    folders = [out / cell_name(cfg.width, cfg.lr, cfg.seed) for cfg in cells]
    done, failures = {}, []  # done: cell index -> summary (with jobs > 1 the cells end in any order)
    rows = lambda: [row_of(cells[i], done[i]) for i in sorted(done)]  # noqa: E731
    with StopSignals() as signals:  # shared with the run in progress: one signal stops both
        try:
            reused = [reused_summary(cfg, folder, resume) for cfg, folder in zip(cells, folders)]
            if jobs > 1:
                done.update((i, summary) for i, summary in enumerate(reused) if summary is not None)
                todo = [i for i, summary in enumerate(reused) if summary is None]
                if todo:
                    failures = run_cells(cells, folders, todo, jobs, signals, done, resume=resume,
                                         overwrite=overwrite, quiet=quiet)
            else:
                for i, (cfg, folder, summary) in enumerate(zip(cells, folders, reused)):
                    if signals.requested:
                        break
                    if summary is None:
                        if not quiet:
                            print(f"[{i + 1}/{len(cells)}] width {cfg.width}, lr {cfg.lr}, seed {cfg.seed}",
                                  flush=True)
                        summary = run_cell(cfg, folder, resume=resume, overwrite=overwrite)
                        if summary["status"] == "interrupted":  # checkpointed: resume=True continues it
                            break
                    done[i] = summary
        except KeyboardInterrupt:  # a second signal stopped it at once: the cells done are kept
            if done:
                write_csv(rows(), out / "sweep.csv")
            raise
        # not after an error, nor with no cell done: a sweep.csv without rows would refuse the rerun
        if done:
            write_csv(rows(), out / "sweep.csv")
    if base.plots and done:
        from .config_words import config_title
        from .plots import plot_sweep
        plot_sweep(rows(), out / "sweep.png", title=config_title(base.to_dict(), omit=("width", "lr", "seed")))
    if failures:
        raise CellsFailed(rows(), failures)
    return rows()


def reused_summary(cfg: TrainConfig, folder: Path, resume: bool):
    """The summary of a cell that resume=True takes as done; None for a cell to run."""
    finished = folder / "summary.json"
    summary = json.loads(finished.read_text()) if resume and finished.exists() else None
    return None if summary is None or unfinished(summary, cfg) else summary


def run_cell(cfg: TrainConfig, folder: Path, *, resume: bool, overwrite: bool) -> dict:
    """Runs a cell: continued from its checkpoint where resume=True finds one, else anew."""
    cell_resume = resume and (folder / "checkpoint.pt").exists()
    return run(cfg, folder, resume=cell_resume, overwrite=overwrite or (resume and not cell_resume), quiet=True)


def unfinished(summary: dict, cfg: TrainConfig) -> bool:
    """Whether resume=True continues a cell: it was stopped, or it finished before the
    sweep's --steps (a resumed sweep with more steps extends its cells, as a resumed run
    does). A divergent cell is done."""
    status = summary.get("status")
    return status == "interrupted" or (status == "finished" and summary.get("steps", cfg.steps) < cfg.steps)


def check_grid(widths: list[int], lrs: list[str], seeds: list[int]) -> None:
    """Every bad value of the grid, named by its sweep option, before the first run starts."""
    for name, values in (("--widths", widths), ("--lrs", lrs), ("--seeds", seeds)):
        if not values:
            raise ValueError(f"{name} needs at least one value")
    for name, values, least in (("--widths", widths, 1), ("--seeds", seeds, 0)):
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < least]
        if bad:
            raise ValueError(f"{name} takes integers >= {least}, got {bad[0]!r}")
    for lr in lrs:
        try:
            LearningRate.parse(lr)
        except ValueError:
            raise ValueError(f"--lrs {lr!r}: expected a number > 0 (3e-3) or K/lambda0 with K > 0 "
                             "(2.5/lambda0)") from None


def check_cells_begun(cells: list[TrainConfig], out: Path) -> None:
    """Every cell that resume=True reuses (it has a summary) or continues (a checkpoint) does
    so only as it began: an option that would change what it computed is refused, by name,
    before any cell runs. (run() checks a continued cell again, against its checkpoint.)"""
    for cfg in cells:
        folder = out / cell_name(cfg.width, cfg.lr, cfg.seed)
        if (folder / "summary.json").exists() or (folder / "checkpoint.pt").exists():
            stored = folder / "config.json"
            continuation(cfg, json.loads(stored.read_text()) if stored.exists() else None, stored)


def row_of(cfg: TrainConfig, summary: dict) -> dict:
    row = {"width": cfg.width, "lr_spec": cfg.lr, "seed": cfg.seed}
    row.update({k: summary.get(k) for k in COLUMNS if k not in row})
    c = summary.get("lr_times_lambda0")
    row["lr_over_2_over_lambda0"] = c / 2 if c is not None else None
    return row


def write_csv(rows: list[dict], path) -> None:
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        tmp.replace(path)
    except BaseException:  # a failed write, or a second Ctrl-C or SIGTERM during it: no file left beside
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


TABLE = (("width", "width"), ("lr_spec", "lr"), ("seed", "seed"), ("lambda0", "lambda0"), ("lr", "lr value"),
         ("lr_over_2_over_lambda0", "lr/(2/l0)"), ("phase", "phase"), ("peak_loss", "peak loss"),
         ("final_loss", "final loss"), ("sharpness_final", "sharpness"), ("two_over_lr", "2/lr"),
         ("final_val_acc", "val acc"), ("final_val_loss", "val loss"), ("grok_step", "grok step"))
TABLE_WHEN_MEASURED = (("final_noisy_train_acc", "noisy mem"), ("final_clean_train_acc", "clean train acc"),
                       ("final_robust_val_acc", "robust acc"))  # --label-noise, --adv-eval: shown where a row has them


def format_table(rows: list[dict]) -> str:
    shown = TABLE + tuple((c, head) for c, head in TABLE_WHEN_MEASURED if any(r.get(c) is not None for r in rows))
    cols, heads = zip(*shown)
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    table = [heads] + [tuple(fmt(r.get(c)) for c in cols) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(heads))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table)
