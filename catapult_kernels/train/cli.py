"""catapult-train: one run, a sweep (catapult-train sweep ...) or the muP coordinate check
(catapult-train coord-check ...). Every option of a run is also an option of the other two."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .. import __version__
from . import config as C
from .config import TrainConfig
from .config_file import add_config_option, format_config, parse_args
from .parallel import from_rank0, is_main_process, launched_by_torchrun, process_group, world_size
from .run_folder import FolderLock

DEFAULTS = TrainConfig()


def _add(parser, flag: str, help: str, *aliases: str, dest: Optional[str] = None, **kw) -> None:
    dest = dest or flag.lstrip("-").replace("-", "_")
    default = getattr(DEFAULTS, dest, None)
    shown = f" (default: {default})" if default is not None and not isinstance(default, bool) else ""
    parser.add_argument(flag, *aliases, dest=dest, default=argparse.SUPPRESS, help=help + shown, **kw)


def _choices(parser, flag: str, choices: tuple, help: str) -> None:
    # no argparse `choices`: the config's own check names every choice in one clear message
    _add(parser, flag, f"{help}: {' | '.join(choices)}", metavar="NAME")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    g = parser.add_argument_group("task")
    _choices(g, "--task", C.TASKS, "task")
    # --p, the config's name, stays; torchrun's own parser takes --p for one of its options
    _add(g, "--modulus", "modular: the prime modulus (--p is the same, except after torchrun)", "--p", dest="p",
         type=int)
    _choices(g, "--op", C.MODULAR_OPS, "modular: the operation")
    _add(g, "--train-frac", "modular: the fraction of all pairs used for training", type=float)
    _add(g, "--n-train", "teacher-student, digits, mnist1d: training examples (mnist1d: the first N of its 4000)",
         type=int)
    _add(g, "--n-val", "teacher-student: validation examples", type=int)
    _add(g, "--input-dim", "teacher-student: input dimension", type=int)
    _add(g, "--label-noise", "classification: the fraction F of training labels replaced by a random other class, "
         "fixed by the seed (validation labels stay clean)", type=float, metavar="F")
    g = parser.add_argument_group("model")
    _choices(g, "--model", C.MODELS, "model")
    _add(g, "--depth", "mlp: weight layers (2 = one hidden layer)", type=int)
    _add(g, "--width", "mlp: hidden units per layer", type=int)
    _choices(g, "--activation", C.ACTIVATIONS, "mlp activation")
    _choices(g, "--parametrization", C.PARAMETRIZATIONS, "mlp parametrization")
    _add(g, "--bias", "mlp: biases (--no-bias: none)", action=argparse.BooleanOptionalAction)
    _add(g, "--base-width", "muP: the width at which muP equals standard", type=int)
    _add(g, "--ntk-bias-scale", "NTK: the bias multiplier beta (Jacot et al.; beta^2 is the biases' "
         "share of the curvature)", type=float)
    _add(g, "--layers", "transformer: blocks", type=int)
    _add(g, "--d-model", "transformer: model width", type=int)
    _add(g, "--heads", "transformer: attention heads", type=int)
    _choices(g, "--transformer", C.TRANSFORMERS, "transformer: pre-ln (ours: [a, b, =], pre-LayerNorm) or power "
             "(the Grokfast paper's take on Power et al.'s decoder: [a, op, b, =], its residual wiring and init, "
             "a head over the whole vocabulary; mul skips b = 0)")
    g = parser.add_argument_group("optimization")
    _choices(g, "--optimizer", C.OPTIMIZERS, "optimizer (muon: Muon for the hidden matrices, in one optimizer "
             "with AdamW for the input and output layers, embeddings, biases and norms)")
    _choices(g, "--impl", C.IMPLS, "catapult_kernels.optim, or torch.optim's own (sgd, adam, adamw)")
    _add(g, "--lr", "a number, or K/lambda0 (K over the top Hessian eigenvalue at init)", metavar="LR")
    _add(g, "--weight-decay", "weight decay (decoupled for adamw, lion, lamb, muon: both its kinds of group)",
         type=float)
    _add(g, "--momentum", "sgd, lars, muon: momentum (default: 0 for sgd and lars, 0.95 for muon)", type=float)
    _add(g, "--nesterov", "sgd, lars, muon: Nesterov momentum (default: on for muon only)",
         action=argparse.BooleanOptionalAction)
    _choices(g, "--adjust-lr", C.ADJUST_LRS, "muon: the lr's shape scaling (torch.optim.Muon's adjust_lr_fn; "
             "default: original)")
    _add(g, "--beta1", "adam-like, and muon's AdamW groups: beta1 (default: the optimizer's; muon 0.9)", type=float)
    _add(g, "--beta2", "adam-like, and muon's AdamW groups: beta2 (default: the optimizer's; muon 0.95)", type=float)
    _add(g, "--beta3", "adan: beta3 (default: the optimizer's)", type=float)
    _add(g, "--eps", "adam-like, and muon's AdamW groups: epsilon (default: the optimizer's; muon 1e-8)",
         type=float)
    _add(g, "--max-grad-norm", "clip the global grad norm to this", type=float)
    _add(g, "--agc", "adaptive gradient clipping ratio (e.g. 0.01)", type=float)
    _choices(g, "--grokfast", C.GROKFAST, "gradient filter")
    _add(g, "--grokfast-alpha", "Grokfast EMA decay", type=float)
    _add(g, "--grokfast-lamb", "Grokfast amplification", type=float)
    _choices(g, "--state-dtype", C.STATE_DTYPES, "catapult's optimizers: how they store their state, Grokfast's EMA "
             "included (int8: codes in blocks of 128 with a float32 scale each, about 1 byte per element; "
             "default: the params' dtype)")
    _choices(g, "--schedule", C.SCHEDULES, "lr schedule after warmup")
    _add(g, "--warmup", "linear warmup steps", type=int)
    _add(g, "--decay-steps", "cosine: steps to the minimum (default: --steps)", type=int)
    _add(g, "--min-lr-ratio", "cosine: the final lr over the peak lr", type=float)
    _add(g, "--cycle-peak", "cyclic: the lr of each cycle's first half, in units of 2/lambda0 (or see --cycle-unit); "
         "cyclic sets the lr itself, so --lr is left out", type=float, metavar="K")
    _add(g, "--cycle-trough", "cyclic: the lr of each cycle's second half, in the same units", type=float, metavar="K")
    _add(g, "--cycle-period", "cyclic: steps per cycle (a square wave: the first ceil(N/2) at the peak)", type=int,
         metavar="N")
    _choices(g, "--cycle-unit", C.CYCLE_UNITS, "cyclic: the unit 2/lambda0, or 2/(the sharpness re-measured at "
             "each cycle's first step)")
    _choices(g, "--loss", C.LOSSES, "loss (mse: 0.5 * sum over outputs, mean over examples)")
    _add(g, "--batch-size", "minibatch size (default: full batch)", type=int)
    _add(g, "--grad-accum", "micro-batches per step: each batch split into K, one forward and backward each, "
         "the grads summed (the same step up to rounding, in 1/K of the activation memory)", type=int, metavar="K")
    _choices(g, "--amp", C.AMPS, "autocast of the forward pass, the loss in float32 (fp16: with a GradScaler, "
             "which catapult's optimizers take in their kernels); the sharpness stays float32")
    _choices(g, "--dtype", C.PARAM_DTYPES, "the params' dtype (bf16: rounded to nearest, the loss and metrics in "
             "float32 as under --amp)")
    _choices(g, "--master-weights", C.MASTER_WEIGHTS, "with --dtype bf16, catapult's optimizers: fp32 (a float32 "
             "copy, 4 bytes per param), ecc (an int8 correction: 16 significant bits, 1 byte) or stochastic "
             "(unbiased rounding seeded by --seed, 0 bytes); default: round to nearest")
    _add(g, "--steps", "optimizer steps", type=int)
    _add(g, "--seed", "seed of data, init and batch order", type=int)
    _add(g, "--device", "cpu, cuda, cuda:1, ... (with --parallel: cpu or cuda, one GPU per rank)")
    _choices(g, "--parallel", C.PARALLEL, "data parallel over the global batch, under torchrun --nproc-per-node N "
             "(ddp: a full replica per rank; fsdp: params sharded by FSDP2); metrics as one process would log")
    g = parser.add_argument_group("diagnostics and output")
    _add(g, "--log-every", "steps between metrics records", type=int)
    _add(g, "--sharpness-every", "steps between sharpness measurements (0: none)", type=int)
    _add(g, "--sharpness-iters", "Lanczos iterations (Hessian-vector products) per measurement", type=int)
    _add(g, "--sharpness-batch", "the fixed batch for sharpness and lambda0: the first N training examples",
         type=int)
    _add(g, "--grok-threshold", "val accuracy that counts as grokked", type=float)
    _choices(g, "--adv-eval", C.ADV_EVALS, "robust val accuracy at every log step under this L-inf attack on the "
             "inputs as the model sees them (digits, mnist1d standardized, modular one-hot; mlp only), maximizing --loss; "
             "an example counts when it is right both clean and attacked")
    _add(g, "--adv-eps", "the attack's L-inf radius (modular: < 0.5, so every input still reads as its operands)",
         type=float)
    _add(g, "--adv-steps", "pgd: steps, from the clean input (no random start)", type=int)
    _add(g, "--adv-step-size", "pgd: the signed step (default: 2.5 * eps / steps)", type=float)
    _add(g, "--checkpoint-every", "steps between checkpoints (0: at the end and on Ctrl-C)", type=int)
    _add(g, "--plots", "write figures (--no-plots: none)", action=argparse.BooleanOptionalAction)
    _add(g, "--tensorboard", "also write the metrics and figures as TensorBoard events in <out>/tensorboard "
         "(needs the tensorboard package)", action=argparse.BooleanOptionalAction)


def add_run_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", help=f"the {what} folder (default: a new folder under runs/)")
    parser.add_argument("--resume", action="store_true", help=f"continue the {what} in --out")
    parser.add_argument("--overwrite", action="store_true", help=f"replace the {what} in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _overrides(ns: argparse.Namespace) -> dict:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(ns).items() if k in fields}


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--version", action="version", version=f"catapult-train {__version__}")
    return p


def check_out(out: Path) -> None:
    """--out is a folder this process can write in, or can be made in one: checked before any
    work, with nothing left behind (the probe is an unnamed temporary file)."""
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        folder = out
        while not folder.exists():  # the nearest existing folder: the output is made in it
            folder = folder.parent
        if not folder.is_dir():
            raise ValueError(f"--out {out}: {folder} is a file, not a folder")
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def check_device(device: str) -> None:
    """--device names a device this machine has: checked before any work."""
    import torch
    try:
        kind = torch.device(device)
    except RuntimeError:
        kind = None
    if kind is None or kind.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N")
    if kind.type == "cuda":
        visible = torch.cuda.device_count()
        if visible == 0:
            raise ValueError(f"--device {device}: no CUDA device is visible")
        if kind.index is not None and kind.index >= visible:
            raise ValueError(f"--device {device}: {visible} CUDA device(s) visible, cuda:0 to cuda:{visible - 1}")


def _check_resume_or_overwrite(ns: argparse.Namespace) -> None:
    if ns.resume and ns.overwrite:
        raise ValueError("--resume continues what is in --out and --overwrite replaces it: pass one of them")


def _check_one_process(overrides: dict, command: str) -> None:
    if overrides.get("parallel", "none") != "none" or launched_by_torchrun():
        raise ValueError(f"{command} runs in one process: --parallel and torchrun apply to a single run "
                         "(torchrun --nproc-per-node N -m catapult_kernels.train ... --parallel ddp)")


def _remove_if_empty(folder: Path) -> None:
    """Take back a folder this command made, if the command failed before writing in it (bad
    input found late), so that it leaves nothing behind."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def _run_device(ns: argparse.Namespace, overrides: dict) -> str:
    """The device the run will be on, as far as the process group must know before the config
    is read (on rank 0): --device, else a resumed run's config.json says it (a peek that
    changes nothing; the config itself is checked later), else the default."""
    if "device" in overrides:
        return overrides["device"]
    if ns.resume:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return str(json.loads((Path(ns.out) / "config.json").read_text()).get("device", DEFAULTS.device))
    return DEFAULTS.device


