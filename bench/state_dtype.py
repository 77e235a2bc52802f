"""What optimizer-state storage (state_dtype) and the master weights of bfloat16 params
(master_weights) cost per step and save in memory, on the CPU: catapult's AdamW with float32,
bfloat16 and int8 states, and with bfloat16 params rounded to nearest or kept by "fp32",
"ecc" or "stochastic" master weights, against torch's fused AdamW and the 8-bit AdamWs of
torchao and bitsandbytes, in one run.

    OMP_NUM_THREADS=2 python -m bench.state_dtype [--cases 1x1024,10x1024,3x4096] [--reps 10]
        [--mlp 3x4096] [--batch 64] [--train-steps 5] [--optimizers torch_fused,...]
        [--peers runs/peers] [--threads 2] [--out bench/results]

(1) Step time. A case LAYERSxD is the weights and biases of LAYERS Linear(D, D) (1x1024:
1.05M params, 10x1024: 10.5M, 3x4096: 50.3M), params and grads from bench.optim_step's
make_params (the grads set once and kept). With float32 params: catapult AdamW (backend
cpu) at state_dtype None (float32 states), bfloat16 and int8 (blocks of 128 codes and a
float32 scale, int8_blocks), and torch.optim.AdamW(fused=True); with bfloat16 params: ours
at None (bfloat16 states) and int8, ours with bfloat16 states and master_weights "fp32",
"ecc" and "stochastic", and torch's fused AdamW (bfloat16 states, rounded to nearest). The
contenders of one param dtype take turns over 5 rounds beside bench.optim_step's roof (an
in-place stream, 8 B/elem), so a slow spell of the shared machine hits them alike; median
of --reps steps each after a warm-up step per round. Each row's speedup against torch's
fused AdamW of its param dtype, and against ours with float32 params and states (timed in
the float32 rounds). Bytes per param a step (step_bytes_per_param), with P the param's
size and S a state's: the param P read and written (no master weights or "stochastic",
whose counter is 8 B per tensor), or the float32 master read and written and the param
only written ("fp32": P + 8), or the param and its int8 correction read and written
("ecc": 2P + 2); g read (P); m and v read and written (4S; int8: a code each way and 4 B
of scale per 128 elements each way, S = 1.03125). So float32 params 28, bfloat16 states
20, int8 states 16.125; bfloat16 params 14 and 10.125, with "fp32" 20, "ecc" 16,
"stochastic" 14. Effective GB/s = those bytes / the step time.

(2) Training-step memory. An MLP of --mlp LAYERSxD (Linear(D, D), ReLU between, the last
layer's D outputs as logits; 3x4096 = the 50.3M case's tensors), cross entropy on random
data of --batch rows. Float32 params: torch's fused AdamW, ours at float32, bfloat16 and
int8 states, torchao's and bitsandbytes' AdamW8bit. Bfloat16 params (the MLP built in
float32 and rounded once, its inputs in bfloat16, the loss in float32 as catapult-train
--dtype bf16 computes it; keys bf16_*): torch's fused AdamW and ours without master weights
(both round to nearest), ours with "fp32", "ecc" and "stochastic" (bfloat16 states), and
ours with int8 states and "ecc" (2.06 + 1 B of state per param). Each optimizer in a fresh
subprocess (its imports, the model, one forward and backward without optimizer, the grads
freed, one step of the optimizer on a 64x64 param of the param dtype for its lazy imports,
then the optimizer): the peak resident memory (VmHWM of /proc/self/status) above the
resident memory before the optimizer, for the first step (zero_grad, forward, backward,
step: the state allocated, torchao's step compiled) and for the --train-steps steps after
it (the high-water mark reset through /proc/self/clear_refs); the optimizer's state bytes
per param (opt.state_bytes() for ours, master weights included: "fp32" 4, "ecc" 1,
"stochastic" 0 as its counters are 0-d; for the others every state tensor but 0-d step
counts, tensor subclasses by their inner tensors, a tensor shared between params once); the
median training step and optimizer step. torchao and bitsandbytes come from --peers, a
folder bench/peers_env.sh installs them into beside the project's venv; one that does not
import or run is recorded with its error, not left out. Rows record the param dtype and the
master weights (None: none)."""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.machinery
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple, Optional

