"""catapult_kernels.optim.AdamW against torch.optim.AdamW (+ clip_grad_norm_): the same
numbers over many steps, interchangeable state_dicts, GradScaler, skips, bad input."""
import copy
import math

import pytest
import torch
from torch import nn

from catapult_kernels.optim import AdamW
from conftest import BACKEND_DEVICES
from reference import norm_reference
from training import STEPS, assert_same_params, make_data, param_groups, make_model, train

CONFIGS = {
    "default": dict(),
    "clip": dict(max_grad_norm=0.05),
    "amsgrad_maximize": dict(amsgrad=True, maximize=True),
    "clip_amsgrad_betas": dict(max_grad_norm=0.1, amsgrad=True, betas=(0.8, 0.95), eps=1e-6),
}


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_torch_adamw(backend_device, config):
    backend, device = backend_device
    config = dict(config)
    max_grad_norm = config.pop("max_grad_norm", None)
    ours_model = make_model(device)
    ref_model = copy.deepcopy(ours_model)
    lr = 3e-2
    ours = AdamW(param_groups(ours_model, lr), lr=lr, weight_decay=0.1, max_grad_norm=max_grad_norm,
                 backend=backend, **config)
    ref = torch.optim.AdamW(param_groups(ref_model, lr), lr=lr, weight_decay=0.1, **config)
    sched_ours = torch.optim.lr_scheduler.CosineAnnealingLR(ours, T_max=STEPS)
    sched_ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=STEPS)
    norms = train(ours_model, ours, STEPS, device, max_grad_norm=max_grad_norm, scheduler=sched_ours)
    ref_norms = train(ref_model, ref, STEPS, device, max_grad_norm=max_grad_norm, scheduler=sched_ref)
    # Ulp-level differences (FMA or not) grow over 20 steps at this lr; 1e-4 is 0.3% of
    # one step's size, far below what any error in the formula would give.
    assert_same_params(ours_model, ref_model, rtol=1e-4, atol=1e-4)
    if max_grad_norm is not None:  # the first step's norm exactly; later ones see the drift
        torch.testing.assert_close(norms[0], ref_norms[0].to(device), rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.stack(norms), torch.stack(ref_norms).to(device), rtol=1e-4, atol=0)
        assert norms[0].device.type == device and norms[0].shape == ()
    assert ours_model[0].bias.grad is None and ours_model[0].bias not in ours.state
    for p in ours_model.parameters():
        if p.requires_grad:
            for key in ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if config.get("amsgrad") else ()):
                assert key in ours.state[p]


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_half_params_at_least_as_accurate_as_torch_fused(backend_device, dtype, amsgrad):
    """20 steps on half-type params fed a fixed sequence of grads (no feedback through a
    model, so rounding differences do not compound chaotically): against float32 training,
    our error is no more than 2x that of torch's fused AdamW run in the same dtype."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(7)
    shapes = [(64, 33), (33,), (1,), (257,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * 1e-2 for s in shapes] for _ in range(20)]
    runs = {}
    for name, make, dt in [("gold", lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=amsgrad), torch.float32),
                           ("torch", lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=amsgrad, fused=True), dtype),
                           ("ours", lambda ps: AdamW(ps, lr=1e-2, amsgrad=amsgrad, backend=backend), dtype)]:
        params = [nn.Parameter(p.to(device=device, dtype=dt)) for p in init]
        opt = make(params)
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr.to(device=device, dtype=dt)
            opt.step()
        runs[name] = (params, opt)
    for i, (pg, pr, po) in enumerate(zip(*(runs[k][0] for k in ("gold", "torch", "ours")))):
        err_ref = (pr.double() - pg.double()).norm()
        err_ours = (po.double() - pg.double()).norm()
        assert err_ours <= 2 * err_ref, (i, float(err_ours), float(err_ref))
        assert runs["ours"][1].state[po]["exp_avg"].dtype == dtype


def test_mixed_dtypes_in_one_model():
    """One optimizer over float32 and bfloat16 params: the global norm covers both, and
    each dtype is updated as torch's fused AdamW updates it (one step: no feedback)."""
    model = make_model("cpu")
    model[-1].to(torch.bfloat16)
    ref_model = copy.deepcopy(model)
    ours = AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.1)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, fused=True)
    x, y = make_data("cpu")
    for m, opt in ((model, ours), (ref_model, ref)):
        ((m[-1](m[:-1](x).bfloat16()).float() - y) ** 2).mean().backward()
        if opt is ours:
            expected_norm = norm_reference([p.grad for p in m.parameters() if p.grad is not None])[0]
        else:
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
        opt.step()
    torch.testing.assert_close(ours.grad_norm.double(), expected_norm, rtol=1e-5, atol=0)
    assert_same_params(model[:-1], ref_model[:-1], rtol=1e-5, atol=1e-5)
    assert_same_params(model[-1:], ref_model[-1:], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_interchangeable(direction):
    """Train 5 steps with one optimizer, move its state_dict into the other, train 5 more:
    the same numbers as 10 uninterrupted steps."""
    model = make_model("cpu")
    straight = copy.deepcopy(model)
    make_ours = lambda m: AdamW(param_groups(m, 1e-2), lr=1e-2, amsgrad=True)  # noqa: E731
    make_torch = lambda m: torch.optim.AdamW(param_groups(m, 1e-2), lr=1e-2, amsgrad=True)  # noqa: E731
    first, second = (make_ours, make_torch) if direction == "ours_to_torch" else (make_torch, make_ours)
    opt = first(model)
    train(model, opt, 5, "cpu")
    saved = copy.deepcopy(opt.state_dict())
    opt2 = second(model)
    opt2.load_state_dict(saved)
    train(model, opt2, 5, "cpu")
    ref = make_torch(straight)
    train(straight, ref, 10, "cpu")
    assert_same_params(model, straight, rtol=1e-5, atol=1e-5)
    for p in model.parameters():
        if p in opt2.state:
            assert float(opt2.state[p]["step"]) == 10.0


def test_state_dict_group_keys_are_torchs_where_our_options_hold_their_default():
    """grokfast and agc, which torch's groups lack, are left out of state_dict() where a group
    holds the optimizer's default (so that torch.distributed.checkpoint, which loads only the
    keys both sides have, moves checkpoints between us and torch), kept where a group differs,
    and filled in from the loading optimizer's defaults: a torch state_dict loaded into an
    AdamW built with Grokfast and AGC keeps them on."""
    model = make_model("cpu")
    torch_keys = set(torch.optim.AdamW(model.parameters()).state_dict()["param_groups"][0])
    plain = AdamW(model.parameters())
    assert set(plain.state_dict()["param_groups"][0]) == torch_keys
    grokfast = dict(alpha=0.9, lamb=1.0)
    tuned = AdamW(model.parameters(), grokfast=grokfast, agc=0.05)
    assert set(tuned.state_dict()["param_groups"][0]) == torch_keys
    tuned.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
    assert tuned.param_groups[0]["grokfast"] == grokfast and tuned.param_groups[0]["agc"] == 0.05
    mixed = AdamW([{"params": list(model.parameters())[:2], "agc": 0.1}, {"params": list(model.parameters())[2:]}])
    groups = mixed.state_dict()["param_groups"]
    assert groups[0]["agc"] == 0.1 and "agc" not in groups[1]
    loaded = AdamW([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    loaded.load_state_dict(mixed.state_dict())
    assert loaded.param_groups[0]["agc"] == 0.1 and loaded.param_groups[1]["agc"] is None


@pytest.mark.parametrize("step_as", ["float", "cpu_tensor"])
def test_loads_step_saved_as_float_or_cpu_tensor(step_as):
    model = make_model("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 3, "cpu")
    sd = opt.state_dict()
    for s in sd["state"].values():
        s["step"] = float(s["step"]) if step_as == "float" else torch.tensor(float(s["step"]))
    ours = AdamW(model.parameters(), lr=1e-2)
    ours.load_state_dict(sd)
    train(model, ours, 2, "cpu")
    for s in ours.state.values():
        assert isinstance(s["step"], torch.Tensor) and float(s["step"]) == 5.0


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_grad_scaler(backend_device):
    """GradScaler hands its scale and found_inf to our step (torch's fused-optimizer
    protocol); an overflowing step is skipped on the device and the scale backs off.
    Reference: torch's AdamW with unscale_ + clip_grad_norm_."""
    backend, device = backend_device
    model = make_model(device)
    ref_model = copy.deepcopy(model)
    ours = AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.05, backend=backend)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    x, y = make_data(device)
    scales, norms = [], []
    for m, opt in ((model, ours), (ref_model, ref)):
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
        for i in range(8):
            opt.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            scaler.scale(loss).backward()
            if i == 3:  # an overflow: this step must be skipped
                next(p for p in m.parameters() if p.grad is not None).grad[0, 0] = math.inf
            if opt is ref:
                scaler.unscale_(opt)
                norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
            if opt is ours:
                norm = ours.grad_norm.clone()  # unscaled, as clip_grad_norm_ sees it
        norms.append(norm)
        scales.append(scaler.get_scale())
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-4, atol=0)
    assert scales[0] == scales[1] == 2.0**12  # x2 three times, /2 once
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-5)
    for p, pr in zip(model.parameters(), ref_model.parameters()):
        if p in ours.state:
            assert float(ours.state[p]["step"]) == float(ref.state[pr]["step"]) == 7.0


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_skip_nonfinite_leaves_everything_unchanged(backend_device, bad):
    backend, device = backend_device
    model = make_model(device)
    opt = AdamW(model.parameters(), lr=1e-2, skip_nonfinite=True, backend=backend)
    train(model, opt, 3, device)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    x, y = make_data(device)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[2].weight.grad[1, 1] = bad
    opt.step()
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    for key, s in opt.state_dict()["state"].items():
        for name, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[key][name])), name
    assert int(opt.skipped_steps) == 1
    assert not torch.isfinite(opt.grad_norm)
    train(model, opt, 1, device)  # and training goes on
    assert int(opt.skipped_steps) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_closure_and_add_param_group():
    model = make_model("cpu")
    extra = nn.Parameter(torch.randn(5))
    ref_model, ref_extra = copy.deepcopy(model), extra.detach().clone().requires_grad_()
    x, y = make_data("cpu")
    ours = AdamW(model.parameters(), lr=1e-2)
    ours.add_param_group(dict(params=[extra], lr=0.1, weight_decay=0.0))
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    ref.add_param_group(dict(params=[ref_extra], lr=0.1, weight_decay=0.0))
    for m, e, opt in ((model, extra, ours), (ref_model, ref_extra, ref)):
        for _ in range(4):
            def closure():
                opt.zero_grad()
                loss = ((m(x) - y) ** 2).mean() + (e ** 2).sum()
                loss.backward()
                return loss
            loss = opt.step(closure)
            assert loss is not None
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extra, ref_extra, rtol=1e-5, atol=1e-5)