def main_train(argv: list[str]) -> int:
    from .experiment import default_out, describe, resolve_resume, run
    from .loop import StopSignals
    p = _parser("catapult-train", "Train one run; writes config.json, metrics.jsonl, summary.json, "
                "curves.png and checkpoint.pt to --out. Subcommands: sweep, coord-check, double-descent, probe, "
                "compare. Under torchrun --nproc-per-node N with --parallel ddp or fsdp, one run on N processes; "
                "rank 0 writes --out.")
    add_train_options(p)
    add_run_options(p, "run")
    ns = parse_args(p, argv)
    overrides = _overrides(ns)
    if overrides.get("schedule") == "cyclic":  # the cycle's levels are in units of 2/lambda0: the base lr
        overrides.setdefault("lr", "2/lambda0")
    _check_resume_or_overwrite(ns)
    if ns.resume and ns.out is None:
        raise ValueError("--resume needs --out (the run to continue)")
    # under torchrun the group comes first: rank 0 alone reads and makes folders (it broadcasts what it finds)
    with process_group(launched_by_torchrun(), "torchrun", _run_device(ns, overrides)):
        if ns.resume:
            cfg = from_rank0(lambda: resolve_resume(ns.out, overrides))
        else:
            cfg = TrainConfig(**overrides).validate()
        if cfg.parallel == "none" and world_size() > 1:
            raise ValueError(f"torchrun started {world_size()} processes, but --parallel is none: each would train "
                             "the whole run into one folder; pass --parallel ddp or --parallel fsdp")
        # made now, atomically: no other run picks it
        out = Path(ns.out) if ns.out else from_rank0(lambda: default_out(cfg))
        try:
            from_rank0(lambda: check_out(out))
            check_device(cfg.device)
            with StopSignals() as signals:  # Ctrl-C or SIGTERM, even during setup: checkpoint at a step boundary
                summary = run(cfg, out, resume=ns.resume, overwrite=ns.overwrite, quiet=ns.quiet)
        except BaseException:
            if ns.out is None and is_main_process():
                _remove_if_empty(out)
            raise
    if not is_main_process():
        return 128 + (signals.signum or signal.SIGINT) if summary["status"] == "interrupted" else 0
    print(f"{out}: {summary['status']}\n{describe(summary)}")
    if summary["status"] == "interrupted":
        print(f"catapult-train: interrupted at step {summary['steps']}; continue with: "
              f"catapult-train --resume --out {out}", file=sys.stderr)
        return 128 + (signals.signum or signal.SIGINT)
    return 0


