"""torchrun --nproc-per-node 2: every optimizer on DTensor params against one process.

FSDP2 (fully_shard): a 33-row layer (17/16 rows per rank) and a 1-row layer with a 1-element
bias (one rank's shards are empty); each rank takes its half of the global batch. Tensor
parallel: a colwise layer and a rowwise one whose bias is replicated (counted once in the
norm; the rowwise weight's AGC rows are cut across ranks). Each step is checked for host
syncs (none) and collectives (the expected all-reduces); the params after 3 steps against
a single process on the whole batch, within a few times the drift of torch's own AdamW +
clip_grad_norm_ under FSDP2. Also clip_grad_norm_ on DTensor grads against torch's."""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import catapult_kernels
from common import (CPU_FLAG_READS, OPTIMIZERS, PIPELINES, RANK, HostSyncs, finish, init, max_rel_diff, naive_norm,
                    report)

STEPS = 3
GLOBAL_BATCH = 8


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 33), torch.nn.Tanh(), torch.nn.Linear(33, 1))


def tp_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batch(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, n_in, generator=g) * 3, torch.randn(GLOBAL_BATCH, n_out, generator=g)


def loss_of(model, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def expected_all_reduces(name: str, options: dict, units_cut: bool) -> int:
    """Per step: one for the global norm, one for the AGC units that shards cut, one for
    the per-tensor norms of LAMB and LARS."""
    global_norm = "max_grad_norm" in options or "skip_nonfinite" in options
    return int(global_norm) + int("agc" in options and units_cut) + int(name in ("LAMB", "LARS"))


def all_reduces(comm: CommDebugMode) -> int:
    return sum(n for op, n in comm.get_comm_counts().items() if "all_reduce" in str(op))


def train(model, opt, x, y, count: bool):
    """STEPS steps; the host syncs and all-reduces of each step() (when count)."""
    syncs, reduces = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if not count:
            opt.step()
            continue
        with CommDebugMode() as comm, HostSyncs() as host:
            opt.step()
        syncs.append(host.count)
        reduces.append(all_reduces(comm))
    return syncs, reduces


def fsdp(mesh, model):
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=mesh)
    return model


