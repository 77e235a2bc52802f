"""Which int8 map for which Adam state: the measurement behind int8_blocks' SQRT (first
moments) and FOURTH_ROOT (second moments), with LINEAR (p = 1, plain absmax int8) as the
baseline. Every map is the same 128-element blockwise absmax code, c = rint(127 u^p) with
u = |x| / amax; only p differs. On CPU, a few minutes on one thread.

    OMP_NUM_THREADS=1 python -m bench.int8_maps [--steps 600] [--seeds 5] [--width 256]
        [--snapshots 1,10,100,600] [--out bench/results]

Task: sklearn's digits (catapult_kernels.train.tasks.digits, 1500 training images, the
split fixed), an MLP 64 -> width -> width -> 10 (the trainer's), cross entropy, minibatches
of 128, AdamW lr 3e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.

(a) Real moments: torch.optim.AdamW trains seed 0; at each snapshot step each map encodes
and decodes exp_avg (m) and exp_avg_sq (v) once. Reported, over all params together: the
relative error ||q(x) - x|| / ||x|| of the state; of Adam's update direction
m_hat / (sqrt(v_hat) + eps) with only that state quantized (and with both, per map pair);
the fraction of elements whose v decodes to 0 while m does not (where the step becomes
m / eps); the largest |update| (float32's stays of order 1).

(b) Training through the codec: a pure-PyTorch AdamW (torch.optim.AdamW's math) whose m
and v are decoded, updated in float32, used for the step and encoded again every step, as
the int8 kernels do, for the map pairs (m, v) below and for float32 states; per seed the
final loss over the whole training set, its ratio to the float32 run's, the validation
accuracy, and the step whose minibatch loss was first NaN or inf (the run stops there).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch

from bench.optim_step import device_name
from catapult_kernels import int8_blocks
from catapult_kernels.train.models import MLP
from catapult_kernels.train.tasks import digits

HYPER = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
BATCH = 128
N_TRAIN = 1500
MAPS = ("linear", "sqrt", "fourth_root")
PAIRS = (("linear", "linear"), ("sqrt", "sqrt"), ("sqrt", "fourth_root"), ("fourth_root", "fourth_root"))


def linear_round_trip(x: torch.Tensor) -> torch.Tensor:
    """The p = 1 code on int8_blocks' blocks: c = rint(127 |x| / amax) with x's sign."""
    flat = x.reshape(-1)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, int8_blocks.num_blocks(n) * int8_blocks.BLOCK - n))
    blocks = blocks.view(-1, int8_blocks.BLOCK)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    codes = torch.round(blocks / amax * 127.0)
    return (codes / 127.0 * amax).view(-1)[:n].view_as(x)


def round_trip(x: torch.Tensor, map_name: str) -> torch.Tensor:
    """x as a state stored with the map: encoded and decoded once."""
    if map_name == "fp32":
        return x
    if map_name == "linear":
        return linear_round_trip(x)
    map = {"sqrt": int8_blocks.SQRT, "fourth_root": int8_blocks.FOURTH_ROOT}[map_name]
    return int8_blocks.decode(*int8_blocks.encode(x, map), map)


def make_model(seed: int, width: int) -> MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(64, 10, depth=3, width=width)


def batch_order(seed: int, steps: int) -> list[torch.Tensor]:
    """Each step's example indices: shuffled epochs, the same for every storage of a seed."""
    gen = torch.Generator().manual_seed(1000 + seed)
    order = torch.cat([torch.randperm(N_TRAIN, generator=gen) for _ in range(steps * BATCH // N_TRAIN + 1)])
    return list(order[:steps * BATCH].view(steps, BATCH))


def loss_and_backward(model, data, idx) -> float:
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
    loss.backward()
    return loss.item()


class StoredAdamW:
    """torch.optim.AdamW's single-tensor math with m and v kept as `map_m` / `map_v` codes:
    each step decodes them, updates them in float32, steps with the float32 values and
    stores them encoded again (what one pass of the int8 kernels does)."""

    def __init__(self, params, map_m: str, map_v: str):
        self.params = list(params)
        self.map_m, self.map_v = map_m, map_v
        self.m = [torch.zeros_like(p) for p in self.params]  # kept decoded: round_trip is the storage
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        lr, (beta1, beta2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
        self.t += 1
        bias1, bias2_sqrt = 1 - beta1 ** self.t, math.sqrt(1 - beta2 ** self.t)
        for i, p in enumerate(self.params):
            g = p.grad
            m = self.m[i].lerp(g, 1 - beta1)
            v = self.v[i].mul(beta2).addcmul_(g, g, value=1 - beta2)
            p.mul_(1 - lr * wd)
            p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-lr / bias1)
            self.m[i], self.v[i] = round_trip(m, self.map_m), round_trip(v, self.map_v)


def adam_direction(m: torch.Tensor, v: torch.Tensor, step: int) -> torch.Tensor:
    beta1, beta2 = HYPER["betas"]
    return (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + HYPER["eps"])


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((approx - exact).double()) / torch.linalg.vector_norm(exact.double()))


def moment_rows(data, steps: int, snapshots: list[int], width: int) -> list[dict]:
    """(a): torch.optim.AdamW on seed 0; each snapshot's m and v through each map."""
    model = make_model(0, width)
    opt = torch.optim.AdamW(model.parameters(), **HYPER)
    rows = []
    for step, idx in enumerate(batch_order(0, steps), start=1):
        loss_and_backward(model, data, idx)
        opt.step()
        if step not in snapshots:
            continue
        states = [opt.state[p] for p in model.parameters()]
        m = torch.cat([s["exp_avg"].reshape(-1) for s in states])
        v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])
        exact = adam_direction(m, v, step)
        # per param tensor: its blocks are its own
        stored = {name: (torch.cat([round_trip(s["exp_avg"], name).reshape(-1) for s in states]),
                         torch.cat([round_trip(s["exp_avg_sq"], name).reshape(-1) for s in states]))
                  for name in ("fp32",) + MAPS}
        for map_m, map_v in [(name, "fp32") for name in MAPS] + [("fp32", name) for name in MAPS] + list(PAIRS):
            qm, qv = stored[map_m][0], stored[map_v][1]
            direction = adam_direction(qm, qv, step)
            rows.append(dict(kind="moments", step=step, map_m=map_m, map_v=map_v,
                             m_error=relative_error(qm, m), v_error=relative_error(qv, v),
                             direction_error=relative_error(direction, exact),
                             v_zero_m_nonzero=float(((qv == 0) & (qm != 0)).double().mean()),
                             max_abs_update=float(direction.abs().max()), fp32_max_abs_update=float(exact.abs().max()),
                             n_elements=m.numel()))
    return rows


