"""catapult_kernels.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""
import math

import pytest
import torch
from torch import nn

import catapult_kernels
from catapult_kernels.optim import AdamW
from conftest import BACKEND_DEVICES


def _with_grads(device, dtype=torch.float32, seed=0, empty=True):
    torch.manual_seed(seed)
    shapes = [(31, 7), (1,), (0,), (4099,)] if empty else [(31, 7), (1,), (4099,)]
    params = [nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    frozen = nn.Parameter(torch.randn(3, device=device, dtype=dtype))  # grad None: ignored
    return params + [frozen]


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0], ids=["l2", "inf", "l1-fallback"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_torch(backend_device, norm_type, max_norm, dtype):
    backend, device = backend_device
    empty = norm_type != math.inf  # torch's inf-norm refuses an empty grad; ours takes it
    ours, ref = _with_grads(device, dtype, empty=empty), _with_grads(device, dtype, empty=empty)
    total = catapult_kernels.clip_grad_norm_(ours, max_norm, norm_type, backend=backend)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert total.dtype == ref_total.dtype and total.shape == ()
    torch.testing.assert_close(total, ref_total, **tol)
    for p, q in zip(ours, ref):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **tol)


def test_single_tensor_and_no_grads():
    p = nn.Parameter(torch.randn(10))
    p.grad = torch.ones(10)
    assert catapult_kernels.clip_grad_norm_(p, 1.0).item() == pytest.approx(math.sqrt(10))
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert catapult_kernels.clip_grad_norm_([nn.Parameter(torch.randn(3))], 1.0).item() == 0.0


def test_error_if_nonfinite():
    params = _with_grads("cpu")
    params[0].grad[0, 0] = math.nan
    grads = [p.grad.clone() for p in params if p.grad is not None]
    with pytest.raises(RuntimeError, match="non-finite"):
        catapult_kernels.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for g, p in zip(grads, [p for p in params if p.grad is not None]):
        assert torch.equal(g.nan_to_num(7.0), p.grad.nan_to_num(7.0))  # untouched
    assert math.isnan(catapult_kernels.clip_grad_norm_(params, 1.0).item())


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        catapult_kernels.clip_grad_norm_(_with_grads("cpu"), 1.0, backend="xla")


DTYPE_MIXES = {
    "float64": [torch.float64] * 3,
    "float32+float64": [torch.float32, torch.float64, torch.float32],
    "bfloat16+float32": [torch.bfloat16, torch.float32],
    "float16+bfloat16": [torch.float16, torch.bfloat16],
    "float16": [torch.float16],
}


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 0.5, 0.0, 3.0, -math.inf], ids=str)
@pytest.mark.parametrize("mix", DTYPE_MIXES.values(), ids=DTYPE_MIXES.keys())
def test_matches_torch_on_any_dtype_and_norm_type(backend_device, norm_type, mix):
    """The returned norm in torch's dtype (the grads' dtypes promoted together) and value, and
    the clipped grads, for float64 grads, mixed dtypes and norm types the fused op has not
    (torch's total is the norm of the per-tensor norms: for 0, the count of nonzero grads)."""
    backend, device = backend_device

    def params():
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(40 + 7 * i, device=device, dtype=dt)) for i, dt in enumerate(mix)]
        for p in ps:
            p.grad = torch.randn_like(p) * 3
        return ps

    ours, ref = params(), params()
    total = catapult_kernels.clip_grad_norm_(ours, 1.0, norm_type, backend=backend)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    assert total.dtype == ref_total.dtype and total.shape == () and total.device == ref_total.device
    # Half-precision totals: torch rounds each grad's norm to its dtype before combining, we do not.
    lowest = min(mix, key=lambda dt: torch.finfo(dt).bits)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(lowest, 1e-2)
    torch.testing.assert_close(total, ref_total, rtol=tol, atol=0)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol * q.grad.abs().max().item())


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_finite_grad_is_clipped_not_zeroed(backend_device, dtype):
    """One grad element of 3e19: the norm (3e19) is finite, so the grads are scaled by
    1 / 3e19 (torch's float32 norm overflows to inf and zeroes them)."""
    backend, device = backend_device
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(s, device=device, dtype=dtype)) for s in (70001, 9)]
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad[123] = 3e19
    grads64 = [p.grad.double().cpu() for p in params]
    total = catapult_kernels.clip_grad_norm_(params, 1.0, backend=backend)
    norm64 = torch.linalg.vector_norm(torch.cat(grads64))
    torch.testing.assert_close(total.double().cpu(), norm64.to(dtype).double(), rtol=1e-6, atol=0)
    coef = 1.0 / (norm64.item() + 1e-6)
    for p, g in zip(params, grads64):
        want = (g * coef).to(dtype).double()
        torch.testing.assert_close(p.grad.double().cpu(), want, rtol=1e-6, atol=0)
    assert params[0].grad[123].item() == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_adamw_clips_huge_finite_grad_instead_of_skipping(backend_device):
    """AdamW(max_grad_norm=1, skip_nonfinite=True) with one grad element of 3e19: the norm is
    finite, so the step is taken (not skipped) with the grads clipped to norm 1, as torch's
    AdamW on the grads clipped in float64."""
    backend, device = backend_device
    torch.manual_seed(0)
    shapes = [(300, 233), (9,)]  # 69900 elements: several chunks on every backend
    ours = [nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    grads = [torch.randn(s, device=device) for s in shapes]
    grads[0][100, 7] = 3e19
    for p, g in zip(ours, grads):
        p.grad = g.clone()
    opt = AdamW(ours, lr=1e-2, max_grad_norm=1.0, skip_nonfinite=True, backend=backend)
    opt.step()

    norm64 = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    coef = min(1.0, 1.0 / (norm64.item() + 1e-6))
    for p, g in zip(ref, grads):
        p.grad = (g.double() * coef).float()
    torch.optim.AdamW(ref, lr=1e-2).step()

    assert opt.skipped_steps.item() == 0
    torch.testing.assert_close(opt.grad_norm.double().cpu(), norm64.float().double().cpu(), rtol=1e-6, atol=0)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
