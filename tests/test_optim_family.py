"""The optimizer family with the fused regularizers (Adam, AdamW, SGD, Lion, ADOPT, Adan, LAMB, LARS;
clip, AGC, Grokfast) against the plain-PyTorch references of
catapult_kernels.optim.reference (torch.optim itself for SGD, Adam and AdamW), over
20 steps on every backend; half types, state_dict round trips, skips, bad input."""
import copy
import math

import pytest
import torch
from torch import nn

from catapult_kernels.optim import ADOPT, LAMB, LARS, SGD, Adam, Adan, AdamW, Lion
from catapult_kernels.optim.reference import (ADOPTReference, AdanReference, GradPipeline, LAMBReference,
                                              LARSReference, LionReference)
from conftest import BACKEND_DEVICES
from training import STEPS, assert_same_params, make_data, make_model, param_groups

GF = dict(alpha=0.9, lamb=2.0)
# name: (ours, reference, optimizer kwargs, pipeline kwargs)
CASES = {
    "sgd_agc_grokfast": (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
                         dict(agc=0.05, grokfast=GF)),
    "sgd_plain_grokfast_maximize": (SGD, torch.optim.SGD, dict(lr=1e-3, maximize=True), dict(grokfast=GF)),
    "adam_l2_clip_grokfast": (Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2),
                              dict(max_grad_norm=0.1, grokfast=GF)),
    "adamw_agc": (AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), dict(agc=0.02)),
    "lion": (Lion, LionReference, dict(lr=1e-3, weight_decay=0.1), {}),
    "lion_all": (Lion, LionReference, dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=0.5, maximize=True),
                 dict(max_grad_norm=0.1, agc=0.05, grokfast=GF)),
    "adopt": (ADOPT, ADOPTReference, dict(lr=1e-2), {}),
    "adopt_all": (ADOPT, ADOPTReference, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-5, weight_decay=0.1, maximize=True),
                  dict(max_grad_norm=0.1, agc=0.05, grokfast=GF)),
    "adan": (Adan, AdanReference, dict(lr=1e-2), {}),
    "adan_no_prox_all": (Adan, AdanReference, dict(lr=1e-2, betas=(0.9, 0.9, 0.95), weight_decay=0.1, no_prox=True,
                                                   maximize=True), dict(max_grad_norm=0.1, agc=0.05, grokfast=GF)),
    "lamb": (LAMB, LAMBReference, dict(lr=1e-2), {}),
    "lamb_options": (LAMB, LAMBReference, dict(lr=1e-2, weight_decay=0.1, bias_correction=False,
                                               max_weight_norm=0.5), dict(max_grad_norm=0.1, grokfast=GF)),
    "lars": (LARS, LARSReference, dict(lr=1.0, weight_decay=1e-3), {}),
    "lars_nesterov_regularized": (LARS, LARSReference, dict(lr=0.5, nesterov=True, weight_decay=1e-3,
                                                            exclude_1d=False, trust_coefficient=0.01),
                                  dict(max_grad_norm=0.1, agc=0.05, grokfast=GF)),
}


def _reference_kwargs(ref, kwargs):
    if ref in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        return dict(kwargs, foreach=False)
    return kwargs


def _train(model, opt, pipeline, device, steps=STEPS):
    x, y = make_data(device)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if pipeline is not None:
            pipeline()
        opt.step()


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(backend_device, case):
    backend, device = backend_device
    ours_cls, ref_cls, kwargs, pipeline_kwargs = case
    model = make_model(device)
    ref_model = copy.deepcopy(model)
    lr = kwargs["lr"]
    ours = ours_cls(param_groups(model, lr), backend=backend, **kwargs, **pipeline_kwargs)
    ref = ref_cls(param_groups(ref_model, lr), **_reference_kwargs(ref_cls, kwargs))
    _train(model, ours, None, device)
    _train(ref_model, ref, GradPipeline(ref_model.parameters(), **pipeline_kwargs), device)
    assert_same_params(model, ref_model, rtol=1e-4, atol=1e-5)
    if "grokfast" in pipeline_kwargs:
        for p in model.parameters():
            if p.requires_grad:
                assert ours.state[p]["grokfast_ema"].shape == p.shape


def _fixed_sequence(make, params0, grads, device, dtype):
    params = [nn.Parameter(p.to(device=device, dtype=dtype)) for p in params0]
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return params


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["lion_all", "lamb_options", "lars_nesterov_regularized", "adam_l2_clip_grokfast",
                                  "adopt_all", "adan_no_prox_all"])
