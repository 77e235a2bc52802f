"""catapult_kernels.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""
import math

import pytest
import torch
from torch import nn

import catapult_kernels
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
