"""catapult::lamb_ (C++) and catapult::lamb_triton_ against the LAMB formula (You et al.
2019) in tests/reference.py, on every backend, dtype and awkward shape, with the
per-tensor trust ratio checked explicitly. The grad pipeline (AGC, Grokfast, skip) on every
update op is in test_update_ops.py."""
import math

import pytest
import torch

from catapult_kernels import ops
from conftest import BACKEND_DEVICES, DTYPES
from reference import (assert_bitwise_equal, assert_close_to_reference, grad_multiplier_reference, lamb_reference,
                       norm_reference)

SHAPES = {
    "empty": [(0,)],
    "one": [(1,)],
    "odd": [(7,), (3, 5), (7, 33, 2)],
    "chunks": [(4099,)],                  # several chunks of the Triton kernel: a per-tensor norm across them
    "above_cpu_chunk": [(2**15 + 3,)],    # more than one chunk of the CPU kernel (2^15)
    "mixed": [(0,), (1,), (131,), (257, 33), (5,)],
}
# beta2 0.99 as in test_update_ops.py: the kernels compute 1 - beta2 and 1 - beta2^step in float32
# (csrc/lamb_math.h), whose cancellation at 0.999 alone costs about 5e-6 of the update.
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01)


def _state(shapes, dtype, device, step=2.0, seed=0):
    """Random params, grads and mid-training moments (v > 0) for each shape; step: the
    steps taken before (the op runs step + 1)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda s, f=1.0: (torch.randn(s, generator=g) * f).to(dtype=dtype, device=device)  # noqa: E731
    params = [mk(s) for s in shapes]
    grads = [mk(s) for s in shapes]
    m = [mk(s, 0.1) for s in shapes]
    v = [mk(s, 0.1).abs() for s in shapes]
    steps = [torch.tensor(step, device=device) for _ in shapes]
    return params, grads, m, v, steps


def _run(backend, params, grads, m, v, steps, bias_correction=True, max_weight_norm=0.0, maximize=False,
         grad_norm=None, max_grad_norm=0.0, grad_scale=None, skip=None, lr=HYPER["lr"],
         weight_decay=HYPER["weight_decay"]):
    device = params[0].device if params else torch.device("cpu")
    pipeline = ops.PipelineArgs(grad_norm=grad_norm, max_grad_norm=max_grad_norm, grad_scale=grad_scale, skip=skip,
                                maximize=maximize)
    ops.update_("lamb_", params, grads, [m, v], steps, torch.tensor(lr, device=device), pipeline=pipeline,
                backend=backend, beta1=HYPER["beta1"], beta2=HYPER["beta2"], eps=HYPER["eps"],
                weight_decay=weight_decay, bias_correction=bias_correction, max_weight_norm=max_weight_norm)


def _check(params, m, v, before, bias_correction=True, max_weight_norm=0.0, maximize=False, mult=1.0,
           weight_decay=HYPER["weight_decay"], lr=HYPER["lr"]):
    h = HYPER
    for i, (p, mi, vi, p0, g0, m0, v0, s) in enumerate(zip(params, m, v, *before)):
        args = (float(s) + 1, lr, h["beta1"], h["beta2"], h["eps"], weight_decay, bias_correction, max_weight_norm,
                maximize, mult)
        gold = lamb_reference(p0.cpu(), g0.cpu(), m0.cpu(), v0.cpu(), *args, compute_dtype=torch.float64)
        same = lamb_reference(p0.cpu(), g0.cpu(), m0.cpu(), v0.cpu(), *args, compute_dtype=torch.float32)
        assert_close_to_reference(f"param[{i}]", p, gold[0], same[0])
        assert_close_to_reference(f"exp_avg[{i}]", mi, gold[1], same[1])
        assert_close_to_reference(f"exp_avg_sq[{i}]", vi, gold[2], same[2])


def _clone(*lists):
    return [[t.clone() for t in ts] for ts in lists]


def _direction(p, g, m, v, step, bias_correction=True, weight_decay=HYPER["weight_decay"]):
    """LAMB's r for one tensor in float64, written out again (not through the reference)."""
    h = HYPER
    p, g, m, v = (t.cpu().double() for t in (p, g, m, v))
    m = h["beta1"] * m + (1 - h["beta1"]) * g
    v = h["beta2"] * v + (1 - h["beta2"]) * g * g
    bc1 = 1 - h["beta1"] ** step if bias_correction else 1.0
    bc2 = 1 - h["beta2"] ** step if bias_correction else 1.0
    return (m / bc1) / ((v / bc2).sqrt() + h["eps"]) + weight_decay * p


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("bias_correction", [True, False], ids=["bc", "no_bc"])
def test_matches_reference(backend_device, dtype, shapes, bias_correction):
    backend, device = backend_device
    inputs = _state(shapes, dtype, device)
    before = _clone(*inputs)
    params, grads, m, v, steps = inputs
    _run(backend, params, grads, m, v, steps, bias_correction=bias_correction)
    _check(params, m, v, before, bias_correction)
    assert all(torch.equal(a, b) for a, b in zip(grads, before[1])), "grads must not be written"
    assert all(torch.equal(a, b + 1) for a, b in zip(steps, before[4])), "the op counts its step"


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["maximize", "clip", "clip_inactive", "grad_scale", "scale_and_clip",
                                  "max_weight_norm", "no_decay"])
