"""catapult::lion_ (C++) and catapult::lion_triton_ against the Lion formula (Chen et al.
2023) in tests/reference.py, on every backend, dtype and awkward shape. The regularizers
(AGC, Grokfast) are in test_regularizers.py."""
import math

import pytest
import torch

from catapult_kernels import ops
from conftest import BACKEND_DEVICES, DTYPES
from reference import (assert_bitwise_equal, assert_close_to_reference, grad_multiplier_reference, lion_reference,
                       norm_reference)

SHAPES = {
    "empty": [(0,)],
    "one": [(1,)],
    "odd": [(7,), (3, 5), (7, 33, 2)],
    "chunks": [(4099,)],                  # several chunks of the Triton kernel
    "above_cpu_chunk": [(2**15 + 3,)],    # more than one chunk of the CPU kernel (2^15)
    "mixed": [(0,), (1,), (131,), (257, 33), (5,)],
}
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)


def _state(shapes, dtype, device, seed=0):
    """Random params, grads and mid-training momenta for each shape."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda s, f=1.0: (torch.randn(s, generator=g) * f).to(dtype=dtype, device=device)  # noqa: E731
    return [mk(s) for s in shapes], [mk(s) for s in shapes], [mk(s, 0.1) for s in shapes]


def _run(backend, params, grads, m, maximize=False, grad_norm=None, max_grad_norm=0.0, grad_scale=None,
         found_inf=None, lr=HYPER["lr"], weight_decay=HYPER["weight_decay"]):
    device = params[0].device if params else torch.device("cpu")
    ops.lion_(params, grads, m, torch.tensor(lr, device=device), HYPER["beta1"], HYPER["beta2"], weight_decay,
              maximize, grad_norm, max_grad_norm, grad_scale, found_inf, backend=backend)


def _check(params, m, before, maximize=False, mult=1.0, lr=HYPER["lr"], weight_decay=HYPER["weight_decay"]):
    for i, (p, mi, p0, g0, m0) in enumerate(zip(params, m, *before)):
        args = (lr, HYPER["beta1"], HYPER["beta2"], weight_decay, maximize, mult)
        gold = lion_reference(p0.cpu(), g0.cpu(), m0.cpu(), *args, compute_dtype=torch.float64)
        same = lion_reference(p0.cpu(), g0.cpu(), m0.cpu(), *args, compute_dtype=torch.float32)
        assert_close_to_reference(f"param[{i}]", p, gold[0], same[0])
        assert_close_to_reference(f"exp_avg[{i}]", mi, gold[1], same[1])


def _clone(*lists):
    return [[t.clone() for t in ts] for ts in lists]


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(backend_device, dtype, shapes):
    backend, device = backend_device
    params, grads, m = _state(shapes, dtype, device)
    before = _clone(params, grads, m)
    _run(backend, params, grads, m)
    _check(params, m, before)
    assert all(torch.equal(a, b) for a, b in zip(grads, before[1])), "grads must not be written"


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["maximize", "clip", "clip_inactive", "grad_scale", "scale_and_clip", "no_decay"])
def test_options(backend_device, dtype, case):
    backend, device = backend_device
    params, grads, m = _state([(129,), (31, 7)], dtype, device, seed=2)
    before = _clone(params, grads, m)
    norm = torch.tensor(float(norm_reference(grads)[0]), device=device)
    scale = torch.tensor(1024.0, device=device)
    kw = {"maximize": dict(maximize=True),
          "clip": dict(grad_norm=norm, max_grad_norm=1.0),
          "clip_inactive": dict(grad_norm=norm, max_grad_norm=1e6),
          "grad_scale": dict(grad_scale=scale),
          "scale_and_clip": dict(grad_norm=norm, max_grad_norm=0.01, grad_scale=scale),
          "no_decay": dict(weight_decay=0.0)}[case]
    _run(backend, params, grads, m, **kw)
    mult = grad_multiplier_reference(kw.get("grad_norm"), kw.get("max_grad_norm"), kw.get("grad_scale"))
    _check(params, m, before, kw.get("maximize", False), mult, weight_decay=kw.get("weight_decay", HYPER["weight_decay"]))


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_sign_and_scale_invariance(backend_device):
    """Lion's update is lr * sign(c): a grad scaled by a power of two (unscaled again by
    grad_scale) moves p bit for bit as the plain grad; where c is exactly 0 (m = g = 0)
    p only decays; the direction is beta1's interpolation, the momentum beta2's."""
    backend, device = backend_device
    n = 300
    p0 = torch.randn(n).to(device)
    # elements 0..99: beta1's mix and beta2's differ in sign (swapped betas would show)
    m0 = torch.cat([torch.full((100,), 1.0), torch.zeros(100), torch.randn(100)]).to(device)
    g0 = torch.cat([torch.full((100,), -20.0), torch.zeros(100), torch.randn(100)]).to(device)
    p, g, m = p0.clone(), g0.clone(), m0.clone()
    _run(backend, [p], [g], [m])
    lr, wd = HYPER["lr"], HYPER["weight_decay"]
    decayed = p0.cpu() * torch.tensor(1 - lr * wd, dtype=torch.float32)
    # c = 0.9 * 1 + 0.1 * (-20) = -1.1 < 0: p moves up; m = 0.99 * 1 + 0.01 * (-20) = 0.79 stays > 0
    torch.testing.assert_close(p[:100].cpu(), decayed[:100] + lr, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m[:100].cpu(), torch.full((100,), 0.79), rtol=1e-6, atol=0)
    # c == 0 exactly: sign(0) = 0, only the decay
    torch.testing.assert_close(p[100:200].cpu(), decayed[100:200], rtol=1e-6, atol=0)
    assert (m[100:200] == 0).all()
    # scaled grads, unscaled by grad_scale: the same bits
    p2, m2 = p0.clone(), m0.clone()
    _run(backend, [p2], [g0 * 1024], [m2], grad_scale=torch.tensor(1024.0, device=device))
    assert_bitwise_equal("param", p2, p)
    assert_bitwise_equal("exp_avg", m2, m)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("found_inf", [1.0, math.inf])
def test_found_inf_writes_nothing(backend_device, dtype, found_inf):
    backend, device = backend_device
    params, grads, m = _state([(1000,), (3, 5)], dtype, device)
    grads[0][4] = math.nan
    before = _clone(params, grads, m)
    norm = torch.tensor(5.0, device=device)
    _run(backend, params, grads, m, maximize=True, grad_norm=norm, max_grad_norm=1.0,
         grad_scale=torch.tensor(8.0, device=device), found_inf=torch.tensor(found_inf, device=device))
    for now, then in zip((params, grads, m), before):
        for a, b in zip(now, then):
            assert_bitwise_equal("state", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_found_inf_zero_steps(backend_device):
    backend, device = backend_device
    params, grads, m = _state([(100,)], torch.float32, device)
    before = _clone(params, grads, m)
    _run(backend, params, grads, m, found_inf=torch.tensor(0.0, device=device))
    _check(params, m, before)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_several_steps(backend_device):
    """Five steps track five steps of the reference run in float64 (the momentum carries)."""
    backend, device = backend_device
    params, _, m = _state([(257,), (13, 17)], torch.float32, device, seed=11)
    gold_p = [p.cpu().double() for p in params]
    gold_m = [mi.cpu().double() for mi in m]
    gen = torch.Generator().manual_seed(12)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
        _run(backend, params, grads, m)
        for i, g in enumerate(grads):
            gold_p[i], gold_m[i], _ = lion_reference(gold_p[i], g.cpu().double(), gold_m[i], HYPER["lr"],
                                                     HYPER["beta1"], HYPER["beta2"], HYPER["weight_decay"], False)
    for i in range(len(params)):
        torch.testing.assert_close(params[i].cpu().double(), gold_p[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m[i].cpu().double(), gold_m[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_many_small_tensors(backend_device):
    backend, device = backend_device
    n = 300 if device == "cpu" and backend == "triton" else 2000
    g = torch.Generator().manual_seed(5)
    shapes = [(int(torch.randint(1, 200, (1,), generator=g)),) for _ in range(n)]
    params, grads, m = _state(shapes, torch.float32, device)
    before = _clone(params, grads, m)
    _run(backend, params, grads, m)
    _check(params, m, before)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_mixed_dtypes_in_one_call(backend_device):
    backend, device = backend_device
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    shapes = [(131,), (33, 3), (1,), (2050,), (0,)]
    params, grads, m = [], [], []
    for i, (s, dt) in enumerate(zip(shapes, dtypes)):
        p, g, mi = _state([s], dt, device, seed=20 + i)
        params += p
        grads += g
        m += mi
    before = _clone(params, grads, m)
    _run(backend, params, grads, m)
    _check(params, m, before)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_bad_inputs_change_nothing(backend_device):
    backend, device = backend_device
    params, grads, m = _state([(10,), (4, 4)], torch.float32, device)
    before = _clone(params, grads, m)
    strided = torch.zeros(4, 8, device=device)[:, ::2]  # not dense
    cases = [
        dict(grads=grads[:1]),                                      # list lengths differ
        dict(m=m[:1]),                                              # an exp_avg missing
        dict(grads=[grads[0], torch.randn(16, device=device)]),     # shape differs
        dict(m=[m[0], m[1].to(torch.bfloat16)]),                    # dtype differs
        dict(grads=[grads[0], grads[1].t().contiguous().t()]),      # same shape, other layout
        dict(params=[params[0], strided], grads=[grads[0], strided.clone()], m=[m[0], strided.clone()]),
        dict(params=[params[0].double(), params[1]], grads=[grads[0].double(), grads[1]],
             m=[m[0].double(), m[1]]),                              # unsupported dtype
        dict(kw=dict(max_grad_norm=1.0)),                           # clipping without grad_norm
        dict(kw=dict(grad_norm=torch.tensor([1.0, 2.0], device=device), max_grad_norm=1.0)),
        dict(kw=dict(grad_scale=torch.tensor(2.0, dtype=torch.float64, device=device))),
        dict(kw=dict(found_inf=torch.zeros(2, device=device))),
    ]
    if device == "cuda":
        cases.append(dict(kw=dict(grad_scale=torch.tensor(2.0))))  # a control scalar on the CPU
        cases.append(dict(m=[m[0], m[1].cpu()]))
    for case in cases:
        args = dict(params=params, grads=grads, m=m) | case
        with pytest.raises(RuntimeError):
            _run(backend, args["params"], args["grads"], args["m"], **case.get("kw", {}))
    for now, then in zip((params, grads, m), before):
        for a, b in zip(now, then):
            assert_bitwise_equal("state", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_bad_lr_changes_nothing(backend_device):
    backend, device = backend_device
    params, grads, m = _state([(10,)], torch.float32, device)
    before = _clone(params, grads, m)
    for lr in (torch.tensor(0.1, dtype=torch.float64, device=device), torch.tensor([0.1, 0.2], device=device)):
        with pytest.raises(RuntimeError):
            ops.lion_(params, grads, m, lr, 0.9, 0.99, 0.0, False, backend=backend)
    for now, then in zip((params, grads, m), before):
        for a, b in zip(now, then):
            assert_bitwise_equal("state", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_opcheck(backend_device):
    backend, device = backend_device
    op = torch.ops.catapult.lion_triton_ if backend == "triton" else torch.ops.catapult.lion_
    for maximize, control, regularizers in ((False, False, False), (True, True, False), (False, True, True)):
        params, grads, m = _state([(33,), (4, 5), (3, 2, 2)], torch.float32, device)
        agc = [torch.rand(1 if p.dim() < 2 else p.shape[0], device=device) + 0.1 for p in params] if regularizers else []
        emas = [torch.randn_like(p) for p in params] if regularizers else []
        scalars = ((torch.tensor(3.0, device=device), 1.0, torch.tensor(2.0, device=device),
                    torch.tensor(0.0, device=device)) if control else (None, 0.0, None, None))
        args = (params, grads, m, torch.tensor(1e-3, device=device), 0.9, 0.99, 0.01, maximize, *scalars,
                agc, emas, 0.98, 2.0)
        torch.library.opcheck(op, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for 2^31 elements")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_pow_31_elements(backend):
    n = 2**31 + 1000
    p = torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda")
    g = torch.full((n,), 0.25, dtype=torch.bfloat16, device="cuda")
    m = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    g[-3:] = -1.0  # only reached with 64-bit indexing
    ops.lion_([p], [g], [m], torch.tensor(0.5, device="cuda"), 0.9, 0.99, 0.0, False, backend=backend)
    # c = 0.1 * g: p = 0.5 - 0.5 * sign(g); m = 0.01 * g
    assert p[0].item() == 0.0 and p[-4].item() == 0.0 and p[-1].item() == 1.0 and p[-3].item() == 1.0
    assert m[-1].item() == torch.tensor(-0.01, dtype=torch.bfloat16).item()
    assert m[0].item() == torch.tensor(0.0025, dtype=torch.bfloat16).item()
