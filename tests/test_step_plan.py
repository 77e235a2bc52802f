"""The step plan (catapult_kernels/optim/plan.py): a step reuses the last step's checked lists
while nothing they came from changed, and checks everything anew, with the same errors
before anything is written, when something did. Each case runs two optimizers over the
same grads and changes: one as users run it, one whose plan is dropped before every step
(so that every step takes the full checks); they must agree bit for bit."""
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from catapult_kernels.optim import SGD, Adam, AdamW

SHAPES = [(6, 5), (5,), (3, 1, 2)]
GF = dict(alpha=0.9, lamb=2.0)


def _params(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _groups(params, **second):
    """Two groups, the second with its own options: a bad input in it comes after the first
    group's update would have run."""
    return [{"params": params[:2]}, {"params": params[2:], **second}]


def _set_grads(params, seed):
    """New grad tensors, as after zero_grad(set_to_none=True)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


class Twins:
    """`opt` as users run it and `ref`, checked anew every step, over copies of the same
    params; `count` counts the steps of `opt` that checked anew."""

    def __init__(self, make, shapes=SHAPES):
        self.params, self.ref_params = _params(shapes), _params(shapes)
        self.opt, self.ref = make(self.params), make(self.ref_params)
        self.count = 0
        checked = self.opt._checked_buckets

        def counted(*args):
            self.count += 1
            return checked(*args)
        self.opt._checked_buckets = counted

    def both(self, change):
        """change(opt, params) applied to both."""
        change(self.opt, self.params)
        change(self.ref, self.ref_params)

    def step(self, seed):
        _set_grads(self.params, seed)
        _set_grads(self.ref_params, seed)
        self.opt.step()
        self.ref._plan = None
        self.ref.step()
        self.assert_same()

    def assert_same(self):
        for p, q in zip(self.params, self.ref_params):
            assert torch.equal(p, q)
            mine, theirs = self.opt.state.get(p, {}), self.ref.state.get(q, {})
            assert mine.keys() == theirs.keys()
            for key in mine:
                assert torch.equal(torch.as_tensor(mine[key]), torch.as_tensor(theirs[key])), key


def _snapshot(opt):
    return ([p.detach().clone() for g in opt.param_groups for p in g["params"]],
            {id(p): {k: torch.as_tensor(v).clone() for k, v in s.items()} for p, s in opt.state.items()})


def _assert_unchanged(opt, snapshot):
    params, states = snapshot
    assert all(torch.equal(p, q) for p, q in zip((p for g in opt.param_groups for p in g["params"]), params))
    assert {id(p) for p in opt.state} == set(states)
    for p, s in opt.state.items():
        assert s.keys() == states[id(p)].keys()
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), states[id(p)][k]), k


# ---- reuse --------------------------------------------------------------------------
def test_plan_is_reused_while_nothing_changes_and_a_new_lr_does_not_rebuild_it():
    twins = Twins(lambda ps: AdamW(_groups(ps, lr=3e-2, weight_decay=0.1), lr=1e-2, max_grad_norm=1.0))
    for t in range(3):
        twins.step(t)
    for t, lr in enumerate([5e-3, 5e-3, 2e-2]):  # a scheduler's float lr
        twins.both(lambda opt, ps: opt.param_groups[0].__setitem__("lr", lr))
        twins.step(10 + t)
    assert twins.count == 1


def test_hyperparameters_that_keep_the_state_keys_keep_the_plan():
    """AGC switched on (with a transposed weight, whose grad it pre-scales), other betas,
    weight decay and maximize: the next steps take them, from the same plan."""
    def make(ps):
        ps.append(nn.Parameter(torch.randn(7, 5, generator=torch.Generator().manual_seed(6)).t()))
        return AdamW(_groups(ps), lr=1e-2)

    def change(opt, ps):
        opt.param_groups[1].update(agc=0.05, betas=(0.8, 0.99), weight_decay=0.3, maximize=True)
    twins = Twins(make)
    twins.step(0)
    twins.step(1)
    twins.both(change)
    twins.step(2)
    twins.step(3)
    assert twins.count == 1


def test_plan_takes_a_tensor_lr_as_it_is_now():
    twins = Twins(lambda ps: Adam(ps, lr=torch.tensor(1e-2)))
    twins.step(0)
    twins.both(lambda opt, ps: opt.param_groups[0]["lr"].fill_(3e-2))
    twins.step(1)
    assert twins.count == 1


def test_plan_holds_strided_params_agc_grokfast_frozen_params_and_mixed_dtypes():
    """The layouts the full checks handle apart: a strided param (a dense copy, written
    back), a transposed weight under AGC (a pre-scaled grad), a param without a grad,
    bfloat16 beside float32 in one group (two buckets)."""
    def make(ps):
        g = torch.Generator().manual_seed(5)
        ps += [nn.Parameter(torch.randn(6, 10, generator=g)[:, ::2]), nn.Parameter(torch.randn(7, 5, generator=g).t()),
               nn.Parameter(torch.randn(4, generator=g).to(torch.bfloat16)), nn.Parameter(torch.randn(3, generator=g))]
        return SGD(_groups(ps, agc=0.02), lr=0.05, momentum=0.9, grokfast=GF, max_grad_norm=2.0)

    twins = Twins(make)
    frozen = -1  # the last param: never a grad
    for t in range(4):
        _set_grads(twins.params, t)
        _set_grads(twins.ref_params, t)
        twins.params[frozen].grad = twins.ref_params[frozen].grad = None
        twins.opt.step()
        twins.ref._plan = None
        twins.ref.step()
        twins.assert_same()
    assert twins.count == 1


# ---- grads --------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda ps: AdamW(_groups(ps), lr=1e-2),
                                  lambda ps: SGD(_groups(ps), lr=0.1, momentum=0.9, grokfast=GF)],
                         ids=["adamw", "sgd_momentum_grokfast"])
def test_a_param_losing_and_regaining_its_grad_rebuilds_the_plan(make):
    twins = Twins(make)
    twins.step(0)
    twins.step(1)
    frozen = twins.params[2].detach().clone()

    def lose(opt, ps):
        ps[2].grad = None
    for t in (2, 3):
        _set_grads(twins.params, t)
        _set_grads(twins.ref_params, t)
        twins.both(lose)
        twins.opt.step()
        twins.ref._plan = None
        twins.ref.step()
        twins.assert_same()
    assert torch.equal(twins.params[2], frozen)
    twins.step(4)
    assert twins.count == 3  # the first step, the step the grad went, the step it came back


def _grad_of_dtype(p, dtype):
    p.grad_dtype = None  # torch refuses a grad of another dtype unless told
    p.grad = p.grad.to(dtype)


def _data(p, data):  # .data may change under a grad; the step must notice
    p.data = data


BAD_GRADS = {
    "grad_dtype": (lambda p: _grad_of_dtype(p, torch.bfloat16), "the grad of param 0 of group 1 is"),
    "grad_sparse": (lambda p: setattr(p, "grad", p.grad.to_sparse()), "does not support sparse gradients"),
    "param_dtype": (lambda p: _data(p, p.data.to(torch.bfloat16)), "the grad of param 0 of group 1 is"),
    "param_shape": (lambda p: _data(p, torch.zeros(p.shape[0] + 1, *p.shape[1:])), "the grad of param 0 of group 1"),
}


@pytest.mark.parametrize("case", BAD_GRADS)
def test_a_bad_grad_after_planned_steps_is_refused_before_anything_is_written(case):
    spoil, match = BAD_GRADS[case]
    params = _params()
    opt = AdamW(_groups(params, lr=3e-2), lr=1e-2)
    for t in range(2):
        _set_grads(params, t)
        opt.step()
    _set_grads(params, 2)
    spoil(params[2])
    before = _snapshot(opt)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    _assert_unchanged(opt, before)


def test_a_grad_that_turns_noncontiguous_is_laid_out_like_its_param():
    twins = Twins(lambda ps: AdamW(_groups(ps), lr=1e-2))
    twins.step(0)
    twins.step(1)

    def transposed_grad(opt, ps):  # same values, same shape, other strides
        ps[0].grad = ps[0].grad.t().contiguous().t()
    _set_grads(twins.params, 2)
    _set_grads(twins.ref_params, 2)
    twins.both(transposed_grad)
    assert not twins.params[0].grad.is_contiguous()
    twins.opt.step()
    twins.ref._plan = None
    twins.ref.step()
    twins.assert_same()
    twins.step(3)
    assert twins.count == 3


# ---- state ----------------------------------------------------------------------------
STATE_CHANGES = {
    "tensor_replaced": lambda opt, ps: opt.state[ps[2]].__setitem__("exp_avg", opt.state[ps[2]]["exp_avg"] * 2),
    "step_as_float": lambda opt, ps: opt.state[ps[2]].__setitem__("step", 7.0),
    "state_dropped": lambda opt, ps: opt.state.pop(ps[2]),
    "state_dict_replaced": lambda opt, ps: opt.state.__setitem__(ps[2], {}),
    "key_deleted": lambda opt, ps: opt.state[ps[2]].pop("exp_avg_sq"),
}


@pytest.mark.parametrize("case", STATE_CHANGES)
def test_state_changed_by_the_user_is_what_the_next_step_updates(case):
    twins = Twins(lambda ps: AdamW(_groups(ps), lr=1e-2))
    twins.step(0)
    twins.step(1)
    twins.both(STATE_CHANGES[case])
    twins.step(2)
    twins.step(3)
    assert twins.count == 2


BAD_STATES = {
    "dtype": lambda t: t.double(),
    "shape": lambda t: torch.zeros(t.shape[0] + 1, *t.shape[1:]),
    "layout": lambda t: torch.zeros(t.shape[::-1]).transpose(0, -1),
}


@pytest.mark.parametrize("case", BAD_STATES)
def test_a_bad_state_tensor_is_refused_before_anything_is_written(case):
    params = _params()
    opt = AdamW(_groups(params), lr=1e-2)
    for t in range(2):
        _set_grads(params, t)
        opt.step()
    _set_grads(params, 2)
    opt.state[params[2]]["exp_avg"] = BAD_STATES[case](opt.state[params[2]]["exp_avg"])
    before = _snapshot(opt)
    with pytest.raises(RuntimeError, match=r"state\['exp_avg'\] of a param is"):
        opt.step()
    _assert_unchanged(opt, before)


# ---- groups and hyperparameters ----------------------------------------------------------
def test_add_param_group_is_planned_in():
    twins = Twins(lambda ps: AdamW(ps[:2], lr=1e-2))
    twins.step(0)
    twins.step(1)
    twins.both(lambda opt, ps: opt.add_param_group({"params": ps[2:], "lr": 3e-2}))
    twins.step(2)
    twins.step(3)
    assert twins.count == 2


def test_load_state_dict_is_planned_in_and_the_replaced_state_let_go():
    other_params = _params()
    other = AdamW(_groups(other_params), lr=1e-2)
    for t in range(3):
        _set_grads(other_params, 20 + t)
        other.step()
    twins = Twins(lambda ps: AdamW(_groups(ps), lr=1e-2))
    twins.step(0)
    twins.step(1)
    replaced = weakref.ref(twins.opt.state[twins.params[0]]["exp_avg"])
    twins.both(lambda opt, ps: opt.load_state_dict(copy.deepcopy(other.state_dict())))
    gc.collect()
    assert replaced() is None
    twins.step(2)
    assert twins.opt.state[twins.params[0]]["step"] == 4
    twins.step(3)
    assert twins.count == 2


HYPER_CHANGES = {
    "amsgrad": (lambda ps: Adam(_groups(ps), lr=1e-2), "amsgrad", True, "max_exp_avg_sq"),
    "momentum": (lambda ps: SGD(_groups(ps), lr=0.1), "momentum", 0.9, "momentum_buffer"),
    "grokfast": (lambda ps: AdamW(_groups(ps), lr=1e-2), "grokfast", GF, "grokfast_ema"),
}


@pytest.mark.parametrize("case", HYPER_CHANGES)
def test_a_hyperparameter_that_changes_the_state_keys_rebuilds_the_plan(case):
    make, key, value, state_key = HYPER_CHANGES[case]
    twins = Twins(make)
    twins.step(0)
    twins.step(1)
    twins.both(lambda opt, ps: opt.param_groups[1].__setitem__(key, value))
    twins.step(2)
    twins.step(3)
    assert state_key in twins.opt.state[twins.params[2]] and state_key not in twins.opt.state[twins.params[0]]
    assert twins.count == 2


# ---- skipped steps, copies, torch.compile -----------------------------------------------
def test_a_skipped_first_step_leaves_the_next_step_a_first_step():
    """skip_nonfinite skips the first step: the momentum buffers it made are dropped, and
    the next step sets them, as a first step does."""
    twins = Twins(lambda ps: SGD(_groups(ps), lr=0.1, momentum=0.9, grokfast=GF, skip_nonfinite=True))

    def nan_grad(opt, ps):
        ps[0].grad[0, 0] = float("nan")
    _set_grads(twins.params, 0)
    _set_grads(twins.ref_params, 0)
    twins.both(nan_grad)
    twins.opt.step()
    twins.ref._plan = None
    twins.ref.step()
    twins.step(1)
    fresh = _params()
    first = SGD(_groups(fresh), lr=0.1, momentum=0.9, grokfast=GF)
    _set_grads(fresh, 1)
    first.step()
    assert all(torch.equal(p, q) for p, q in zip(twins.params, fresh))
    twins.step(2)


def test_copies_and_pickles_leave_the_plan_behind():
    params = _params()
    opt = AdamW(params, lr=1e-2)
    for t in range(2):
        _set_grads(params, t)
        opt.step()
    assert opt._plan is not None
    assert "_plan" not in opt.__getstate__()
    copied_params, copied = copy.deepcopy((params, opt))
    assert copied._plan is None
    _set_grads(params, 2)
    _set_grads(copied_params, 2)
    opt.step()
    copied.step()
    assert all(torch.equal(p, q) for p, q in zip(params, copied_params))


def test_a_compiled_step_takes_no_plan_and_compiles_once_its_state_is_made():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    params = _params()
    opt = AdamW(_groups(params, lr=3e-2), lr=1e-2, max_grad_norm=1.0, backend="cpu")
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for t in range(3):
        _set_grads(params, t)
        step()
    compiled = counter.frame_count
    for t in range(3, 7):
        _set_grads(params, t)
        step()
    assert counter.frame_count == compiled
    assert opt._plan is None