def torch_drift(mesh) -> float:
    """How far torch's AdamW + clip_grad_norm_ under FSDP2 and tensor parallel ends from one
    process (the larger)."""
    def run(model, xb, yb):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(STEPS):
            opt.zero_grad()
            loss_of(model, xb, yb).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        return model
    x, y = batch(5, 1)
    fsdp_drift = max_rel_diff(run(fsdp(mesh, mlp()), x.chunk(2)[RANK], y.chunk(2)[RANK]), run(mlp(), x, y))
    x, y = batch(6, 4)
    tp = parallelize_module(tp_mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    tp_drift = max_rel_diff(run(tp, x, y), run(tp_mlp(), x, y))
    report("torch_drift", fsdp=fsdp_drift, tp=tp_drift)
    return max(fsdp_drift, tp_drift, 1e-7)  # the floor: float32's resolution at a few ulps


def check_fsdp(mesh, drift: float) -> None:
    x, y = batch(5, 1)
    mine = x.chunk(2)[RANK], y.chunk(2)[RANK]
    for name, make in OPTIMIZERS.items():
        for pipeline, options in PIPELINES.items():
            sharded, single = fsdp(mesh, mlp()), mlp()
            opt_sharded, opt_single = make(sharded.parameters(), **options), make(single.parameters(), **options)
            syncs, reduces = train(sharded, opt_sharded, *mine, count=True)
            train(single, opt_single, x, y, count=False)
            diff = max_rel_diff(sharded, single)
            expected = expected_all_reduces(name, options, units_cut=True)  # the biases are 1-D
            report(f"fsdp/{name}/{pipeline}", diff=diff, bound=4 * drift, syncs=syncs, all_reduces=reduces,
                   expected_all_reduces=expected)
            assert diff <= 4 * drift, (name, pipeline, diff, drift)
            if pipeline not in CPU_FLAG_READS:
                assert syncs == [0] * STEPS, (name, pipeline, syncs)
            assert reduces == [expected] * STEPS, (name, pipeline, reduces, expected)
            if opt_single.grad_norm is not None:
                assert torch.allclose(opt_sharded.grad_norm, opt_single.grad_norm, rtol=1e-6), name
                assert opt_single.grad_norm > options["max_grad_norm"]  # the clip acts


def check_tensor_parallel(mesh, drift: float) -> None:
    x, y = batch(6, 4)
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    for name, make in OPTIMIZERS.items():
        options = PIPELINES["clip+grokfast+agc"]
        sharded, single = parallelize_module(tp_mlp(), mesh, plan), tp_mlp()
        assert sharded[2].bias.placements[0].is_replicate()
        opt_sharded, opt_single = make(sharded.parameters(), **options), make(single.parameters(), **options)
        syncs, reduces = train(sharded, opt_sharded, x, y, count=True)
        train(single, opt_single, x, y, count=False)
        diff = max_rel_diff(sharded, single)
        expected = expected_all_reduces(name, options, units_cut=True)  # rowwise rows, colwise bias
        report(f"tp/{name}", diff=diff, bound=4 * drift, syncs=syncs, all_reduces=reduces,
               expected_all_reduces=expected)
        assert diff <= 4 * drift, (name, diff, drift)
        assert syncs == [0] * STEPS and reduces == [expected] * STEPS, (name, syncs, reduces)
        assert torch.allclose(opt_sharded.grad_norm, opt_single.grad_norm, rtol=1e-6), name


def check_clip_grad_norm(mesh) -> None:
    """catapult_kernels.clip_grad_norm_ on DTensor grads (FSDP2 and tensor parallel) against
    torch's on the same grads: the same total norm, the same clipped grads."""
    for kind, x, y in (("fsdp", *batch(5, 1)), ("tp", *batch(6, 4))):
        models = []
        for _ in range(2):
            model = fsdp(mesh, mlp()) if kind == "fsdp" else parallelize_module(
                tp_mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
            loss_of(model, x, y).backward()
            models.append(model)
        naive = naive_norm(models[0])
        with CommDebugMode() as comm, HostSyncs() as host:
            ours = catapult_kernels.clip_grad_norm_(models[0].parameters(), 0.1)
        theirs = torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.1).full_tensor()
        grads = max(((a.grad - b.grad).full_tensor().abs().max() / b.grad.full_tensor().abs().max()).item()
                    for a, b in zip(models[0].parameters(), models[1].parameters()))
        report(f"clip_grad_norm_/{kind}", ours=ours.item(), torch=theirs.item(), naive=naive, grad_diff=grads,
               all_reduces=all_reduces(comm), syncs=host.count)
        assert type(ours) is torch.Tensor and torch.allclose(ours, theirs, rtol=1e-6), (ours, theirs)
        assert grads <= 1e-6 and all_reduces(comm) == 1 and host.count == 0


def check_skipped_step(mesh) -> None:
    """skip_nonfinite over FSDP2 shards, every optimizer: an inf in one rank's shard only
    (the global norm is inf on every rank) leaves params and state bit for bit unchanged."""
    x, y = batch(5, 1)
    mine = x.chunk(2)[RANK], y.chunk(2)[RANK]
    for name, make in OPTIMIZERS.items():
        model = fsdp(mesh, mlp())
        opt = make(model.parameters(), **PIPELINES["skip_nonfinite+clip+grokfast"])
        train(model, opt, *mine, count=False)
        snapshot = lambda: [t.full_tensor().clone() for t in model.parameters()] + [  # noqa: E731
            v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
            for state in opt.state.values() for v in state.values()]
        before = snapshot()
        opt.zero_grad()
        loss_of(model, *mine).backward()
        if RANK == 1:
            model[0].weight.grad._local_tensor[0, 0] = float("inf")
        opt.step()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, snapshot()))
        report(f"skipped_step/{name}", unchanged=unchanged, skipped=opt.skipped_steps.item())
        assert unchanged and opt.skipped_steps.item() == 1, name