import torch

from bench.muon_step import count_by_dim
from bench.optim_step import device_name, make_params, roof, step_times_ms
from catapult_kernels import int8_blocks
from catapult_kernels.optim import AdamW

CPU = torch.device("cpu")
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
ROUNDS = 5
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int8: "int8"}
CHILD_MARK = "STATE_DTYPE_CHILD "  # the line of a --child's stdout that carries its result

# param dtype -> the step-time contenders (optimizer, state_dtype, master_weights); the first is the baseline
STEP_CONTENDERS = {
    torch.float32: [("torch AdamW(fused=True)", None, None), ("catapult AdamW", None, None),
                    ("catapult AdamW", torch.bfloat16, None), ("catapult AdamW", torch.int8, None)],
    torch.bfloat16: [("torch AdamW(fused=True)", None, None), ("catapult AdamW", None, None),
                     ("catapult AdamW", torch.int8, None), ("catapult AdamW", None, "fp32"),
                     ("catapult AdamW", None, "ecc"), ("catapult AdamW", None, "stochastic")],
}


def _module_attr(module: str, attr: str):
    return getattr(importlib.import_module(module), attr)


class TrainOptimizer(NamedTuple):
    """A contender of the training step: load() imports what the optimizer needs and returns
    its class, so that the imports come before the memory baseline; the MLP is trained in
    param_dtype."""
    title: str
    load: Callable
    param_dtype: torch.dtype = torch.float32
    master_weights: Optional[str] = None


def torch_fused(param_dtype: torch.dtype = torch.float32) -> TrainOptimizer:
    return TrainOptimizer("torch AdamW(fused=True)", lambda: functools.partial(torch.optim.AdamW, fused=True),
                          param_dtype)


def catapult_adamw(state_dtype=None, master_weights=None, param_dtype=torch.float32) -> TrainOptimizer:
    return TrainOptimizer(f"catapult AdamW, {DTYPE_NAMES[state_dtype or param_dtype]} states",
                          lambda: functools.partial(AdamW, backend="cpu", state_dtype=state_dtype,
                                                    master_weights=master_weights),
                          param_dtype, master_weights)


TRAIN_OPTIMIZERS = {
    "torch_fused": torch_fused(),
    "catapult_fp32": catapult_adamw(),
    "catapult_bf16": catapult_adamw(torch.bfloat16),
    "catapult_int8": catapult_adamw(torch.int8),
    "torchao_8bit": TrainOptimizer("torchao AdamW8bit", lambda: _module_attr("torchao.optim", "AdamW8bit")),
    "bnb_8bit": TrainOptimizer("bitsandbytes AdamW8bit", lambda: _module_attr("bitsandbytes.optim", "AdamW8bit")),
    # bfloat16 params: rounded to nearest (torch's way, ours without master weights), then ours
    # with each kind of master weights, and the leanest: int8 states with "ecc"
    "bf16_torch_fused": torch_fused(torch.bfloat16),
    "bf16_catapult": catapult_adamw(param_dtype=torch.bfloat16),
    "bf16_catapult_fp32_master": catapult_adamw(master_weights="fp32", param_dtype=torch.bfloat16),
    "bf16_catapult_ecc": catapult_adamw(master_weights="ecc", param_dtype=torch.bfloat16),
    "bf16_catapult_stochastic": catapult_adamw(master_weights="stochastic", param_dtype=torch.bfloat16),
    "bf16_catapult_int8_ecc": catapult_adamw(torch.int8, "ecc", torch.bfloat16),
}
PEER_PACKAGES = {"torchao_8bit": "torchao", "bnb_8bit": "bitsandbytes"}


def linear_shapes(layers: int, d: int) -> list[tuple]:
    return [s for _ in range(layers) for s in ((d, d), (d,))]