def main_sweep(argv: list[str]) -> int:
    from .loop import StopSignals
    from .plots import sweep_figure
    from .sweep import format_table, sweep
    from .sweep_jobs import CellsFailed
    p = _parser("catapult-train sweep", "Run a grid of widths x learning rates x seeds; writes one "
                "run folder per cell, sweep.csv and sweep.png.")
    p.add_argument("--widths", type=int, nargs="+", help="required, here or in --config")
    p.add_argument("--lrs", nargs="+", help="numbers or K/lambda0, e.g. 0.5/lambda0 3/lambda0 (required, here "
                   "or in --config)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="cells run at once, each in its own process "
                   "with 1/N of this one's torch threads (default: 1, in this process; a cell that fails with N > 1 "
                   "does not stop the others)")
    add_train_options(p)
    add_run_options(p, "sweep")
    ns = parse_args(p, argv, {"widths": list[int], "lrs": list[str], "seeds": list[int]})
    for name in ("widths", "lrs"):
        if getattr(ns, name) is None:
            raise ValueError(f"sweep needs --{name}, on the command line or in --config")
    overrides = _overrides(ns)
    _check_resume_or_overwrite(ns)
    _check_one_process(overrides, "sweep")
    for name in ("width", "lr", "seed"):  # the grid sets these: a single value would be ignored
        if name in overrides:
            raise ValueError(f"sweep takes --{name}s (one cell per value), not --{name}")
    base = TrainConfig(**overrides)
    out = Path(ns.out) if ns.out else Path("runs") / f"sweep-{base.task}-{base.model}"
    check_out(out)
    check_device(base.device)
    if not ns.quiet:
        grid = {"widths": ns.widths, "lrs": ns.lrs, "seeds": ns.seeds}
        print(format_config({**grid, **{k: v for k, v in base.to_dict().items() if k not in ("width", "lr", "seed")}},
                            "sweep config"))
    made, failed = not out.exists(), None
    try:
        with FolderLock(out), StopSignals() as signals:  # one sweep at a time in a folder
            rows = sweep(base, ns.widths, ns.lrs, ns.seeds, out, resume=ns.resume, overwrite=ns.overwrite,
                         quiet=ns.quiet, jobs=ns.jobs)
    except CellsFailed as e:  # the other cells are done: their table first, then the failures
        rows, failed = e.rows, e
    except BaseException:
        if made:
            _remove_if_empty(out)
        raise
    if rows:
        print(format_table(rows))
        drawn = base.plots and sweep_figure(rows).panels
        print(f"wrote {out / 'sweep.csv'}" + (f" and {out / 'sweep.png'}" if drawn else ""))
    if failed is not None:
        print(f"catapult-train: error: {failed}", file=sys.stderr)
        return 1
    cells = len(ns.widths) * len(ns.lrs) * len(ns.seeds)
    if len(rows) < cells:
        print(f"catapult-train: sweep interrupted after {len(rows)} of {cells} cells; finish it with "
              "the same command and --resume", file=sys.stderr)
        return 128 + (signals.signum or signal.SIGINT)
    return 0


