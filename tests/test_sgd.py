"""catapult::sgd_ (C++) and catapult::sgd_triton_ against the SGD formula in
tests/reference.py, on every backend, dtype and awkward shape."""
import math

import pytest
import torch

from catapult_kernels import ops
from conftest import BACKEND_DEVICES, DTYPES
from reference import assert_close_to_reference, grad_multiplier_reference, norm_reference, sgd_reference

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
             control.get("grad_scale"), control.get("found_inf"), backend=backend)


def _check(params, bufs, before, mode, first_step, maximize=False, mult=1.0):
    momentum, dampening, wd, nesterov = mode
    for i, (p, buf, p0, g0, b0) in enumerate(zip(params, bufs, *before)):
        args = (LR, momentum, dampening, wd, nesterov, maximize, first_step, mult)
        gold = sgd_reference(p0.cpu(), g0.cpu(), b0.cpu(), *args, compute_dtype=torch.float64)
        same = sgd_reference(p0.cpu(), g0.cpu(), b0.cpu(), *args, compute_dtype=torch.float32)
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


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("mode", [MODES["plain"], MODES["momentum"]], ids=["plain", "momentum"])
def test_found_inf_writes_nothing(backend_device, mode):
    backend, device = backend_device
    params, grads, bufs = _inputs([(1000,), (3, 5)], torch.float32, device)
    grads[0][4] = math.nan
    before = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    _run(backend, params, grads, bufs, mode, found_inf=torch.tensor(1.0, device=device))
    for now, then in zip((params, grads, bufs), before):
        assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(now, then))


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
    for momentum in (0.0, 0.9):
        params, grads, bufs = _inputs([(33,), (4, 5)], torch.float32, device)
        args = (params, grads, bufs if momentum else [], torch.tensor(1e-2, device=device), momentum, 0.0,
                0.01, False, False, False, torch.tensor(3.0, device=device), 1.0,
                torch.tensor(2.0, device=device), torch.tensor(0.0, device=device))
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
