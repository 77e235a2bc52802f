"""What a demanding torch.optim user relies on beyond the numbers: a skipped step is as if it
never happened; params that share memory, bad tensor lrs and foreign state are refused
before anything changes; copies keep every option; zero-size and strided params train;
a compiled step does not recompile when a scheduler moves the lr."""
import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

from catapult_kernels.optim import LAMB, LARS, SGD, Adam, AdamW, Lion
from catapult_kernels.optim import unwritten
from catapult_kernels.optim.reference import GradPipeline, LAMBReference, LARSReference, LionReference
from conftest import BACKEND_DEVICES

GF = dict(alpha=0.9, lamb=2.0)
# Every optimizer, with the options whose new state is set on its first step (momentum
# buffers, Grokfast EMAs) or that read the step count.
SKIP_CASES = {
    "sgd_momentum_dampening_grokfast": lambda ps, **kw: SGD(ps, lr=0.05, momentum=0.9, dampening=0.3,
                                                             grokfast=GF, **kw),
    "sgd_plain_grokfast": lambda ps, **kw: SGD(ps, lr=0.05, grokfast=GF, **kw),
    "adam_amsgrad_grokfast": lambda ps, **kw: Adam(ps, lr=1e-2, amsgrad=True, grokfast=GF, **kw),
    "adamw_agc_grokfast": lambda ps, **kw: AdamW(ps, lr=1e-2, agc=0.05, grokfast=GF, **kw),
    "lion_grokfast": lambda ps, **kw: Lion(ps, lr=1e-3, weight_decay=0.1, grokfast=GF, **kw),
    "lamb_grokfast": lambda ps, **kw: LAMB(ps, lr=1e-2, grokfast=GF, **kw),
    "lars_grokfast": lambda ps, **kw: LARS(ps, lr=0.5, dampening=0.2, weight_decay=1e-3, grokfast=GF, **kw),
}
SHAPES = [(6, 5), (5,), (3, 1, 2)]


def _params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SHAPES]


def _grads(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(n)]


def _run(make, device, grads, skipped, how):
    """Steps over `grads`; the steps listed in `skipped` are skipped on the device, by a nan
    grad (skip_nonfinite) or by GradScaler's found_inf."""
    params = _params(device)
    opt = make(params, skip_nonfinite=True)
    for t, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.to(device).clone()
        if t in skipped and how == "nonfinite":
            params[0].grad[1, 2] = math.nan
        if how == "found_inf":
            opt.grad_scale = torch.ones((), device=device)
            opt.found_inf = torch.full((), float(t in skipped), device=device)
        opt.step()
    return params, opt


@pytest.fixture(params=["host_reads_flag", "flag_unknown_on_host"])
def flag_on_host(request, monkeypatch):
    """On the CPU the host reads an unwritten-state flag at once; on CUDA it can take some
    steps for its copy to land: then both kernel calls run, gated on the device."""
    if request.param == "flag_unknown_on_host":
        known = unwritten.UnwrittenFlag.known
        monkeypatch.setattr(unwritten.UnwrittenFlag, "known",
                            lambda self, sync=False: known(self, sync) if sync else None)
    return request.param


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("how", ["nonfinite", "found_inf"])
@pytest.mark.parametrize("skipped", [{0}, {0, 1}, {0, 2}], ids=["first", "first_two", "first_and_third"])
@pytest.mark.parametrize("name", SKIP_CASES)
def test_skipped_steps_are_as_if_they_never_happened(backend_device, how, skipped, name, flag_on_host):
    """The same grads with some steps skipped give bit-for-bit the params and state of a
    run that never saw those steps: new momentum buffers and EMAs start at the first step
    that really happens."""
    backend, device = backend_device
    make = lambda ps, **kw: SKIP_CASES[name](ps, backend=backend, **kw)  # noqa: E731
    grads = _grads(5)
    with_skips, opt = _run(make, device, grads, skipped, how)
    kept = [g for t, g in enumerate(grads) if t not in skipped]
    straight, straight_opt = _run(make, device, kept, set(), how)
    for p, q in zip(with_skips, straight):
        assert torch.equal(p, q)
    ours, theirs = opt.state_dict(), straight_opt.state_dict()
    assert int(ours["skipped_steps"]) == len(skipped) and int(theirs["skipped_steps"]) == 0
    for i, state in theirs["state"].items():
        assert set(ours["state"][i]) == set(state)
        for key, value in state.items():
            assert torch.equal(ours["state"][i][key], value), key


