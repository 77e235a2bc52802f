"""flat=True: the params (and grads, then state) of a group with one (device, dtype) laid out in
one buffer, so that a step over them is one kernel call. The numbers are those of flat=False
bit for bit (the global norm of a clip sums in another order: within rounding), state_dicts
stay per param, skipped steps stay as if they never happened, and whatever breaks the layout
(a grad set to None, a `p.data = x`, step counts that differ) falls back to the per-param path."""
import copy
import math

import pytest
import torch
from torch import nn

from catapult_kernels import ops
from catapult_kernels.optim import ADOPT, LAMB, LARS, SGD, Adam, Adan, AdamW, Lion, unwritten
from conftest import BACKEND_DEVICES

GF = dict(alpha=0.9, lamb=2.0)
CASES = {
    "adamw": lambda ps, **kw: AdamW(ps, lr=1e-2, **kw),
    "adamw_amsgrad_grokfast": lambda ps, **kw: AdamW(ps, lr=1e-2, amsgrad=True, grokfast=GF, **kw),
    "adam_coupled_wd": lambda ps, **kw: Adam(ps, lr=1e-2, weight_decay=0.1, **kw),
    "sgd_momentum_grokfast": lambda ps, **kw: SGD(ps, lr=0.05, momentum=0.9, dampening=0.2, grokfast=GF, **kw),
    "sgd_nesterov": lambda ps, **kw: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, **kw),
    "sgd_plain": lambda ps, **kw: SGD(ps, lr=0.05, **kw),
    "lion_grokfast": lambda ps, **kw: Lion(ps, lr=1e-3, weight_decay=0.1, grokfast=GF, **kw),
    "adopt": lambda ps, **kw: ADOPT(ps, lr=1e-2, weight_decay=1e-2, **kw),
    "adan": lambda ps, **kw: Adan(ps, lr=1e-2, **kw),
}
# Two groups; the second mixes dtypes (two flat sets) and has its own lr.
SHAPES = [[(6, 5), (5,), (3, 1, 2)], [(4, 3), (7,)]]
DTYPES = [[torch.float32] * 3, [torch.bfloat16, torch.float32]]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[nn.Parameter(torch.randn(s, generator=g).to(d)) for s, d in zip(shapes, dtypes)]
            for shapes, dtypes in zip(SHAPES, DTYPES)]


def _groups(params):
    return [{"params": params[0]}, {"params": params[1], "lr": 3e-3}]


def _grads(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[[torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
             for shapes, dtypes in zip(SHAPES, DTYPES)] for _ in range(n)]


def _flat(params):
    return [p for group in params for p in group]


def _run(make, grads, flat, **kw):
    """Steps over `grads`, written into the grads in place (as backward does) on the flat run."""
    params = _params()
    opt = make(_groups(params), flat=flat, **kw)
    for step_grads in grads:
        for p, g in zip(_flat(params), _flat(step_grads)):
            if flat:
                p.grad.copy_(g)
            else:
                p.grad = g.clone()
        opt.step()
    return params, opt


def _assert_same(ours, theirs, opt, ref_opt, exact=True):
    check = torch.equal if exact else lambda a, b: torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7)
    for p, q in zip(_flat(ours), _flat(theirs)):
        assert check(p, q)
    for p, q in zip(_flat(ours), _flat(theirs)):
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert set(state) == set(ref_state)
        for key in ref_state:
            assert check(state[key], ref_state[key]), key


@pytest.fixture
def kernel_calls(monkeypatch):
    """The number of params of each update op call."""
    calls = []
    update = ops.update_

    def counted(op, params, *args, **kw):
        calls.append(len(params))
        return update(op, params, *args, **kw)
    monkeypatch.setattr(ops, "update_", counted)
    return calls


@pytest.mark.parametrize("backend", [b.values[0][0] for b in BACKEND_DEVICES if b.values[0][1] == "cpu"])
@pytest.mark.parametrize("name", CASES)
def test_flat_steps_equal_per_param_steps_bit_for_bit(name, backend, kernel_calls):
    """20 steps over two groups and mixed dtypes: the params and every state tensor equal
    flat=False's bit for bit, and from the second step (the first makes the state) each
    flat set takes one kernel call; on every backend that runs on CPU tensors here."""
    grads = _grads(20)
    ours, opt = _run(CASES[name], grads, flat=True, backend=backend)
    assert kernel_calls[-3:] == [1, 1, 1]  # three flat sets, one buffer each
    theirs, ref_opt = _run(CASES[name], grads, flat=False, backend=backend)
    _assert_same(ours, theirs, opt, ref_opt)
    for p in _flat(ours):  # the state is flat: views of one buffer per set
        for key, t in opt.state[p].items():
            assert t._base is not None, key