def check_grad_scaler(mesh) -> None:
    """torch.amp.GradScaler over FSDP2 shards: an inf in one rank's shard only skips the step
    on every rank (GradScaler's found_inf covers the whole grad), params and state unchanged."""
    import catapult_kernels.optim as co
    x, y = batch(5, 1)
    model = fsdp(mesh, mlp())
    opt = co.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(loss_of(model, x.chunk(2)[RANK], y.chunk(2)[RANK])).backward()
        if step == 1:
            before = [t.full_tensor().clone() for t in (*model.parameters(), *(s["exp_avg"] for s in opt.state.values()))]
            if RANK == 1:
                model[0].weight.grad._local_tensor[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if step == 1:
            after = [t.full_tensor() for t in (*model.parameters(), *(s["exp_avg"] for s in opt.state.values()))]
            unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
            report("grad_scaler/inf_on_one_rank", scale=scaler.get_scale(), unchanged=unchanged)
            assert unchanged and scaler.get_scale() == 2.0 ** 9
    assert all(torch.isfinite(p.full_tensor()).all() for p in model.parameters())


def check_swapped_shard(mesh) -> None:
    """A param whose local shard is swapped under it (load_state_dict(assign=True) with
    torch.__future__'s swap on) is updated in its new shard, not in the one the last step
    planned with."""
    import catapult_kernels.optim as co
    from torch.distributed.tensor import Shard, distribute_tensor
    layer = torch.nn.Linear(3, 4, bias=False)
    layer.weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    weight, opt = layer.weight, co.SGD(layer.parameters(), lr=0.1)
    ones = lambda: distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])  # noqa: E731
    weight.grad = ones()
    opt.step()
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.load_state_dict({"weight": distribute_tensor(torch.full((4, 3), 5.0), mesh, [Shard(0)])}, assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert layer.weight is weight
    weight.grad = ones()
    opt.step()
    got = weight.full_tensor()
    report("swapped_shard", got=got[0, 0].item())
    assert torch.equal(got, torch.full((4, 3), 5.0) - 0.1), got


def check_refusals(mesh) -> None:
    """Bad input on DTensors: a clear error before anything changes."""
    import catapult_kernels.optim as co
    x, y = batch(5, 1)
    model = fsdp(mesh, mlp())
    try:
        co.AdamW(model.parameters(), flat=True)
        raise AssertionError("flat=True took DTensor params")
    except ValueError as e:
        assert "flat=True" in str(e) and "DTensor" in str(e), e
    opt = co.AdamW(model.parameters(), lr=1e-2)
    step_once = lambda: (opt.zero_grad(), loss_of(model, x, y).backward(), opt.step())  # noqa: E731
    step_once()
    weight = model[0].weight
    opt.state[weight]["exp_avg"] = opt.state[weight]["exp_avg"].full_tensor()  # a state of another sharding
    before = [p.full_tensor().clone() for p in model.parameters()]
    try:
        step_once()
        raise AssertionError("a plain state tensor for a DTensor param was taken")
    except RuntimeError as e:
        assert "not placed like the param" in str(e), e
    assert all(torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters()))
    try:
        catapult_kernels.clip_grad_norm_(model.parameters(), 1.0, norm_type=0.0)
        raise AssertionError("norm_type 0 on DTensor grads was taken")
    except ValueError as e:
        assert "norm_type" in str(e), e
    report("refusals")


def main() -> None:
    init()
    mesh = init_device_mesh("cpu", (2,))
    drift = torch_drift(mesh)
    check_fsdp(mesh, drift)
    check_tensor_parallel(mesh, drift)
    check_clip_grad_norm(mesh)
    check_skipped_step(mesh)
    check_grad_scaler(mesh)
    check_swapped_shard(mesh)
    check_refusals(mesh)
    finish()


if __name__ == "__main__":
    main()