def test_grad_with_other_strides_than_param():
    p = nn.Parameter(torch.randn(6, 4))
    q = nn.Parameter(p.detach().clone())
    g = torch.randn(4, 6).t()  # same shape, transposed strides
    p.grad, q.grad = g, g.contiguous()
    AdamW([p], lr=0.1).step()
    torch.optim.AdamW([q], lr=0.1).step()
    torch.testing.assert_close(p, q)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "learning rate"),
    (dict(eps=-1e-8), "epsilon"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(backend="tpu"), "unknown backend"),
    (dict(differentiable=True), "differentiable"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW(make_model("cpu").parameters(), **kwargs)


def test_bad_params():
    with pytest.raises(ValueError, match="complex"):
        AdamW([nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="one device"):
        AdamW([nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3, device="meta"))])
    with pytest.raises(ValueError, match="not supported"):
        AdamW([nn.Parameter(torch.randn(3, dtype=torch.float64))])


@pytest.mark.parametrize("case, match", [
    ("sparse", "sparse"),
    ("shape", "grad of param"),
    ("dtype", "grad of param"),
    ("negative_lr", "learning rate"),
])
def test_bad_step_input_changes_nothing(case, match):
    """The error names the problem and comes before any param or state is written,
    although the bad param comes last."""
    model = make_model("cpu")
    opt = AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2, "cpu")
    x, y = make_data("cpu")
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    w = model[-1].weight
    if case == "sparse":
        w.grad = w.grad.to_sparse()
    elif case == "shape":  # .data may change shape under a grad; the step must notice
        w.data = torch.randn(w.shape[0], w.shape[1] + 1)
    elif case == "dtype":
        w.data = w.data.to(torch.bfloat16)
    else:
        opt.param_groups[0]["lr"] = -1.0
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises((RuntimeError, ValueError), match=match):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for key, s in opt.state_dict()["state"].items():
        for name, value in s.items():
            assert torch.equal(value, state[key][name]), (key, name)