@pytest.mark.parametrize("name", ["adamw_amsgrad_grokfast", "sgd_momentum_grokfast", "adan"])
def test_flat_clip_equals_per_param_clip_within_rounding(name, kernel_calls):
    """With a global clip that bites, the norm over the flat buffers sums in another order:
    the params and states agree within rounding, and the reported norm too."""
    grads = _grads(20)
    ours, opt = _run(CASES[name], grads, flat=True, max_grad_norm=0.5)
    assert kernel_calls[-3:] == [1, 1, 1]
    theirs, ref_opt = _run(CASES[name], grads, flat=False, max_grad_norm=0.5)
    assert float(ref_opt.grad_norm) > 2.0  # the clip bites
    torch.testing.assert_close(opt.grad_norm, ref_opt.grad_norm, rtol=1e-6, atol=0)
    _assert_same(ours, theirs, opt, ref_opt, exact=False)


def test_state_dict_round_trips_through_per_param_and_torch():
    """flat -> per param -> flat gives the numbers of one flat run; the state_dict is
    torch's, per param, with independent step counts, and torch's AdamW resumes from it."""
    grads = _grads(10)
    make = CASES["adamw"]
    straight, straight_opt = _run(make, grads, flat=True)

    first, first_opt = _run(make, grads[:4], flat=True)
    saved = copy.deepcopy(first_opt.state_dict())
    assert [float(s["step"]) for s in saved["state"].values()] == [4.0] * 5
    steps = [s["step"] for s in first_opt.state_dict()["state"].values()]
    steps[0] += 1  # each param's count is its own
    assert [float(s) for s in steps[1:]] == [4.0] * 4
    steps[0] -= 1

    middle = [[nn.Parameter(p.detach().clone()) for p in group] for group in first]
    middle_opt = make(_groups(middle), flat=False)
    middle_opt.load_state_dict(copy.deepcopy(saved))
    for step_grads in grads[4:7]:
        for p, g in zip(_flat(middle), _flat(step_grads)):
            p.grad = g.clone()
        middle_opt.step()

    last = [[nn.Parameter(p.detach().clone()) for p in group] for group in middle]
    last_opt = make(_groups(last), flat=True)
    last_opt.load_state_dict(copy.deepcopy(middle_opt.state_dict()))
    for step_grads in grads[7:]:
        for p, g in zip(_flat(last), _flat(step_grads)):
            p.grad.copy_(g)
        last_opt.step()
    _assert_same(last, straight, last_opt, straight_opt)
    assert all(s.state_keys is not None for s in last_opt._flat_sets)  # flat again

    ref = [[nn.Parameter(p.detach().clone()) for p in group] for group in first]
    torch_opt = torch.optim.AdamW(_groups(ref), lr=1e-2, foreach=False)
    torch_opt.load_state_dict(copy.deepcopy(saved))
    for step_grads in grads[4:]:
        for p, g in zip(_flat(ref), _flat(step_grads)):
            p.grad = g.clone()
        torch_opt.step()
    for p, q in zip(_flat(straight), _flat(ref)):
        torch.testing.assert_close(p, q, rtol=2e-2 if p.dtype is torch.bfloat16 else 1e-5, atol=1e-5)


def test_load_state_dict_rewinds_a_flat_optimizer():
    """A state_dict loaded into an optimizer that ran flat replaces its flat state."""
    grads = _grads(8)
    straight, straight_opt = _run(CASES["sgd_momentum_grokfast"], grads, flat=True)
    params = _params()
    opt = CASES["sgd_momentum_grokfast"](_groups(params), flat=True)
    for t, step_grads in enumerate(grads[:4] + grads[4:7] + grads[4:]):
        if t == 4:
            saved, kept = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in _flat(params)]
        if t == 7:  # back to step 4
            opt.load_state_dict(saved)
            for p, k in zip(_flat(params), kept):
                p.data.copy_(k)
        for p, g in zip(_flat(params), _flat(step_grads)):
            p.grad.copy_(g)
        opt.step()
    _assert_same(params, straight, opt, straight_opt)


def test_grads_given_before_construction_are_kept():
    params, ref = _params(), _params()
    for p, q, g in zip(_flat(params), _flat(ref), _flat(_grads(1)[0])):
        p.grad, q.grad = g.clone(), g.clone()
    opt, ref_opt = Lion(_groups(params), flat=True), Lion(_groups(ref))
    assert all(p.grad._base is not None for p in _flat(params))  # views of the flat grad buffers
    for _ in range(2):
        opt.step()
        ref_opt.step()
    _assert_same(params, ref, opt, ref_opt)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(5, 8), nn.Linear(8, 2), nn.Linear(2, 2)

    def forward(self, x, use_all):
        y = self.b(torch.tanh(self.a(x)))
        return self.unused(y) if use_all else y


