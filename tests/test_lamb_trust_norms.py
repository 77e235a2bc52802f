"""LAMB's trust ratio |p| / |r| on every backend when the squares of p leave float32's range:
one weight of 3e19 (its square, 9e38, overflows float32; the norms do not) and weights of
1e-30 (their squares underflow float32; the norms do not). The CPU sums such a chunk again
in double (csrc/cpu/square_sum.h), CUDA and Triton always sum in double, so the step matches
the float64 formula; a float32 sum made |p| inf or 0, and the step inf or lr * r."""
import pytest
import torch

from catapult_kernels import ops
from conftest import BACKEND_DEVICES
from reference import lamb_reference

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01)
STEP = 3.0
# Above one chunk on every backend, and a tensor of a few elements.
SHAPES = [(70001,), (7,)]
# Relative error of a float32 step, of a bfloat16 one (a few ulps: p is stored in bfloat16).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _state(dtype, device, param_scale, huge_at=None):
    g = torch.Generator().manual_seed(0)
    mk = lambda s, f=1.0: torch.randn(s, generator=g, dtype=torch.float64) * f  # noqa: E731
    params = [mk(s, param_scale) for s in SHAPES]
    if huge_at is not None:
        params[0][huge_at] = 3e19
    grads = [mk(s) for s in SHAPES]
    m = [mk(s, 0.1) for s in SHAPES]
    v = [mk(s, 0.1).abs() for s in SHAPES]
    to = lambda ts: [t.to(dtype=dtype, device=device) for t in ts]  # noqa: E731
    return to(params), to(grads), to(m), to(v)


def _step_and_check(backend, device, params, grads, m, v, keep):
    """One lamb_ step, then params[i][keep[i]] against the float64 formula."""
    before = [t.clone() for t in (*params, *grads, *m, *v)]
    steps = [torch.tensor(STEP - 1, device=device) for _ in params]  # the steps before: the op runs STEP
    h = HYPER
    ops.update_("lamb_", params, grads, [m, v], steps, torch.tensor(h["lr"], device=device), backend=backend,
                beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"], weight_decay=h["weight_decay"], bias_correction=True,
                max_weight_norm=0.0)
    n = len(params)
    for i, p in enumerate(params):
        p0, g0, m0, v0 = (before[k * n + i].cpu() for k in range(4))
        gold = lamb_reference(p0, g0, m0, v0, STEP, h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"],
                              True, 0.0, False)[0]
        assert torch.isfinite(p).all(), f"params[{i}] is not finite"
        got, want = p.cpu()[keep[i]].double(), gold[keep[i]].double()
        tol = RTOL[p.dtype]  # relative to the element or to the largest (p - lr * trust * r cancels)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(),
                                   msg=lambda msg: f"params[{i}]: {msg}")


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", RTOL, ids=str)
def test_one_huge_weight(backend_device, dtype):
    """|p| = 3e19 and |r| = 3e17 (weight decay): trust 100, not inf / 3e17 = inf. The other
    weights get lr * 100 * r, about 1, checked elementwise (the huge one moves by less than
    its ulp)."""
    backend, device = backend_device
    params, grads, m, v = _state(dtype, device, 1.0, huge_at=40000)
    keep = [torch.arange(SHAPES[0][0]) != 40000, torch.ones(SHAPES[1], dtype=torch.bool)]
    _step_and_check(backend, device, params, grads, m, v, keep)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", RTOL, ids=str)
def test_tiny_weights(backend_device, dtype):
    """|p| about 1e-30 * sqrt(n): trust about 1e-30, so p shrinks by about lr * wd; a float32
    sum of squares gave |p| = 0, trust 1, and p = p - lr * r, about 1e-2."""
    backend, device = backend_device
    params, grads, m, v = _state(dtype, device, 1e-30)
    keep = [torch.ones(s, dtype=torch.bool) for s in SHAPES]
    _step_and_check(backend, device, params, grads, m, v, keep)