def test_size_one_dims_may_have_any_stride():
    """A column made by .t() has strides (1, 8); a fresh grad of its shape has (1, 1). Both
    walk memory in the same order, so the step must take them as they are, as torch does."""
    p = nn.Parameter(torch.randn(1, 8).t())
    q = nn.Parameter(p.detach().clone())
    p.grad, q.grad = torch.randn(8, 1), None
    q.grad = p.grad.clone()
    assert p.stride() != p.grad.stride()
    AdamW([p], lr=0.1).step()
    torch.optim.AdamW([q], lr=0.1).step()
    torch.testing.assert_close(p, q)


def test_found_inf_summed_over_devices_skips_once():
    """GradScaler hands over found_inf summed over devices (2.0 with two overflowing GPUs):
    still one skipped step, and the step count must not go down."""
    model = make_model("cpu")
    opt = AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2, "cpu")
    before = copy.deepcopy(opt.state_dict()["state"])
    params = [p.detach().clone() for p in model.parameters()]
    opt.found_inf, opt.grad_scale = torch.tensor(2.0), None
    opt.step()
    del opt.found_inf, opt.grad_scale
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for key, s in opt.state_dict()["state"].items():
        assert float(s["step"]) == float(before[key]["step"]) == 2.0
    assert int(opt.skipped_steps) == 1


def test_tensor_lr():
    model = make_model("cpu")
    ref_model = copy.deepcopy(model)
    ours = AdamW(model.parameters(), lr=torch.tensor(1e-2))
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    train(model, ours, 5, "cpu")
    train(ref_model, ref, 5, "cpu")
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-5)


def test_bad_loaded_state_changes_nothing():
    """A state_dict whose moments do not fit the params is refused at the step, before any
    param or state (of any group) is written."""
    model = make_model("cpu")
    opt = AdamW(param_groups(model, 1e-2), lr=1e-2)
    train(model, opt, 2, "cpu")
    sd = opt.state_dict()
    last = max(sd["state"])
    sd["state"][last]["exp_avg"] = torch.zeros(4, 4)
    opt.load_state_dict(sd)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    steps = {k: float(s["step"]) for k, s in opt.state_dict()["state"].items()}
    x, y = make_data("cpu")
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match="exp_avg"):
        opt.step()
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert {k: float(s["step"]) for k, s in opt.state_dict()["state"].items()} == steps