def test_half_types_at_least_as_accurate_as_the_reference(backend_device, dtype, name):
    """20 steps on a fixed grad sequence: against the float64 reference, our error (math in
    float32, one rounding per stored value) is no more than 2x that of the reference run
    in the same half type (which can overflow to nan in float16: then ignored), with a
    floor of 8 ulps of the largest param (20 roundings of p)."""
    backend, device = backend_device
    ours_cls, ref_cls, kwargs, pipeline_kwargs = CASES[name]
    # No clipping here: clipped grads of these sizes square to below float16's range, and
    # then any Adam-like state in float16 (ours, torch's, the reference's) is just zeros.
    pipeline_kwargs = {k: v for k, v in pipeline_kwargs.items() if k != "max_grad_norm"}
    g = torch.Generator().manual_seed(7)
    shapes = [(64, 33), (33,), (5, 1, 3)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(STEPS)]

    def reference(params):
        opt, pipeline = ref_cls(params, **_reference_kwargs(ref_cls, kwargs)), GradPipeline(params, **pipeline_kwargs)

        class Both:
            def step(self):
                pipeline()
                opt.step()
        return Both()

    gold = _fixed_sequence(reference, init, grads, "cpu", torch.float64)
    same = _fixed_sequence(reference, init, grads, "cpu", dtype)
    ours = _fixed_sequence(lambda ps: ours_cls(ps, backend=backend, **kwargs, **pipeline_kwargs), init, grads,
                           device, dtype)
    for pg, ps, po in zip(gold, same, ours):
        err_same = torch.nan_to_num((ps.double() - pg).abs().max(), nan=0.0)
        floor = 8 * torch.finfo(dtype).eps * pg.abs().max()
        assert (po.detach().cpu().double() - pg).abs().max() <= 2 * max(err_same, floor)


@pytest.mark.parametrize("name", CASES.keys())
def test_state_dict_round_trip(name):
    """5 steps, save, a new optimizer loads it, 5 more: bit-identical to 10 straight steps."""
    ours_cls, _, kwargs, pipeline_kwargs = CASES[name]
    make = lambda m: ours_cls(param_groups(m, kwargs["lr"]), **kwargs, **pipeline_kwargs)  # noqa: E731
    model = make_model("cpu")
    straight = copy.deepcopy(model)
    opt = make(model)
    _train(model, opt, None, "cpu", steps=5)
    saved = copy.deepcopy(opt.state_dict())
    if "grokfast" in pipeline_kwargs:
        assert all("grokfast_ema" in s for s in saved["state"].values())
    opt2 = make(model)
    opt2.load_state_dict(saved)
    _train(model, opt2, None, "cpu", steps=5)
    _train(straight, make(straight), None, "cpu", steps=10)
    for p, q in zip(model.parameters(), straight.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_adam_state_dict_interchangeable_with_torch(direction):
    kw = dict(lr=1e-2, weight_decay=1e-2)
    model = make_model("cpu")
    straight = copy.deepcopy(model)
    make_ours = lambda m: Adam(param_groups(m, 1e-2), **kw)  # noqa: E731
    make_torch = lambda m: torch.optim.Adam(param_groups(m, 1e-2), **kw)  # noqa: E731
    first, second = (make_ours, make_torch) if direction == "ours_to_torch" else (make_torch, make_ours)
    opt = first(model)
    _train(model, opt, None, "cpu", steps=5)
    opt2 = second(model)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt2, None, "cpu", steps=5)
    _train(straight, make_torch(straight), None, "cpu", steps=10)
    assert_same_params(model, straight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", ["sgd_agc_grokfast", "lion_all", "lamb_options", "lars_nesterov_regularized",
                                  "adopt_all", "adan_no_prox_all"])
def test_skip_nonfinite_leaves_everything_unchanged(backend_device, name):
    backend, device = backend_device
    ours_cls, _, kwargs, pipeline_kwargs = CASES[name]
    model = make_model(device)
    opt = ours_cls(model.parameters(), skip_nonfinite=True, backend=backend, **kwargs, **pipeline_kwargs)
    _train(model, opt, None, device, steps=3)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    x, y = make_data(device)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[2].weight.grad[0, 0] = math.nan
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for key, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(state[key][k])), k
    assert int(opt.skipped_steps) == 1


@pytest.mark.parametrize("make, match", [
    (lambda ps: SGD(ps, grokfast=dict(alpha=1.0)), "grokfast alpha"),
    (lambda ps: SGD(ps, grokfast=dict(alpha=0.9, lamb=-1.0)), "grokfast lamb"),
    (lambda ps: Adam(ps, grokfast=dict(beta=0.9)), "Invalid grokfast"),
    (lambda ps: AdamW(ps, agc=0.0), "Invalid agc"),
    (lambda ps: Lion(ps, agc=-1.0), "Invalid agc"),
    (lambda ps: Lion(ps, betas=(0.9, 1.5)), "beta"),
    (lambda ps: Lion(ps, lr=-1e-4), "learning rate"),
    (lambda ps: LAMB(ps, max_weight_norm=0.0), "max_weight_norm"),
    (lambda ps: LAMB(ps, eps=-1.0), "epsilon"),
    (lambda ps: LARS(ps, trust_coefficient=0.0), "trust_coefficient"),
    (lambda ps: LARS(ps, momentum=-0.5), "momentum"),
    (lambda ps: ADOPT(ps, betas=(0.9, 1.0)), "beta parameter at index 1"),
    (lambda ps: ADOPT(ps, eps=-1.0), "epsilon"),
    (lambda ps: Adan(ps, betas=(0.9, 0.99)), "three betas"),
    (lambda ps: Adan(ps, weight_decay=-0.1), "weight_decay"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_model("cpu").parameters())
