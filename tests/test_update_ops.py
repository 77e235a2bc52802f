"""Every update op (torch.ops.catapult.<op> and its Triton twin <op>_triton_) against its
formula in tests/reference.py, on every backend, dtype and awkward shape, through every
option of the grad pipeline: unscale, clip, AGC, Grokfast, maximize and skip.

SPECS describes each op in the configurations whose paths differ (Adam and AdamW; SGD and
LARS; ...): its op, hyperparameters and reference. A new optimizer gets every test here by
adding its entries (and its reference). The pipeline order under test (csrc/ops.cpp):
1. unscale and clip, 2. AGC, 3. Grokfast, 4. maximize, then each optimizer's weight decay
and update. state_steps hold the steps taken before the call: the op runs step t = s + 1
and writes t back, unless skipped."""
import math
from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch

from catapult_kernels import ops
from catapult_kernels.optim.reference import ADOPTReference, AdanReference
from conftest import BACKEND_DEVICES, DTYPES
from reference import (adamw_reference, adan_reference, adopt_reference, agc_factor_view, assert_bitwise_equal,
                       assert_close_to_reference, grad_multiplier_reference, grad_pipeline_reference, lamb_reference,
                       lion_reference, muon_momentum_reference, muon_update_reference, norm_reference,
                       sgd_reference)

# ------------------------------------------------------------------- the op specs

# Each op's state lists in schema order, by the singular names the references use.
STATE_LISTS = {
    "adamw_": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "sgd_": ("momentum_buffer",),
    "lion_": ("exp_avg",),
    "lamb_": ("exp_avg", "exp_avg_sq"),
    "adopt_": ("exp_avg", "exp_avg_sq"),
    "adan_": ("exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad"),
    "muon_momentum_": ("momentum_buffer",),
    "muon_update_": (),
}
HAS_STEP = {"adamw_", "lamb_", "adopt_", "adan_"}


@dataclass(frozen=True)
class Spec:
    """One op in one configuration. reference(hyper, lr, t, compute_dtype, mult, maximize,
    pipeline) maps one tensor's inputs t (param, grad, its states, step: the t of the
    formula, trust) to its outputs by name (ema included when the filter runs)."""
    id: str
    op: str
    lr: float
    hyper: dict  # the op's own arguments after lr, in schema order
    reference: Callable
    unused: tuple = ()        # state lists this configuration leaves empty
    trust: bool = False       # LARS: per-param trust ratios (Muon's update: lr ratios)
    per_param: str = "trust_ratios"  # the name of the op's per-param argument
    maximize: bool = False    # the pipeline's maximize, unless a test sets it
    step: float = 3.0         # state_steps before the call
    shape_sets: tuple = ("empty", "one", "primes", "above_block", "mixed")

    @property
    def states(self):
        return STATE_LISTS[self.op]

    @property
    def used(self):
        return [s for s in self.states if s not in self.unused]

    @property
    def has_step(self):
        return self.op in HAS_STEP

    def but(self, suffix, **changes):
        """A variant: hyperparameters overridden by name, other fields by theirs."""
        hyper = {k: changes.pop(k) for k in list(changes) if k in self.hyper}
        return replace(self, id=f"{self.id}-{suffix}", hyper={**self.hyper, **hyper}, **changes)


def _adamw(h, lr, t, dt, mult, maximize, kw):
    p, m, v, vmax, ema = adamw_reference(t["param"], t["grad"], t["exp_avg"], t["exp_avg_sq"], t["max_exp_avg_sq"],
                                         t["step"], lr, h["beta1"], h["beta2"], h["eps"], h["weight_decay"],
                                         h["amsgrad"], maximize, mult, dt,
                                         decoupled_weight_decay=h["decoupled_weight_decay"], **kw)
    return dict(param=p, exp_avg=m, exp_avg_sq=v, max_exp_avg_sq=vmax if h["amsgrad"] else None, ema=ema)


def _sgd(h, lr, t, dt, mult, maximize, kw):
    p, buf, ema = sgd_reference(t["param"], t["grad"], t["momentum_buffer"], lr, h["momentum"], h["dampening"],
                                h["weight_decay"], h["nesterov"], maximize, h["first_step"], mult, dt, trust=t["trust"],
                                **kw)
    return dict(param=p, momentum_buffer=buf if h["momentum"] else None, ema=ema)


def _lion(h, lr, t, dt, mult, maximize, kw):
    p, m, ema = lion_reference(t["param"], t["grad"], t["exp_avg"], lr, h["beta1"], h["beta2"], h["weight_decay"],
                               maximize, mult, dt, **kw)
    return dict(param=p, exp_avg=m, ema=ema)


def _lamb(h, lr, t, dt, mult, maximize, kw):
    p, m, v, ema = lamb_reference(t["param"], t["grad"], t["exp_avg"], t["exp_avg_sq"], t["step"], lr, h["beta1"],
                                  h["beta2"], h["eps"], h["weight_decay"], h["bias_correction"], h["max_weight_norm"],
                                  maximize, mult, dt, **kw)
    return dict(param=p, exp_avg=m, exp_avg_sq=v, ema=ema)


def _adopt(h, lr, t, dt, mult, maximize, kw):
    p, m, v, ema = adopt_reference(t["param"], t["grad"], t["exp_avg"], t["exp_avg_sq"], t["step"], lr, h["beta1"],
                                   h["beta2"], h["eps"], h["weight_decay"], maximize, mult, dt, **kw)
    return dict(param=p, exp_avg=m, exp_avg_sq=v, ema=ema)


def _adan(h, lr, t, dt, mult, maximize, kw):
    p, m, d, v, pre, ema = adan_reference(t["param"], t["grad"], t["exp_avg"], t["exp_avg_diff"], t["exp_avg_sq"],
                                          t["pre_grad"], t["step"], lr, h["beta1"], h["beta2"], h["beta3"], h["eps"],
                                          h["weight_decay"], h["no_prox"], maximize, mult, dt, **kw)
    return dict(param=p, exp_avg=m, exp_avg_diff=d, exp_avg_sq=v, pre_grad=pre, ema=ema)


def _muon_momentum(h, lr, t, dt, mult, maximize, kw):
    out, buf, ema = muon_momentum_reference(t["grad"], t["momentum_buffer"], h["momentum"], h["nesterov"], maximize,
                                            mult, dt, **kw)
    return dict(param=out, momentum_buffer=buf, ema=ema)  # `out` is the op's first list


def _muon_update(h, lr, t, dt, mult, maximize, kw):
    p, ema = muon_update_reference(t["param"], t["grad"], lr, h["weight_decay"], t["trust"], maximize, mult, dt, **kw)
    return dict(param=p, ema=ema)


# beta2 0.99, not 0.999: the kernels compute 1 - beta and 1 - beta^t in float32, whose
# cancellation at 0.999 alone costs about 5e-6 of the update (the float32 bound is 2e-6).
ADAMW = Spec("adamw", "adamw_", 1e-2, dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                                            decoupled_weight_decay=True, amsgrad=False), _adamw,
             unused=("max_exp_avg_sq",))
ADAM = replace(ADAMW, id="adam", hyper=dict(ADAMW.hyper, decoupled_weight_decay=False))
SGD = Spec("sgd", "sgd_", 0.05, dict(momentum=0.9, dampening=0.1, weight_decay=0.05, nesterov=False, first_step=False,
                                      trust_ratios=None), _sgd)
LARS = replace(SGD, id="lars", hyper=dict(SGD.hyper, nesterov=True, dampening=0.0), trust=True)
LION = Spec("lion", "lion_", 1e-2, dict(beta1=0.9, beta2=0.99, weight_decay=0.1), _lion)
LAMB = Spec("lamb", "lamb_", 1e-2, dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, bias_correction=True,
                                         max_weight_norm=5.0), _lamb)
