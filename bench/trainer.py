"""Trainer benchmark on a wide MLP, full batch:
1. overhead: catapult_kernels.train.fit against a hand-written loop with the same model,
   the same torch.optim optimizer and the same math (target: fit at most 5% slower);
2. end to end: fit with catapult_kernels' optimizers against torch's (clip + step).

    python -m bench.trainer [--device cpu|cuda] [--width 4096] [--depth 3] [--steps 100] [--repeats 5]

Each case is timed `--repeats` times in alternating order; the table shows medians.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import time

import torch

from bench.optim_step import device_name, sync
from catapult_kernels import optim
from catapult_kernels.train import fit, mse_loss
from catapult_kernels.train.models import MLP

LOG_EVERY = 10  # the trainer reads the loss and measures norms and accuracies once per 10 steps


def hand_loop(model, opt, x, y, steps, device, max_grad_norm=None) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        mse_loss(model(x), y).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
    sync(device)
    return steps / (time.perf_counter() - t0)


def trainer(model, opt, x, y, steps, device, max_grad_norm=None) -> float:
    sync(device)
    t0 = time.perf_counter()
    fit(model, opt, (x, y), loss="mse", steps=steps, log_every=LOG_EVERY, measure_lambda0=False,
        quiet=True, max_grad_norm=max_grad_norm)
    sync(device)
    return steps / (time.perf_counter() - t0)  # the whole call: the final record included


CLIP = 1.0
CASES = {  # name -> (runner, optimizer factory, max_grad_norm for the runner)
    "hand loop, torch SGD": (hand_loop, lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9), None),
    "fit, torch SGD": (trainer, lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9), None),
    "fit, torch AdamW + clip": (trainer, lambda ps: torch.optim.AdamW(ps, lr=1e-4), CLIP),
    "fit, catapult AdamW(max_grad_norm)": (trainer, lambda ps: optim.AdamW(ps, lr=1e-4, max_grad_norm=CLIP), None),
    "fit, torch SGD momentum + clip": (trainer, lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9), CLIP),
    "fit, catapult SGD momentum(max_grad_norm)":
        (trainer, lambda ps: optim.SGD(ps, lr=1e-3, momentum=0.9, max_grad_norm=CLIP), None),
}
PAIRS = [("overhead", "hand loop, torch SGD", "fit, torch SGD"),
         ("AdamW + clip", "fit, torch AdamW + clip", "fit, catapult AdamW(max_grad_norm)"),
         ("SGD momentum + clip", "fit, torch SGD momentum + clip", "fit, catapult SGD momentum(max_grad_norm)")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.examples, 64, generator=g).to(device)
    y = torch.randn(args.examples, 1, generator=g).to(device)
    torch.manual_seed(0)
    model0 = MLP(64, 1, args.depth, args.width, "relu", "ntk").to(device)
    n_params = sum(p.numel() for p in model0.parameters())

    def once(name):
        runner, make_opt, clip = CASES[name]
        model = copy.deepcopy(model0)
        opt = make_opt(model.parameters())
        runner(model, opt, x, y, 3, device, clip)  # warm up: allocations, optimizer state
        return runner(model, opt, x, y, args.steps, device, clip)

    runs = {name: [] for name in CASES}
    for rep in range(args.repeats):
        for name in (list(CASES) if rep % 2 == 0 else list(reversed(CASES))):
            runs[name].append(once(name))
    median = {name: statistics.median(v) for name, v in runs.items()}

    print(f"\n{device_name(device)}, torch {torch.__version__}; MLP depth {args.depth} width {args.width} "
          f"({n_params / 1e6:.1f}M params), {args.examples} examples, full batch, {args.steps} steps, "
          f"log every {LOG_EVERY}\n")
    print("| case | steps/s (median) |\n|---|---:|")
    for name in CASES:
        print(f"| {name} | {median[name]:.2f} |")
    summary = {}
    for label, base, ours in PAIRS:
        ratio = median[base] / median[ours]
        summary[label] = ratio
    print(f"\ntrainer overhead vs hand loop: {summary['overhead'] - 1:+.1%} (target: at most +5%)")
    for label in ("AdamW + clip", "SGD momentum + clip"):
        print(f"end to end, {label}: catapult {1 / summary[label]:.2f}x torch's steps/s")

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    path = os.path.join(args.out, f"trainer-{device.type}-{stamp}.json")
    with open(path, "x") as f:  # never overwrite an earlier result
        json.dump(dict(benchmark="trainer", device=device_name(device), torch=torch.__version__, date=stamp,
                       config=vars(args), n_params=n_params, log_every=LOG_EVERY, steps_per_s=runs,
                       median_steps_per_s=median, overhead=summary["overhead"] - 1,
                       catapult_over_torch={k: 1 / v for k, v in summary.items() if k != "overhead"}),
                  f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
