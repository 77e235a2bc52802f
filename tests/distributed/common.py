"""What the torchrun check scripts share: the process group, the models, the single-process
reference, the counters of host syncs and collectives, and a clean exit."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import catapult_kernels.optim as co
from catapult_kernels.host_syncs import HostSyncs  # noqa: F401  (the scripts take it from here)

RANK = int(os.environ.get("RANK", "0"))

# Every optimizer with a config that runs its whole grad pipeline: clipping that acts
# (max_grad_norm below the norm), skip_nonfinite, Grokfast and AGC; and plain.
OPTIMIZERS = {
    "SGD": lambda ps, **kw: co.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "Adam": lambda ps, **kw: co.Adam(ps, lr=1e-2, weight_decay=1e-3, **kw),
    "AdamW": lambda ps, **kw: co.AdamW(ps, lr=1e-2, **kw),
    "Lion": lambda ps, **kw: co.Lion(ps, lr=1e-3, **kw),
    "ADOPT": lambda ps, **kw: co.ADOPT(ps, lr=1e-2, **kw),
    "Adan": lambda ps, **kw: co.Adan(ps, lr=1e-2, **kw),
    "LAMB": lambda ps, **kw: co.LAMB(ps, lr=1e-2, **kw),
    "LARS": lambda ps, **kw: co.LARS(ps, lr=0.5, weight_decay=1e-3, **kw),
}
PIPELINES = {
    "plain": {},
    "clip+grokfast+agc": dict(max_grad_norm=0.5, grokfast=dict(alpha=0.9, lamb=1.0), agc=0.05),
    "skip_nonfinite+clip+grokfast": dict(max_grad_norm=0.5, skip_nonfinite=True, grokfast=dict(alpha=0.9, lamb=1.0)),
}
# Where a step may be skipped on the device (skip_nonfinite), new state carries a flag that
# the host reads once it can without a sync (optim/unwritten.py): at once on the CPU, so
# the CPU counts a read of a CPU value there; a CUDA step polls an event instead.
CPU_FLAG_READS = {"skip_nonfinite+clip+grokfast"}


def init(backend: str = "gloo") -> None:
    torch.manual_seed(0)
    dist.init_process_group(backend)


def finish() -> None:
    """A clean exit. Some gloo runs abort at interpreter exit after every check passed
    (`terminate called without an active exception`, a gloo thread torn down with the
    interpreter): about 1 in 10 without the barrier and the destroy, and still 2 of 17
    runs of these scripts with them. Leaving without the interpreter's teardown, once
    everything is flushed and every rank is done, removed it (0 of 10)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def report(name: str, **values) -> None:
    """One line per check, from rank 0, that the pytest side reads."""
    if RANK == 0:
        print("CHECK " + json.dumps({"name": name, **values}), flush=True)
        sys.stdout.flush()


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_rel_diff(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """The largest |a - b| / max|b| over the params of two models (by name)."""
    worst = 0.0
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        a, b = full(p.detach()).double(), full(ref[name].detach()).double()
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item())
    return worst


def naive_norm(model: torch.nn.Module) -> float:
    """The grad norm a placement-blind all-reduce of local squares gives (replicas counted
    as often as they are held): what the placement-aware norm must not be."""
    squares = sum(full_local(p.grad).double().square().sum() for p in model.parameters())
    dist.all_reduce(squares)
    return squares.sqrt().item()


def full_local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t