def _train(flat, zero, uses, make=CASES["adamw"]):
    torch.manual_seed(0)
    net = _Net()
    opt = make(net.parameters(), flat=flat)
    g = torch.Generator().manual_seed(2)
    for use_all in uses:
        x = torch.randn(16, 5, generator=g)
        zero(net, opt)
        net(x, use_all).square().mean().backward()
        opt.step()
    return net, opt


@pytest.mark.parametrize("zero", ["model_set_to_none", "opt_zero_grad"])
def test_training_with_backward_equals_per_param(zero, kernel_calls):
    """A model trained by backward: zero_grad by the model (grads set to None, then new ones:
    copied in and the views put back) or by the optimizer (the views zeroed in place)."""
    zero_fn = {"model_set_to_none": lambda net, opt: net.zero_grad(set_to_none=True),
               "opt_zero_grad": lambda net, opt: opt.zero_grad(set_to_none=True)}[zero]
    net, opt = _train(True, zero_fn, [True] * 6)
    assert kernel_calls[-1] == 1
    ref, ref_opt = _train(False, zero_fn, [True] * 6)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    flat_set, = opt._flat_sets
    assert all(p.grad is v for p, v in zip(net.parameters(), flat_set.grads))
    opt.zero_grad()
    assert all(p.grad is v for p, v in zip(net.parameters(), flat_set.grads))
    assert not flat_set.grad.any()


def test_params_without_a_grad_take_the_per_param_path():
    """model.zero_grad() then a backward that skips a layer: its grads are None, and it is
    not updated (as torch), so that step runs per param; the flat layout comes back after."""
    uses = [True, True, False, True, False, False, True]
    zero = lambda net, opt: net.zero_grad(set_to_none=True)  # noqa: E731
    for make in (CASES["adamw"], CASES["sgd_momentum_grokfast"]):
        net, opt = _train(True, zero, uses, make)
        ref, ref_opt = _train(False, zero, uses, make)
        for p, q in zip(net.parameters(), ref.parameters()):
            assert torch.equal(p, q)
            for key in ref_opt.state[q]:
                assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), key
        # the counts parted (the unused layer skipped steps): per param from then on
        assert opt._flat_sets[0].diverged == ("step" in ref_opt.state[q])


@pytest.fixture(params=["host_reads_flag", "flag_unknown_on_host"])
def flag_on_host(request, monkeypatch):
    """On the CPU the host reads an unwritten-state flag at once; on CUDA it can take some
    steps: then the state is maybe unwritten, and its set runs per param."""
    if request.param == "flag_unknown_on_host":
        known = unwritten.UnwrittenFlag.known
        monkeypatch.setattr(unwritten.UnwrittenFlag, "known",
                            lambda self, sync=False: known(self, sync) if sync else None)
    return request.param


@pytest.mark.parametrize("how", ["nonfinite", "found_inf"])
@pytest.mark.parametrize("name", ["adamw_amsgrad_grokfast", "sgd_momentum_grokfast", "lion_grokfast", "adan"])
def test_skipped_steps_leave_everything_as_it_was(name, how, kernel_calls, flag_on_host):
    """Skipped steps (a nan grad with skip_nonfinite, GradScaler's found_inf), the first one
    among them (new state, set on its first real step) and later ones (on the flat path),
    give bit for bit the run that never saw them."""
    grads = _grads(8)
    skipped = {0, 4, 5}

    def run(flat, steps, skip):
        params = _params()
        opt = CASES[name](_groups(params), flat=flat, skip_nonfinite=True)
        for t, step_grads in enumerate(steps):
            for p, g in zip(_flat(params), _flat(step_grads)):
                p.grad = g.clone()
            if t in skip and how == "nonfinite":
                params[0][0].grad[1, 2] = math.nan
            if how == "found_inf":
                opt.grad_scale = torch.ones(())
                opt.found_inf = torch.full((), float(t in skip))
            opt.step()
        return params, opt

    ours, opt = run(True, grads, skipped)
    if flag_on_host == "host_reads_flag":  # else the new state stays maybe unwritten: per param
        assert all(s.state_keys is not None for s in opt._flat_sets) and kernel_calls[-1] == 1
    assert int(opt.skipped_steps) == 3
    theirs, ref_opt = run(False, [g for t, g in enumerate(grads) if t not in skipped], set())
    _assert_same(ours, theirs, opt, ref_opt)


