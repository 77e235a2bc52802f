"""torchrun --nproc-per-node 4: 2-D meshes against one process. HSDP (fully_shard on a
(replicate, shard) mesh: each shard held twice, counted once) and FSDP2 over tensor parallel
(each weight cut along both mesh dims). Each rank takes its data-parallel slice of the batch."""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from common import OPTIMIZERS, PIPELINES, HostSyncs, finish, init, max_rel_diff, naive_norm, report
from sharded_optimizers import STEPS, all_reduces, batch, expected_all_reduces, loss_of, mlp, tp_mlp, train

BOUND = 1e-6  # a few times torch's own drift under FSDP2 (sharded_optimizers.py measures it)
CHECKED = ("AdamW", "LAMB", "LARS")  # an elementwise update, and the two with per-tensor norms


def check_hsdp() -> None:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    x, y = batch(5, 1)
    mine = x.chunk(4)[mesh.get_rank()], y.chunk(4)[mesh.get_rank()]
    for name in CHECKED:
        options = PIPELINES["clip+grokfast+agc"]
        sharded, single = mlp(), mlp()
        for layer in (sharded[0], sharded[2], sharded):
            fully_shard(layer, mesh=mesh)
        assert sharded[0].weight.placements[0].is_replicate()
        opt, opt_single = OPTIMIZERS[name](sharded.parameters(), **options), OPTIMIZERS[name](single.parameters(), **options)
        syncs, reduces = train(sharded, opt, *mine, count=True)
        train(single, opt_single, x, y, count=False)
        diff = max_rel_diff(sharded, single)
        expected = expected_all_reduces(name, options, units_cut=True)
        report(f"hsdp/{name}", diff=diff, naive_grad_norm=naive_norm(sharded), syncs=syncs, all_reduces=reduces, expected_all_reduces=expected,
               grad_norm=opt.grad_norm.item(), single_grad_norm=opt_single.grad_norm.item())
        assert diff <= BOUND and syncs == [0] * STEPS and reduces == [expected] * STEPS, (name, diff, syncs, reduces)
        assert torch.allclose(opt.grad_norm, opt_single.grad_norm, rtol=1e-6)


def check_fsdp_over_tp() -> None:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    x, y = batch(6, 4)
    dp = mesh["dp"].get_local_rank()
    mine = x.chunk(2)[dp], y.chunk(2)[dp]
    for name in CHECKED:
        options = PIPELINES["clip+grokfast+agc"]
        sharded, single = tp_mlp(), tp_mlp()
        parallelize_module(sharded, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for layer in (sharded[0], sharded[2], sharded):
            fully_shard(layer, mesh=mesh["dp"])
        opt, opt_single = OPTIMIZERS[name](sharded.parameters(), **options), OPTIMIZERS[name](single.parameters(), **options)
        train(single, opt_single, x, y, count=False)
        syncs = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss_of(sharded, *mine).backward()
            with CommDebugMode() as comm, HostSyncs() as host:
                opt.step()
            syncs.append((host.count, all_reduces(comm)))
        diff = max_rel_diff(sharded, single)
        report(f"fsdp+tp/{name}", diff=diff, syncs_and_all_reduces=syncs, placements=str(sharded[2].weight.placements),
               grad_norm=opt.grad_norm.item(), single_grad_norm=opt_single.grad_norm.item())
        assert diff <= BOUND and all(s == 0 for s, _ in syncs), (name, diff, syncs)
        assert torch.allclose(opt.grad_norm, opt_single.grad_norm, rtol=1e-6)


def main() -> None:
    init()
    check_hsdp()
    check_fsdp_over_tp()
    finish()


if __name__ == "__main__":
    main()