@pytest.mark.parametrize("name", SKIP_CASES)
def test_state_saved_after_only_skipped_steps_holds_no_new_buffer(name):
    """A checkpoint taken after skipped first steps holds no momentum buffer or EMA that
    a resumed run would take for a real one."""
    _, opt = _run(lambda ps, **kw: SKIP_CASES[name](ps, backend="cpu", **kw), "cpu", _grads(2), {0, 1},
                  "nonfinite")
    for state in opt.state_dict()["state"].values():
        assert "grokfast_ema" not in state and "momentum_buffer" not in state


# ---- params that share memory --------------------------------------------------------
def test_params_that_share_memory_are_refused():
    base = torch.zeros(10)
    a, b = nn.Parameter(base[:6]), nn.Parameter(base[4:])
    with pytest.raises(ValueError, match="param 0 of group 0 and param 1 of group 0 share memory"):
        AdamW([a, b])
    same = torch.zeros(3, 4)
    opt = SGD([nn.Parameter(same)], lr=0.1)
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [nn.Parameter(same.t())]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="elements that share memory"):
        Lion([nn.Parameter(torch.zeros(4).expand(3, 4))])


def test_disjoint_views_of_one_buffer_train_like_separate_params():
    """A flat buffer split into params (and interleaved strided views) shares no element."""
    flat = torch.randn(22)
    views = [flat[:12].view(3, 4), flat[12:].view(10)]
    inter = torch.randn(4, 6)
    views += [inter[:, ::2], inter[:, 1::2]]
    params = [nn.Parameter(v) for v in views]
    copies = [nn.Parameter(v.detach().clone()) for v in views]
    ours, ref = AdamW(params, lr=0.1), torch.optim.AdamW(copies, lr=0.1, foreach=False)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


# ---- tensor hyperparameters -------------------------------------------------------
@pytest.mark.parametrize("lr", [-1.0, math.nan], ids=["negative", "nan"])
def test_a_bad_tensor_lr_is_refused_everywhere_it_can_enter(lr):
    bad = torch.tensor(lr)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        AdamW([nn.Parameter(torch.zeros(2))], lr=bad)
    opt = AdamW([nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": bad})
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = bad
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.load_state_dict(saved)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1) and len(opt.param_groups) == 1


# ---- foreign state ------------------------------------------------------------------
def _stepped(cls, **kw):
    p = nn.Parameter(torch.randn(4, 3))
    opt = cls([p], **kw)
    p.grad = torch.randn_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("source, target, key", [
    (lambda: _stepped(SGD, lr=0.1, momentum=0.9), lambda ps: AdamW(ps), "'momentum_buffer'"),
    (lambda: _stepped(Lion), lambda ps: LAMB(ps), "'exp_avg_sq'"),
    (lambda: _stepped(torch.optim.SGD, lr=0.1, momentum=0.9), lambda ps: Lion(ps), "'momentum_buffer'"),
    (lambda: _stepped(Lion), lambda ps: AdamW(ps), "lacks 'exp_avg_sq'"),
], ids=["sgd_into_adamw", "lion_into_lamb", "torch_sgd_into_lion", "lion_into_adamw"])
def test_state_of_another_optimizer_is_refused_by_key(source, target, key):
    saved = source().state_dict()
    p = nn.Parameter(torch.randn(4, 3))
    opt = target([p])
    hyper = lambda: [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]  # noqa: E731
    groups = hyper()
    with pytest.raises(KeyError, match=key):
        opt.load_state_dict(saved)
    assert not opt.state and hyper() == groups


def test_state_missing_a_moment_is_refused():
    saved = _stepped(AdamW).state_dict()
    del saved["state"][0]["exp_avg_sq"]
    with pytest.raises(KeyError, match="lacks 'exp_avg_sq'"):
        AdamW([nn.Parameter(torch.randn(4, 3))]).load_state_dict(saved)


def test_torch_adamw_state_still_loads():
    saved = _stepped(torch.optim.AdamW, lr=1e-2).state_dict()
    opt = AdamW([nn.Parameter(torch.randn(4, 3))], lr=1e-2)
    opt.load_state_dict(saved)
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


# ---- copies ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch_save"])
def test_copies_keep_every_option(how):
    p = nn.Parameter(torch.randn(5))
    opt = AdamW([p], lr=0.1, max_grad_norm=0.5, skip_nonfinite=True, backend="cpu")
    p.grad = torch.full((5,), math.nan)
    opt.step()
    p.grad = torch.randn(5)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        twin = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert (twin.backend, twin.max_grad_norm, twin.skip_nonfinite) == ("cpu", 0.5, True)
    assert int(twin.skipped_steps) == 1
    q = twin.param_groups[0]["params"][0]
    q.grad = p.grad.clone()
    opt.step()
    twin.step()
    assert torch.equal(p, q) and torch.equal(opt.grad_norm, twin.grad_norm)


def test_skipped_steps_survive_a_state_dict_round_trip():
    _, opt = _run(lambda ps, **kw: AdamW(ps, **kw), "cpu", _grads(3), {0, 2}, "nonfinite")
    saved = opt.state_dict()
    fresh = AdamW(_params("cpu"), skip_nonfinite=True)
    fresh.load_state_dict(saved)
    assert int(fresh.skipped_steps) == 2


# ---- zero-size params, checks before changes -------------------------------------
@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, agc=0.01),
                                  lambda ps: AdamW(ps, lr=0.1, agc=0.01, grokfast=GF),
                                  lambda ps: LARS(ps, agc=0.01, exclude_1d=False)],
                         ids=["sgd", "adamw", "lars"])
