"""catapult_kernels.triton.gram: x @ x.mT from the upper-triangle tiles, mirrored.

Under the Triton interpreter (CPU, 16 x 16 tiles, so the shapes below cross tiles and
leave partial ones) against torch in float32, and compiled for sm_90 (the GPU machine's
H100/H200) with the GPU tiles in a subprocess without the interpreter."""
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from catapult_kernels.triton.gram import _upper_tile  # noqa: E402  (after triton's check)

SHAPES = [(1, 1), (7, 5), (5, 7), (33, 70), (64, 64), (3, 17, 40)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gram():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.fail("conftest switches the interpreter on without a GPU")
    from catapult_kernels.triton.gram import gram
    return gram


def _device():
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _reference(x):
    return x.float() @ x.float().mT


def _one_ulp(ref, dtype):
    """The spacing of dtype's numbers at |ref| (|ref| in [2^(e-1), 2^e): 2^(e-1-mantissa bits))."""
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    _, exponent = torch.frexp(ref)
    return torch.ldexp(torch.ones_like(ref), exponent - 1 - mantissa_bits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gram_of_small_integers_is_exact(shape, dtype):
    # Integers in [-3, 3]: every product and sum is exact in float32, so the result is the
    # reference rounded once to dtype (to nearest even: sums up to 630 round in bfloat16).
    x = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(_device())
    out = _gram()(x)
    assert out.dtype == dtype and out.shape == (*shape[:-1], shape[-2])
    assert torch.equal(out, _reference(x).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gram_matches_float32_matmul_and_is_symmetric(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(_device())
    out = _gram()(x)
    assert torch.equal(out, out.mT)
    ref = _reference(x)
    err = (out.float() - ref).abs()
    # Any float32 sum of these products, in any order, errs by at most ~n eps sum|x_rk x_ck|
    # <= n eps |x_r| |x_c| (n <= 70: < 1e-5 |x_r| |x_c|); entries near 0 make a plain rtol meaningless.
    norms = x.float().norm(dim=-1)
    tolerance = 1e-5 * norms[..., :, None] * norms[..., None, :]
    if dtype != torch.float32:
        # then rounded once to dtype, maybe on the other side of a rounding boundary than torch's sum
        tolerance += _one_ulp(ref, dtype)
    assert (err <= tolerance).all(), (err - tolerance).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gram_of_non_contiguous_input(dtype):
    base = torch.randint(-3, 4, (2, 40, 33), generator=torch.Generator().manual_seed(2)).to(dtype).to(_device())
    x = base.mT  # (2, 33, 40), strides (1320, 1, 33)
    assert not x.is_contiguous()
    assert torch.equal(_gram()(x), _reference(x).to(dtype))
    assert torch.equal(_gram()(base[0, ::2, 1:]), _reference(base[0, ::2, 1:]).to(dtype))


def test_gram_of_empty_shapes():
    gram = _gram()
    assert torch.equal(gram(torch.ones(4, 0, device=_device())), torch.zeros(4, 4, device=_device()))
    assert gram(torch.ones(0, 3, device=_device())).shape == (0, 0)
    assert gram(torch.ones(0, 5, 3, device=_device())).shape == (0, 5, 5)


def test_gram_refuses_bad_input_in_one_line():
    gram = _gram()
    with pytest.raises(TypeError, match="float32, bfloat16 or float16, got torch.float64"):
        gram(torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., m, n\), got \(3,\)"):
        gram(torch.ones(3))


@triton.jit
def _upper_tiles_kernel(numbers, tiles, N: tl.constexpr):
    offsets = tl.arange(0, N)
    i, j = _upper_tile(tl.load(numbers + offsets))
    tl.store(tiles + 2 * offsets, i)
    tl.store(tiles + 2 * offsets + 1, j)


def test_upper_tile_numbering_inverts_column_order():
    # t = j (j + 1) / 2 + i; the column j, from a float32 square root, is nondecreasing in t, so
    # it is right for every t (of the 23170 columns where 8 t + 1 fits an int32: 128-row tiles up
    # to m ~ 2.9M) when it is right at each column's first tile and the tile before.
    columns = torch.arange(1, 23170, dtype=torch.int64)
    starts = columns * (columns + 1) // 2
    numbers = torch.cat([torch.zeros(1, dtype=torch.int64), starts - 1, starts]).to(torch.int32)
    numbers = torch.cat([numbers, torch.zeros(65536 - len(numbers), dtype=torch.int32)])
    tiles = torch.empty(len(numbers), 2, dtype=torch.int32, device=_device())
    _upper_tiles_kernel[(1,)](numbers.to(_device()), tiles, N=len(numbers))
    i, j = tiles.cpu().long().unbind(1)
    assert ((0 <= i) & (i <= j) & (j * (j + 1) // 2 + i == numbers)).all()


def test_gram_under_torch_compile_is_the_eager_result():
    # kept whole as an op, its fake giving the shape; doubling is exact in any dtype
    gram = _gram()
    x = torch.randn(2, 20, 36, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(_device())
    compiled = torch.compile(lambda x: 2 * gram(x), fullgraph=True)
    assert torch.equal(compiled(x), 2 * gram(x))


# ~8 s on 2 cores with an empty Triton cache (4 kernel variants; cached after: ~7 s, mostly imports).
# Not conftest's interpreter: a subprocess without TRITON_INTERPRET compiles what gram launches.
def test_gram_compiles_for_sm90_with_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    compiled = dict(re.findall(r"^compiled (\S+) (\S+)$", done.stdout, re.M))
    # 16-bit inputs and TF32 on Hopper's warpgroup MMA; IEEE float32 on plain FMAs
    assert compiled == {"bf16": "wgmma", "fp16": "wgmma", "fp32-tf32": "wgmma", "fp32-ieee": "fma"}, done.stdout


def _compile_launches() -> None:
    """Record gram's launch for each dtype (CPU tensors, nothing run) and compile it for sm_90
    with the arguments' specialization as the launcher makes it (ints equal to 1 constant,
    multiples of 16 and 16-byte aligned pointers marked divisible)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from catapult_kernels.triton import gram as gram_module

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    gram_module.wrap_triton = Recorder
    gram_module.check_runnable = lambda device, kernel: None
    cases = [("bf16", torch.bfloat16, "highest"), ("fp16", torch.float16, "highest"),
             ("fp32-tf32", torch.float32, "high"), ("fp32-ieee", torch.float32, "highest")]
    for name, dtype, precision in cases:
        torch.set_float32_matmul_precision(precision)
        gram_module.gram(torch.zeros(2, 256, 512, dtype=dtype))
        kernel, args, kwargs = launches.pop()
        values = dict(zip(kernel.arg_names, args), **kwargs)
        options = dict(num_warps=values.pop("num_warps"), num_stages=values.pop("num_stages"))
        signature, constexprs, attrs = {}, {}, {}
        for index, param in enumerate(kernel.params):
            value = values[param.name]
            if param.is_constexpr or (type(value) is int and value == 1):
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
                continue
            if isinstance(value, torch.Tensor):
                signature[param.name] = {torch.float32: "*fp32", torch.bfloat16: "*bf16",
                                         torch.float16: "*fp16"}[value.dtype]
                divisible = value.data_ptr() % 16 == 0
            else:
                signature[param.name] = "i32"
                divisible = value % 16 == 0
            if divisible:
                attrs[(index,)] = [["tt.divisibility", 16]]
        ptx = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                                       attrs=attrs),
                             target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        unit = "wgmma" if re.search(r"\bwgmma\.", ptx) else "fma" if re.search(r"\bfma\.rn\.f32\b", ptx) else "?"
        print("compiled", name, unit, flush=True)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") != "1"
    _compile_launches()


def test_gram_opcheck():
    """torch.library.opcheck of catapult::gram_triton: schema, fake kernel, autograd
    registration, AOT dispatch."""
    _gram()(torch.zeros(1, 1))  # registers the op
    x = torch.randn(2, 17, 40, generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(torch.ops.catapult.gram_triton.default, (x,))