def main_coord_check(argv: list[str]) -> int:
    from .coord_check import coord_check, format_growth
    p = _parser("catapult-train coord-check", "The muP coordinate check: mean |pre-activation| per layer "
                "over the first steps, across widths, for the standard parametrization and muP.")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--check-steps", type=int, default=3, help="steps recorded")
    add_train_options(p)
    p.add_argument("--out", help="folder for coord_check.json and coord_check.png")
    p.add_argument("--overwrite", action="store_true")
    ns = parse_args(p, argv, {"widths": list[int], "check_steps": int})
    overrides = _overrides(ns)
    _check_one_process(overrides, "coord-check")
    for name, why in (("width", "--widths"), ("parametrization", "both standard and mup, side by side")):
        if name in overrides:  # the check sets these itself: a value given here would be ignored
            raise ValueError(f"coord-check takes {why}, not --{name}")
    base = TrainConfig(**{"depth": 3, **overrides})
    out = Path(ns.out) if ns.out else Path("runs") / "coord-check"
    check_out(out)
    check_device(base.device)
    target = out / "coord_check.json"
    if target.exists() and not ns.overwrite:
        raise ValueError(f"{target} exists; pass --overwrite to replace it")
    results = coord_check(base, ns.widths, steps=ns.check_steps)
    out.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"config": base.to_dict(), "results": results}, indent=1) + "\n")
    if base.plots:
        from .config_words import config_title
        from .plots import plot_coord_check
        plot_coord_check(results, out / "coord_check.png",
                         title=config_title(base.to_dict(), omit=("width", "parametrization", "steps")))
    print(format_growth(results))
    print(f"wrote {target}" + (f" and {out / 'coord_check.png'}" if base.plots else ""))
    return 0