def test_refused_where_the_update_needs_each_params_norm():
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="LAMB does not take flat=True"):
        LAMB(p, flat=True)
    with pytest.raises(ValueError, match="LARS does not take flat=True"):
        LARS(p, flat=True)
    with pytest.raises(ValueError, match="flat=True does not take agc"):
        AdamW(p, agc=0.01, flat=True)


def test_a_group_with_agc_and_frozen_params_stay_per_param():
    """AGC needs each param's rows, and a frozen param keeps no grad: they stay as given."""
    params = _params()
    frozen = nn.Parameter(torch.randn(3), requires_grad=False)
    data = [p.data_ptr() for p in params[1]] + [frozen.data_ptr()]
    opt = AdamW([{"params": params[0] + [frozen]}, {"params": params[1], "agc": 0.05}], flat=True)
    assert [p.data_ptr() for p in params[1]] + [frozen.data_ptr()] == data
    assert len(opt._flat_sets) == 1 and opt._flat_sets[0].params == params[0]
    ref = [[nn.Parameter(p.detach().clone()) for p in group] for group in params]
    ref_opt = AdamW([{"params": ref[0]}, {"params": ref[1], "agc": 0.05}])
    for step_grads in _grads(4):
        for p, q, g in zip(_flat(params), _flat(ref), _flat(step_grads)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    _assert_same(params, ref, opt, ref_opt)


def test_a_param_moved_out_by_data_assignment_leaves_the_layout():
    """`p.data = x` takes p out of its buffer: its set takes the per-param path from then on."""
    grads = _grads(5)
    params, ref = _params(), _params()
    opt, ref_opt = AdamW(_groups(params), flat=True), AdamW(_groups(ref))
    for t, step_grads in enumerate(grads):
        if t == 2:
            params[0][1].data = params[0][1].data.clone()
            ref[0][1].data = ref[0][1].data.clone()
        for p, q, g in zip(_flat(params), _flat(ref), _flat(step_grads)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    _assert_same(params, ref, opt, ref_opt)
    assert len(opt._flat_sets) == 2


def test_deepcopy_keeps_the_layout_and_the_numbers():
    grads = _grads(6)
    params = _params()
    opt = Adan(_groups(params), lr=1e-2, flat=True)
    for step_grads in grads[:3]:
        for p, g in zip(_flat(params), _flat(step_grads)):
            p.grad.copy_(g)
        opt.step()
    twin = copy.deepcopy(opt)
    assert twin.flat and len(twin._flat_sets) == 3
    twin_params = [group["params"] for group in twin.param_groups]
    for o, ps in ((opt, params), (twin, twin_params)):
        for step_grads in grads[3:]:
            for p, g in zip(_flat(ps), _flat(step_grads)):
                p.grad = g.clone()
            o.step()
    _assert_same(twin_params, params, twin, opt)


def test_compiled_step_runs_per_param_with_the_eager_numbers():
    """Under torch.compile every param takes the per-param path (one graph, no break); the
    numbers are the eager flat steps'."""
    torch._dynamo.reset()
    params = [nn.Parameter(torch.randn(s)) for s in [(16, 8), (16,), (3, 16)]]
    eager_params = [nn.Parameter(p.detach().clone()) for p in params]
    opt = AdamW(params, lr=1e-2, max_grad_norm=0.5, flat=True)
    eager_opt = AdamW(eager_params, lr=1e-2, max_grad_norm=0.5, flat=True)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(params, eager_params):
            p.grad.copy_(torch.randn(p.shape, generator=g))
            q.grad.copy_(p.grad)
        compiled_step()
        eager_opt.step()
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert torch.equal(opt.state[p]["step"], eager_opt.state[q]["step"])


def test_compiled_training_step_with_zero_grad_keeps_the_views():
    """A compiled training step (backward, step, opt.zero_grad()) gives the eager flat numbers,
    and leaves the grads views of the flat buffer, zeroed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    eager_model = copy.deepcopy(model)
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def make_step(m, opt):
        def step():
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        return step
    opt = AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5, flat=True)
    eager_opt = AdamW(eager_model.parameters(), lr=1e-2, max_grad_norm=0.5, flat=True)
    compiled, eager = torch.compile(make_step(model, opt)), make_step(eager_model, eager_opt)
    for _ in range(3):
        compiled()
        eager()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    flat_set, = opt._flat_sets
    assert all(p.grad is v for p, v in zip(model.parameters(), flat_set.grads)) and not flat_set.grad.any()
