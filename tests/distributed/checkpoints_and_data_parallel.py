"""torchrun --nproc-per-node 2 <folder>: distributed checkpoints between catapult's and torch's
optimizers under FSDP2, DDP, and ZeRO-1, each against the same training in one process.

DCP: a run saved with get_state_dict + dcp.save by one side is loaded with dcp.load +
set_state_dict into a fresh model and optimizer of the other side (get_state_dict on a
fresh optimizer runs its zero-grad lr=0 step first); one more step of both then agrees.
DDP: gradient_as_bucket_view=True and two micro-batches per step, the first under no_sync().
ZeRO: ZeroRedundancyOptimizer(optimizer_class=catapult's AdamW, max_grad_norm=...) clips by
the norm over every rank's part of the params."""
from __future__ import annotations

import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel as DDP

import catapult_kernels.optim as co
from common import RANK, HostSyncs, finish, init, max_rel_diff, report
from sharded_optimizers import all_reduces, batch, fsdp, loss_of, mlp

BOUND = 1e-6  # a few times torch's own drift under FSDP2 (sharded_optimizers.py measures it)
# The optimizers that torch has too, with one argument set that each side takes.
PAIRS = {
    "AdamW": (lambda ps: torch.optim.AdamW(ps, lr=1e-2), lambda ps: co.AdamW(ps, lr=1e-2)),
    "Adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
             lambda ps: co.Adam(ps, lr=1e-2, weight_decay=1e-3)),
    "SGD": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), lambda ps: co.SGD(ps, lr=0.05, momentum=0.9)),
}


def step(model, opt, x, y) -> None:
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()


def check_dcp(folder: str, mesh) -> None:
    x, y = batch(5, 1)
    mine = x.chunk(2)[RANK], y.chunk(2)[RANK]
    for name, (torch_opt, our_opt) in PAIRS.items():
        for source, target in ((torch_opt, our_opt), (our_opt, torch_opt)):
            direction = "torch->catapult" if source is torch_opt else "catapult->torch"
            path = f"{folder}/{name}-{direction}"
            saved = fsdp(mesh, mlp())
            saved_opt = source(saved.parameters())
            for _ in range(2):
                step(saved, saved_opt, *mine)
            model_state, optim_state = get_state_dict(saved, saved_opt)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)

            loaded = fsdp(mesh, mlp())
            loaded_opt = target(loaded.parameters())
            model_state, optim_state = get_state_dict(loaded, loaded_opt)  # a fresh optimizer: DCP's lr=0 step
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(loaded, loaded_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            same_start = max_rel_diff(loaded, saved)
            step(saved, saved_opt, *mine)
            step(loaded, loaded_opt, *mine)
            diff = max_rel_diff(loaded, saved)
            report(f"dcp/{name}/{direction}", start=same_start, diff=diff)
            assert same_start == 0.0 and diff <= BOUND, (name, direction, same_start, diff)


def check_ddp() -> None:
    """Two micro-batches per step, the first without the all-reduce (no_sync), grads as views
    of DDP's buckets, against one process on the whole batch."""
    x, y = batch(5, 1)
    mine = x.chunk(2)[RANK], y.chunk(2)[RANK]
    ddp = DDP(mlp(), gradient_as_bucket_view=True)
    single = mlp()
    opt = co.AdamW(ddp.parameters(), lr=1e-2, max_grad_norm=0.5, grokfast=dict(alpha=0.9, lamb=1.0))
    opt_single = co.AdamW(single.parameters(), lr=1e-2, max_grad_norm=0.5, grokfast=dict(alpha=0.9, lamb=1.0))
    for _ in range(3):
        opt.zero_grad()
        with ddp.no_sync():
            (loss_of(ddp, mine[0][:2], mine[1][:2]) / 2).backward()
        (loss_of(ddp, mine[0][2:], mine[1][2:]) / 2).backward()
        with CommDebugMode() as comm, HostSyncs() as host:
            opt.step()
        step(single, opt_single, x, y)
        assert all_reduces(comm) == 0 and host.count == 0, (all_reduces(comm), host.count)
    diff = max_rel_diff(ddp.module, single)
    report("ddp/AdamW/no_sync+bucket_view", diff=diff, grad_norm=opt.grad_norm.item(),
           single_grad_norm=opt_single.grad_norm.item())
    assert diff <= BOUND and opt_single.grad_norm > 0.5, diff


def check_zero() -> None:
    """Each rank's local AdamW holds part of the params; the clip must use the norm of all."""
    x, y = batch(5, 1)
    mine = x.chunk(2)[RANK], y.chunk(2)[RANK]
    for options in (dict(max_grad_norm=0.5), dict(max_grad_norm=0.5, skip_nonfinite=True)):
        ddp = DDP(mlp())
        single = mlp()
        zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=co.AdamW, lr=1e-2, **options)
        opt_single = co.AdamW(single.parameters(), lr=1e-2, **options)
        for _ in range(3):
            step(ddp, zero, *mine)
            step(single, opt_single, x, y)
        diff = max_rel_diff(ddp.module, single)
        report(f"zero/AdamW/{'+'.join(options)}", diff=diff, grad_norm=zero.optim.grad_norm.item(),
               single_grad_norm=opt_single.grad_norm.item())
        assert diff <= BOUND, (options, diff)
        assert torch.allclose(zero.optim.grad_norm, opt_single.grad_norm, rtol=1e-6)


def main() -> None:
    init()
    check_dcp(sys.argv[1], init_device_mesh("cpu", (2,)))
    check_ddp()
    check_zero()
    finish()


if __name__ == "__main__":
    main()