def main_compare(argv: list[str]) -> int:
    from .compare import DEFAULT_FIGURE, DEFAULT_METRICS, compare
    p = _parser("catapult-train compare", "Overlay the curves (metrics.jsonl) of several runs in one figure, "
                "one panel per metric, each run labelled by the options in which it differs from the others.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (two or more)")
    p.add_argument("--out", help=f"the figure (.png, .pdf, .svg; default: {DEFAULT_FIGURE} in the current folder)")
    p.add_argument("--metrics", nargs="+", metavar="NAME", help="metrics.jsonl keys (train_loss is loss; default: "
                   f"those of {', '.join(DEFAULT_METRICS)} that every run logged)")
    p.add_argument("--overwrite", action="store_true", help="replace the figure if it exists")
    ns = p.parse_args(argv)
    out, labels = compare(ns.runs, ns.out, ns.metrics, overwrite=ns.overwrite)
    for run, label in zip(ns.runs, labels):
        print(f"  {run}: {label}")
    print(f"wrote {out}")
    return 0


def main_double_descent(argv: list[str]) -> int:
    from .double_descent import main
    return main(argv)


def main_probe(argv: list[str]) -> int:
    from .probe import main
    return main(argv)


COMMANDS = {"sweep": main_sweep, "coord-check": main_coord_check, "compare": main_compare,
            "double-descent": main_double_descent, "probe": main_probe}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else main_train(argv)
    except ValueError as e:  # bad input: one clear line, no traceback (under torchrun, rank 0's)
        if is_main_process():
            print(f"catapult-train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk, not the input (e.g. a full disk): one clear line too
        if is_main_process():
            print(f"catapult-train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM while stopping, or Ctrl-C outside a run
        print("catapult-train: stopped at once; a run continues from its last checkpoint with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