ADOPT = Spec("adopt", "adopt_", 1e-2, dict(beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1), _adopt)
ADAN = Spec("adan", "adan_", 1e-2, dict(beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.02,
                                        no_prox=False), _adan)
MUON_MOMENTUM = Spec("muon_momentum", "muon_momentum_", 1e-2, dict(momentum=0.95, nesterov=True), _muon_momentum)
# lr_ratios: one per param, as LARS's trust ratios (trust=True)
MUON_UPDATE = Spec("muon_update", "muon_update_", 2e-2, dict(weight_decay=0.1, lr_ratios=None), _muon_update,
                   trust=True, per_param="lr_ratios")

# Every op in the configurations that take different paths through the pipeline's consumers.
SPECS = [ADAMW, ADAM, SGD, LARS, LION, LAMB, ADOPT, ADAN, MUON_MOMENTUM, MUON_UPDATE]
# One configuration per op.
PER_OP = [ADAMW, SGD, LION, LAMB, ADOPT, ADAN, MUON_MOMENTUM, MUON_UPDATE]


def _sgd_modes(base, shape_sets):
    """torch.optim.SGD's paths: plain, plain with weight decay, momentum, nesterov; each on a
    later step and on the first (buffers set to the grad; a no-op flag without momentum)."""
    modes = {"plain": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, unused=("momentum_buffer",)),
             "plain_wd": dict(momentum=0.0, dampening=0.0, weight_decay=0.1, nesterov=False,
                              unused=("momentum_buffer",)),
             "momentum": dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
             "nesterov": dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True)}
    return [base.but(f"{name}{'-first' if first else ''}", first_step=first, shape_sets=shape_sets, **mode)
            for name, mode in modes.items() for first in (False, True)]


# The configurations checked against their reference on every shape set they list.
VARIANTS = [
    ADAMW, ADAMW.but("amsgrad", amsgrad=True, unused=()),
    # Adam's coupled L2 goes in after maximize's negation.
    *(ADAM.but(name, shape_sets=("primes", "above_block", "mixed"), **kw) for name, kw in [
        ("plain", {}), ("amsgrad-max", dict(amsgrad=True, unused=(), maximize=True)), ("max", dict(maximize=True))]),
    *_sgd_modes(SGD, SGD.shape_sets),
    *_sgd_modes(LARS, ("mixed", "primes")),
    LION, LION.but("no_decay", weight_decay=0.0, shape_sets=("mixed",)),
    ADOPT, ADOPT.but("first", step=0.0, shape_sets=("mixed",)),
    ADAN, ADAN.but("first", step=0.0, shape_sets=("mixed",)), ADAN.but("no_prox", no_prox=True, shape_sets=("mixed",)),
    MUON_MOMENTUM, MUON_MOMENTUM.but("plain", nesterov=False, shape_sets=("mixed",)),
    MUON_MOMENTUM.but("heavy", momentum=0.3, shape_sets=("mixed",)),  # the other branch of torch's lerp
    MUON_UPDATE, MUON_UPDATE.but("no_decay", weight_decay=0.0, shape_sets=("mixed",)),
]

SHAPES = {
    "empty": [(0,)],
    "one": [(1,)],
    "primes": [(7,), (13, 17), (7, 33, 2), (4099,)],  # 4099: several chunks of the Triton kernels
    "above_block": [(65537,)],                        # over a chunk of the CPU (2^15) and CUDA kernels
    "mixed": [(0,), (1,), (131,), (257, 33), (5,)],
}
# The Triton interpreter is slow (about a millisecond a block): there the block to be above is
# its chunk of 1024 elements (kernel_common.update_sizes), and the matrix of the mixed set is
# smaller.
INTERPRETER_SHAPES = dict(SHAPES, above_block=[(2**13 + 3,)], mixed=[(0,), (1,), (131,), (65, 33), (5,)])
AGC_SHAPES = [(37,), (3, 5), (7, 33, 2), (2, 3, 4, 5), (1, 9), (6, 1), (0, 4), (1,)]


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def big_shape(backend, device):
    """A matrix whose rows of 129 cross chunk bounds: 300 x 129 = 38700 elements, more than
    the CPU kernel's chunk of 2^15; 40 x 129 under the (slow) Triton interpreter, whose
    chunks are 1024 elements."""
    return (40, 129) if interpreted(backend, device) else (300, 129)


def _ids(specs):
    return [s.id for s in specs]


# ----------------------------------------------------------------------- harness

def _rows(p):
    return p.shape[0] if p.dim() >= 2 else 1


INIT = {  # each state's mid-training value, from mk(shape, factor)
    "exp_avg": lambda mk, s: mk(s, 0.1),
    "exp_avg_sq": lambda mk, s: mk(s, 0.1).abs(),
    "max_exp_avg_sq": lambda mk, s: mk(s, 0.15).abs(),
    "momentum_buffer": lambda mk, s: mk(s, 0.1),
    "exp_avg_diff": lambda mk, s: mk(s, 0.1),
    "pre_grad": lambda mk, s: mk(s),
}


def make_state(spec, shapes, dtype, device, seed=0, step=None):
    """Random params, grads, mid-training state, Grokfast emas, step counts and LARS trust
    ratios for each shape: a dict of lists (trust a tensor)."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda s, f=1.0: (torch.randn(s, generator=gen) * f).to(dtype=dtype, device=device)  # noqa: E731
    st = {"param": [mk(s) for s in shapes], "grad": [mk(s) for s in shapes]}
    for name in spec.states:
        st[name] = [INIT[name](mk, s) for s in shapes]
    st["ema"] = [mk(s, 0.5) for s in shapes]
    st["step"] = [torch.tensor(spec.step if step is None else step, device=device) for _ in shapes]
    st["trust"] = (torch.rand(len(shapes), generator=gen) * 1.9 + 0.1).to(device)
    return st


def make_agc(params, seed=1):
    """A random factor in (0, 1] per row of each param, float32 on its device."""
    gen = torch.Generator().manual_seed(seed)
    return [(1.0 - torch.rand(_rows(p), generator=gen)).to(p.device) for p in params]


def clone_state(st):
    return {k: ([t.clone() for t in v] if isinstance(v, list) else v.clone()) for k, v in st.items()}


def pipeline_args(spec, agc=(), emas=(), alpha=0.98, lamb=2.0, maximize=None, grad_norm=None, max_grad_norm=0.0,
                  grad_scale=None, skip=None):
    return ops.PipelineArgs(grad_norm=grad_norm, max_grad_norm=max_grad_norm, grad_scale=grad_scale, skip=skip,
                            agc_scales=list(agc), grokfast_emas=list(emas), grokfast_alpha=alpha, grokfast_lamb=lamb,
                            maximize=spec.maximize if maximize is None else maximize)


def op_inputs(spec, st, lr=None, states=None):
    """(params, grads, states, state_steps, lr, hyper) of ops.update_ for the state st."""
    p = st["param"]
    device = p[0].device if p else torch.device("cpu")
    if states is None:
        states = [st[name] if name in spec.used else [] for name in spec.states]
    hyper = dict(spec.hyper)
    if spec.trust:
        hyper[spec.per_param] = st["trust"]
    return (p, st["grad"], states, st["step"] if spec.has_step else None,
            torch.tensor(spec.lr if lr is None else lr, device=device), hyper)


def run(spec, backend, st, lr=None, states=None, **pipeline):
    params, grads, states, steps, lr, hyper = op_inputs(spec, st, lr, states)
    ops.update_(spec.op, params, grads, states, steps, lr, pipeline=pipeline_args(spec, **pipeline), backend=backend,
                **hyper)


def reference(spec, st, i, compute_dtype, mult=1.0, maximize=None, agc=None, ema=None, alpha=0.98, lamb=2.0):
    """The spec's reference for tensor i of the state st (before the step): {name: tensor}."""
    t = {k: v[i].cpu() for k, v in st.items() if isinstance(v, list)}
    t["step"] = float(st["step"][i]) + 1
    t["trust"] = float(st["trust"][i]) if spec.trust else 1.0
    kw = dict(agc_scale=agc, ema=ema, grokfast_alpha=alpha, grokfast_lamb=lamb)
    out = spec.reference(spec.hyper, spec.lr, t, compute_dtype, mult, spec.maximize if maximize is None else maximize,
                         kw)
    return {n: o for n, o in out.items() if o is not None}


