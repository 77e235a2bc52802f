"""catapult::grad_pipeline_ (the grad pipeline alone, into buffers: what optimizers that are
not elementwise reuse) against the pipeline's reference, on every backend and dtype; a skipped
call writes nothing; bad input is refused before anything is written."""
import pytest
import torch

from catapult_kernels import ops
from conftest import BACKEND_DEVICES, DTYPES
from reference import grad_multiplier_reference, grad_pipeline_reference

SHAPES = [(0,), (1,), (7,), (13, 17), (4099,), (257, 33)]


def _inputs(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=g).to(dtype=dtype, device=device) for s in SHAPES]
    emas = [torch.randn(s, generator=g).mul(0.1).to(dtype=dtype, device=device) for s in SHAPES]
    agc = [torch.rand(s[0] if len(s) >= 2 else 1, generator=g).to(device) for s in SHAPES]
    return grads, emas, agc


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_writes_the_pipelines_grad_and_advances_the_emas(backend_device, dtype):
    backend, device = backend_device
    grads, emas, agc = _inputs(dtype, device)
    emas_before = [e.clone() for e in emas]
    grads_before = [g.clone() for g in grads]
    out = [torch.full_like(g, float("nan")) for g in grads]
    norm, scale = torch.tensor(40.0, device=device), torch.tensor(4.0, device=device)
    pipeline = ops.PipelineArgs(grad_norm=norm, max_grad_norm=2.0, grad_scale=scale, agc_scales=agc,
                                grokfast_emas=emas, grokfast_alpha=0.9, grokfast_lamb=1.5, maximize=True)
    ops.update_("grad_pipeline_", out, grads, [], None, torch.tensor(0.1, device=device), pipeline, backend)
    mult = grad_multiplier_reference(40.0, 2.0, 4.0)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for o, g, e0, e, a in zip(out, grads_before, emas_before, emas, agc):
        want, want_ema = grad_pipeline_reference(g, mult, a, e0, 0.9, 1.5, maximize=True)
        torch.testing.assert_close(o.double().cpu(), want, **tol)
        torch.testing.assert_close(e.double().cpu(), want_ema, **tol)
    for g, g0 in zip(grads, grads_before):
        assert torch.equal(g, g0)  # the grads are read, not written


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_a_skipped_call_writes_nothing(backend_device):
    backend, device = backend_device
    grads, emas, agc = _inputs(torch.float32, device)
    out = [torch.zeros_like(g) for g in grads]
    emas_before = [e.clone() for e in emas]
    ops.update_("grad_pipeline_", out, grads, [], None, torch.tensor(0.1, device=device),
                ops.PipelineArgs(skip=torch.ones((), device=device), grokfast_emas=emas), backend)
    assert all(not o.any() for o in out)
    assert all(torch.equal(e, e0) for e, e0 in zip(emas, emas_before))


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_out_laid_out_unlike_the_grads_is_refused(backend_device):
    backend, device = backend_device
    grads = [torch.randn(3, 4, device=device), torch.randn(5, device=device)]
    out = [torch.zeros(4, 3, device=device).t(), torch.zeros(5, device=device, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape .* but out\[0\] has shape"):
        ops.update_("grad_pipeline_", out, grads, [], None, torch.tensor(0.1, device=device), backend=backend)
    assert all(not o.float().any() for o in out)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("pipeline_on", [False, True], ids=["off", "on"])
def test_opcheck(backend_device, pipeline_on):
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    backend, device = backend_device
    grads, emas, agc = _inputs(torch.float32, device)
    out = [torch.zeros_like(g) for g in grads]
    pipeline = ops.PipelineArgs()
    if pipeline_on:
        pipeline = ops.PipelineArgs(grad_norm=torch.tensor(3.0, device=device), max_grad_norm=1.0,
                                    grad_scale=torch.tensor(2.0, device=device), skip=torch.tensor(0.0, device=device),
                                    agc_scales=agc, grokfast_emas=emas, grokfast_alpha=0.9, maximize=True)
    op = torch.ops.catapult.grad_pipeline_triton_ if backend == "triton" else torch.ops.catapult.grad_pipeline_
    torch.library.opcheck(op, (out, grads, torch.tensor(0.1, device=device), *pipeline.args(), [], []))