def step_bytes_per_param(param_dtype: torch.dtype, state_dtype, master_weights=None) -> float:
    """Bytes an ideal AdamW step moves per param: the param and its master weights, g read, m and
    v read and written. Without master weights p is read and written; "fp32" reads and writes
    the float32 copy and only writes p; "ecc" reads and writes p and its int8 correction;
    "stochastic" reads and writes p (its counter, 8 bytes per tensor each way, left out)."""
    p = torch.empty(0, dtype=param_dtype).element_size()
    param = {None: 2 * p, "fp32": p + 8, "ecc": 2 * p + 2, "stochastic": 2 * p}[master_weights]
    state = {None: p, torch.float32: 4, torch.bfloat16: 2, torch.int8: 1 + 4 / int8_blocks.BLOCK}[state_dtype]
    return param + p + 4 * state


def make_step_optimizer(name: str, params, state_dtype, master_weights):
    if name.startswith("torch"):
        return torch.optim.AdamW(params, fused=True, **HYPER)
    return AdamW(params, backend="cpu", state_dtype=state_dtype, master_weights=master_weights, **HYPER)


def params_in(shapes, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """bench.optim_step's params and grads, cast to dtype."""
    out = []
    for p in make_params(shapes, CPU):
        q = torch.nn.Parameter(p.detach().to(dtype))
        q.grad = p.grad.to(dtype)
        out.append(q)
    return out


def step_case(layers: int, d: int, reps: int) -> list[dict]:
    shapes = linear_shapes(layers, d)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    roof_name, roof_fn, roof_bytes = roof(CPU)
    rows = []
    for param_dtype, group in STEP_CONTENDERS.items():
        opts = {(name, sd, mw): make_step_optimizer(name, params_in(shapes, param_dtype), sd, mw)
                for name, sd, mw in group}
        steps = {"roof": roof_fn, **{key: opt.step for key, opt in opts.items()}}
        times = {key: [] for key in steps}
        for _ in range(ROUNDS):
            for key, fn in steps.items():
                times[key] += step_times_ms(fn, CPU, max(1, reps // ROUNDS), warmup=1)
        roof_gbs = roof_bytes / statistics.median(times.pop("roof")) / 1e6
        for (name, sd, mw), ts in times.items():
            ms = statistics.median(ts)
            nbytes = step_bytes_per_param(param_dtype, sd, mw)
            opt = opts[(name, sd, mw)]
            state = opt.state_bytes() if isinstance(opt, AdamW) else peer_state_bytes(opt)
            rows.append(dict(kind="step", case=f"{layers} x {d}x{d} + bias", n_params=n_params,
                             n_tensors=len(shapes), param_dtype=DTYPE_NAMES[param_dtype], optimizer=name,
                             state_dtype=DTYPE_NAMES[sd or param_dtype], master_weights=mw, median_ms=ms, rep_ms=ts,
                             bytes_per_param=nbytes, effective_gbs=nbytes * n_params / ms / 1e6, roof=roof_name,
                             roof_gbs=roof_gbs, fraction_of_roof=nbytes * n_params / ms / 1e6 / roof_gbs,
                             state_bytes_per_param=state))
        del opts, steps
    # full precision: ours with float32 params and states (timed in the float32 params' rounds)
    full = next(x for x in rows
                if x["param_dtype"] == x["state_dtype"] == "float32" and x["optimizer"] == "catapult AdamW")
    for r in rows:
        base = next(x for x in rows if x["param_dtype"] == r["param_dtype"])
        r["baseline"] = f"{base['optimizer']} ({base['param_dtype']} params)"
        r["speedup_vs_baseline"] = base["median_ms"] / r["median_ms"]
        r["speedup_vs_float32"] = full["median_ms"] / r["median_ms"]
    return rows


def peer_state_bytes(opt) -> float:
    """Bytes of state per element of the params that have state: every state tensor but 0-d
    step counts, a tensor subclass (torchao's OptimState8bit) by its inner tensors, a
    tensor shared between params (bitsandbytes' code maps) once."""
    seen, total, elements = set(), 0, 0
    for p, param_state in opt.state.items():
        elements += p.numel()
        todo = [t for t in param_state.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
        while todo:
            t = todo.pop()
            if hasattr(t, "__tensor_flatten__"):
                todo += [getattr(t, name) for name in t.__tensor_flatten__()[0]]
            elif t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total / elements if elements else 0.0


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def train_child(key: str, layers: int, d: int, batch: int, steps: int) -> dict:
    """One optimizer's training steps in this (fresh) process: its memory and times."""
    spec = TRAIN_OPTIMIZERS[key]
    make = spec.load()
    package = PEER_PACKAGES.get(key)
    version = importlib.import_module(package).__version__ if package else torch.__version__
    torch.manual_seed(0)
    blocks = [m for _ in range(layers) for m in (torch.nn.Linear(d, d), torch.nn.ReLU())][:-1]
    model = torch.nn.Sequential(*blocks).to(spec.param_dtype)  # built in float32, then rounded once
    x, y = torch.randn(batch, d, dtype=spec.param_dtype), torch.randint(d, (batch,))

    def forward_backward():
        model.zero_grad()  # frees the grads
        # the loss in float32, as catapult-train --dtype bf16 computes it
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()

    forward_backward()  # the model's own first-call costs (lazy initialization) before the baseline
    model.zero_grad()
    # and the optimizer's: torch.optim's first step imports dynamo and sympy (~150 MiB); a
    # 64x64 param, as large as the peers' smallest 8-bit state
    warm = torch.nn.Parameter(torch.zeros(64, 64, dtype=spec.param_dtype))
    warm.grad = torch.ones_like(warm)
    make([warm], **HYPER).step()
    base_kb = proc_status_kb("VmRSS")
    opt = make(model.parameters(), **HYPER)

    def train_step() -> tuple[float, float]:
        t0 = time.perf_counter()
        forward_backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        return (t2 - t0) * 1e3, (t2 - t1) * 1e3

    first_ms, first_opt_ms = train_step()
    first_peak_kb = proc_status_kb("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident memory
    timed = [train_step() for _ in range(steps)]
    n_params = sum(p.numel() for p in model.parameters())
    state = opt.state_bytes() if isinstance(opt, AdamW) else peer_state_bytes(opt)
    return dict(version=version, n_params=n_params, baseline_rss_mib=base_kb / 1024,
                first_step_peak_mib=(first_peak_kb - base_kb) / 1024,
                steady_peak_mib=(proc_status_kb("VmHWM") - base_kb) / 1024,
                first_step_ms=first_ms, first_optimizer_step_ms=first_opt_ms,
                median_step_ms=statistics.median(t for t, _ in timed),
                median_optimizer_step_ms=statistics.median(o for _, o in timed),
                state_bytes_per_param=state, state_mib=state * n_params / 2**20,
                params_finite=all(bool(p.isfinite().all()) for p in model.parameters()))


def train_case(key: str, args) -> dict:
    """train_child in a fresh subprocess; its error's last line where it fails."""
    spec = TRAIN_OPTIMIZERS[key]
    row = dict(kind="train_step", optimizer=spec.title, key=key, param_dtype=DTYPE_NAMES[spec.param_dtype],
               master_weights=spec.master_weights, mlp=args.mlp, batch=args.batch)
    package = PEER_PACKAGES.get(key)
    if package and importlib.machinery.PathFinder.find_spec(package, [os.path.abspath(args.peers)] + sys.path) is None:
        return {**row, "error": f"{package} is in neither {args.peers} nor this environment: bench/peers_env.sh"}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.abspath(args.peers), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "bench.state_dtype", "--child", key, "--mlp", args.mlp, "--batch", str(args.batch),
           "--train-steps", str(args.train_steps), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    row["wall_s"] = time.perf_counter() - t0
    marked = [line for line in result.stdout.splitlines() if line.startswith(CHILD_MARK)]
    if result.returncode == 0 and marked:
        return {**row, **json.loads(marked[-1][len(CHILD_MARK):])}
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return {**row, "error": lines[-1] if lines else f"exit code {result.returncode}"}


def print_tables(rows: list[dict]) -> None:
    print("| case | params | param dtype | optimizer | states | master weights | state B/param | median ms "
          "| vs torch fused | vs float32 | B/param moved | GB/s | of roof |")
    print("|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["kind"] == "step":
            print(f"| {r['case']} | {r['n_params'] / 1e6:.2f}M | {r['param_dtype']} | {r['optimizer']} | "
                  f"{r['state_dtype']} | {r['master_weights'] or 'none'} | {r['state_bytes_per_param']:.3f} | "
                  f"{r['median_ms']:.2f} | {r['speedup_vs_baseline']:.2f}x | {r['speedup_vs_float32']:.2f}x | "
                  f"{r['bytes_per_param']:g} | {r['effective_gbs']:.1f} | {r['fraction_of_roof']:.0%} |")
    print("\nvs torch fused: its step with the same param dtype; vs float32: catapult AdamW's with float32 params "
          "and states")
    print("master weights none: the update rounded to nearest into the param")
    print("of roof: of the in-place stream x.mul_(c) measured beside each case and param dtype")
    print("peak: resident memory (VmHWM) above the model's after a forward and backward without optimizer")
    print("\n| param dtype | optimizer | master weights | version | state B/param | state MiB | peak, first step MiB "
          "| peak, later steps MiB | train step ms | optimizer step ms | first step ms | params finite |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["kind"] != "train_step":
            continue
        head = f"| {r['param_dtype']} | {r['optimizer']} | {r['master_weights'] or 'none'} |"
        if "error" in r:
            print(f"{head} did not run: {r['error']} | | | | | | | | |")
            continue
        print(f"{head} {r['version']} | {r['state_bytes_per_param']:.3f} | {r['state_mib']:.0f} | "
              f"{r['first_step_peak_mib']:.0f} | {r['steady_peak_mib']:.0f} | "
              f"{r['median_step_ms']:.0f} | {r['median_optimizer_step_ms']:.0f} | {r['first_step_ms']:.0f} | "
              f"{r['params_finite']} |")


def git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    return result.stdout.strip() or None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="1x1024,10x1024,3x4096", help="step-time cases, LAYERSxD each")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--mlp", default="3x4096", help="LAYERSxD of the training-step MLP")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps after the first")
    ap.add_argument("--optimizers", default=",".join(TRAIN_OPTIMIZERS), help=f"of {', '.join(TRAIN_OPTIMIZERS)}")
    ap.add_argument("--peers", default="runs/peers", help="where bench/peers_env.sh installed torchao, bitsandbytes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--child", choices=list(TRAIN_OPTIMIZERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers, d = count_by_dim(args.mlp, "--mlp")
    if args.child:
        print(CHILD_MARK + json.dumps(train_child(args.child, layers, d, args.batch, args.train_steps)))
        return
    keys = args.optimizers.split(",")
    unknown = [k for k in keys if k not in TRAIN_OPTIMIZERS]
    if unknown:
        ap.error(f"unknown optimizer {unknown[0]!r}; choose from {', '.join(TRAIN_OPTIMIZERS)}")
    cases = [count_by_dim(c, "--cases") for c in args.cases.split(",")]

    load = {"start": os.getloadavg()}
    rows = [r for layers_, d_ in cases for r in step_case(layers_, d_, args.reps)]
    load["after_step_times"] = os.getloadavg()
    rows += [train_case(key, args) for key in keys]
    load["end"] = os.getloadavg()

    device = device_name(CPU)
    print(f"\n{device}, torch {torch.__version__}, {args.threads} threads; load average (1 min) "
          + ", ".join(f"{k} {v[0]:.2f}" for k, v in load.items()) + "\n")
    print_tables(rows)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    path = os.path.join(args.out, f"state_dtype-cpu-{stamp}.json")
    with open(path, "x") as f:  # never overwrite an earlier result
        json.dump(dict(benchmark="state_dtype", device=device, device_type="cpu", torch=torch.__version__,
                       commit=git_commit(), threads=args.threads, omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                       cpu_capability=torch.backends.cpu.get_cpu_capability(), date=stamp, argv=sys.argv[1:],
                       loadavg=load, reps=args.reps, rounds=ROUNDS, hyperparameters=HYPER,
                       int8_block=int8_blocks.BLOCK, grads="set once, kept (step times)", rows=rows),
                  f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