def check(spec, st, before, mult=1.0, maximize=None, agc=None, emas=None, alpha=0.98, lamb=2.0):
    """Every written tensor of st against the reference from the state before the step; the
    grads (and the emas when not passed) keep their bits; the step counts moved by one."""
    for i in range(len(st["param"])):
        kw = dict(mult=mult, maximize=maximize, agc=None if agc is None else agc[i].cpu(),
                  ema=None if emas is None else before["ema"][i].cpu(), alpha=alpha, lamb=lamb)
        gold = reference(spec, before, i, torch.float64, **kw)
        same = reference(spec, before, i, torch.float32, **kw)
        for name in gold:
            assert_close_to_reference(f"{spec.id} {name}[{i}]", st[name][i], gold[name], same[name],
                                      before[name][i].cpu())
    for a, b in zip(st["grad"], before["grad"]):
        assert_bitwise_equal("grad", a, b)
    if emas is None:
        for a, b in zip(st["ema"], before["ema"]):
            assert_bitwise_equal("ema (not passed)", a, b)
    assert_bitwise_equal("trust_ratios", st["trust"], before["trust"])
    for i, (a, b) in enumerate(zip(st["step"], before["step"])):
        assert_bitwise_equal(f"state_steps[{i}]", a, b + 1 if spec.has_step else b)


def assert_all_unchanged(st, before, extra=()):
    for k in st:
        now, then = st[k], before[k]
        for a, b in (zip(now, then) if isinstance(now, list) else [(now, then)]):
            assert_bitwise_equal(k, a, b)
    for a, b in extra:
        assert_bitwise_equal("regularizer state", a, b)


def _backend_cases(specs):
    """pytest params (spec, backend_device) with readable ids."""
    return [pytest.param(s, bd.values[0], id=f"{s.id}-{bd.id}") for s in specs for bd in BACKEND_DEVICES]


# ---------------------------------------------------------------- the spec table


@pytest.mark.parametrize("spec", PER_OP, ids=_ids(PER_OP))
def test_spec_table_matches_the_ops(spec):
    """The table here describes the ops as registered: their state lists, step counts and
    own arguments in schema order (op_inputs and test_opcheck pass them by position)."""
    op = ops.UPDATE_OPS[spec.op]
    assert tuple(op.states) == tuple(f"{s}s" for s in spec.states)
    assert op.has_step == spec.has_step
    assert tuple(op.hyper) == tuple(spec.hyper)


# --------------------------------------------------------------- the formulas


def _matches_cases():
    cases = []
    for spec in VARIANTS:
        for shape_set in spec.shape_sets:
            for dtype in DTYPES:
                for bd in BACKEND_DEVICES:
                    cases.append(pytest.param(spec, shape_set, dtype, bd.values[0],
                                              id=f"{spec.id}-{shape_set}-{dtype}-{bd.id}"))
    return cases


@pytest.mark.parametrize("spec, shape_set, dtype, backend_device", _matches_cases())
def test_matches_reference(spec, shape_set, dtype, backend_device):
    backend, device = backend_device
    st = make_state(spec, (INTERPRETER_SHAPES if interpreted(backend, device) else SHAPES)[shape_set], dtype, device)
    before = clone_state(st)
    run(spec, backend, st)
    check(spec, st, before)


OPTION_SPECS = [s for s in SPECS if s is not LAMB]  # test_lamb.py checks LAMB's options


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["maximize", "clip", "clip_inactive", "grad_scale", "scale_and_clip"])
@pytest.mark.parametrize("spec", OPTION_SPECS, ids=_ids(OPTION_SPECS))
def test_options(backend_device, dtype, case, spec):
    backend, device = backend_device
    st = make_state(spec, [(129,), (31, 7)], dtype, device, seed=2)
    before = clone_state(st)
    norm = torch.tensor(float(norm_reference(st["grad"])[0]), device=device)
    scale = torch.tensor(1024.0, device=device)
    kw = {"maximize": dict(maximize=True),
          "clip": dict(grad_norm=norm, max_grad_norm=1.0),
          "clip_inactive": dict(grad_norm=norm, max_grad_norm=1e6),
          "grad_scale": dict(grad_scale=scale),
          "scale_and_clip": dict(grad_norm=norm, max_grad_norm=0.01, grad_scale=scale)}[case]
    run(spec, backend, st, **kw)
    mult = grad_multiplier_reference(kw.get("grad_norm"), kw.get("max_grad_norm"), kw.get("grad_scale"))
    check(spec, st, before, mult=mult, maximize=kw.get("maximize"))


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_grad_scale_of_a_power_of_two_is_exact(spec, backend_device):
    """Grads scaled by 1024 and unscaled by grad_scale 1024 step bit for bit as the plain
    grads (both products are exact)."""
    backend, device = backend_device
    plain = make_state(spec, [(257,), (13, 17)], torch.float32, device, seed=21)
    scaled = clone_state(plain)
    scaled["grad"] = [g * 1024 for g in scaled["grad"]]
    run(spec, backend, plain)
    run(spec, backend, scaled, grad_scale=torch.tensor(1024.0, device=device))
    for k in ["param", *spec.used]:
        for a, b in zip(plain[k], scaled[k]):
            assert_bitwise_equal(k, a, b)


