"""torchrun --nproc-per-node 2: Muon across ranks against one process. FSDP2 (a 33-row
matrix split 17/16, a 1-row one split 1/0) and DDP with the Newton-Schulz work spread
(ns_group) and no_sync() accumulation: the same params as one process, every matrix
orthogonalized exactly once per step, by one rank, and neither rank doing all of them."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

import catapult_kernels.optim.newton_schulz as newton_schulz
from catapult_kernels.optim import Muon, muon_param_groups
from common import RANK, finish, init, max_rel_diff, report
from sharded_optimizers import batch, fsdp, loss_of

STEPS = 3
# Newton-Schulz runs in bfloat16: an input an ulp of float32 apart (DDP's averaged grads
# are not one process's to the last bit) may round a product one bfloat16 ulp apart, which
# moves a param by about 1e-4 of its scale. Not for a 1-row matrix: there X X^T is one
# number near 1, whose bfloat16 ulp (2^-7) the quintic iteration amplifies to percents of
# the update (measured: 1.3e-2 of the params), so the DDP check, whose grads differ in the
# last bit, has 4 outputs; FSDP's, whose grads are one process's bit for bit, keeps 1.
BOUND = 2e-4


def model(outputs: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 33), torch.nn.Tanh(), torch.nn.Linear(33, 33), torch.nn.Tanh(),
                               torch.nn.Linear(33, outputs))


class CountMatrices:
    """Counts the matrices this rank orthogonalizes (newton_schulz's one by one, and batches)."""

    NAMES = ("newton_schulz_matrix", "newton_schulz")

    def __init__(self):
        self.count, self._originals = 0, {name: getattr(newton_schulz, name) for name in self.NAMES}

    def __enter__(self):
        for name, original in self._originals.items():
            def counted(x, *args, original=original):
                self.count += x.shape[0] if x.dim() == 3 else 1
                return original(x, *args)
            setattr(newton_schulz, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(newton_schulz, name, original)


def both_ranks(count: int) -> list:
    counts = torch.tensor([count])
    gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, counts)
    return [int(c) for c in gathered]


def check(name: str, sharded, single, opt, opt_single, step) -> None:
    with CountMatrices() as counter:
        for _ in range(STEPS):
            step(sharded, opt)
    for _ in range(STEPS):
        step(single, opt_single)
    per_rank = both_ranks(counter.count)
    matrices = len(opt_single.param_groups[0]["params"])
    diff = max_rel_diff(getattr(sharded, "module", sharded), single)  # DDP's module: its names
    report(name, diff=diff, matrices_per_rank=per_rank, matrices_per_step=matrices)
    assert diff <= BOUND, (name, diff)
    assert sum(per_rank) == matrices * STEPS and max(per_rank) < matrices * STEPS, (name, per_rank)


def full_batch_step(m, o) -> None:
    x, y = batch(5, 1)
    o.zero_grad()
    loss_of(m, x, y).backward()
    o.step()


def main() -> None:
    init()
    mesh = init_device_mesh("cpu", (2,))
    options = dict(lr=0.02, weight_decay=0.01, max_grad_norm=0.5)
    sharded, single = fsdp(mesh, model()), model()
    check("muon/fsdp", sharded, single, Muon(muon_param_groups(sharded), **options),
          Muon(muon_param_groups(single), **options), full_batch_step)

    x, y = batch(5, 1)
    mine = x.chunk(2)[RANK], y.chunk(2)[RANK]

    def accumulate(m, o) -> None:  # two micro-batches, the first without the all-reduce
        o.zero_grad()
        with m.no_sync():
            (loss_of(m, mine[0][:2], mine[1][:2]) / 2).backward()
        (loss_of(m, mine[0][2:], mine[1][2:]) / 2).backward()
        o.step()

    ddp, single = DDP(model(outputs=4)), model(outputs=4)
    check("muon/ddp+no_sync", ddp, single,
          Muon(muon_param_groups(ddp.module), ns_group=dist.group.WORLD, **options),
          Muon(muon_param_groups(single), **options),
          lambda m, o: accumulate(m, o) if m is ddp else full_batch_step(m, o))
    finish()


if __name__ == "__main__":
    main()