def test_options(backend_device, dtype, case):
    backend, device = backend_device
    inputs = _state([(129,), (31, 7)], dtype, device, step=0.0, seed=2)
    before = _clone(*inputs)
    params, grads, m, v, steps = inputs
    norm = torch.tensor(float(norm_reference(grads)[0]), device=device)
    scale = torch.tensor(1024.0, device=device)
    kw = {"maximize": dict(maximize=True),
          "clip": dict(grad_norm=norm, max_grad_norm=1.0),
          "clip_inactive": dict(grad_norm=norm, max_grad_norm=1e6),
          "grad_scale": dict(grad_scale=scale),
          "scale_and_clip": dict(grad_norm=norm, max_grad_norm=0.01, grad_scale=scale),
          "max_weight_norm": dict(max_weight_norm=2.0),   # |p| is about 11 and 15: clamped
          "no_decay": dict(weight_decay=0.0)}[case]
    _run(backend, params, grads, m, v, steps, **kw)
    mult = grad_multiplier_reference(kw.get("grad_norm"), kw.get("max_grad_norm"), kw.get("grad_scale"))
    _check(params, m, v, before, True, kw.get("max_weight_norm", 0.0), kw.get("maximize", False), mult,
           kw.get("weight_decay", HYPER["weight_decay"]))


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("bias_correction", [True, False], ids=["bc", "no_bc"])
def test_trust_ratio_per_tensor(backend_device, bias_correction):
    """p - p_new = lr * trust * r with one trust per tensor, |p| / |r|: tensors of very
    different norms in one call each get their own; a zero param gets trust 1."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(3)
    shapes = [(300,), (20, 15), (50,), (4099,)]
    factors = [1.0, 40.0, 0.0, 0.01]  # param scales: |p| from 0 to about 700
    params = [(torch.randn(s, generator=gen) * f).to(device) for s, f in zip(shapes, factors)]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    m = [(torch.randn(s, generator=gen) * 0.1).to(device) for s in shapes]
    v = [(torch.randn(s, generator=gen) * 0.1).abs().to(device) for s in shapes]
    steps = [torch.tensor(1.0, device=device) for _ in shapes]  # step 2
    before = _clone(params, grads, m, v, steps)
    _run(backend, params, grads, m, v, steps, bias_correction=bias_correction)
    lr = HYPER["lr"]
    for i, (p0, g0, m0, v0) in enumerate(zip(*before[:4])):
        r = _direction(p0, g0, m0, v0, 2.0, bias_correction)
        p_norm = p0.double().norm().item()
        trust = p_norm / r.norm().item() if p_norm > 0 else 1.0
        expected = p0.cpu().double() - lr * trust * r
        torch.testing.assert_close(params[i].cpu().double(), expected, rtol=2e-6, atol=2e-6 * expected.abs().max().item(),
                                   msg=lambda msg: f"param[{i}] (trust {trust:.4g}): {msg}")
    # the zero param moved by exactly lr * r (trust 1), not by 0 * r / |r|
    assert params[2].abs().min() > 0


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_trust_ratio_zero_update(backend_device, weight_decay):
    """r = 0 (zero grad and moments, and no decay or a zero param): trust 1 instead of
    0/0, so nothing moves and nothing turns NaN."""
    backend, device = backend_device
    p_nonzero = torch.randn(100).to(device)
    params = [p_nonzero.clone() if weight_decay == 0.0 else torch.zeros(100, device=device), torch.zeros(7, device=device)]
    grads = [torch.zeros_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0, device=device) for _ in params]
    before = _clone(params, m, v)
    _run(backend, params, grads, m, v, steps, weight_decay=weight_decay)
    for now, then in zip((params, m, v), before):
        for a, b in zip(now, then):
            assert_bitwise_equal("state", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_direction_of_pass_2_is_that_of_pass_1(backend_device, dtype):
    """Pass 2's r must be pass 1's (the one the trust ratio was measured on), not one
    recomputed from m and v as rounded to a half type: here v = 0.01 * (1e-3)^2 = 1e-8
    rounds to 0 in float16, and an r recomputed from it would be m_hat / eps = 1000 instead
    of about 1 (p = -99 instead of 0.9)."""
    backend, device = backend_device
    p = torch.tensor([1.0, 1.0], dtype=dtype, device=device)
    g = torch.tensor([1e-3, 1.0], dtype=dtype, device=device)
    m, v = torch.zeros(2, dtype=dtype, device=device), torch.zeros(2, dtype=dtype, device=device)
    steps = [torch.tensor(0.0, device=device)]
    before = _clone([p], [g], [m], [v], steps)
    _run(backend, [p], [g], [m], [v], steps, lr=0.1, weight_decay=0.0)
    _check([p], [m], [v], before, weight_decay=0.0, lr=0.1)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("max_weight_norm", [0.0, -1.0, 1.0, 10.0, 1e6])
def test_max_weight_norm(backend_device, max_weight_norm):
    """|w| = min(|p|, max_weight_norm) when max_weight_norm > 0 (never raised to it), else |p|.
    Param norms here: about 0.5, 3 and 316."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(4)
    shapes = [(25,), (9,), (1000,)]
    factors = [0.1, 1.0, 10.0]
    params = [(torch.randn(s, generator=gen) * f).to(device) for s, f in zip(shapes, factors)]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    m = [(torch.randn(s, generator=gen) * 0.1).to(device) for s in shapes]
    v = [(torch.randn(s, generator=gen) * 0.1).abs().to(device) for s in shapes]
    steps = [torch.tensor(4.0, device=device) for _ in shapes]  # step 5
    before = _clone(params, grads, m, v, steps)
    _run(backend, params, grads, m, v, steps, max_weight_norm=max_weight_norm)
    lr = HYPER["lr"]
    for i, (p0, g0, m0, v0) in enumerate(zip(*before[:4])):
        r = _direction(p0, g0, m0, v0, 5.0)
        w = p0.double().norm().item()
        if max_weight_norm > 0:
            w = min(w, max_weight_norm)
        expected = p0.cpu().double() - lr * (w / r.norm().item()) * r
        torch.testing.assert_close(params[i].cpu().double(), expected, rtol=2e-6, atol=2e-6 * expected.abs().max().item(),
                                   msg=lambda msg: f"param[{i}]: {msg}")
    _check(params, m, v, before, max_weight_norm=max_weight_norm)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("bias_correction", [True, False], ids=["bc", "no_bc"])
