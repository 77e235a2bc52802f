"""Optimizer step under FSDP2 on CPU: catapult_kernels' AdamW(max_grad_norm=1.0) against
torch's AdamW (fused and foreach) + clip_grad_norm_(params, 1.0), on 2 gloo ranks, with
the collectives and host syncs of each step counted.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --standalone -m bench.distributed_step \\
        [--sizes 10M] [--tensors 512x4096,1536x4096] [--reps 30] [--out bench/results]

(from the repository root; the script path form, `torchrun ... bench/distributed_step.py`,
needs PYTHONPATH=. to find the package `bench`.)

Models, on the mesh init_device_mesh("cpu", (2,)), wrapped with fully_shard per layer and
at the root: `--sizes` a 4-hidden-layer tanh MLP of about that many params (10 tensors, a
few big ones); `--tensors COUNTxELEMENTS` that many parallel bias-free d x d Linear
branches whose outputs sum (d*d = ELEMENTS; each weight's grad is as large as the others',
as no chain of layers shrinks it), where torch's clip_grad_norm_ pays per DTensor.

The grads come from one backward and are kept: the timed step does not need fresh grads,
and with lr 1e-4 the params barely move. torch's clip scales its grads in place to norm 1
on its first (warm-up) step, then by a coefficient of about 1: the same work every step.
catapult reads the grads and leaves them as they are.

Each rep: every contender in turn (ABAB..., so a slow spell of the machine hits them
alike), each after a barrier, timed on each rank; a rep's time is the max over the ranks
(all-reduced MAX once at the end). Reported: the median, and torch / catapult per case.
One more step per contender, untimed, runs under CommDebugMode (the collectives of the
step, by op) and a dispatch mode counting host reads of tensor values (host syncs) among
the ops on the DTensors: torch's foreach AdamW reads each param's step counter, a CPU
tensor, with .item() (2 per param: a host read, no GPU sync even on GPUs); reads inside
an aten kernel (torch's fused CPU AdamW reads the same counters in C++) are not seen.
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
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

import catapult_kernels.optim as co
from bench.optim_step import device_name, mlp_shapes, parse_size
from catapult_kernels.host_syncs import HostSyncs

MAX_GRAD_NORM = 1.0
LR = 1e-4
WARMUP = 2
BATCH = 8


class Branches(torch.nn.Module):
    """`count` parallel Linear(d, d, bias=False) whose outputs sum."""

    def __init__(self, count: int, d: int):
        super().__init__()
        self.branches = torch.nn.ModuleList(torch.nn.Linear(d, d, bias=False) for _ in range(count))

    def forward(self, x):
        return sum(branch(x) for branch in self.branches)


def mlp(n_params: int) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """The MLP and its layers (what fully_shard wraps one by one)."""
    shapes = mlp_shapes(n_params)
    dims = [shapes[0][1]] + [w[0] for w in shapes[::2]]
    linears = [torch.nn.Linear(a, b) for a, b in zip(dims, dims[1:])]
    layers = [m for linear in linears for m in (linear, torch.nn.Tanh())][:-1]
    return torch.nn.Sequential(*layers), linears


def branch_spec(spec: str) -> tuple[int, int]:
    """COUNTxELEMENTS -> (count, d) with d * d = ELEMENTS."""
    count, elements = (int(x) for x in spec.lower().split("x"))
    d = math.isqrt(elements)
    if count < 1 or d * d != elements:
        raise ValueError
    return count, d


def branches(count: int, d: int) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    model = Branches(count, d)
    return model, list(model.branches)


def sharded_with_grads(build, mesh) -> torch.nn.Module:
    """The model, the same on every rank, under fully_shard per layer and at the root,
    with the grads of one backward."""
    torch.manual_seed(0)
    model, layers = build()
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    d_in = layers[0].in_features
    x = torch.randn(BATCH, d_in, generator=torch.Generator().manual_seed(1))
    model(x).square().mean().backward()
    return model


def torch_adamw_and_clip(**kw):
    def make(params: list):
        opt = torch.optim.AdamW(params, lr=LR, **kw)

        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
        return step
    return make


CATAPULT = "catapult AdamW(max_grad_norm=1.0)"
# name -> make(params) -> the step to time
CONTENDERS = {
    "torch AdamW(fused=True) + clip_grad_norm_": torch_adamw_and_clip(fused=True),
    "torch AdamW(foreach=True) + clip_grad_norm_": torch_adamw_and_clip(foreach=True),
    CATAPULT: lambda params: co.AdamW(params, lr=LR, max_grad_norm=MAX_GRAD_NORM).step,
}


def timed_ms(step) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def counted(step) -> dict:
    """The collectives (by op) and host syncs of one step."""
    with CommDebugMode() as comm, HostSyncs() as host:
        step()
    ops = {str(op): n for op, n in comm.get_comm_counts().items() if n}
    return dict(collectives=ops, collectives_total=sum(ops.values()), host_syncs=host.count)


def bench_case(label: str, build, mesh, reps: int) -> list[dict]:
    """Each contender on its own copy of the model (the same params and grads)."""
    steps = {}
    for name, make in CONTENDERS.items():
        params = list(sharded_with_grads(build, mesh).parameters())
        steps[name] = make(params)
    counts = {}
    for name, step in steps.items():
        for _ in range(WARMUP):
            step()
        counts[name] = counted(step)
    local_ms = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            local_ms[name].append(timed_ms(step))
    rows = []
    for name, ms in local_ms.items():
        worst = torch.tensor(ms, dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        rows.append(dict(case=label, n_params=sum(p.numel() for p in params), n_tensors=len(params),
                         optimizer=name, median_ms=statistics.median(worst.tolist()), rep_ms=worst.tolist(),
                         **counts[name]))
    ours = next(r["median_ms"] for r in rows if r["optimizer"] == CATAPULT)
    for r in rows:
        r["vs_catapult"] = r["median_ms"] / ours  # > 1: catapult is faster
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10M", help="MLP cases: params each, e.g. 1M,10M ('' for none)")
    ap.add_argument("--tensors", default="512x4096,1536x4096",
                    help="many-tensor cases: COUNTxELEMENTS each, e.g. 512x4096,1536x4096 ('' for none)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    cases = []
    for spec in filter(None, args.sizes.split(",")):
        try:
            cases.append((f"MLP {spec}", lambda n=parse_size(spec): mlp(n)))
        except (ValueError, KeyError):
            ap.error(f"--sizes takes param counts like 10M or 500K, got {spec!r}")
    for spec in filter(None, args.tensors.split(",")):
        try:
            cases.append((f"{spec} elements", lambda cd=branch_spec(spec): branches(*cd)))
        except ValueError:
            ap.error(f"--tensors takes COUNTxELEMENTS with ELEMENTS a square (d x d weights), got {spec!r}")

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank0 = dist.get_rank() == 0
    rows = []
    for label, build in cases:
        rows += bench_case(label, build, mesh, args.reps)

    if rank0:
        device = f"{dist.get_world_size()} ranks x {device_name(torch.device('cpu'))}"
        print(f"\n{device}, gloo, FSDP2, torch {torch.__version__}; median of {args.reps} reps, "
              "each the max over ranks\n")
        print("| case | params | tensors | optimizer | median ms | vs catapult | collectives / step | host syncs / step |")
        print("|---|---:|---:|---|---:|---:|---|---:|")
        for r in rows:
            ops = ", ".join(f"{n} {op}" for op, n in r["collectives"].items()) or "none"
            print(f"| {r['case']} | {r['n_params'] / 1e6:.2f}M | {r['n_tensors']} | {r['optimizer']} | "
                  f"{r['median_ms']:.2f} | {r['vs_catapult']:.2f}x | {ops} | {r['host_syncs']} |")
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        path = os.path.join(args.out, f"distributed_step-cpu-{stamp}.json")
        with open(path, "x") as f:  # never overwrite an earlier result
            json.dump(dict(benchmark="distributed_step", device=device, backend="gloo",
                           world_size=dist.get_world_size(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                           torch=torch.__version__, date=stamp, argv=sys.argv[1:], reps=args.reps,
                           warmup=WARMUP, lr=LR, max_grad_norm=MAX_GRAD_NORM,
                           grads="one backward, kept; torch's clip rescales them in place", rows=rows),
                      f, indent=1)
        print(f"\nwrote {path}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
