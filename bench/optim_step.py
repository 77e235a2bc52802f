"""Optimizer-step microbenchmark: catapult_kernels' optimizers (with and without fused
global clipping) against torch's fused and foreach ones (+ clip_grad_norm_) and against the
unfused plain-PyTorch references (catapult_kernels.optim.reference: Lion, LAMB, LARS, and
Grokfast/AGC as a grad pass before torch's optimizer), on the layers of a wide MLP,
reported as effective bandwidth and as a fraction of a roof measured in the same run.

    python -m bench.optim_step [--device cpu|cuda] [--optimizers adamw,sgd,lion,...]
                               [--sizes 1M,10M] [--reps 20]

Effective GB/s = the bytes the ideal kernel must move / time (DESIGN.md), fp32 per param:
AdamW, Adam and ADOPT read p, g, m, v and write p, m, v = 28 B; SGD with momentum 20;
plain SGD 12; Lion 20; Adan 44 (p, g, m, d, v and the previous grad read, all but g
written); LAMB 40 (two passes: p, g, m, v read, m, v written; then p, m, v read, p
written); LARS 28 (a norm pass over p and g, then momentum SGD). Clipping reads g once
more (+4), Grokfast reads and writes its EMA (+8), AGC reads p and g for the row norms
(+8). The roof: on CPU an in-place stream x.mul_(c) (8 B/elem; a step updates in place),
on GPU a device-to-device copy (8 B/elem). The 5000 x 1000-element case, bound by the
host's per-tensor work, also runs ours with flat=True (the params in one buffer).
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
from catapult_kernels.optim import ADOPT, LAMB, LARS, SGD, Adam, Adan, AdamW, Lion
from catapult_kernels.optim.base import FusedOptimizer
from catapult_kernels.optim.reference import (ADOPTReference, AdanReference, GradPipeline, LAMBReference,
                                              LARSReference, LionReference)

GROKFAST = dict(alpha=0.98, lamb=2.0)
AGC = 0.01
# name -> (ours, kwargs, regularizers, torch class (fused/foreach baselines) or None,
#          unfused reference class or None, fp32 bytes per param without clipping)
FAMILIES = {
    "adamw": (AdamW, dict(lr=1e-3), {}, torch.optim.AdamW, None, 28),
    "adam": (Adam, dict(lr=1e-3, weight_decay=1e-2), {}, torch.optim.Adam, None, 28),
    "sgd": (SGD, dict(lr=1e-3), {}, torch.optim.SGD, None, 12),
    "sgd_momentum": (SGD, dict(lr=1e-3, momentum=0.9), {}, torch.optim.SGD, None, 20),
    "lion": (Lion, dict(lr=1e-4, weight_decay=0.1), {}, None, LionReference, 20),
    "adopt": (ADOPT, dict(lr=1e-3, weight_decay=1e-2), {}, None, ADOPTReference, 28),
    "adan": (Adan, dict(lr=1e-3), {}, None, AdanReference, 44),
    "lamb": (LAMB, dict(lr=1e-3), {}, None, LAMBReference, 40),
    "lars": (LARS, dict(lr=1.0, weight_decay=1e-4), {}, None, LARSReference, 28),
    "adamw_grokfast": (AdamW, dict(lr=1e-3), dict(grokfast=GROKFAST), None, torch.optim.AdamW, 36),
    "sgd_grokfast": (SGD, dict(lr=1e-3), dict(grokfast=GROKFAST), None, torch.optim.SGD, 20),
    "adamw_agc": (AdamW, dict(lr=1e-3), dict(agc=AGC), None, torch.optim.AdamW, 36),
    "sgd_agc": (SGD, dict(lr=1e-3), dict(agc=AGC), None, torch.optim.SGD, 20),
}
DEFAULT_FAMILIES = ",".join(FAMILIES)
CLIP_BYTES = 4
# Above the grads' norm: torch's clip_grad_norm_ scales the grads in place on every call,
# and an active clip would shrink the benchmark's fixed grads toward denormals (slow on
# CPUs), which no training run sees. The clipping work is the same either way.
MAX_GRAD_NORM = 1e4


class Unfused:
    """The plain-PyTorch way: the grad pipeline rewrites the grads, then the optimizer steps.
    Grokfast and AGC, having no torch version, use the reference; the grads get restored
    from a copy outside the timing (a benchmark's grads must not drift)."""

    def __init__(self, params, pipeline: GradPipeline, opt):
        self.params, self.pipeline, self.opt = params, pipeline, opt

    def step(self):
        self.pipeline()
        self.opt.step()


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


def contenders(family: str, backends, flat: bool = False):
    """name -> make(params, clip): torch fused and foreach (where torch has the optimizer),
    the unfused plain-PyTorch reference (where it has not, or with a regularizer on), and
    ours on each backend; with flat, also ours with flat=True where it takes it."""
    ours_cls, kw, regularizers, torch_cls, ref_cls, _ = FAMILIES[family]
    out = {}
    if torch_cls is not None:
        title = torch_cls.__name__
        out[f"torch {title}(fused=True)"] = lambda ps, clip: torch_cls(ps, fused=True, **kw)
        out[f"torch {title}(foreach=True)"] = lambda ps, clip: torch_cls(ps, foreach=True, **kw)
    if ref_cls is not None:
        fused_ok = ref_cls in (torch.optim.AdamW, torch.optim.SGD)
        title = f"unfused: {ref_cls.__name__}" + ("(fused=True)" if fused_ok else "") + \
            "".join(f" + {k}" for k in regularizers)
        out[title] = lambda ps, clip: Unfused(
            ps, GradPipeline(ps, max_grad_norm=MAX_GRAD_NORM if clip else None, **regularizers),
            ref_cls(ps, fused=True, **kw) if fused_ok else ref_cls(ps, **kw))
    for b in backends:
        out[f"catapult {ours_cls.__name__} [{b}]"] = (lambda b: lambda ps, clip: ours_cls(
            ps, max_grad_norm=MAX_GRAD_NORM if clip else None, backend=b, **kw, **regularizers))(b)
        if flat and ours_cls._flattenable and "agc" not in regularizers:
            out[f"catapult {ours_cls.__name__}(flat=True) [{b}]"] = (lambda b: lambda ps, clip: ours_cls(
                ps, max_grad_norm=MAX_GRAD_NORM if clip else None, backend=b, flat=True, **kw,
                **regularizers))(b)
    return out


def bench_case(family, label, shapes, device, backends, reps, rounds=5, flat=False) -> list[dict]:
    """Median step time of each contender (with flat: also ours with flat=True), and the
    roof. They take turns over `rounds` rounds, so a slow spell of a shared machine does not
    land on one of them alone."""
    n_params = sum(math.prod(s) for s in shapes)
    roof_name, roof_fn, roof_bytes = roof(device)
    rows = []
    for clip in (False, True):
        steps = {"roof": roof_fn}
        for name, make in contenders(family, backends, flat).items():
            params = make_params(shapes, device)
            opt = make(params, clip)
            if isinstance(opt, Unfused):
                grads = [p.grad.clone() for p in params]

                def fn(opt=opt, params=params, grads=grads):
                    opt.step()
                    torch._foreach_copy_([p.grad for p in params], grads)  # the same grads every step
                steps[name] = fn
            elif clip and not isinstance(opt, FusedOptimizer):
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
            gbs = (FAMILIES[family][5] + CLIP_BYTES * clip) * n_params / ms / 1e6
            rows.append(dict(optimizer_family=family, case=label, n_params=n_params, n_tensors=len(shapes),
                             clip=clip, optimizer=name, median_ms=ms, effective_gbs=gbs, roof=roof_name,
                             roof_gbs=roof_gbs, fraction_of_roof=gbs / roof_gbs))
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
    ap.add_argument("--optimizers", default=DEFAULT_FAMILIES, help=f"of {', '.join(FAMILIES)}")
    ap.add_argument("--sizes", default=None, help="params per case, e.g. 1M,10M,100M")
    ap.add_argument("--no-small", action="store_true",
                    help="skip the 5000 x 1000-element case (run for the families torch has)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or ("1M,10M,100M" if device.type == "cuda" else "1M,10M")
    reps = args.reps or (50 if device.type == "cuda" else 20)
    backends = ["cuda", "triton"] if device.type == "cuda" else ["cpu"]
    backends = [b for b in backends if b != "cuda" or ops.has_cpp_kernels("cuda")]

    cases = [(f"MLP {s}", mlp_shapes(parse_size(s))) for s in sizes.split(",")]
    rows = []
    for family in args.optimizers.split(","):
        if family not in FAMILIES:
            ap.error(f"unknown optimizer {family!r}; choose from {', '.join(FAMILIES)}")
        small = [] if args.no_small or FAMILIES[family][3] is None else [("5000 x 1000", [(1000,)] * 5000)]
        for label, shapes in cases + small:
            # flat=True where the host's per-tensor work is what it removes: thousands of small tensors
            rows += bench_case(family, label, shapes, device, backends, reps, flat=(label, shapes) in small)
    for r in rows:
        # the baseline: torch's fused optimizer where torch has one, else the unfused reference
        same = [x for x in rows if x["optimizer_family"] == r["optimizer_family"] and x["case"] == r["case"]
                and x["clip"] == r["clip"]]
        base = next(x for x in same if x["optimizer"].startswith(("torch", "unfused")))
        r["baseline"] = base["optimizer"]
        r["speedup_vs_baseline"] = base["median_ms"] / r["median_ms"]

    print(f"\n{device_name(device)}, torch {torch.__version__}; roof: {rows[0]['roof']}, "
          "measured beside each case\n")
    print("| family | case | clip | optimizer | median ms | GB/s | roof GB/s | of roof | vs baseline |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['optimizer_family']} | {r['case']} | {'clip + step' if r['clip'] else 'step'} | {r['optimizer']} | "
              f"{r['median_ms']:.3f} | {r['effective_gbs']:.1f} | {r['roof_gbs']:.0f} | "
              f"{r['fraction_of_roof']:.0%} | {r['speedup_vs_baseline']:.2f}x |")
    print("\nbaseline: the first torch or unfused contender of each family (torch's fused optimizer where it exists)")

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    path = os.path.join(args.out, f"optim_step-{device.type}-{stamp}.json")
    with open(path, "x") as f:  # never overwrite an earlier result
        json.dump(dict(benchmark="optim_step", device=device_name(device), device_type=device.type,
                       torch=torch.__version__, date=stamp,
                       bytes_per_param={k: v[5] for k, v in FAMILIES.items()}, clip_bytes_per_param=CLIP_BYTES,
                       max_grad_norm=MAX_GRAD_NORM, reps=reps, rows=rows),
                  f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