def test_several_steps(backend_device, bias_correction):
    """Steps 1..5 (state_steps counted up by the op) track the reference run step after
    step in float64 from the same start."""
    backend, device = backend_device
    big = (4099,) if backend == "triton" and device == "cpu" else (2**15 + 3,)  # the interpreter is slow
    params, _, m, v, _ = _state([(257,), (13, 17), big], torch.float32, device, seed=11)
    m = [torch.zeros_like(t) for t in m]
    v = [torch.zeros_like(t) for t in v]
    gold = [[t.cpu().double() for t in ts] for ts in (params, m, v)]
    gen = torch.Generator().manual_seed(12)
    h = HYPER
    steps = [torch.tensor(0.0, device=device) for _ in params]
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
        _run(backend, params, grads, m, v, steps, bias_correction=bias_correction)
        for i, g in enumerate(grads):
            gold[0][i], gold[1][i], gold[2][i], _ = lamb_reference(
                gold[0][i], g.cpu().double(), gold[1][i], gold[2][i], float(step), h["lr"], h["beta1"], h["beta2"],
                h["eps"], h["weight_decay"], bias_correction, 0.0, False)
    for name, got, ref in zip(("param", "exp_avg", "exp_avg_sq"), (params, m, v), gold):
        for i, (a, b) in enumerate(zip(got, ref)):
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item(),
                                       msg=lambda msg: f"{name}[{i}]: {msg}")


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_each_tensor_uses_its_own_step(backend_device):
    backend, device = backend_device
    inputs = _state([(50,), (60,), (70,)], torch.float32, device)
    for s, value in zip(inputs[4], (0.0, 9.0, 999.0)):  # steps 1, 10 and 1000
        s.fill_(value)
    before = _clone(*inputs)
    _run(backend, *inputs)
    params, _, m, v, _ = inputs
    _check(params, m, v, before)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("found_inf", [1.0, math.inf])
