"""gram(x) = x @ x.mT, computing only the tiles on and above the diagonal.

For Muon's Newton-Schulz iteration (A = X X^T; B = b A + c A A; X = a X + B X), whose
X X^T is symmetric: the (m, m) output is cut into BLOCK x BLOCK tiles and one program
computes tile (i, j) for each i <= j only, then stores it at (i, j) and its transpose
at (j, i), so about half the multiply-adds of a full matmul are done. Flash-Muon
measured such a kernel 1.6-2x faster than the full matmul at m = 8192 (A100/H800) and
no faster at m = 1024.

Numerics as torch's matmul: products accumulated in float32, the result rounded once
to x's dtype (to nearest even). float32 inputs follow torch.get_float32_matmul_precision()
("highest": IEEE float32 products; "high" or "medium": TF32 tensor cores). The output is symmetric bit for bit: a tile on the diagonal stores only
its entries r <= c, at (r, c) and at (c, r), so no entry depends on the order in which
the hardware sums the two mirrored dot products.

Tiles: 128 x 128 output tiles, K steps of 64 (16-bit types, 4 stages) or 32 (float32,
3 stages), 8 warps, the Hopper (H100/H200, sm_90) shapes of Triton's matmul tutorial
for a square tile; under the Triton interpreter (CPU tensors, tests), 16 x 16 x 16, so
small shapes still cross tiles. Programs enumerate the upper tiles column by column
(tile j's row block is shared by consecutive programs); the order is not tuned.

An op, catapult::gram_triton, that torch.compile keeps whole (its fake gives the shape).

Where to use it: CUDA tensors with m >= ~2048 (smaller m: torch's matmul), a bound
to be set from measurements. Measured so far: nothing on a GPU. The kernel is checked
against torch under the interpreter, and compiled for sm_90 (tests/test_triton_gram.py):
16-bit and TF32 inputs run on Hopper's warpgroup MMA (wgmma), 128 KiB of shared memory
for 16-bit types (of 227 KiB).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .kernel_common import store_as
from .multi_tensor_table import TL_DTYPE, check_runnable, is_interpreted, keep_whole_under_functionalization

__all__ = ["gram"]


@triton.jit
def _upper_tile(t):
    """(i, j), i <= j, of upper tile number t, tiles numbered column by column:
    t = j (j + 1) / 2 + i. j = floor((sqrt(8 t + 1) - 1) / 2) in float32, correctly rounded
    (the same on GPUs and the interpreter), is right or, just before a column's first tile
    once 8 t + 1 > 2^24, one too large (checked for all j < 23170, where 8 t + 1 fits an int32)."""
    j = ((tl.sqrt_rn((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
    return t - j * (j + 1) // 2, j


@triton.jit
def _gram_kernel(x, out, m, n, tiles_per_matrix, stride_xb, stride_xm, stride_xk,
                 BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    pid = tl.program_id(0)
    batch = (pid // tiles_per_matrix).to(tl.int64)
    ti, tj = _upper_tile(pid % tiles_per_matrix)
    rows = ti.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = tj.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    x = x + batch * stride_xb
    a_ptrs = x + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    b_ptrs = x + cols[:, None] * stride_xm + ks[None, :] * stride_xk
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, tl.cdiv(n, BLOCK_K)):
        k_ok = ks[None, :] < n - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rows[:, None] < m) & k_ok, other=0.0)
        b = tl.load(b_ptrs, mask=(cols[:, None] < m) & k_ok, other=0.0)
        if INTERPRETED:
            # the interpreter's dot multiplies bfloat16's raw bits; float32 holds their products exactly
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_xk
    out = out + batch * m * m
    at = out + rows[:, None] * m + cols[None, :]
    mirrored = out + cols[:, None] * m + rows[None, :]
    if ti == tj:
        # entries r <= c only, at (r, c) and mirrored at (c, r): symmetric whatever order summed them
        keep = (rows[:, None] <= cols[None, :]) & (cols[None, :] < m)
        store_as(at, acc, keep, DTYPE, INTERPRETED)
        store_as(mirrored, tl.trans(acc), tl.trans(keep), DTYPE, INTERPRETED)
    else:
        # rows < cols < m here: a mask constant along the rows' contiguous dimension keeps stores vectorized
        inside = cols < m
        store_as(at, acc, inside[None, :], DTYPE, INTERPRETED)
        store_as(mirrored, tl.trans(acc), inside[:, None], DTYPE, INTERPRETED)


def _launch_config(dtype: torch.dtype, interpreted: bool) -> dict:
    """Tile sizes and compile options (see the module docstring)."""
    if interpreted:
        return dict(BLOCK=16, BLOCK_K=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=4)


def _gram_output(x: torch.Tensor) -> torch.Tensor:
    """gram's output, unwritten, after the checks of its input."""
    if x.dim() < 2:
        raise ValueError(f"gram: x must have shape (..., m, n), got {tuple(x.shape)}")
    if x.dtype not in TL_DTYPE:
        raise TypeError(f"gram: x must be float32, bfloat16 or float16, got {x.dtype}")
    return x.new_empty((*x.shape[:-1], x.shape[-2]))


@triton_op("catapult::gram_triton", mutates_args=())
def gram(x: torch.Tensor) -> torch.Tensor:
    """x @ x.mT for x of shape (..., m, n), float32/bfloat16/float16 (any strides): the
    (..., m, m) result in x's dtype, accumulated in float32, symmetric bit for bit.
    CUDA tensors, or CPU tensors under the Triton interpreter. An op (catapult::gram_triton)
    kept whole by torch.compile, as the other Triton ops."""
    out = _gram_output(x)
    check_runnable(x.device, _gram_kernel)
    if out.numel() == 0:
        return out
    *batch_shape, m, n = x.shape
    x3 = x.reshape(math.prod(batch_shape), m, n)  # a view for (m, n), (batch, m, n) and any viewable strides
    interpreted = is_interpreted(_gram_kernel)
    config = _launch_config(x.dtype, interpreted)
    tiles_per_side = triton.cdiv(m, config["BLOCK"])
    tiles_per_matrix = tiles_per_side * (tiles_per_side + 1) // 2
    precision = "ieee" if x.dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest" else "tf32"
    wrap_triton(_gram_kernel)[(x3.shape[0] * tiles_per_matrix,)](
        x3, out, m, n, tiles_per_matrix, x3.stride(0), x3.stride(1), x3.stride(2),
        DTYPE=TL_DTYPE[x.dtype], INPUT_PRECISION=precision, INTERPRETED=interpreted, **config)
    return out


gram.register_fake(_gram_output)
keep_whole_under_functionalization(gram)