def test_zero_size_params_train_in_an_agc_group(make):
    first = nn.Parameter(torch.randn(4, 3))
    empty = [nn.Parameter(torch.randn(0, 5)), nn.Parameter(torch.randn(3, 0)), nn.Parameter(torch.randn(0))]
    opt = make([first])
    opt.add_param_group({"params": empty})
    for p in [first, *empty]:
        p.grad = torch.randn_like(p)
    before = first.detach().clone()
    opt.step()
    assert not torch.equal(first, before)


def test_a_bad_step_count_changes_nothing():
    params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))]
    opt = AdamW(params[:1])
    opt.add_param_group({"params": params[1:]})
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.state[params[1]]["step"] = torch.tensor([1.0, 1.0])
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="state\\['step'\\] of a param has 2 elements"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert float(opt.state[params[0]]["step"]) == 1.0


# ---- strided params -----------------------------------------------------------------
STRIDED_CASES = {
    "sgd": (lambda ps: SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "adamw_grokfast": (lambda ps: AdamW(ps, lr=0.05, grokfast=GF),
                       lambda ps: (torch.optim.AdamW(ps, lr=0.05), GradPipeline(ps, grokfast=GF))),
    "adamw_agc": (lambda ps: AdamW(ps, lr=0.05, agc=0.02),
                  lambda ps: (torch.optim.AdamW(ps, lr=0.05), GradPipeline(ps, agc=0.02))),
    "lion_agc": (lambda ps: Lion(ps, lr=1e-2, agc=0.02),
                 lambda ps: (LionReference(ps, lr=1e-2), GradPipeline(ps, agc=0.02))),
    "lamb": (lambda ps: LAMB(ps, lr=1e-2), lambda ps: LAMBReference(ps, lr=1e-2)),
    "lars_agc": (lambda ps: LARS(ps, lr=0.5, agc=0.02, exclude_1d=False),
                 lambda ps: (LARSReference(ps, lr=0.5, exclude_1d=False), GradPipeline(ps, agc=0.02))),
}


def _strided_params():
    """A strided view, a transposed weight (AGC rows not contiguous), a column and a plain one."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 10, generator=g)
    return [wide[:, ::2], torch.randn(7, 5, generator=g).t(), torch.randn(5, 4, generator=g)[:, 1],
            torch.randn(4, 3, generator=g)]


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", STRIDED_CASES)
def test_strided_params_train_as_torch_trains_them(backend_device, name):
    backend, device = backend_device
    ours_make, ref_make = STRIDED_CASES[name]
    views = [v.to(device) for v in _strided_params()]
    params = [nn.Parameter(v) for v in views]
    bases = [p._base for p in params]
    ref_params = [nn.Parameter(v.detach().clone()) for v in views]
    opt = ours_make(params)
    opt.backend = backend
    ref = ref_make(ref_params)
    ref_opt, pipeline = ref if isinstance(ref, tuple) else (ref, None)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        for p, q in zip(params, ref_params):
            p.grad = torch.randn(p.shape, generator=g).to(device)
            q.grad = p.grad.clone()
        opt.step()
        if pipeline is not None:
            pipeline()
        ref_opt.step()
    for p, q, base in zip(params, ref_params, bases):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert base is None or p._base is base  # still a view: the update went into the base


# ---- torch.compile ---------------------------------------------------------------
def test_a_scheduled_float_lr_does_not_recompile_the_step():
    """As torch.optim's compiled step: after the first steps, a new lr each step reuses the graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    params = [nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(4))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = AdamW(params, lr=1e-2, max_grad_norm=1.0, backend="cpu")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    step = torch.compile(opt.step)
    for _ in range(3):
        step()
        sched.step()
    compiled = counters["stats"]["unique_graphs"]
    for _ in range(5):
        step()
        sched.step()
    assert counters["stats"]["unique_graphs"] == compiled


def test_a_compiled_step_with_unwritten_state_does_not_recompile():
    """skip_nonfinite with momentum and Grokfast: the flags of new state are updated in place,
    so torch.compile(fullgraph=True) reuses its graphs, and the numbers are the eager ones."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    make = lambda ps: SGD(ps, lr=0.05, momentum=0.9, dampening=0.3, grokfast=GF,  # noqa: E731
                          skip_nonfinite=True, backend="cpu")
    params, eager_params = _params("cpu"), _params("cpu")
    opt, eager = make(params), make(eager_params)
    step = torch.compile(opt.step, fullgraph=True)
    grads = _grads(12)
    for t, step_grads in enumerate(grads):
        for p, q, g in zip(params, eager_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        if t == 0:
            params[0].grad[0, 0] = eager_params[0].grad[0, 0] = math.nan
        step()
        eager.step()
        if t == 5:
            compiled = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == compiled
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_flags_settle_when_the_host_runs_ahead(monkeypatch):
    """On CUDA a flag's copy lands some steps late: the host still learns that the state was
    written (a write never reverts) and goes back to one kernel call."""
    calls = []
    known = unwritten.UnwrittenFlag.known
    monkeypatch.setattr(unwritten.UnwrittenFlag, "known",  # lands only every third look
                        lambda self, sync=False: known(self, sync) if sync or calls.append(1) or len(calls) % 3 == 0
                        else None)
    params = _params("cpu")
    opt = SGD(params, lr=0.05, momentum=0.9, skip_nonfinite=True)
    for t, step_grads in enumerate(_grads(8)):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    assert not opt._unwritten


def test_a_loaded_skip_count_stays_where_the_step_counts():
    _, opt = _run(lambda ps, **kw: AdamW(ps, **kw), "cpu", _grads(2), {0}, "nonfinite")
    saved = opt.state_dict()
    fresh = AdamW(_params("cpu"), skip_nonfinite=True)
    fresh.load_state_dict(saved)
    fresh.step()
    assert int(fresh.skipped_steps) == 1


def test_a_torch_sgd_state_with_a_none_buffer_starts_it_at_the_grad():
    """torch saves momentum_buffer None for a param that never stepped: set, not updated."""
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    ours = SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    saved = ours.state_dict()
    saved["state"] = {0: {"momentum_buffer": None}}
    ours.load_state_dict(saved)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9, dampening=0.5)
    p.grad, q.grad = torch.full((3,), 2.0), torch.full((3,), 2.0)
    ours.step()
    ref.step()
    assert torch.equal(p, q)


def test_many_groups_are_checked_for_shared_memory_in_linear_time():
    params = [nn.Parameter(torch.zeros(2)) for _ in range(3000)]
    opt = SGD(params[:1], lr=0.1)
    for p in params[1:]:
        opt.add_param_group({"params": [p]})
    assert len(opt._spans) == 3000
    with pytest.raises(ValueError, match="param 0 of group 7 and param 0 of group 3000 share memory"):
        opt.add_param_group({"params": [nn.Parameter(params[7].data[1:])]})


def test_a_none_buffer_of_a_key_the_group_does_not_use_loads():
    """Older torch saved momentum_buffer None even without momentum: nothing to refuse."""
    p = nn.Parameter(torch.ones(3))
    opt = SGD([p], lr=0.1)
    saved = opt.state_dict()
    saved["state"] = {0: {"momentum_buffer": None}}
    opt.load_state_dict(saved)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p, torch.full((3,), 0.9))
