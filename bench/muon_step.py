"""Muon step microbenchmark on CPU: catapult_kernels.optim.Muon (a fused momentum op, Newton-
Schulz batched over the matrices of one shape, a fused update op) against torch.optim.Muon
(per matrix), same params, grads and hyperparameters; and Newton-Schulz alone.

    python -m bench.muon_step [--reps 10] [--out bench/results]
        [--gpt2 12x768] [--mlp 4x2048] [--small 256x64] [--ns-dims 1024,2048,4096] [--ns-batch 4]

Step cases: `--gpt2 BLOCKSxD` the matrices of a GPT-2-shaped stack, nn.Linear's (out, in)
layout, per block qkv (3D, D), attention out (D, D), MLP fc (4D, D) and proj (D, 4D); `--mlp
LAYERSxD` the hidden matrices of a wide MLP, LAYERS of (D, D); `--small COUNTxD` COUNT
matrices of (D, D). The grads are set once and kept (lr 1e-3: the params barely move). Each
rep: one step of each optimizer in turn (ABAB..., so a slow spell of the shared machine hits
both alike), after one untimed step each (state allocation). Reported: the median, torch /
catapult, and the GFLOP/s of the Newton-Schulz products (5 steps of X X^T, A A, B X per
matrix: 5 (4 s^2 l + 2 s^3) FLOP for an s x l matrix, s <= l), which bound the step.

Newton-Schulz alone, on a batch of `--ns-batch` square matrices per dim (the largest dim
with half the batch and a third of the reps): torch's per-matrix function
(torch.optim._muon._zeropower_via_newtonschulz) on each, catapult's batched chain on the
list (a bmm chain in bfloat16), and the same batched chain in float32 (the dtype question:
is bfloat16 matmul fast on this CPU?), with each result's relative Frobenius distance from
torch's bfloat16 one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import catapult_kernels.optim as co
from bench.optim_step import device_name
from catapult_kernels.optim.muon import NS_COEFFICIENTS
from catapult_kernels.optim.newton_schulz import newton_schulz

HYPER = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, eps=1e-7)
NS_STEPS, EPS = HYPER["ns_steps"], HYPER["eps"]
WARMUP = 1


def gpt2_shapes(blocks: int, d: int) -> list[tuple]:
    return [s for _ in range(blocks) for s in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]


def ns_flop(shape: tuple) -> float:
    s, l = sorted(shape)
    return NS_STEPS * (4 * s * s * l + 2 * s ** 3)


def make_params(shapes, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
        p.grad = torch.randn(s, generator=g) * 1e-2
        params.append(p)
    return params


def alternating_ms(fns: dict, reps: int, warmup: int = WARMUP) -> dict:
    """name -> the time of each rep (ms), the contenders taking turns within each rep."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def step_case(label: str, shapes: list, reps: int) -> list[dict]:
    ours = co.Muon(make_params(shapes), **HYPER)
    theirs = torch.optim.Muon(make_params(shapes), **HYPER)
    times = alternating_ms({"torch.optim.Muon": theirs.step, "catapult Muon": ours.step}, reps)
    flop = sum(ns_flop(s) for s in shapes)
    rows = [dict(kind="step", case=label, n_params=sum(s[0] * s[1] for s in shapes), n_matrices=len(shapes),
                 shapes=sorted({tuple(s) for s in shapes}), optimizer=name, median_ms=statistics.median(ts),
                 rep_ms=ts, ns_gflop=flop / 1e9, ns_gflops=flop / statistics.median(ts) / 1e6)
            for name, ts in times.items()]
    base = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_torch"] = base / r["median_ms"]
    return rows


def batched_chain_float32(matrices: list) -> list:
    """catapult's batched Newton-Schulz chain (newton_schulz.py) with float32 for bfloat16."""
    a, b, c = NS_COEFFICIENTS
    x = torch.stack(matrices).float()
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=EPS)
    for _ in range(NS_STEPS):
        gram = torch.bmm(x, x.mT)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return list(x.unbind())


