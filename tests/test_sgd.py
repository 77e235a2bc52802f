"""catapult::sgd_ (C++) and catapult::sgd_triton_ against the SGD formula (and LARS's
per-tensor trust ratios) in tests/reference.py, on every backend, dtype and awkward shape.
The regularizers (AGC, Grokfast) are in test_regularizers.py."""
import math

import pytest
import torch

from catapult_kernels import ops
from conftest import BACKEND_DEVICES, DTYPES
from reference import (assert_bitwise_equal, assert_close_to_reference, grad_multiplier_reference, norm_reference,
                       sgd_reference)

SHAPES = {
    "empty": [(0,)],
    "one": [(1,)],
    "primes": [(7,), (13, 17), (4099,)],
    "above_block": [(65537,)],
    "mixed": [(0,), (1,), (131,), (257, 33), (5,)],
}
MODES = {  # momentum, dampening, weight_decay, nesterov
    "plain": (0.0, 0.0, 0.0, False),
    "plain_wd": (0.0, 0.0, 0.1, False),
    "momentum": (0.9, 0.1, 0.01, False),
    "nesterov": (0.9, 0.0, 0.01, True),
}
LR = 0.05


def _inputs(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda s: torch.randn(s, generator=g).to(dtype=dtype, device=device)  # noqa: E731
    return [mk(s) for s in shapes], [mk(s) for s in shapes], [mk(s) for s in shapes]


def _run(backend, params, grads, bufs, mode, first_step=False, maximize=False, **control):
    momentum, dampening, wd, nesterov = mode
    device = params[0].device if params else torch.device("cpu")
    ops.sgd_(params, grads, bufs if momentum else [], torch.tensor(LR, device=device), momentum, dampening,
             wd, nesterov, maximize, first_step, control.get("grad_norm"), control.get("max_grad_norm", 0.0),
             control.get("grad_scale"), control.get("found_inf"), trust_ratios=control.get("trust_ratios"),
             backend=backend)


def _check(params, bufs, before, mode, first_step, maximize=False, mult=1.0, trust=None):
    momentum, dampening, wd, nesterov = mode
    for i, (p, buf, p0, g0, b0) in enumerate(zip(params, bufs, *before)):
        args = (LR, momentum, dampening, wd, nesterov, maximize, first_step, mult)
        t = 1.0 if trust is None else float(trust[i])
        gold = sgd_reference(p0.cpu(), g0.cpu(), b0.cpu(), *args, compute_dtype=torch.float64, trust=t)
        same = sgd_reference(p0.cpu(), g0.cpu(), b0.cpu(), *args, compute_dtype=torch.float32, trust=t)
        assert_close_to_reference(f"param[{i}]", p, gold[0], same[0])
        if momentum:
            assert_close_to_reference(f"momentum_buffer[{i}]", buf, gold[1], same[1])


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("first_step", [False, True], ids=["later", "first"])
def test_matches_reference(backend_device, dtype, shapes, mode, first_step):
    backend, device = backend_device
    params, grads, bufs = _inputs(shapes, dtype, device)
    before = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    _run(backend, params, grads, bufs, mode, first_step)
    _check(params, bufs, before, mode, first_step)
    assert all(torch.equal(a, b) for a, b in zip(grads, before[1])), "grads must not be written"
    if not mode[0]:
        assert all(torch.equal(a, b) for a, b in zip(bufs, before[2])), "no momentum: buffers untouched"


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["maximize", "clip", "grad_scale", "scale_and_clip"])
def test_options(backend_device, dtype, case):
    backend, device = backend_device
    params, grads, bufs = _inputs([(129,), (31, 7)], dtype, device, seed=2)
    before = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    norm = torch.tensor(float(norm_reference(grads)[0]), device=device)
    scale = torch.tensor(512.0, device=device)
    kw = {"maximize": dict(maximize=True),
          "clip": dict(grad_norm=norm, max_grad_norm=1.0),
          "grad_scale": dict(grad_scale=scale),
          "scale_and_clip": dict(grad_norm=norm, max_grad_norm=0.01, grad_scale=scale)}[case]
    _run(backend, params, grads, bufs, MODES["momentum"], **kw)
    mult = grad_multiplier_reference(kw.get("grad_norm"), kw.get("max_grad_norm"), kw.get("grad_scale"))
    _check(params, bufs, before, MODES["momentum"], False, kw.get("maximize", False), mult)


