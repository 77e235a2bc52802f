"""The Triton Gram kernel (catapult_kernels/triton/gram.py: x @ x.mT from the upper-triangle
tiles only, mirrored) against torch's `x @ x.mT`, in bfloat16, at square dims: the
measurement that decides where Muon's Newton-Schulz should use it (the issue's target: at
least 1.5x at 8192 on an H100/H200).

    python -m bench.gram [--dims 1024,2048,4096,8192] [--reps 20] [--out bench/results]

On CUDA: CUDA-event times, the median of alternating reps after a warm-up, TFLOP/s of the
full product's 2 m^2 n flops (the kernel does about half of them), and the largest
difference from torch's result relative to its largest entry. On CPU it runs under the
Triton interpreter (TRITON_INTERPRET=1 before import), for the smoke test only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch


def _timer(device: torch.device):
    """fn -> its time in ms (CUDA events on a GPU, wall time elsewhere)."""
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    return timed


def case(d: int, reps: int, device: torch.device) -> list[dict]:
    from catapult_kernels.triton.gram import gram
    x = torch.randn(d, d, device=device).bfloat16()
    fns = {"torch x @ x.mT": lambda: x @ x.mT, "catapult gram": lambda: gram(x)}
    timed = _timer(device)
    for fn in fns.values():  # warm-up: compiles the kernel
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    reference = fns["torch x @ x.mT"]().float()
    difference = float((fns["catapult gram"]().float() - reference).abs().max() / reference.abs().max())
    flop = 2.0 * d * d * d
    rows = [dict(dim=d, variant=name, median_ms=statistics.median(ts), rep_ms=ts,
                 tflops=flop / statistics.median(ts) / 1e9) for name, ts in times.items()]
    for r in rows:
        r["speedup_vs_torch"] = rows[0]["median_ms"] / r["median_ms"]
        r["max_rel_difference"] = difference if r["variant"] == "catapult gram" else 0.0
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="1024,2048,4096,8192")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench.gram on CPU needs TRITON_INTERPRET=1 (the Triton interpreter): a smoke run only")
    rows = [r for d in (int(v) for v in args.dims.split(",")) for r in case(d, args.reps, device)]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gram-{device.type}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(dict(benchmark="gram", device=name, torch=torch.__version__, dtype="bfloat16", reps=args.reps,
                       rows=rows), f, indent=1)
    print(f"{name}, torch {torch.__version__}, bfloat16, median of {args.reps}\n")
    print("| dim | variant | median ms | TFLOP/s (full product) | vs torch | max rel. difference |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dim']} | {r['variant']} | {r['median_ms']:.3f} | {r['tflops']:.1f} | "
              f"{r['speedup_vs_torch']:.2f}x | {r['max_rel_difference']:.1e} |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
