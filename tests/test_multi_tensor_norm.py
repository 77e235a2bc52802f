"""catapult::multi_tensor_norm (C++) and catapult::multi_tensor_norm_triton against a
float64 reference, on every backend, dtype and awkward shape."""
import math

import pytest
import torch

from catapult_kernels import ops
from conftest import BACKEND_DEVICES, DTYPES
from reference import norm_reference

SHAPES = {
    "empty": [(0,)],
    "one": [(1,)],
    "primes": [(7,), (13, 17), (4099,)],
    "above_block": [(65537,), (16385,)],
    "mixed": [(0,), (3, 0), (1,), (131,), (257, 33)],
}
# Relative error of a float32-accumulated norm; half inputs are exact in float32.
RTOL = 1e-5


def _tensors(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype=dtype, device=device) for s in shapes]


def _norm_op(backend):
    return torch.ops.catapult.multi_tensor_norm_triton if backend == "triton" else torch.ops.catapult.multi_tensor_norm


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("ord", [2.0, math.inf], ids=["l2", "inf"])
def test_matches_reference(backend_device, dtype, shapes, ord):
    backend, device = backend_device
    tensors = _tensors(shapes, dtype, device)
    total, per = ops.multi_tensor_norm(tensors, ord, per_tensor=True, backend=backend)
    ref_total, ref_per = norm_reference(tensors, ord)
    assert total.dtype == torch.float32 and total.shape == () and total.device.type == device
    assert per.shape == (len(tensors),)
    torch.testing.assert_close(total.double().cpu(), ref_total, rtol=RTOL, atol=0)
    torch.testing.assert_close(per.double().cpu(), ref_per, rtol=RTOL, atol=0)
    total_only, empty = ops.multi_tensor_norm(tensors, ord, per_tensor=False, backend=backend)
    assert empty.numel() == 0
    assert torch.equal(total_only, total)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_many_small_tensors_and_mixed_dtypes(backend_device):
    backend, device = backend_device
    n = 600 if device == "cpu" and backend == "triton" else 3000
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(int(torch.randint(0, 300, (1,), generator=g)), generator=g).to(DTYPES[i % 3]).to(device)
               for i in range(n)]
    total, per = ops.multi_tensor_norm(tensors, 2.0, per_tensor=True, backend=backend)
    ref_total, ref_per = norm_reference(tensors)
    torch.testing.assert_close(total.double().cpu(), ref_total, rtol=RTOL, atol=0)
    torch.testing.assert_close(per.double().cpu(), ref_per, rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_non_contiguous_input(backend_device):
    backend, device = backend_device
    base = torch.randn(300, 97, device=device)
    tensors = [base.t(), base[::3, 1:50], torch.randn(64, 64, device=device).to(memory_format=torch.contiguous_format)]
    total, per = ops.multi_tensor_norm(tensors, 2.0, per_tensor=True, backend=backend)
    ref_total, ref_per = norm_reference(tensors)
    torch.testing.assert_close(total.double().cpu(), ref_total, rtol=RTOL, atol=0)
    torch.testing.assert_close(per.double().cpu(), ref_per, rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_deterministic(backend_device):
    backend, device = backend_device
    tensors = _tensors([(100003,), (5, 20011), (17,)], torch.float32, device, seed=3)
    first = ops.multi_tensor_norm(tensors, 2.0, True, backend)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, threads):
            torch.set_num_threads(n)
            again = ops.multi_tensor_norm(tensors, 2.0, True, backend)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("ord", [2.0, math.inf], ids=["l2", "inf"])
def test_nonfinite_propagates(backend_device, dtype, bad, ord):
    backend, device = backend_device
    tensors = _tensors([(1000,), (33,)], dtype, device)
    tensors[1][7] = bad
    tensors[1][9] = HUGE[dtype]  # a finite neighbour beyond float32 squares changes nothing
    total, per = ops.multi_tensor_norm(tensors, ord, True, backend)
    expect = math.nan if math.isnan(bad) else math.inf
    for value in (total, per[1]):
        assert math.isnan(expect) and math.isnan(value.item()) or value.item() == expect
    assert math.isfinite(per[0].item())


# Per dtype, a finite element whose square overflows float32 (float16 has none: its largest
# square fits float32), and one whose square underflows it.
HUGE = {torch.float32: 3e19, torch.bfloat16: 3e19, torch.float16: 6e4}
TINY = {torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 1e-7}
# Above one chunk on every backend (CPU 2^16, CUDA 2^14, Triton 8192; interpreted 1024).
SCALING_SHAPES = [(1000,), (70001,), (3,)]


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", [0, 5000, 70000], ids=["first", "middle", "last"])
def test_huge_finite_element_gives_finite_norm(backend_device, dtype, where):
    """One element of 3e19 among normal values: its square (9e38) overflows float32, but the
    norm (3e19) does not, and must come out finite and exact, total and per tensor."""
    backend, device = backend_device
    tensors = _tensors(SCALING_SHAPES, dtype, device)
    tensors[1][where] = HUGE[dtype]
    total, per = ops.multi_tensor_norm(tensors, 2.0, True, backend)
    ref_total, ref_per = norm_reference(tensors)
    assert math.isfinite(total.item())
    torch.testing.assert_close(total.double().cpu(), ref_total, rtol=1e-6, atol=0)
    torch.testing.assert_close(per.double().cpu(), ref_per, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_elements_do_not_vanish(backend_device, dtype):
    """Elements of 1e-30: their squares (1e-60) underflow float32, their norm does not."""
    backend, device = backend_device
    tensors = [t * TINY[dtype] for t in _tensors(SCALING_SHAPES, torch.float64, "cpu")]
    tensors = [t.to(dtype=dtype, device=device) for t in tensors]
    total, per = ops.multi_tensor_norm(tensors, 2.0, True, backend)
    ref_total, ref_per = norm_reference(tensors)
    assert total.item() > 0
    torch.testing.assert_close(total.double().cpu(), ref_total, rtol=1e-6, atol=0)
    torch.testing.assert_close(per.double().cpu(), ref_per, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_elements_near_float32_max(backend_device, dtype):
    """Every element near float32's max: the norm is exact while it fits a float32 (9 elements
    of 1e38 give 3e38), and inf once it does not, as the float64 norm rounded to float32."""
    backend, device = backend_device
    fits = torch.full((9,), 1e38, dtype=dtype, device=device)
    beyond = torch.full((20000,), 3e38, dtype=dtype, device=device)
    total, per = ops.multi_tensor_norm([fits, beyond], 2.0, True, backend)
    ref_total, ref_per = norm_reference([fits, beyond])
    assert math.isfinite(per[0].item())
    torch.testing.assert_close(per.double().cpu(), ref_per.float().double(), rtol=1e-6, atol=0)
    assert total.item() == ref_total.float().item() == math.inf


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_empty_list(backend_device):
    backend, _ = backend_device
    op = _norm_op(backend)
    total, per = op([], 2.0, True)
    assert total.item() == 0.0 and per.numel() == 0


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_bad_inputs(backend_device):
    backend, device = backend_device
    op = _norm_op(backend)
    x = torch.randn(10, device=device)
    with pytest.raises(RuntimeError, match="ord"):
        op([x], 3.0, False)
    with pytest.raises(RuntimeError, match="Int|Long|dtype"):
        op([x, torch.ones(3, dtype=torch.int64, device=device)], 2.0, False)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_opcheck(backend_device):
    backend, device = backend_device
    tensors = _tensors([(33,), (4, 5)], torch.float32, device) + _tensors([(9,)], torch.bfloat16, device)
    for per_tensor in (False, True):
        torch.library.opcheck(_norm_op(backend), (tensors, 2.0, per_tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for 2^31 elements")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_pow_31_elements(backend):
    n = 2**31 + 1000
    x = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    x[:7] = 1.0
    x[-5:] = 2.0  # only reached with 64-bit indexing
    total, per = ops.multi_tensor_norm([x], 2.0, True, backend)
    assert total.item() == pytest.approx(math.sqrt(7 + 5 * 4))
    total_inf, _ = ops.multi_tensor_norm([x], math.inf, False, backend)
    assert total_inf.item() == 2.0