def ns_case(d: int, batch: int, reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(d)
    matrices = [torch.randn(d, d, generator=g) for _ in range(batch)]
    fns = {
        "torch per-matrix (bfloat16)": lambda: [_zeropower_via_newtonschulz(m, NS_COEFFICIENTS, NS_STEPS, EPS)
                                                for m in matrices],
        "catapult batched (bfloat16)": lambda: list(newton_schulz(torch.stack(matrices), NS_COEFFICIENTS, NS_STEPS,
                                                                  EPS).unbind()),
        "batched chain (float32)": lambda: batched_chain_float32(matrices),
    }
    times = alternating_ms(fns, reps, warmup=0)
    reference = torch.stack(fns["torch per-matrix (bfloat16)"]()).float()
    flop = batch * ns_flop((d, d))
    rows = []
    for name, ts in times.items():
        result = torch.stack(fns[name]()).float()
        distance = float(torch.linalg.norm(result - reference) / torch.linalg.norm(reference))
        rows.append(dict(kind="newton_schulz", case=f"{batch} x {d}x{d}", dim=d, batch=batch, variant=name,
                         median_ms=statistics.median(ts), rep_ms=ts, ns_gflop=flop / 1e9,
                         ns_gflops=flop / statistics.median(ts) / 1e6, rel_distance_from_torch_bf16=distance))
    base = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_torch"] = base / r["median_ms"]
    return rows


def count_by_dim(spec: str, flag: str) -> tuple[int, int]:
    """COUNTxD -> (count, d)."""
    try:
        count, d = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"{flag} takes COUNTxD (e.g. 12x768), got {spec!r}")
    return count, d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--gpt2", default="12x768", help="BLOCKSxD")
    ap.add_argument("--mlp", default="4x2048", help="LAYERSxD")
    ap.add_argument("--small", default="256x64", help="COUNTxD")
    ap.add_argument("--ns-dims", default="1024,2048,4096")
    ap.add_argument("--ns-batch", type=int, default=4)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()  # recorded: other work on a shared machine skews the times

    blocks, d_model = count_by_dim(args.gpt2, "--gpt2")
    layers, d_mlp = count_by_dim(args.mlp, "--mlp")
    count, d_small = count_by_dim(args.small, "--small")
    cases = [(f"GPT-2 {blocks} blocks x d={d_model}", gpt2_shapes(blocks, d_model)),
             (f"MLP {layers} hidden x {d_mlp}x{d_mlp}", [(d_mlp, d_mlp)] * layers),
             (f"{count} x {d_small}x{d_small}", [(d_small, d_small)] * count)]
    rows = [r for label, shapes in cases for r in step_case(label, shapes, args.reps)]
    dims = sorted(int(x) for x in args.ns_dims.split(","))
    for d in dims:
        largest = d == dims[-1] and len(dims) > 1
        rows += ns_case(d, max(1, args.ns_batch // 2) if largest else args.ns_batch,
                        max(1, args.reps // 3) if largest else args.reps)

    device = device_name(torch.device("cpu"))
    print(f"\n{device}, torch {torch.__version__}; median of {args.reps} alternating reps; "
          f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| case | params | matrices | optimizer | median ms | vs torch | NS GFLOP/s |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        if r["kind"] == "step":
            print(f"| {r['case']} | {r['n_params'] / 1e6:.2f}M | {r['n_matrices']} | {r['optimizer']} | "
                  f"{r['median_ms']:.1f} | {r['speedup_vs_torch']:.2f}x | {r['ns_gflops']:.0f} |")
    print("\n| Newton-Schulz | variant | reps | median ms | vs torch | GFLOP/s | rel. distance from torch bf16 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["kind"] == "newton_schulz":
            print(f"| {r['case']} | {r['variant']} | {len(r['rep_ms'])} | {r['median_ms']:.1f} | "
                  f"{r['speedup_vs_torch']:.2f}x | {r['ns_gflops']:.0f} | {r['rel_distance_from_torch_bf16']:.2e} |")

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    path = os.path.join(args.out, f"muon_step-cpu-{stamp}.json")
    with open(path, "x") as f:  # never overwrite an earlier result
        json.dump(dict(benchmark="muon_step", device=device, device_type="cpu", torch=torch.__version__,
                       threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                       cpu_capability=torch.backends.cpu.get_cpu_capability(), date=stamp, argv=sys.argv[1:],
                       loadavg_before=load_before, loadavg_after=os.getloadavg(),
                       reps=args.reps, warmup=WARMUP, hyperparameters=HYPER, ns_coefficients=NS_COEFFICIENTS,
                       grads="set once, kept", rows=rows),
                  f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