def _trust(n, device, seed=4):
    """Per-tensor trust ratios, float32, spread over (0.05, 3) so that a mix-up between
    tensors or a missing factor shows."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * 2.95 + 0.05).to(device)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("first_step", [False, True], ids=["later", "first"])
def test_trust_ratios(backend_device, dtype, mode, first_step):
    """LARS: g = trust[i] * (g + wd * p), one factor per param, before momentum."""
    backend, device = backend_device
    shapes = SHAPES["mixed"] + [(4099,)]
    params, grads, bufs = _inputs(shapes, dtype, device, seed=3)
    before = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    trust = _trust(len(shapes), device)
    trust_before = trust.clone()
    _run(backend, params, grads, bufs, mode, first_step, trust_ratios=trust)
    _check(params, bufs, before, mode, first_step, trust=trust.cpu())
    assert_bitwise_equal("trust_ratios", trust, trust_before)
    assert all(torch.equal(a, b) for a, b in zip(grads, before[1])), "grads must not be written"


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", ["maximize", "scale_and_clip"])
def test_trust_ratios_with_options(backend_device, case):
    backend, device = backend_device
    params, grads, bufs = _inputs([(129,), (31, 7), (1,)], torch.float32, device, seed=6)
    before = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    trust = _trust(3, device, seed=8)
    norm = torch.tensor(float(norm_reference(grads)[0]), device=device)
    kw = {"maximize": dict(maximize=True),
          "scale_and_clip": dict(grad_norm=norm, max_grad_norm=0.01, grad_scale=torch.tensor(512.0, device=device))}[case]
    _run(backend, params, grads, bufs, MODES["nesterov"], trust_ratios=trust, **kw)
    mult = grad_multiplier_reference(kw.get("grad_norm"), kw.get("max_grad_norm"), kw.get("grad_scale"))
    _check(params, bufs, before, MODES["nesterov"], False, kw.get("maximize", False), mult, trust=trust.cpu())


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_trust_ratios_of_one_change_nothing(backend_device):
    """trust 1 is SGD: bit for bit the same as no trust_ratios."""
    backend, device = backend_device
    results = []
    for trust in (None, torch.ones(2, device=device)):
        params, grads, bufs = _inputs([(1000,), (3, 5)], torch.float32, device, seed=9)
        _run(backend, params, grads, bufs, MODES["momentum"], trust_ratios=trust)
        results.append(params + bufs)
    for a, b in zip(*results):
        assert_bitwise_equal("param/buffer", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_bad_trust_ratios_change_nothing(backend_device):
    backend, device = backend_device
    params, grads, bufs = _inputs([(10,), (4, 4)], torch.float32, device)
    before = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
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
        with pytest.raises(RuntimeError):
            _run(backend, params, grads, bufs, MODES["momentum"], trust_ratios=trust)
    for now, then in zip((params, grads, bufs), before):
        for a, b in zip(now, then):
            assert_bitwise_equal("state", a, b)


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_reference_matches_torch(mode, maximize):
    """The reference itself against torch.optim.SGD in float64 over three steps."""
    momentum, dampening, wd, nesterov = mode
    torch.manual_seed(0)
    p = torch.randn(40, dtype=torch.float64)
    tp = torch.nn.Parameter(p.clone())
    opt = torch.optim.SGD([tp], lr=LR, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
                          maximize=maximize, foreach=False)
    buf = None
    for step in range(3):
        g = torch.randn(40, dtype=torch.float64)
        tp.grad = g.clone()
        opt.step()
        p, buf, _ = sgd_reference(p, g, buf, LR, momentum, dampening, wd, nesterov, maximize, step == 0)
    torch.testing.assert_close(p, tp.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("mode", [MODES["plain"], MODES["momentum"]], ids=["plain", "momentum"])
def test_found_inf_writes_nothing(backend_device, mode):
    backend, device = backend_device
    params, grads, bufs = _inputs([(1000,), (3, 5)], torch.float32, device)
    grads[0][4] = math.nan
    before = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    _run(backend, params, grads, bufs, mode, found_inf=torch.tensor(1.0, device=device))
    for now, then in zip((params, grads, bufs), before):
        for a, b in zip(now, then):
            assert_bitwise_equal("state", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_many_small_tensors(backend_device):
    backend, device = backend_device
    n = 300 if device == "cpu" and backend == "triton" else 2000
    g = torch.Generator().manual_seed(5)
    shapes = [(int(torch.randint(1, 200, (1,), generator=g)),) for _ in range(n)]
    params, grads, bufs = _inputs(shapes, torch.float32, device)
    before = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    _run(backend, params, grads, bufs, MODES["momentum"])
    _check(params, bufs, before, MODES["momentum"], False)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_bad_inputs_change_nothing(backend_device):
    backend, device = backend_device
    params, grads, bufs = _inputs([(10,), (4, 4)], torch.float32, device)
    before = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    cases = [
        dict(grads=grads[:1]),                                     # list lengths differ
        dict(grads=[grads[0], torch.randn(16, device=device)]),    # shape differs
        dict(bufs=[bufs[0], bufs[1].to(torch.bfloat16)]),          # dtype differs
        dict(bufs=bufs[:1]),                                       # a buffer missing
    ]
    for case in cases:
        args = dict(params=params, grads=grads, bufs=bufs) | case
        with pytest.raises(RuntimeError):
            _run(backend, args["params"], args["grads"], args["bufs"], MODES["momentum"])
    for now, then in zip((params, grads, bufs), before):
        assert all(torch.equal(a, b) for a, b in zip(now, then))


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_opcheck(backend_device):
    backend, device = backend_device
    op = torch.ops.catapult.sgd_triton_ if backend == "triton" else torch.ops.catapult.sgd_
    for momentum, trust, regularizers in ((0.0, False, False), (0.9, False, False), (0.9, True, False),
                                          (0.0, True, True), (0.9, False, True)):
        params, grads, bufs = _inputs([(33,), (4, 5), (3, 2, 2)], torch.float32, device)
        agc = [torch.rand(1 if p.dim() < 2 else p.shape[0], device=device) + 0.1 for p in params] if regularizers else []
        emas = [torch.randn_like(p) for p in params] if regularizers else []
        args = (params, grads, bufs if momentum else [], torch.tensor(1e-2, device=device), momentum, 0.0,
                0.01, False, False, False, _trust(3, device) if trust else None, torch.tensor(3.0, device=device),
                1.0, torch.tensor(2.0, device=device), torch.tensor(0.0, device=device), agc, emas, 0.98, 2.0)
        torch.library.opcheck(op, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for 2^31 elements")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_pow_31_elements(backend):
    n = 2**31 + 1000
    p = torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda")
    g = torch.full((n,), 0.25, dtype=torch.bfloat16, device="cuda")
    g[-3:] = -1.0  # only reached with 64-bit indexing
    ops.sgd_([p], [g], [], torch.tensor(0.5, device="cuda"), 0.0, 0.0, 0.0, False, False, False, backend=backend)
    assert p[0].item() == 0.5 - 0.5 * 0.25 and p[-1].item() == 0.5 + 0.5