@pytest.mark.parametrize("spec, backend_device", _backend_cases([s for s in SPECS if s.has_step]))
def test_each_tensor_uses_its_own_step(spec, backend_device):
    """Steps 0 (the first), 9 and 999 in one call."""
    backend, device = backend_device
    st = make_state(spec, [(50,), (60,), (70,)], torch.float32, device)
    for s, value in zip(st["step"], (0.0, 9.0, 999.0)):
        s.fill_(value)
    before = clone_state(st)
    run(spec, backend, st)
    check(spec, st, before)


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_several_steps(spec, backend_device):
    """Five steps from a fresh state (zero moments, step 0) track five steps of the
    reference in float64: the state, and the step count the op advances, carry over."""
    backend, device = backend_device
    st = make_state(spec, [(257,), (13, 17)], torch.float32, device, seed=11, step=0.0)
    for name in spec.used:
        for t in st[name]:
            t.zero_()
    gold = {k: ([t.cpu().double() for t in v] if isinstance(v, list) else v.cpu()) for k, v in st.items()}
    gen = torch.Generator().manual_seed(12)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in st["param"]]
        st["grad"] = [g.to(device) for g in grads]
        gold["grad"] = [g.double() for g in grads]
        run(spec, backend, st)
        new = [reference(spec, gold, i, torch.float64) for i in range(len(grads))]
        for i, out in enumerate(new):
            for name, t in out.items():
                gold[name][i] = t
            gold["step"][i] = gold["step"][i] + 1
    for name in ["param", *spec.used]:
        for i, (a, b) in enumerate(zip(st[name], gold[name])):
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item(),
                                       msg=lambda msg: f"{spec.id} {name}[{i}]: {msg}")
    if spec.has_step:
        assert all(float(s) == 5.0 for s in st["step"]), "the op counts its steps"


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_many_small_tensors(spec, backend_device):
    backend, device = backend_device
    n = 100 if interpreted(backend, device) else 2000
    g = torch.Generator().manual_seed(5)
    shapes = [(int(torch.randint(1, 200, (1,), generator=g)),) for _ in range(n)]
    st = make_state(spec, shapes, torch.float32, device)
    before = clone_state(st)
    run(spec, backend, st)
    check(spec, st, before)


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_mixed_dtypes_in_one_call(spec, backend_device):
    backend, device = backend_device
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    shapes = [(131,), (33, 3), (1,), (2050,), (0,)]
    parts = [make_state(spec, [s], dt, device, seed=20 + i) for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    st = {k: sum((part[k] for part in parts), []) for k in parts[0] if k != "trust"}
    st["trust"] = torch.cat([part["trust"] for part in parts])
    before = clone_state(st)
    run(spec, backend, st)
    check(spec, st, before)


# ------------------------------------------------------------------ op by op


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_adam_and_adamw_differ(backend_device):
    """decoupled_weight_decay is honoured: with a large weight decay the two steps differ,
    each matching its own formula (not just both close to something)."""
    backend, device = backend_device
    results = {}
    for spec in (ADAMW, ADAM):
        st = make_state(spec, [(513,)], torch.float32, device, seed=3)
        before = clone_state(st)
        run(spec, backend, st)
        check(spec, st, before)
        results[spec.id] = (st["param"][0].cpu(), st["exp_avg"][0].cpu())
    assert (results["adamw"][0] - results["adam"][0]).abs().max() > 1e-4
    assert (results["adamw"][1] - results["adam"][1]).abs().max() > 1e-4  # coupled L2 enters m


@pytest.mark.parametrize("decoupled", [True, False], ids=["AdamW", "Adam"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_adam_reference_matches_torch(decoupled, amsgrad, maximize):
    """The reference itself against torch.optim.AdamW / torch.optim.Adam in float64 over three steps."""
    torch.manual_seed(0)
    p = torch.randn(40, dtype=torch.float64)
    grads = [torch.randn(40, dtype=torch.float64) for _ in range(3)]
    h = ADAMW.hyper
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    tp = torch.nn.Parameter(p.clone())
    opt = cls([tp], lr=ADAMW.lr, betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weight_decay"],
              amsgrad=amsgrad, maximize=maximize, foreach=False)
    ours, m, v, vmax = p.clone(), torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for step, g in enumerate(grads, start=1):
        tp.grad = g.clone()
        opt.step()
        ours, m, v, vmax_new, _ = adamw_reference(ours, g, m, v, vmax, float(step), ADAMW.lr, h["beta1"], h["beta2"],
                                                  h["eps"], h["weight_decay"], amsgrad, maximize,
                                                  decoupled_weight_decay=decoupled)
        vmax = vmax_new if amsgrad else vmax
    torch.testing.assert_close(ours, tp.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", [s for s in _sgd_modes(SGD, ()) if not s.hyper["first_step"]], ids=lambda s: s.id)
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_sgd_reference_matches_torch(mode, maximize):
    """The reference itself against torch.optim.SGD in float64 over three steps."""
    h = mode.hyper
    torch.manual_seed(0)
    p = torch.randn(40, dtype=torch.float64)
    tp = torch.nn.Parameter(p.clone())
    opt = torch.optim.SGD([tp], lr=mode.lr, momentum=h["momentum"], dampening=h["dampening"],
                          weight_decay=h["weight_decay"], nesterov=h["nesterov"], maximize=maximize, foreach=False)
    buf = None
    for step in range(3):
        g = torch.randn(40, dtype=torch.float64)
        tp.grad = g.clone()
        opt.step()
        p, buf, _ = sgd_reference(p, g, buf, mode.lr, h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"],
                                  maximize, step == 0)
    torch.testing.assert_close(p, tp.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec, options", [(ADOPT, {}), (ADOPT, dict(maximize=True)), (ADAN, {}),
                                           (ADAN, dict(no_prox=True, maximize=True))],
                         ids=["adopt", "adopt-max", "adan", "adan-no_prox-max"])
def test_adopt_and_adan_references_agree(spec, options):
    """The op references against the reference optimizers (optim/reference.py), written
    apart, in float64 over five steps from a fresh state (the first step's branch included)."""
    h = dict(spec.hyper, no_prox=options.get("no_prox", False)) if spec is ADAN else spec.hyper
    maximize = options.get("maximize", False)
    torch.manual_seed(0)
    p = torch.randn(40, dtype=torch.float64)
    tp = torch.nn.Parameter(p.clone())
    if spec is ADOPT:
        opt = ADOPTReference([tp], lr=spec.lr, betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                             weight_decay=h["weight_decay"], maximize=maximize)
    else:
        opt = AdanReference([tp], lr=spec.lr, betas=(h["beta1"], h["beta2"], h["beta3"]), eps=h["eps"],
                            weight_decay=h["weight_decay"], no_prox=h["no_prox"], maximize=maximize)
    state = {name: torch.zeros_like(p) for name in spec.states}
    for t in range(1, 6):
        g = torch.randn(40, dtype=torch.float64)
        tp.grad = g.clone()
        opt.step()
        out = spec.reference(h, spec.lr, dict(state, param=p, grad=g, step=float(t)), torch.float64, 1.0, maximize,
                             dict(agc_scale=None, ema=None, grokfast_alpha=0.98, grokfast_lamb=2.0))
        p = out["param"]
        state = {name: out[name] for name in spec.states}
    torch.testing.assert_close(p, tp.detach(), rtol=1e-12, atol=1e-12)
    for name in spec.states:
        torch.testing.assert_close(state[name], opt.state[tp][name], rtol=1e-12, atol=1e-12)
    assert opt.state[tp]["step"] == 5


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_sgd_trust_ratios_of_one_change_nothing(backend_device):
    """trust 1 is SGD: bit for bit the same as no trust_ratios."""
    backend, device = backend_device
    results = []
    for spec in (SGD, replace(SGD, trust=True)):
        st = make_state(spec, [(1000,), (3, 5)], torch.float32, device, seed=9)
        st["trust"] = torch.ones(2, device=device)
        run(spec, backend, st)
        results.append(st["param"] + st["momentum_buffer"])
    for a, b in zip(*results):
        assert_bitwise_equal("param/buffer", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_sgd_bad_trust_ratios_change_nothing(backend_device):
    backend, device = backend_device
    st = make_state(LARS, [(10,), (4, 4)], torch.float32, device)
    before = clone_state(st)
    cases = [
        torch.ones(1, device=device),                          # one per param: too few
        torch.ones(3, device=device),                          # too many
        torch.ones(2, dtype=torch.float64, device=device),     # not float32
        torch.ones(2, dtype=torch.bfloat16, device=device),
        torch.ones(2, 1, device=device),                       # not 1-D
        torch.ones(4, device=device)[::2],                     # not contiguous
    ]
    if device == "cuda":
        cases.append(torch.ones(2))                            # on another device
    for trust in cases:
        with pytest.raises(RuntimeError, match="trust_ratios"):
            run(LARS, backend, dict(st, trust=trust))
    assert_all_unchanged(st, before)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_lion_sign_and_interpolations(backend_device):
    """Lion's update is lr * sign(c): where c is exactly 0 (m = g = 0) p only decays; the
    direction is beta1's interpolation, the momentum beta2's."""
    backend, device = backend_device
    n = 300
    st = make_state(LION, [(n,)], torch.float32, device)
    p0 = st["param"][0].clone()
    # elements 0..99: beta1's mix and beta2's differ in sign (swapped betas would show)
    st["exp_avg"][0].copy_(torch.cat([torch.full((100,), 1.0), torch.zeros(100), torch.randn(100)]))
    st["grad"][0].copy_(torch.cat([torch.full((100,), -20.0), torch.zeros(100), torch.randn(100)]))
    run(LION, backend, st)
    p, m = st["param"][0].cpu(), st["exp_avg"][0].cpu()
    lr, wd = LION.lr, LION.hyper["weight_decay"]
    decayed = p0.cpu() * torch.tensor(1 - lr * wd, dtype=torch.float32)
    # c = 0.9 * 1 + 0.1 * (-20) = -1.1 < 0: p moves up; m = 0.99 * 1 + 0.01 * (-20) = 0.79 stays > 0
    torch.testing.assert_close(p[:100], decayed[:100] + lr, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m[:100], torch.full((100,), 0.79), rtol=1e-6, atol=0)
    # c == 0 exactly: sign(0) = 0, only the decay
    torch.testing.assert_close(p[100:200], decayed[100:200], rtol=1e-6, atol=0)
    assert (m[100:200] == 0).all()


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adopt_first_step_sets_only_v(backend_device, dtype):
    """t = 1: v = g^2 of the pipeline's grad; p (no weight decay either) and m keep their bits."""
    backend, device = backend_device
    st = make_state(ADOPT, [(37,), (7, 33, 2)], dtype, device, seed=22, step=0.0)
    before = clone_state(st)
    scale = torch.tensor(4.0, device=device)
    run(ADOPT, backend, st, maximize=True, grad_scale=scale)
    check(ADOPT, st, before, mult=0.25, maximize=True)
    for name in ("param", "exp_avg"):
        for a, b in zip(st[name], before[name]):
            assert_bitwise_equal(name, a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_adopt_eps_clip_and_nan(backend_device):
    """ghat = clamp(g / max(sqrt(v), eps), -(t-1)^(1/4), (t-1)^(1/4)): v = 0 takes eps (and
    the clip), v < 0 and a NaN grad give NaN (both clamps keep it), in vector lanes and tails."""
    backend, device = backend_device
    spec = ADOPT.but("t2", step=1.0)  # t = 2: the clip is 1
    st = make_state(spec, [(37,)], torch.float32, device, seed=23)
    v, g = st["exp_avg_sq"][0], st["grad"][0]
    v[[0, 9, 20, 36]] = 0.0
    v[[3, 17]] = -1.0
    g[[5, 33]] = math.nan
    before = clone_state(st)
    run(spec, backend, st)
    p, m = st["param"][0].cpu(), st["exp_avg"][0].cpu()
    nan = torch.zeros(37, dtype=torch.bool)
    nan[[3, 17, 5, 33]] = True
    assert torch.isnan(p[nan]).all() and torch.isnan(m[nan]).all(), "NaN must propagate"
    assert torch.isfinite(p[~nan]).all()
    keep = ~nan
    gold = reference(spec, before, 0, torch.float64)
    for name, got in (("param", p), ("exp_avg", m)):
        assert_close_to_reference(name, got[keep], gold[name][keep], None, before[name][0].cpu()[keep])
    # v = 0: ghat = +-1 (the clip at t = 2), so m = 0.9 * m + 0.1 * sign(g)
    zero = [0, 9, 20, 36]
    expected_m = 0.9 * before["exp_avg"][0].cpu()[zero].double() + 0.1 * torch.sign(before["grad"][0].cpu()[zero]).double()
    torch.testing.assert_close(m[zero].double(), expected_m, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adan_first_step_ignores_pre_grad(backend_device, dtype):
    """t = 1: diff = 0 whatever pre_grad holds (NaN here): the same bits as from any other
    pre_grad; pre_grad becomes the pipeline's grad."""
    backend, device = backend_device
    results = []
    for fill in (None, math.nan):
        st = make_state(ADAN, [(37,), (7, 33, 2)], dtype, device, seed=24, step=0.0)
        if fill is not None:
            for t in st["pre_grad"]:
                t.fill_(fill)
        before = clone_state(st)
        run(ADAN, backend, st, maximize=True, grad_scale=torch.tensor(2.0, device=device))
        if fill is None:
            check(ADAN, st, before, mult=0.5, maximize=True)
        results.append(st)
    for name in ("param", *ADAN.states):
        for a, b in zip(results[0][name], results[1][name]):
            assert_bitwise_equal(name, a, b)
    for pre, g in zip(results[0]["pre_grad"], results[0]["grad"]):
        assert_bitwise_equal("pre_grad", pre, (-(g.float() / 2)).to(dtype))


# ----------------------------------------------------------------------------- AGC


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_agc_matches_reference(backend_device, dtype, spec):
    """g = grad * agc_scales[i][row], row the index along dim 0 (one row for 1-D params),
    over params of 1 to 4 dims and rows that do not divide any chunk size."""
    backend, device = backend_device
    shapes = AGC_SHAPES + [big_shape(backend, device)]
    st = make_state(spec, shapes, dtype, device)
    agc = make_agc(st["param"])
    before, agc_before = clone_state(st), [a.clone() for a in agc]
    run(spec, backend, st, agc=agc)
    check(spec, st, before, agc=agc)
    for a, b in zip(agc, agc_before):
        assert_bitwise_equal("agc_scales", a, b)


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_agc_row_factors_are_per_row(spec, backend_device):
    """A zero factor on every other row: exactly those rows see no grad (a row's update does
    not depend on the other rows' grads)."""
    backend, device = backend_device
    shapes = [big_shape(backend, device), (7, 33, 2)]
    st = make_state(spec, shapes, torch.float32, device, seed=5)
    agc = [(torch.arange(_rows(p)) % 2).float().to(device) for p in st["param"]]
    zero_grads = clone_state(st)
    for g in zero_grads["grad"]:
        g.zero_()
    run(spec, backend, st, agc=agc)
    run(spec, backend, zero_grads, agc=agc)
    for p, p0 in zip(st["param"], zero_grads["param"]):
        # rows with factor 0 saw a zero grad: they match the run with zero grads bit for bit,
        # except through LAMB's per-tensor trust ratio, which mixes the rows
        if spec is not LAMB:
            assert_bitwise_equal("rows with factor 0", p[0::2], p0[0::2])
        assert (p[1::2] != p0[1::2]).any(), "rows with factor 1 must see their grads"


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_agc_ones_is_no_agc(spec, backend_device):
    """Factors of exactly 1 change nothing, bit for bit (grad * (mult * 1) == grad * mult)."""
    backend, device = backend_device
    shapes = [(257,), (13, 17), (3, 4, 5)]
    results = []
    for agc in (False, True):
        st = make_state(spec, shapes, torch.float32, device, seed=9)
        run(spec, backend, st, agc=[torch.ones(_rows(p), device=device) for p in st["param"]] if agc else (),
            grad_norm=torch.tensor(30.0, device=device), max_grad_norm=1.0)
        results.append(st)
    assert_all_unchanged(results[1], results[0])


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_agc_with_permuted_params(spec, backend_device):
    """AGC needs each row in one contiguous run, not a contiguous param: dims after the
    first may be permuted (here (4, 6, 5) with strides (30, 1, 6))."""
    backend, device = backend_device
    st = make_state(spec, [(4, 5, 6), (9,)], torch.float32, device, seed=6)
    for k in ["param", "grad", "ema", *spec.states]:
        st[k][0] = st[k][0].permute(0, 2, 1)
    assert not st["param"][0].is_contiguous()
    agc = make_agc(st["param"])
    before = clone_state(st)
    run(spec, backend, st, agc=agc)
    check(spec, st, before, agc=agc)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_agc_many_small_matrices(backend_device):
    """Each param reads its own factor table: 200 small matrices in one call."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(8)
    shapes = [tuple(int(x) for x in torch.randint(1, 12, (2,), generator=gen)) for _ in range(200)]
    st = make_state(SGD, shapes, torch.float32, device, seed=8)
    agc = make_agc(st["param"], seed=9)
    before = clone_state(st)
    run(SGD, backend, st, agc=agc)
    check(SGD, st, before, agc=agc)


# ------------------------------------------------------------------------ Grokfast


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", PER_OP, ids=_ids(PER_OP))
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_grokfast_alpha_zero_starts_at_the_grad(backend_device, dtype, spec, maximize):
    """alpha = 0: the new ema is exactly the pipeline's grad after AGC (and before maximize),
    bit for bit: here grad * agc / 1024 (grad_scale 1024, a power of two, so the order of the
    products cannot matter), rounded once to the dtype."""
    backend, device = backend_device
    shapes = [(37,), (7, 33, 2), big_shape(backend, device)]
    st = make_state(spec, shapes, dtype, device, seed=3)
    agc = make_agc(st["param"], seed=4)
    st["grad"] = [g * 1024 for g in st["grad"]]  # exact in every dtype
    before = clone_state(st)
    scale = torch.tensor(1024.0, device=device)
    run(spec, backend, st, agc=agc, emas=st["ema"], alpha=0.0, lamb=2.0, maximize=maximize, grad_scale=scale)
    for i, (e, g, a, p) in enumerate(zip(st["ema"], before["grad"], agc, st["param"])):
        expected = (g.float().cpu() * agc_factor_view(a.cpu(), p)) / 1024.0
        assert_bitwise_equal(f"ema[{i}]", e, expected.to(dtype))
    check(spec, st, before, mult=1 / 1024, maximize=maximize, agc=agc, emas=st["ema"], alpha=0.0, lamb=2.0)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_grokfast_matches_reference(backend_device, dtype, spec):
    """alpha = 0.98, lamb = 2 (the paper's defaults) from a mid-training ema."""
    backend, device = backend_device
    shapes = [(0,), (1,), (131,), (257, 33), (4099,)]
    if interpreted(backend, device):
        shapes = [(0,), (1,), (131,), big_shape(backend, device)]
    st = make_state(spec, shapes, dtype, device, seed=2)
    before = clone_state(st)
    run(spec, backend, st, emas=st["ema"], alpha=0.98, lamb=2.0)
    check(spec, st, before, emas=st["ema"], alpha=0.98, lamb=2.0)


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_grokfast_lamb_zero_only_tracks(spec, backend_device):
    """lamb = 0: the update is bit for bit the one without Grokfast (g + 0 * ema == g) while the
    ema still moves toward the grad."""
    backend, device = backend_device
    shapes = [(257,), (13, 17)]
    off = make_state(spec, shapes, torch.float32, device, seed=10)
    on = make_state(spec, shapes, torch.float32, device, seed=10)
    before = clone_state(on)
    run(spec, backend, off, alpha=0.9, lamb=0.0)
    run(spec, backend, on, emas=on["ema"], alpha=0.9, lamb=0.0)
    check(spec, on, before, emas=on["ema"], alpha=0.9, lamb=0.0)
    for k in ["param", *spec.used]:
        for a, b in zip(off[k], on[k]):
            assert_bitwise_equal(k, a, b)
    assert all((a != b).any() for a, b in zip(on["ema"], before["ema"])), "the ema must move"


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_grokfast_several_steps(spec, backend_device):
    """The ema carries over steps: four steps from a zero ema (alpha 0.9) track the reference
    run step after step in float64."""
    backend, device = backend_device
    st = make_state(spec, [(129,), (5, 7)], torch.float32, device, seed=13)
    for e in st["ema"]:
        e.zero_()
    gold = {k: ([t.cpu().double() for t in v] if isinstance(v, list) else v.cpu()) for k, v in st.items()}
    gen = torch.Generator().manual_seed(14)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in st["param"]]
        st["grad"] = [g.to(device) for g in grads]
        gold["grad"] = [g.double() for g in grads]
        run(spec, backend, st, emas=st["ema"], alpha=0.9, lamb=2.0)
        new = [reference(spec, gold, i, torch.float64, ema=gold["ema"][i], alpha=0.9, lamb=2.0)
               for i in range(len(grads))]
        for i, out in enumerate(new):
            for name, t in out.items():
                gold[name][i] = t
            gold["step"][i] = gold["step"][i] + 1
    for name in ["param", "ema", *spec.used]:
        for i, (a, b) in enumerate(zip(st[name], gold[name])):
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item(),
                                       msg=lambda msg: f"{spec.id} {name}[{i}]: {msg}")


# -------------------------------------------------------------- the whole pipeline


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_full_pipeline(backend_device, dtype, spec):
    """Unscale, clip, AGC, Grokfast and maximize together, on every op."""
    backend, device = backend_device
    shapes = [(37,), (3, 5), (7, 33, 2), (2, 3, 4, 5), big_shape(backend, device)]
    st = make_state(spec, shapes, dtype, device, seed=4)
    st["grad"] = [g * 256 for g in st["grad"]]
    agc = make_agc(st["param"], seed=5)
    before = clone_state(st)
    norm = torch.tensor(float(norm_reference(st["grad"])[0]), device=device)
    scale = torch.tensor(256.0, device=device)
    run(spec, backend, st, agc=agc, emas=st["ema"], alpha=0.9, lamb=1.5, maximize=True, grad_norm=norm,
        max_grad_norm=10.0, grad_scale=scale)
    mult = grad_multiplier_reference(norm, 10.0, scale)
    assert mult < 1 / 256 / 2, "the clip must be active"
    check(spec, st, before, mult=mult, maximize=True, agc=agc, emas=st["ema"], alpha=0.9, lamb=1.5)


def _alternative_pipelines(grad, agc, ema, mult, alpha, lamb):
    """The contract's order and orders it rules out, each as (pipeline grad, new ema) in float64."""
    g = grad.double()
    a = agc.double().reshape(-1, 1)
    e = ema.double()
    out = {"contract": grad_pipeline_reference(grad, mult, agc, ema, alpha, lamb, maximize=True)}
    # Grokfast before unscale/clip and AGC
    e1 = alpha * e + (1 - alpha) * g
    out["grokfast_first"] = (-((g + lamb * e1) * mult * a), e1)
    # AGC after Grokfast
    e2 = alpha * e + (1 - alpha) * g * mult
    out["agc_after_grokfast"] = (-((g * mult + lamb * e2) * a), e2)
    # maximize before Grokfast
    gm = -(g * mult * a)
    e3 = alpha * e + (1 - alpha) * gm
    out["maximize_first"] = (gm + lamb * e3, e3)
    return out


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_pipeline_order(backend_device):
    """Plain SGD with lr 1 from a zero param writes p = -g_pipeline exactly, so the grad the
    pipeline produced can be read off. The inputs are chosen so that every other order of
    clip, AGC, Grokfast and maximize gives a different grad or ema; the kernel must give the
    contract's: clip before AGC before Grokfast before maximize."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(15)
    rows, cols = 6, 11
    grad = torch.randn(rows, cols, generator=gen) * 50
    ema0 = torch.randn(rows, cols, generator=gen)
    agc = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    grad_norm, max_grad_norm, alpha, lamb = 100.0, 2.0, 0.8, 2.0
    mult = grad_multiplier_reference(grad_norm, max_grad_norm, None)
    plain = SGD.but("plain", momentum=0.0, weight_decay=0.0, unused=("momentum_buffer",))
    st = {"param": [torch.zeros(rows, cols, device=device)], "grad": [grad.clone().to(device)],
          "step": [], "trust": torch.ones(1, device=device)}
    ema = ema0.clone().to(device)
    run(plain, backend, st, lr=1.0, grad_norm=torch.tensor(grad_norm, device=device), max_grad_norm=max_grad_norm,
        agc=[agc.to(device)], emas=[ema], alpha=alpha, lamb=lamb, maximize=True)
    got_g, got_ema = -st["param"][0].cpu().double(), ema.cpu().double()
    orders = _alternative_pipelines(grad, agc, ema0, mult, alpha, lamb)
    want_g, want_ema = orders.pop("contract")
    torch.testing.assert_close(got_g, want_g, rtol=1e-6, atol=1e-6 * want_g.abs().max().item())
    torch.testing.assert_close(got_ema, want_ema, rtol=1e-6, atol=1e-6 * want_ema.abs().max().item())
    for name, (alt_g, alt_ema) in orders.items():
        differs = max(((alt_g - want_g).abs().max() / want_g.abs().max()).item(),
                      ((alt_ema - want_ema).abs().max() / want_ema.abs().max()).item())
        assert differs > 1e-2, f"the case does not tell the contract's order from {name}"


# ---------------------------------------------------------------------------- skip

SKIP_SPECS = [*SPECS, ADAMW.but("amsgrad", amsgrad=True, unused=()), _sgd_modes(SGD, ())[0],
              ADOPT.but("first", step=0.0), ADAN.but("first", step=0.0)]


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", SKIP_SPECS, ids=_ids(SKIP_SPECS))
@pytest.mark.parametrize("skip", [1.0, math.inf, 2.0])
def test_skip_writes_nothing(backend_device, dtype, spec, skip):
    """A skipped step (an overflow, a non-finite grad; any nonzero flag) writes nothing:
    params, state, the step counts and the Grokfast emas keep their bits, whatever else the
    pipeline is asked."""
    backend, device = backend_device
    st = make_state(spec, [(1000,), (7, 33, 2)], dtype, device, seed=16)
    st["grad"][0][3] = math.nan
    agc = make_agc(st["param"])
    before, agc_before = clone_state(st), [a.clone() for a in agc]
    run(spec, backend, st, agc=agc, emas=st["ema"], alpha=0.0, maximize=True,
        grad_norm=torch.tensor(5.0, device=device), max_grad_norm=1.0, grad_scale=torch.tensor(4.0, device=device),
        skip=torch.tensor(skip, device=device))
    assert_all_unchanged(st, before, zip(agc, agc_before))


@pytest.mark.parametrize("spec, backend_device", _backend_cases(SPECS))
def test_skip_zero_steps(spec, backend_device):
    """skip = 0: a normal step, the emas and step counts included."""
    backend, device = backend_device
    st = make_state(spec, [(100,), (5, 9)], torch.float32, device, seed=17)
    agc = make_agc(st["param"])
    before = clone_state(st)
    run(spec, backend, st, agc=agc, emas=st["ema"], skip=torch.tensor(0.0, device=device))
    check(spec, st, before, agc=agc, emas=st["ema"])


@pytest.mark.parametrize("spec, backend_device", _backend_cases(SPECS))
def test_a_one_element_skip_of_shape_1_counts_like_a_0d_one(spec, backend_device):
    """The control scalars are one-element tensors of any shape: a skip of shape [1] skips or
    steps (step counts included) as a 0-d one does."""
    backend, device = backend_device
    st = make_state(spec, [(100,), (5, 9)], torch.float32, device, seed=17)
    before = clone_state(st)
    run(spec, backend, st, skip=torch.ones(1, device=device))
    assert_all_unchanged(st, before, [])
    run(spec, backend, st, skip=torch.zeros(1, device=device))
    check(spec, st, before)


# ---------------------------------------------------------------------- bad inputs


def _bad_cases(spec, st, device):
    """(what, changed state lists, pipeline arguments) that the op must refuse."""
    params, grads, steps = st["param"], st["grad"], st["step"]
    lists = ["param", "grad", *spec.used]
    cases = [
        ("list lengths differ", dict(grad=grads[:1]), {}),
        ("shape differs", dict(grad=[grads[0], torch.randn(16, device=device)]), {}),
        ("same shape, other layout", dict(grad=[grads[0], grads[1].t().contiguous().t()]), {}),
        ("not dense", {k: [st[k][0], torch.zeros(4, 8, device=device)[:, ::2]] for k in lists}, {}),
        ("unsupported dtype", {k: [st[k][0].double(), st[k][1]] for k in lists}, {}),
        ("clipping without grad_norm", {}, dict(max_grad_norm=1.0)),
        ("grad_norm of two elements", {}, dict(grad_norm=torch.tensor([1.0, 2.0], device=device), max_grad_norm=1.0)),
        ("grad_scale float64", {}, dict(grad_scale=torch.tensor(2.0, dtype=torch.float64, device=device))),
        ("skip of two elements", {}, dict(skip=torch.zeros(2, device=device))),
    ]
    for name in spec.used:
        cases += [(f"one {name} missing", {name: st[name][:1]}, {}),
                  # another float storage is fine (state_storage.h); int8 for one param and not another is not
                  (f"{name} int8 for one param only", {name: [st[name][0], st[name][1].to(torch.int8)]}, {}),
                  (f"{name} other layout", {name: [st[name][0], st[name][1].t().contiguous().t()]}, {})]
    if spec.has_step:
        cases += [("a step missing", dict(step=steps[:1]), {}),
                  ("a step not float32", dict(step=[steps[0], steps[1].double()]), {}),
                  ("a step of two elements", dict(step=[steps[0], torch.ones(2, device=device)]), {})]
    if device == "cuda":
        cases += [("a control scalar on the CPU", {}, dict(grad_scale=torch.tensor(2.0))),
                  ("a state on the CPU", {name: [st[name][0], st[name][1].cpu()] for name in spec.used[:1]}, {})]
        if spec.has_step:
            cases.append(("a step on the CPU", dict(step=[steps[0], steps[1].cpu()]), {}))
    return cases


@pytest.mark.parametrize("spec, backend_device", _backend_cases(SPECS))
def test_bad_inputs_change_nothing(spec, backend_device):
    backend, device = backend_device
    st = make_state(spec, [(10,), (4, 4)], torch.float32, device)
    before = clone_state(st)
    for what, lists, pipeline in _bad_cases(spec, st, device):
        with pytest.raises(RuntimeError):
            run(spec, backend, dict(st, **lists), **pipeline)
            pytest.fail(f"{spec.id} took {what}")
    assert_all_unchanged(st, before)


@pytest.mark.parametrize("spec, backend_device", _backend_cases([s for s in SKIP_SPECS if s.unused]))
def test_unused_state_lists_must_be_empty(spec, backend_device):
    """A state list the call does not use (max_exp_avg_sqs without amsgrad, momentum_buffers
    without momentum) must be empty, so that a mix-up of flags and lists shows."""
    backend, device = backend_device
    st = make_state(spec, [(10,), (4, 4)], torch.float32, device)
    before = clone_state(st)
    with pytest.raises(RuntimeError, match=spec.unused[0]):
        run(spec, backend, st, states=[st[name] for name in spec.states])
    assert_all_unchanged(st, before)


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_bad_lr_changes_nothing(spec, backend_device):
    backend, device = backend_device
    st = make_state(spec, [(10,)], torch.float32, device)
    before = clone_state(st)
    for lr in (torch.tensor(0.1, dtype=torch.float64, device=device), torch.tensor([0.1, 0.2], device=device)):
        params, grads, states, steps, _, hyper = op_inputs(spec, st)
        with pytest.raises(RuntimeError, match="lr"):
            ops.update_(spec.op, params, grads, states, steps, lr, backend=backend, **hyper)
    assert_all_unchanged(st, before)


def _bad_regularizer_cases(st, device):
    """(description, agc_scales, grokfast_emas) that every op must refuse."""
    params, emas = st["param"], st["ema"]
    agc = make_agc(params)
    rows = _rows(params[1])
    cases = [
        ("one agc_scales too few", agc[:1], ()),
        ("one agc_scales too many", agc + [torch.ones(1, device=device)], ()),
        ("agc_scales one row too many", [agc[0], torch.ones(rows + 1, device=device)], ()),
        ("agc_scales one row too few", [agc[0], torch.ones(rows - 1, device=device)], ()),
        ("agc_scales per element", [agc[0], torch.ones(params[1].numel(), device=device)], ()),
        ("agc_scales float64", [agc[0], agc[1].double()], ()),
        ("agc_scales bfloat16", [agc[0], agc[1].to(torch.bfloat16)], ()),
        ("agc_scales like the param's dtype", [agc[0], agc[1].to(torch.float16)], ()),
        ("agc_scales 2-D", [agc[0], agc[1].reshape(rows, 1)], ()),
        ("agc_scales not contiguous", [agc[0], torch.ones(2 * rows, device=device)[::2]], ()),
        ("one grokfast_emas too few", (), emas[:1]),
        ("grokfast_emas of the wrong shape", (), [emas[0], torch.zeros(params[1].numel(), device=device)]),
        ("grokfast_emas transposed", (), [emas[0], emas[1].t().contiguous().t()]),
        # stored in another float dtype is fine (state_storage.h); int8 for one param only, or float64, is not
        ("grokfast_emas int8 for one param only", (), [emas[0], emas[1].to(torch.int8)]),
        ("grokfast_emas float64", (), [emas[0], emas[1].double()]),
        ("both, the emas wrong", agc, [emas[0], emas[1][:-1]]),
    ]
    if device == "cuda":
        cases.append(("agc_scales on the CPU", [agc[0], agc[1].cpu()], ()))
        cases.append(("grokfast_emas on the CPU", (), [emas[0], emas[1].cpu()]))
    return cases


@pytest.mark.parametrize("spec, backend_device", _backend_cases(SPECS))
def test_bad_regularizer_args_change_nothing(spec, backend_device):
    backend, device = backend_device
    st = make_state(spec, [(10,), (5, 4)], torch.float16, device, seed=18)
    before = clone_state(st)
    for what, agc, emas in _bad_regularizer_cases(st, device):
        kept = [t.clone() for t in list(agc) + list(emas)]
        with pytest.raises(RuntimeError):
            run(spec, backend, st, agc=agc, emas=emas)
            pytest.fail(f"{spec.id} took {what}")
        for a, b in zip(list(agc) + list(emas), kept):
            assert_bitwise_equal(f"{what}: the regularizer state", a, b)
    assert_all_unchanged(st, before)


@pytest.mark.parametrize("spec, backend_device", _backend_cases(PER_OP))
def test_agc_refuses_rows_that_are_not_contiguous(spec, backend_device):
    """A transposed 2-D param is dense (fine without AGC) but its rows are strided: AGC
    refuses it and nothing changes; the same call without AGC runs."""
    backend, device = backend_device
    st = make_state(spec, [(10,), (5, 7)], torch.float32, device, seed=19)
    for k in ["param", "grad", "ema", *spec.states]:
        st[k][1] = st[k][1].t().contiguous().t()  # shape (5, 7), strides (1, 5)
    assert not st["param"][1].is_contiguous()
    agc = make_agc(st["param"])
    before = clone_state(st)
    with pytest.raises(RuntimeError):
        run(spec, backend, st, agc=agc, emas=st["ema"])
    assert_all_unchanged(st, before)
    run(spec, backend, st, emas=st["ema"])  # without AGC: a dense param, taken
    check(spec, st, before, emas=st["ema"])


# ---------------------------------------------------------------------- the schema


def _op_handle(spec, backend):
    name = f"{spec.op.rstrip('_')}_triton_" if backend == "triton" else spec.op
    return getattr(torch.ops.catapult, name)


# (spec, control scalars given, regularizers on): each configuration once, each part of the
# pipeline on and off for every op (LAMB's in test_lamb.py).
OPCHECK_CASES = [
    (ADAMW, True, True), (ADAMW.but("amsgrad", amsgrad=True, unused=()), True, False),
    (ADAM.but("amsgrad", amsgrad=True, unused=()), False, False),
    (SGD, True, True), (_sgd_modes(SGD, ())[0], True, False), (_sgd_modes(LARS, ())[0], True, True),
    (LION, False, False), (LION, True, True),
    (ADOPT, False, False), (ADOPT, True, True), (ADAN, True, True), (ADAN.but("no_prox", no_prox=True), False, False),
    (MUON_MOMENTUM, True, True), (MUON_MOMENTUM.but("plain", nesterov=False), False, False),
    (MUON_UPDATE, True, False), (MUON_UPDATE, False, False),
]


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("spec, control, regularizers", OPCHECK_CASES,
                         ids=[f"{s.id}{'-control' * c}{'-regularizers' * r}" for s, c, r in OPCHECK_CASES])
def test_opcheck(backend_device, spec, control, regularizers):
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    backend, device = backend_device
    st = make_state(spec, [(33,), (4, 5), (3, 2, 2)], torch.float32, device)
    pipeline = {}
    if control:
        pipeline = dict(grad_norm=torch.tensor(3.0, device=device), max_grad_norm=1.0,
                        grad_scale=torch.tensor(2.0, device=device), skip=torch.tensor(0.0, device=device),
                        maximize=True)
    if regularizers:
        pipeline.update(agc=make_agc(st["param"]), emas=st["ema"])
    params, grads, states, steps, lr, hyper = op_inputs(spec, st, lr=1e-3)
    args = (params, grads, *states, *([steps] if spec.has_step else []), lr, *hyper.values(),
            *pipeline_args(spec, **pipeline).args(), *([[], []] if ops.update_op(spec.op).stored else []))
    torch.library.opcheck(_op_handle(spec, backend), args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for 2^31 elements")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("spec", [s for s in PER_OP if s is not LAMB], ids=_ids([s for s in PER_OP if s is not LAMB]))
def test_more_than_2_pow_31_elements(backend, spec):
    """64-bit indexing: the last elements of a tensor of 2^31 + 1000 elements are updated as
    the first are (LAMB's own file checks it, its trust ratio mixing all elements)."""
    n = 2**31 + 1000
    full = lambda v: torch.full((n,), v, dtype=torch.bfloat16, device="cuda")  # noqa: E731
    st = {"param": [full(0.5)], "grad": [full(0.25)], **{name: [full(0.5)] for name in spec.states},
          "step": [torch.tensor(spec.step, device="cuda")], "trust": torch.ones(1, device="cuda")}
    st["grad"][0][-3:] = -1.0  # only reached with 64-bit indexing
    where = torch.tensor([0, 1, n - 5, n - 4, n - 3, n - 2, n - 1], device="cuda")
    before = {k: [t[where].cpu() for t in v] for k, v in st.items() if k not in ("step", "trust")}
    before.update(step=[s.cpu() for s in st["step"]], trust=st["trust"].cpu())
    run(spec, backend, st)
    gold = reference(spec, before, 0, torch.float64)
    same = reference(spec, before, 0, torch.float32)
    for name in gold:
        assert_close_to_reference(f"{spec.id} {name}", st[name][0][where].cpu(), gold[name], same[name])
