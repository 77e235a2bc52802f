"""Optimizer-step microbenchmark: catapult_kernels' optimizers (with and without fused
global clipping) against torch's fused and foreach ones (+ clip_grad_norm_), on the
layers of a wide MLP, reported as effective bandwidth and as a fraction of a roof
measured in the same run on the same device.

    python -m bench.optim_step [--device cpu|cuda] [--optimizers adamw,sgd,sgd_momentum]
                               [--sizes 1M,10M] [--reps 20]

Effective GB/s = the bytes the ideal kernel must move / time (DESIGN.md), fp32: AdamW reads
p, g, m, v and writes p, m, v = 28 B/param; SGD with momentum 20; plain SGD 12; clipping
reads g once more (+4). The roof: on CPU an in-place stream x.mul_(c) (8 B/elem; a step
updates in place), on GPU a device-to-device copy (8 B/elem).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time

import torch

from catapult_kernels import ops
from catapult_kernels.optim import SGD, AdamW
from catapult_kernels.optim.base import FusedOptimizer

# name -> (torch class, ours, kwargs, fp32 bytes per param without clipping; clipping adds 4)
OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, AdamW, dict(lr=1e-3), 28),
    "sgd": (torch.optim.SGD, SGD, dict(lr=1e-3), 12),
    "sgd_momentum": (torch.optim.SGD, SGD, dict(lr=1e-3, momentum=0.9), 20),
}
CLIP_BYTES = 4
# Above the grads' norm: torch's clip_grad_norm_ scales the grads in place on every call,
# and an active clip would shrink the benchmark's fixed grads toward denormals (slow on
# CPUs), which no training run sees. The clipping work is the same either way.
MAX_GRAD_NORM = 1e4


def mlp_shapes(n_params: int, depth: int = 4, d_in: int = 256, d_out: int = 10) -> list[tuple]:
    """Weight and bias shapes of a `depth`-hidden-layer MLP of about n_params params."""
    width = int((-(d_in + d_out + depth) + math.sqrt((d_in + d_out + depth) ** 2 + 4 * (depth - 1) * n_params))
                / (2 * (depth - 1)))
    dims = [d_in] + [width] * depth + [d_out]
    return [s for a, b in zip(dims, dims[1:]) for s in ((b, a), (b,))]


def make_params(shapes, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g, device=device))
        p.grad = torch.randn(s, generator=g, device=device) * 1e-2
        params.append(p)
    return params


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times_ms(fn, device, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn, device, reps: int) -> float:
    return statistics.median(step_times_ms(fn, device, reps))


def roof(device):
    """(name, fn, bytes per call) of the memory roof: an in-place stream on CPU, a
    device-to-device copy on GPU (8 B/elem), over several times the last-level cache."""
    n = 64 * 2**20 if device.type == "cpu" else 512 * 2**20
    x = torch.randn(n, device=device)
    if device.type == "cpu":
        return "in-place stream x.mul_(c)", lambda: x.mul_(1.0000001), 8 * n
    y = torch.empty_like(x)
    return "device-to-device copy", lambda: y.copy_(x), 8 * n


def contenders(optimizer: str, backends):
    """name -> make(params, clip): torch fused, torch foreach, ours on each backend."""
    torch_cls, ours_cls, kw, _ = OPTIMIZERS[optimizer]
    title = torch_cls.__name__
    out = {
        f"torch {title}(fused=True)": lambda ps, clip: torch_cls(ps, fused=True, **kw),
        f"torch {title}(foreach=True)": lambda ps, clip: torch_cls(ps, foreach=True, **kw),
    }
    for b in backends:
        out[f"catapult {title} [{b}]"] = (lambda b: lambda ps, clip: ours_cls(
            ps, max_grad_norm=MAX_GRAD_NORM if clip else None, backend=b, **kw))(b)
    return out


def bench_case(optimizer, label, shapes, device, backends, reps, rounds=5) -> list[dict]:
    """Median step time of each contender, and the roof. They take turns over `rounds`
    rounds, so a slow spell of a shared machine does not land on one of them alone."""
    n_params = sum(math.prod(s) for s in shapes)
    roof_name, roof_fn, roof_bytes = roof(device)
    rows = []
    for clip in (False, True):
        steps = {"roof": roof_fn}
        for name, make in contenders(optimizer, backends).items():
            params = make_params(shapes, device)
            opt = make(params, clip)
            if clip and not isinstance(opt, FusedOptimizer):
                def fn(opt=opt, params=params):
                    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
                    opt.step()
                steps[name] = fn
            else:
                steps[name] = opt.step
        times = {name: [] for name in steps}
        for _ in range(rounds):
            for name, fn in steps.items():
                times[name] += step_times_ms(fn, device, max(1, reps // rounds))
        roof_gbs = roof_bytes / statistics.median(times.pop("roof")) / 1e6
        for name, ts in times.items():
            ms = statistics.median(ts)
            gbs = (OPTIMIZERS[optimizer][3] + CLIP_BYTES * clip) * n_params / ms / 1e6
            rows.append(dict(optimizer_family=optimizer, case=label, n_params=n_params, n_tensors=len(shapes), clip=clip, optimizer=name,
                             median_ms=ms, effective_gbs=gbs, roof=roof_name, roof_gbs=roof_gbs,
                             fraction_of_roof=gbs / roof_gbs))
        del steps
    return rows


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def parse_size(s: str) -> int:
    s = s.strip().upper()
    return int(float(s[:-1]) * {"K": 1e3, "M": 1e6}[s[-1]]) if s[-1] in "KM" else int(s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--optimizers", default="adamw,sgd,sgd_momentum", help=f"of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--sizes", default=None, help="params per case, e.g. 1M,10M,100M")
    ap.add_argument("--no-small", action="store_true", help="skip the 5000 x 1000-element case")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or ("1M,10M,100M" if device.type == "cuda" else "1M,10M")
    reps = args.reps or (50 if device.type == "cuda" else 20)
    backends = ["cuda", "triton"] if device.type == "cuda" else ["cpu"]
    backends = [b for b in backends if b != "cuda" or ops.has_cpp_kernels("cuda")]

    cases = [(f"MLP {s}", mlp_shapes(parse_size(s))) for s in sizes.split(",")]
    if not args.no_small:
        cases.append(("5000 x 1000", [(1000,)] * 5000))
    rows = []
    for optimizer in args.optimizers.split(","):
        if optimizer not in OPTIMIZERS:
            ap.error(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        for label, shapes in cases:
            rows += bench_case(optimizer, label, shapes, device, backends, reps)
    for r in rows:
        base = next(x for x in rows if x["optimizer_family"] == r["optimizer_family"] and x["case"] == r["case"]
                    and x["clip"] == r["clip"] and x["optimizer"].endswith("(fused=True)"))
        r["speedup_vs_torch_fused"] = base["median_ms"] / r["median_ms"]

    print(f"\n{device_name(device)}, torch {torch.__version__}; roof: {rows[0]['roof']}, "
          "measured beside each case\n")
    print("| family | case | clip | optimizer | median ms | GB/s | roof GB/s | of roof | vs torch fused |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['optimizer_family']} | {r['case']} | {'clip + step' if r['clip'] else 'step'} | {r['optimizer']} | "
              f"{r['median_ms']:.3f} | {r['effective_gbs']:.1f} | {r['roof_gbs']:.0f} | "
              f"{r['fraction_of_roof']:.0%} | {r['speedup_vs_torch_fused']:.2f}x |")

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    path = os.path.join(args.out, f"optim_step-{device.type}-{stamp}.json")
    with open(path, "x") as f:  # never overwrite an earlier result
        json.dump(dict(benchmark="optim_step", device=device_name(device), device_type=device.type,
                       torch=torch.__version__, date=stamp,
                       bytes_per_param={k: v[3] for k, v in OPTIMIZERS.items()}, clip_bytes_per_param=CLIP_BYTES,
                       max_grad_norm=MAX_GRAD_NORM, reps=reps, rows=rows),
                  f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