def test_found_inf_writes_nothing(backend_device, dtype, found_inf):
    backend, device = backend_device
    inputs = _state([(1000,), (3, 5)], dtype, device)
    inputs[1][0][4] = math.nan
    before = _clone(*inputs)
    _run(backend, *inputs, max_weight_norm=1.0, maximize=True, grad_norm=torch.tensor(5.0, device=device),
         max_grad_norm=1.0, grad_scale=torch.tensor(8.0, device=device), skip=torch.tensor(found_inf, device=device))
    for now, then in zip(inputs, before):
        for a, b in zip(now, then):
            assert_bitwise_equal("state", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_found_inf_zero_steps(backend_device):
    backend, device = backend_device
    inputs = _state([(100,)], torch.float32, device)
    before = _clone(*inputs)
    _run(backend, *inputs, skip=torch.tensor(0.0, device=device))
    params, _, m, v, _ = inputs
    _check(params, m, v, before)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_many_small_tensors(backend_device):
    backend, device = backend_device
    n = 300 if device == "cpu" and backend == "triton" else 2000
    g = torch.Generator().manual_seed(5)
    shapes = [(int(torch.randint(1, 200, (1,), generator=g)),) for _ in range(n)]
    inputs = _state(shapes, torch.float32, device)
    before = _clone(*inputs)
    _run(backend, *inputs)
    params, _, m, v, _ = inputs
    _check(params, m, v, before)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_mixed_dtypes_in_one_call(backend_device):
    backend, device = backend_device
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    shapes = [(131,), (33, 3), (1,), (2050,), (0,)]
    inputs = [[], [], [], [], []]
    for i, (s, dt) in enumerate(zip(shapes, dtypes)):
        for acc, ts in zip(inputs, _state([s], dt, device, seed=20 + i)):
            acc += ts
    before = _clone(*inputs)
    _run(backend, *inputs)
    params, _, m, v, _ = inputs
    _check(params, m, v, before)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_bad_inputs_change_nothing(backend_device):
    backend, device = backend_device
    inputs = _state([(10,), (4, 4)], torch.float32, device)
    params, grads, m, v, steps = inputs
    before = _clone(*inputs)
    strided = torch.zeros(4, 8, device=device)[:, ::2]  # not dense
    cases = [
        dict(grads=grads[:1]),                                      # list lengths differ
        dict(v=v[:1]),                                              # an exp_avg_sq missing
        dict(steps=steps[:1]),                                      # a step missing
        dict(steps=[steps[0], steps[1].double()]),                  # a step not float32
        dict(steps=[steps[0], torch.ones(2, device=device)]),       # a step of two elements
        dict(grads=[grads[0], torch.randn(16, device=device)]),     # shape differs
        dict(m=[m[0], m[1].to(torch.bfloat16)]),                    # dtype differs
        dict(v=[v[0], v[1].t().contiguous().t()]),                  # same shape, other layout
        dict(params=[params[0], strided], grads=[grads[0], strided.clone()], m=[m[0], strided.clone()],
             v=[v[0], strided.clone()]),
        dict(kw=dict(max_grad_norm=1.0)),                           # clipping without grad_norm
        dict(kw=dict(grad_scale=torch.tensor(2.0, dtype=torch.float64, device=device))),
        dict(kw=dict(skip=torch.zeros(2, device=device))),
    ]
    if device == "cuda":
        cases.append(dict(steps=[steps[0], steps[1].cpu()]))
    for case in cases:
        args = dict(params=params, grads=grads, m=m, v=v, steps=steps) | case
        with pytest.raises(RuntimeError):
            _run(backend, args["params"], args["grads"], args["m"], args["v"], args["steps"], **case.get("kw", {}))
    for now, then in zip(inputs, before):
        for a, b in zip(now, then):
            assert_bitwise_equal("state", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_opcheck(backend_device):
    backend, device = backend_device
    op = torch.ops.catapult.lamb_triton_ if backend == "triton" else torch.ops.catapult.lamb_
    for bias_correction, max_weight_norm, control, regularizers in ((True, 0.0, False, False), (False, 10.0, True, False),
                                                                    (True, 1.0, True, True)):
        params, grads, m, v, steps = _state([(33,), (4, 5), (3, 2, 2)], torch.float32, device)
        agc = [torch.rand(1 if p.dim() < 2 else p.shape[0], device=device) + 0.1 for p in params] if regularizers else []
        emas = [torch.randn_like(p) for p in params] if regularizers else []
        scalars = ((torch.tensor(3.0, device=device), 1.0, torch.tensor(2.0, device=device),
                    torch.tensor(0.0, device=device)) if control else (None, 0.0, None, None))
        args = (params, grads, m, v, steps, torch.tensor(1e-3, device=device), 0.9, 0.999, 1e-6, 0.01,
                bias_correction, max_weight_norm, *scalars, agc, emas, 0.98, 2.0, False, [], [])
        torch.library.opcheck(op, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for 2^31 elements")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_pow_31_elements(backend):
    n = 2**31 + 1000
    p = torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda")
    g = torch.full((n,), 0.25, dtype=torch.bfloat16, device="cuda")
    m = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    v = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    g[-3:] = -1.0  # only reached with 64-bit indexing
    ops.update_("lamb_", [p], [g], [[m], [v]], [torch.tensor(0.0, device="cuda")], torch.tensor(0.5, device="cuda"),
                backend=backend, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, bias_correction=True,
                max_weight_norm=0.0)
    # step 1: r = g / (|g| + eps), about sign(g); |r| about sqrt(n), |p| = 0.5 sqrt(n): trust about 0.5
    assert p[0].item() == 0.25 and p[-4].item() == 0.25 and p[-1].item() == 0.75 and p[-3].item() == 0.75
    assert m[-1].item() == torch.tensor(-0.1, dtype=torch.bfloat16).item()
