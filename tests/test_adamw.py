"""catapult::adamw_ (C++) and catapult::adamw_triton_ against the AdamW formula (and, with
decoupled_weight_decay=False, Adam's coupled L2) in tests/reference.py, on every backend,
dtype and awkward shape. The regularizers (AGC, Grokfast) are in test_regularizers.py."""
import math

import pytest
import torch

from catapult_kernels import ops
from conftest import BACKEND_DEVICES, DTYPES
from reference import (adamw_reference, assert_bitwise_equal, assert_close_to_reference, grad_multiplier_reference,
                       norm_reference)

SHAPES = {
    "empty": [(0,)],
    "one": [(1,)],
    "primes": [(7,), (13, 17), (4099,)],
    "above_block": [(65537,)],
    "mixed": [(0,), (1,), (131,), (257, 33), (5,)],
}
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


def _state(shapes, dtype, device, step=3.0, seed=0):
    """Random params, grads and mid-training moments (v > 0) for each shape."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda s, f=1.0: (torch.randn(s, generator=g) * f).to(dtype=dtype, device=device)  # noqa: E731
    params = [mk(s) for s in shapes]
    grads = [mk(s) for s in shapes]
    m = [mk(s, 0.1) for s in shapes]
    v = [mk(s, 0.1).abs() for s in shapes]
    vmax = [(vi.float() * 1.5).to(dtype) for vi in v]
    steps = [torch.tensor(step, device=device) for _ in shapes]
    return params, grads, m, v, vmax, steps


def _run(backend, params, grads, m, v, vmax, steps, amsgrad=False, maximize=False, grad_norm=None,
         max_grad_norm=0.0, grad_scale=None, found_inf=None, lr=HYPER["lr"], decoupled=True):
    device = params[0].device if params else torch.device("cpu")
    ops.adamw_(params, grads, m, v, vmax if amsgrad else [], steps, torch.tensor(lr, device=device),
               HYPER["beta1"], HYPER["beta2"], HYPER["eps"], HYPER["weight_decay"], amsgrad, maximize,
               grad_norm, max_grad_norm, grad_scale, found_inf, decoupled_weight_decay=decoupled, backend=backend)


def _expected(params, grads, m, v, vmax, steps, amsgrad, maximize, mult, compute_dtype, decoupled=True):
    h = HYPER
    return [adamw_reference(p, g, mi, vi, vm, float(s), h["lr"], h["beta1"], h["beta2"], h["eps"],
                            h["weight_decay"], amsgrad, maximize, mult, compute_dtype,
                            decoupled_weight_decay=decoupled)
            for p, g, mi, vi, vm, s in zip(params, grads, m, v, vmax, steps)]


def _check(got, inputs, amsgrad, maximize, mult, decoupled=True):
    gold = _expected(*[[t.cpu() for t in ts] for ts in inputs], amsgrad, maximize, mult, torch.float64, decoupled)
    same = _expected(*[[t.cpu() for t in ts] for ts in inputs], amsgrad, maximize, mult, torch.float32, decoupled)
    names = ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"][: 4 if amsgrad else 3]
    for i, (g_out, ref, ref32) in enumerate(zip(got, gold, same)):
        for name, a, b, c in zip(names, g_out, ref, ref32):
            assert_close_to_reference(f"{name}[{i}]", a, b, c)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_matches_reference(backend_device, dtype, shapes, amsgrad):
    backend, device = backend_device
    inputs = _state(shapes, dtype, device)
    before = [[t.clone() for t in ts] for ts in inputs]
    params, grads, m, v, vmax, steps = inputs
    _run(backend, params, grads, m, v, vmax, steps, amsgrad=amsgrad)
    got = list(zip(params, m, v, vmax))
    _check(got, before, amsgrad, False, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(grads, before[1])), "grads must not be written"


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["maximize", "clip", "clip_inactive", "grad_scale", "scale_and_clip"])
def test_options(backend_device, dtype, case):
    backend, device = backend_device
    shapes = [(129,), (31, 7)]
    inputs = _state(shapes, dtype, device, step=1.0, seed=2)
    before = [[t.clone() for t in ts] for ts in inputs]
    params, grads, m, v, vmax, steps = inputs
    norm = torch.tensor(float(norm_reference(grads)[0]), device=device)
    scale = torch.tensor(1024.0, device=device)
    kw = {"maximize": dict(maximize=True),
          "clip": dict(grad_norm=norm, max_grad_norm=1.0),
          "clip_inactive": dict(grad_norm=norm, max_grad_norm=1e6),
          "grad_scale": dict(grad_scale=scale),
          "scale_and_clip": dict(grad_norm=norm, max_grad_norm=0.01, grad_scale=scale)}[case]
    _run(backend, params, grads, m, v, vmax, steps, **kw)
    mult = grad_multiplier_reference(kw.get("grad_norm"), kw.get("max_grad_norm"), kw.get("grad_scale"))
    _check(list(zip(params, m, v, vmax)), before, False, kw.get("maximize", False), mult)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad, maximize", [(False, False), (True, True), (False, True)],
                         ids=["adam", "amsgrad-max", "adam-max"])
def test_adam_coupled_weight_decay(backend_device, dtype, amsgrad, maximize):
    """decoupled_weight_decay=False: torch.optim.Adam's L2, g = g + wd * p (after maximize's
    negation), and no decay of p."""
    backend, device = backend_device
    shapes = SHAPES["mixed"] + SHAPES["primes"] + ([] if backend == "triton" and device == "cpu" else [(65537,)])
    inputs = _state(shapes, dtype, device, seed=7)
    before = [[t.clone() for t in ts] for ts in inputs]
    params, grads, m, v, vmax, steps = inputs
    _run(backend, params, grads, m, v, vmax, steps, amsgrad=amsgrad, maximize=maximize, decoupled=False)
    _check(list(zip(params, m, v, vmax)), before, amsgrad, maximize, 1.0, decoupled=False)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_coupled_and_decoupled_differ(backend_device):
    """The flag is honoured: with a large weight decay the two steps differ, each matching
    its own formula (not just both close to something)."""
    backend, device = backend_device
    results = {}
    for decoupled in (True, False):
        inputs = _state([(513,)], torch.float32, device, seed=3)
        before = [[t.clone() for t in ts] for ts in inputs]
        params, grads, m, v, vmax, steps = inputs
        _run(backend, params, grads, m, v, vmax, steps, decoupled=decoupled)
        _check(list(zip(params, m, v, vmax)), before, False, False, 1.0, decoupled=decoupled)
        results[decoupled] = (params[0].cpu().clone(), m[0].cpu().clone())
    assert (results[True][0] - results[False][0]).abs().max() > 1e-4
    assert (results[True][1] - results[False][1]).abs().max() > 1e-4  # coupled L2 enters m


@pytest.mark.parametrize("decoupled", [True, False], ids=["AdamW", "Adam"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_reference_matches_torch(decoupled, amsgrad, maximize):
    """The reference itself against torch.optim.AdamW / torch.optim.Adam in float64 over three steps."""
    torch.manual_seed(0)
    p = torch.randn(40, dtype=torch.float64)
    grads = [torch.randn(40, dtype=torch.float64) for _ in range(3)]
    h = HYPER
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    tp = torch.nn.Parameter(p.clone())
    opt = cls([tp], lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weight_decay"],
              amsgrad=amsgrad, maximize=maximize, foreach=False)
    ours, m, v, vmax = p.clone(), torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for step, g in enumerate(grads, start=1):
        tp.grad = g.clone()
        opt.step()
        ours, m, v, vmax_new, _ = adamw_reference(ours, g, m, v, vmax, float(step), h["lr"], h["beta1"], h["beta2"],
                                                  h["eps"], h["weight_decay"], amsgrad, maximize,
                                                  decoupled_weight_decay=decoupled)
        vmax = vmax_new if amsgrad else vmax
    torch.testing.assert_close(ours, tp.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("found_inf", [1.0, math.inf])
def test_found_inf_writes_nothing(backend_device, found_inf):
    backend, device = backend_device
    inputs = _state([(1000,), (3, 5)], torch.float32, device)
    inputs[1][0][4] = math.nan
    before = [[t.clone() for t in ts] for ts in inputs]
    params, grads, m, v, vmax, steps = inputs
    _run(backend, params, grads, m, v, vmax, steps, amsgrad=True,
         found_inf=torch.tensor(found_inf, device=device))
    for now, then in zip(inputs, before):
        for a, b in zip(now, then):
            assert_bitwise_equal("state", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_found_inf_zero_steps(backend_device):
    backend, device = backend_device
    inputs = _state([(100,)], torch.float32, device)
    before = [[t.clone() for t in ts] for ts in inputs]
    _run(backend, *inputs, found_inf=torch.tensor(0.0, device=device))
    params, _, m, v, vmax, _ = inputs
    _check(list(zip(params, m, v, vmax)), before, False, False, 1.0)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_each_tensor_uses_its_own_step(backend_device):
    backend, device = backend_device
    inputs = _state([(50,), (60,), (70,)], torch.float32, device)
    for s, value in zip(inputs[5], (1.0, 10.0, 1000.0)):
        s.fill_(value)
    before = [[t.clone() for t in ts] for ts in inputs]
    _run(backend, *inputs)
    params, _, m, v, vmax, _ = inputs
    _check(list(zip(params, m, v, vmax)), before, False, False, 1.0)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_many_small_tensors(backend_device):
    backend, device = backend_device
    n = 300 if device == "cpu" and backend == "triton" else 2000
    g = torch.Generator().manual_seed(5)
    shapes = [(int(torch.randint(1, 200, (1,), generator=g)),) for _ in range(n)]
    inputs = _state(shapes, torch.float32, device)
    before = [[t.clone() for t in ts] for ts in inputs]
    _run(backend, *inputs)
    params, _, m, v, vmax, _ = inputs
    _check(list(zip(params, m, v, vmax)), before, False, False, 1.0)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_bad_inputs_change_nothing(backend_device):
    backend, device = backend_device
    inputs = _state([(10,), (4, 4)], torch.float32, device)
    params, grads, m, v, vmax, steps = inputs
    before = [[t.clone() for t in ts] for ts in inputs]
    bad_cases = [
        dict(grads=grads[:1]),                                     # list lengths differ
        dict(grads=[grads[0], torch.randn(16, device=device)]),    # shape differs
        dict(m=[m[0], m[1].to(torch.bfloat16)]),                   # dtype differs
    ]
    for case in bad_cases:
        args = dict(params=params, grads=grads, m=m, v=v, vmax=vmax, steps=steps) | case
        with pytest.raises(RuntimeError):
            _run(backend, args["params"], args["grads"], args["m"], args["v"], args["vmax"], args["steps"])
    for now, then in zip(inputs, before):
        assert all(torch.equal(a, b) for a, b in zip(now, then))


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_opcheck(backend_device):
    backend, device = backend_device
    op = torch.ops.catapult.adamw_triton_ if backend == "triton" else torch.ops.catapult.adamw_
    cases = [  # decoupled, amsgrad, regularizers
        (True, False, False), (True, True, False), (False, False, False), (False, True, True), (True, False, True)]
    for decoupled, amsgrad, regularizers in cases:
        params, grads, m, v, vmax, steps = _state([(33,), (4, 5), (3, 2, 2)], torch.float32, device)
        norm = torch.tensor(3.0, device=device)
        agc = [torch.rand(1 if p.dim() < 2 else p.shape[0], device=device) + 0.1 for p in params] if regularizers else []
        emas = [torch.randn_like(p) for p in params] if regularizers else []
        args = (params, grads, m, v, vmax if amsgrad else [], steps, torch.tensor(1e-3, device=device),
                0.9, 0.999, 1e-8, 0.01, decoupled, amsgrad, False, norm, 1.0, torch.tensor(2.0, device=device),
                torch.tensor(0.0, device=device), agc, emas, 0.98, 2.0)
        torch.library.opcheck(op, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for 2^31 elements")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_pow_31_elements(backend):
    n = 2**31 + 1000
    p, g, m, v = (torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda") for _ in range(4))
    g[-3:] = -1.0  # only reached with 64-bit indexing
    ops.adamw_([p], [g], [m], [v], [], [torch.tensor(1.0, device="cuda")], torch.tensor(0.1, device="cuda"),
               0.9, 0.999, 1e-8, 0.0, False, False, backend=backend)
    ref = adamw_reference(p[-5:].cpu() * 0 + 0.5, g[-5:].cpu(), torch.full((5,), 0.5, dtype=torch.bfloat16),
                          torch.full((5,), 0.5, dtype=torch.bfloat16), None, 1.0, 0.1, 0.9, 0.999, 1e-8, 0.0,
                          False, False, compute_dtype=torch.float32)
    torch.testing.assert_close(p[-5:].cpu(), ref[0])
    torch.testing.assert_close(m[-5:].cpu(), ref[1])
