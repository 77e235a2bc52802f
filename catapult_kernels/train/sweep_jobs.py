"""A sweep's cells in N worker processes (sweep --jobs N). Each cell is deterministic given its
config, so the rows are those of one process, whatever the order the cells finish in.

Workers are spawned (a fresh interpreter: no copy of the parent's threads or locks) and each
runs torch with torch.get_num_threads() // N threads of the parent's count at the start (at
least 1; OMP_NUM_THREADS sets that count), so N workers share the cores the sweep had.

Signals: Ctrl-C reaches every process of the terminal's group, so workers ignore SIGINT and
the parent alone decides. Its first stop request stops every worker at its cell's next step
boundary, with a checkpoint (as a run's Ctrl-C does), and no new cell starts; a second stops
them at once. The parent relays each request through an event that a thread in every worker
turns into a SIGTERM to its own process, which the run's StopSignals handles. A SIGTERM sent
to a worker directly (a job scheduler's) does the same for that worker.

A cell that fails (an error in its run, a worker killed) does not stop the others: it is
reported at once and listed at the end (CellsFailed), after the table and figure of the rest."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from .config import TrainConfig
from .loop import StopSignals

_stop: Optional[StopSignals] = None  # a worker's, for its whole life


class CellsFailed(Exception):
    """Cells that failed in a sweep run with jobs > 1; rows: those of the cells done."""

    def __init__(self, rows: list[dict], failures: list[tuple[str, str]]):
        self.rows, self.failures = rows, failures
        listed = "; ".join(f"{name}: {error}" for name, error in failures)
        super().__init__(f"{len(failures)} cell(s) failed ({listed}); the others are in sweep.csv: fix the cause "
                         "and finish the sweep with --resume")


def check_jobs(jobs) -> None:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs takes an integer >= 1 (processes), got {jobs!r}")


def threads_per_job(jobs: int) -> int:
    import torch
    return max(1, torch.get_num_threads() // jobs)


def _start_worker(threads: int, stops: tuple) -> None:
    global _stop
    import torch
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's to handle (StopSignals leaves an ignored one be)
    _stop = StopSignals().__enter__()  # SIGTERM: stop at the next step boundary; a second, at once
    threading.Thread(target=_relay, args=(stops,), daemon=True).start()


def _relay(stops: tuple) -> None:
    """Each stop request of the parent as a SIGTERM to this worker, in order."""
    for stop in stops:
        stop.wait()
        os.kill(os.getpid(), signal.SIGTERM)


def _run_in_worker(cfg: TrainConfig, folder: Path, resume: bool, overwrite: bool, progress: str):
    """The cell's summary; None if a stop came before it began."""
    from .sweep import run_cell
    if _stop.requested:
        return None
    if progress:
        print(progress, flush=True)
    return run_cell(cfg, folder, resume=resume, overwrite=overwrite)


def run_cells(cells: list[TrainConfig], folders: list[Path], todo: list[int], jobs: int, signals: StopSignals,
              done: dict, *, resume: bool, overwrite: bool, quiet: bool) -> list[tuple[str, str]]:
    """Runs the cells numbered `todo` in `jobs` processes; done[i] = cells[i]'s summary for each
    that ends (finished or divergent). Returns the failures: (folder name, error). Stops as
    the module says when `signals` asks."""
    context = multiprocessing.get_context("spawn")
    stops = (context.Event(), context.Event())
    failures = []
    pool = cf.ProcessPoolExecutor(min(jobs, len(todo)), mp_context=context, initializer=_start_worker,
                                  initargs=(threads_per_job(jobs), stops))
    try:
        futures = {pool.submit(_run_in_worker, cells[i], folders[i], resume, overwrite,
                               "" if quiet else f"[{i + 1}/{len(cells)}] width {cells[i].width}, lr {cells[i].lr}, "
                                                f"seed {cells[i].seed}"): i for i in todo}
        pending = set(futures)
        while pending:
            finished, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            if signals.requested and not stops[0].is_set():
                stops[0].set()
                for f in pending:  # those no worker took yet; the others stop at a step boundary
                    f.cancel()
            for f in finished:
                i = futures[f]
                if f.cancelled():
                    continue
                error = f.exception()
                if error is None:
                    summary = f.result()
                    if summary is not None and summary["status"] != "interrupted":
                        done[i] = summary
                elif not (stops[0].is_set() and isinstance(error, (KeyboardInterrupt, cf.BrokenExecutor))):
                    first_line = (str(error).splitlines() or [""])[0]
                    failures.append((folders[i].name, f"{type(error).__name__}: {first_line}"))
                    print(f"catapult-train: cell {folders[i].name} failed: {failures[-1][1]}", file=sys.stderr,
                          flush=True)
    except KeyboardInterrupt:  # a second request: the workers stop at once, what they finished is kept
        for stop in stops:
            stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failures