def training_row(data, seed: int, steps: int, pair: tuple, width: int) -> dict:
    """(b): one run of StoredAdamW with the pair's (m, v) storage."""
    model = make_model(seed, width)
    opt = StoredAdamW(model.parameters(), *pair)
    first_nan_step = None
    for step, idx in enumerate(batch_order(seed, steps), start=1):
        if not math.isfinite(loss_and_backward(model, data, idx)):
            first_nan_step = step  # the run is over: stop here
            break
        opt.step()
    with torch.no_grad():
        train_loss = float(torch.nn.functional.cross_entropy(model(data.x_train), data.y_train))
        val_acc = float((model(data.x_val).argmax(1) == data.y_val).double().mean())
    nan = first_nan_step is not None or not math.isfinite(train_loss)
    return dict(kind="training", seed=seed, map_m=pair[0], map_v=pair[1], train_loss=train_loss, val_acc=val_acc,
                nan=nan, first_nan_step=first_nan_step)


def fmt(x: float) -> str:
    return f"{x:.2e}" if x and (abs(x) < 1e-2 or abs(x) >= 1e3) else f"{x:.3f}"


def print_tables(rows: list[dict]) -> None:
    print("\n(a) one encode/decode of torch.optim.AdamW's moments (seed 0): relative errors over all params\n")
    print("| step | map | m error | direction error, m only | v error | direction error, v only | "
          "v -> 0 while m != 0 | max abs update (fp32) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    moments = [r for r in rows if r["kind"] == "moments"]
    for r in moments:
        if r["map_v"] != "fp32" or r["map_m"] == "fp32":
            continue
        v_only = next(x for x in moments if x["step"] == r["step"] and x["map_m"] == "fp32"
                      and x["map_v"] == r["map_m"])
        print(f"| {r['step']} | {r['map_m']} | {fmt(r['m_error'])} | {fmt(r['direction_error'])} | "
              f"{fmt(v_only['v_error'])} | {fmt(v_only['direction_error'])} | {fmt(v_only['v_zero_m_nonzero'])} | "
              f"{fmt(v_only['max_abs_update'])} ({fmt(v_only['fp32_max_abs_update'])}) |")
    print("\n| step | (m, v) maps | direction error | v -> 0 while m != 0 | max abs update |")
    print("|---:|---|---:|---:|---:|")
    for r in moments:
        if "fp32" not in (r["map_m"], r["map_v"]):
            print(f"| {r['step']} | ({r['map_m']}, {r['map_v']}) | {fmt(r['direction_error'])} | "
                  f"{fmt(r['v_zero_m_nonzero'])} | {fmt(r['max_abs_update'])} |")
    training = [r for r in rows if r["kind"] == "training"]
    print("\n(b) training through the codec: final loss on the training set, ratio to float32 states "
          "(per seed, then the geometric mean), validation accuracy, runs that went NaN\n")
    print("| (m, v) storage | train loss, mean | ratio to fp32, per seed | ratio, geo. mean | val acc, mean | "
          "NaN runs (first NaN step) |")
    print("|---|---:|---|---:|---:|---|")
    for pair in [("fp32", "fp32")] + list(PAIRS):
        runs = [r for r in training if (r["map_m"], r["map_v"]) == pair]
        ratios = [r["ratio_to_fp32"] for r in runs]
        finite = [x for x in ratios if math.isfinite(x) and x > 0]
        geo = math.exp(statistics.fmean(math.log(x) for x in finite)) if len(finite) == len(ratios) else float("nan")
        nan_steps = ", ".join(str(r["first_nan_step"]) for r in runs if r["nan"])
        print(f"| ({pair[0]}, {pair[1]}) | {fmt(statistics.fmean(r['train_loss'] for r in runs))} | "
              f"{', '.join(fmt(x) for x in ratios)} | {fmt(geo)} | "
              f"{statistics.fmean(r['val_acc'] for r in runs):.3f} | "
              f"{sum(r['nan'] for r in runs)} of {len(runs)} ({nan_steps}) |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--snapshots", default="1,10,100,600", help="steps at which (a) quantizes the moments")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    snapshots = sorted({int(s) for s in args.snapshots.split(",")})
    if not all(1 <= s <= args.steps for s in snapshots):
        raise SystemExit(f"--snapshots {args.snapshots}: each must be a step in 1..{args.steps}")
    started = time.perf_counter()
    data = digits(N_TRAIN, torch.Generator().manual_seed(0))

    rows = moment_rows(data, args.steps, snapshots, args.width)
    for seed in range(args.seeds):
        runs = [training_row(data, seed, args.steps, pair, args.width) for pair in [("fp32", "fp32")] + list(PAIRS)]
        for r in runs:
            r["ratio_to_fp32"] = r["train_loss"] / runs[0]["train_loss"]
        rows += runs
    print_tables(rows)

    device = device_name(torch.device("cpu"))
    seconds = time.perf_counter() - started
    print(f"\n{device}, torch {torch.__version__}, {seconds:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    path = os.path.join(args.out, f"int8_maps-cpu-{stamp}.json")
    with open(path, "x") as f:  # never overwrite an earlier result
        json.dump(dict(benchmark="int8_maps", device=device, device_type="cpu", torch=torch.__version__,
                       threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                       date=stamp, argv=sys.argv[1:], seconds=seconds, task=f"digits, {N_TRAIN} training images",
                       model=f"MLP 64-{args.width}-{args.width}-10 relu", batch=BATCH, steps=args.steps,
                       seeds=args.seeds, hyperparameters=HYPER, block=int8_blocks.BLOCK, rows=rows),
                  f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
