"""catapult_kernels.optim.SGD against torch.optim.SGD (+ clip_grad_norm_): the same
numbers over many steps, interchangeable state_dicts, GradScaler, skips, bad input."""
import copy
import math

import pytest
import torch
from torch import nn

from catapult_kernels.optim import SGD
from conftest import BACKEND_DEVICES
from training import STEPS, assert_same_params, make_data, make_model, param_groups, train

CONFIGS = {
    "plain": dict(),
    "plain_clip": dict(max_grad_norm=0.05),
    "momentum_dampening_wd": dict(momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "nesterov_maximize_clip": dict(momentum=0.8, nesterov=True, maximize=True, max_grad_norm=0.1),
    # nonzero in double but 0 in float32: torch keeps a momentum buffer, and so do the kernels
    "momentum_below_float32": dict(momentum=1e-50, weight_decay=1e-3),
}


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_torch_sgd(backend_device, config):
    backend, device = backend_device
    config = dict(config)
    max_grad_norm = config.pop("max_grad_norm", None)
    ours_model = make_model(device)
    ref_model = copy.deepcopy(ours_model)
    lr = 0.1
    ours = SGD(param_groups(ours_model, lr), lr=lr, max_grad_norm=max_grad_norm, backend=backend, **config)
    ref = torch.optim.SGD(param_groups(ref_model, lr), lr=lr, **config)
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=5, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=5, gamma=0.5)
    norms = train(ours_model, ours, STEPS, device, max_grad_norm=max_grad_norm, scheduler=sched_ours)
    ref_norms = train(ref_model, ref, STEPS, device, max_grad_norm=max_grad_norm, scheduler=sched_ref)
    assert_same_params(ours_model, ref_model, rtol=1e-4, atol=1e-5)
    if max_grad_norm is not None:
        torch.testing.assert_close(norms[0], ref_norms[0].to(device), rtol=1e-6, atol=0)
    assert ours_model[0].bias not in ours.state  # frozen
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        if p.requires_grad and config.get("momentum"):
            torch.testing.assert_close(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                       rtol=1e-4, atol=1e-5)
        elif not config.get("momentum"):
            assert p not in ours.state  # plain SGD keeps no state, as torch


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_params_at_least_as_accurate_as_torch(backend_device, dtype):
    """20 steps on a fixed grad sequence: against float32, our error is no more than 2x
    that of torch's fused SGD in the same dtype."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(7)
    shapes = [(64, 33), (33,), (1,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(20)]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    runs = {}
    for name, make, dt in [("gold", lambda ps: torch.optim.SGD(ps, **kw), torch.float32),
                           ("torch", lambda ps: torch.optim.SGD(ps, fused=True, **kw), dtype),
                           ("ours", lambda ps: SGD(ps, backend=backend, **kw), dtype)]:
        params = [nn.Parameter(p.to(device=device, dtype=dt)) for p in init]
        opt = make(params)
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr.to(device=device, dtype=dt)
            opt.step()
        runs[name] = params
    for pg, pr, po in zip(runs["gold"], runs["torch"], runs["ours"]):
        err_ref = (pr.double() - pg.double()).norm()
        assert (po.double() - pg.double()).norm() <= 2 * err_ref


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_interchangeable(direction):
    model = make_model("cpu")
    straight = copy.deepcopy(model)
    make_ours = lambda m: SGD(param_groups(m, 0.1), lr=0.1, momentum=0.9)  # noqa: E731
    make_torch = lambda m: torch.optim.SGD(param_groups(m, 0.1), lr=0.1, momentum=0.9)  # noqa: E731
    first, second = (make_ours, make_torch) if direction == "ours_to_torch" else (make_torch, make_ours)
    opt = first(model)
    train(model, opt, 5, "cpu")
    opt2 = second(model)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt2, 5, "cpu")
    train(straight, make_torch(straight), 10, "cpu")
    assert_same_params(model, straight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_grad_scaler(backend_device):
    backend, device = backend_device
    model = make_model(device)
    ref_model = copy.deepcopy(model)
    ours = SGD(model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=0.5, backend=backend)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    x, y = make_data(device)
    for m, opt in ((model, ours), (ref_model, ref)):
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=3)
        for i in range(7):
            opt.zero_grad()
            scaler.scale(((m(x) - y) ** 2).mean()).backward()
            if i == 4:  # an overflow: skipped, the scale backs off
                next(p for p in m.parameters() if p.grad is not None).grad[0, 0] = math.inf
            if opt is ref:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_skip_nonfinite_leaves_everything_unchanged(backend_device):
    backend, device = backend_device
    model = make_model(device)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, skip_nonfinite=True, backend=backend)
    train(model, opt, 3, device)
    params = [p.detach().clone() for p in model.parameters()]
    bufs = copy.deepcopy(opt.state_dict()["state"])
    x, y = make_data(device)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[2].weight.grad[0, 0] = math.nan
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for key, s in opt.state_dict()["state"].items():
        assert torch.equal(s["momentum_buffer"], bufs[key]["momentum_buffer"])
    assert int(opt.skipped_steps) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "learning rate"),
    (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(nesterov=True), "Nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(backend="tpu"), "unknown backend"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGD(make_model("cpu").parameters(), **kwargs)


def test_bad_grad_changes_nothing():
    model = make_model("cpu")
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 2, "cpu")
    x, y = make_data("cpu")
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[-1].weight.grad = model[-1].weight.grad.to_sparse()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    for key, s in opt.state_dict()["state"].items():
        assert torch.equal(s["momentum_buffer"], state[key]["momentum_buffer"])
