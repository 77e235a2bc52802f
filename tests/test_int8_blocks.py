"""catapult_kernels/int8_blocks.py: the int8 state codec's reference, bit for bit as
docs' interface (section 3) writes it: hand-computed codes, blocks in memory order, partial
and non-finite blocks, and error bounds each map guarantees."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from catapult_kernels import int8_blocks as ib

MAPS = (ib.SQRT, ib.FOURTH_ROOT)


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def round_trip(x, map):
    codes, scales = ib.encode(x, map)
    return ib.decode(codes, scales, map)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_hand_computed_block_sqrt(scale):
    # sqrt(u) * 127: 127, 63.5 -> 64 (ties to even), 31.75 -> 32, 0
    codes, scales = ib.encode(f32([1.0, -0.25, 0.0625, 0.0]) * scale, ib.SQRT)
    assert codes.tolist() == [127, -64, 32, 0] and codes.dtype == torch.int8
    assert scales.tolist() == [scale] and scales.dtype == torch.float32
    expected = np.float32([16129, -4096, 1024, 0]) * (np.float32(scale) / np.float32(16129))
    assert ib.decode(codes, scales, ib.SQRT).numpy().tobytes() == expected.tobytes()


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_hand_computed_block_fourth_root(scale):
    # u^(1/4) * 127: 127, 0.7071 * 127 = 89.80 -> 90, 0.5 * 127 = 63.5 -> 64, 0
    codes, scales = ib.encode(f32([1.0, -0.25, 0.0625, 0.0]) * scale, ib.FOURTH_ROOT)
    assert codes.tolist() == [127, -90, 64, 0]
    assert scales.tolist() == [scale]
    q = np.float32([16129, -8100, 4096, 0])
    expected = (q * np.abs(q)) * (np.float32(scale) / np.float32(16129) / np.float32(16129))
    assert ib.decode(codes, scales, ib.FOURTH_ROOT).numpy().tobytes() == expected.tobytes()


def test_rounds_half_to_even():
    u = f32(0.00038750077)  # float32 sqrt(u) * 127 is exactly 2.5
    assert float(torch.sqrt(u) * 127.0) == 2.5
    codes, _ = ib.encode(torch.stack([f32(1.0), u, -u]), ib.SQRT)
    assert codes.tolist() == [127, 2, -2]  # half away from zero would give 3


def numpy_encode(x: np.ndarray, power: int):
    """Every float32 step computed in float64 and rounded once to float32 (exact: float64
    holds the products of float32s, and a rounded float64 quotient or sqrt rounds correctly)."""
    x = x.astype(np.float32).reshape(-1)
    codes, scales = [], []
    for start in range(0, len(x), ib.BLOCK):
        block = x[start:start + ib.BLOCK]
        amax = np.abs(block).max()
        scales.append(amax)
        if not (0 < amax < np.inf):
            codes += [0] * len(block)
            continue
        inverse = np.float32(1.0 / np.float64(amax))
        f = np.float32(np.abs(block).astype(np.float64) * np.float64(inverse))
        for _ in range(power):
            f = np.float32(np.sqrt(f.astype(np.float64)))
        c = np.round(np.float32(f.astype(np.float64) * 127.0))  # numpy rounds half to even
        if power == 2:
            c = np.where(np.abs(block) > 0, np.maximum(c, 1), c)
        codes += list(np.where(block < 0, -c, c).astype(np.int8))
    return np.array(codes, dtype=np.int8), np.array(scales, dtype=np.float32)


def numpy_decode(codes: np.ndarray, scales: np.ndarray, power: int) -> np.ndarray:
    c = codes.astype(np.float64)
    q = np.float32(c * np.abs(c))  # exact
    factor = np.float32(scales.astype(np.float64) / 16129.0)
    if power == 2:
        q = np.float32(q.astype(np.float64) * np.abs(q))
        factor = np.float32(factor.astype(np.float64) / 16129.0)
    s = np.repeat(factor, ib.BLOCK)[:len(codes)].astype(np.float64)
    return np.float32(q.astype(np.float64) * s)


@pytest.mark.parametrize("map,power", [(ib.SQRT, 1), (ib.FOURTH_ROOT, 2)])
def test_each_step_is_rounded_once(map, power):
    # blocks of mixed magnitudes, each block scaled differently; a partial last block
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20 * ib.BLOCK + 37, generator=gen) * torch.exp(torch.randn(20 * ib.BLOCK + 37, generator=gen) * 4)
    codes, scales = ib.encode(x, map)
    want_codes, want_scales = numpy_encode(x.numpy(), power)
    assert np.array_equal(codes.numpy(), want_codes) and scales.numpy().tobytes() == want_scales.tobytes()
    decoded = ib.decode(codes, scales, map)
    assert decoded.numpy().tobytes() == numpy_decode(want_codes, want_scales, power).tobytes()


def near_code_boundaries(scale: float, map, ulps: int = 48) -> torch.Tensor:
    """Blocks of scale followed by 127 values within `ulps` float32 steps of the inputs whose
    code is exactly k + 1/2 (where one ulp of error in u or sqrt flips the code)."""
    ties = torch.tensor([scale * ((k + 0.5) / 127) ** (2 if map is ib.SQRT else 4) for k in range(127)],
                        dtype=torch.float32)
    near = [ties]
    up, down = ties, ties
    for _ in range(ulps):
        up, down = torch.nextafter(up, f32(float("inf"))), torch.nextafter(down, f32(0.0))
        near += [up, down]
    values = torch.stack(near).view(-1, 127)
    return torch.cat([torch.full((len(values), 1), scale), values], dim=1).view(-1)


@pytest.mark.parametrize("map,power", [(ib.SQRT, 1), (ib.FOURTH_ROOT, 2)])
def test_each_step_is_rounded_once_at_code_boundaries(map, power):
    # a faster reciprocal (x * (1 / amax)) or an approximate sqrt flips codes here
    x = torch.cat([near_code_boundaries(s, map) for s in (3.0, 0.7, 1e-20)])
    codes, scales = ib.encode(x, map)
    want_codes, want_scales = numpy_encode(x.numpy(), power)
    assert np.array_equal(codes.numpy(), want_codes) and scales.numpy().tobytes() == want_scales.tobytes()


@pytest.mark.parametrize("map", MAPS)
def test_partial_last_block_and_per_block_scales(map):
    gen = torch.Generator().manual_seed(1)
    magnitudes = (1e-3, 1.0, 1e5)
    x = torch.cat([torch.randn(ib.BLOCK, generator=gen) * m for m in magnitudes] + [f32([-3.0, 0.5])])
    codes, scales = ib.encode(x, map)
    assert scales.shape == (4,) and ib.num_blocks(x.numel()) == 4
    assert torch.equal(scales, torch.stack([b.abs().max() for b in x.split(ib.BLOCK)]))
    for block_codes, block in zip(codes.split(ib.BLOCK), x.split(ib.BLOCK)):
        assert block_codes[block.abs().argmax()].abs() == 127
        alone_codes, _ = ib.encode(block, map)  # a block depends on its own elements only
        assert torch.equal(block_codes, alone_codes)
    assert codes[-2:].tolist() == [-127, round(127 * (0.5 / 3) ** (0.5 if map is ib.SQRT else 0.25))]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("map", MAPS)
def test_non_finite_block_decodes_nan_and_leaves_the_others(map, bad):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3 * ib.BLOCK + 5, generator=gen)
    clean = round_trip(x, map)
    x[ib.BLOCK + 7] = bad
    codes, scales = ib.encode(x, map)
    assert scales[1].isnan() if bad != bad else scales[1] == float("inf")
    assert (codes[ib.BLOCK:2 * ib.BLOCK] == 0).all()
    decoded = ib.decode(codes, scales, map)
    assert decoded[ib.BLOCK:2 * ib.BLOCK].isnan().all()
    rest = torch.ones_like(x, dtype=torch.bool)
    rest[ib.BLOCK:2 * ib.BLOCK] = False
    assert torch.equal(decoded[rest], clean[rest])


@pytest.mark.parametrize("map", MAPS)
def test_zero_block_and_negative_zero(map):
    x = torch.zeros(ib.BLOCK + 3)
    x[:5] = -0.0
    x[ib.BLOCK:] = f32([-0.0, 2.0, -0.0])
    codes, scales = ib.encode(x, map)
    assert scales.tolist() == [0.0, 2.0] and codes.tolist() == [0] * ib.BLOCK + [0, 127, 0]
    decoded = ib.decode(codes, scales, map)
    assert decoded.tolist() == [0.0] * ib.BLOCK + [0.0, 2.0, 0.0]
    assert not decoded.signbit().any()  # -0.0 comes back as +0.0: a code has no sign of zero


def test_fresh_state_decodes_to_zero():
    codes, scales = torch.zeros(300, dtype=torch.int8), torch.zeros(3)
    for map in MAPS:
        assert torch.equal(ib.decode(codes, scales, map), torch.zeros(300))


def error_bound(x: torch.Tensor, scale: torch.Tensor, map) -> torch.Tensor:
    """|decode(encode(x)) - x| per element. With f = (|x| / s)^p and q = c / 127 the decoded
    root, |q - f| <= 1/254 (one rounding to the nearest code), and the decoded |x| is q^(1/p) s:
    SQRT:        |q^2 - f^2| = |q - f| (q + f) <= (2 f + 1/254) / 254
    FOURTH_ROOT: |q^4 - f^4| <= |q - f| 4 max(q, f)^3 <= 4 (f + 1/254)^3 / 254
    times s, plus a few float32 roundings of s (1e-6 s covers them)."""
    u = x.abs().double() / scale
    if map is ib.SQRT:
        bound = (2 * u.sqrt() + 1 / 254) / 254
    else:
        bound = 4 * (u.sqrt().sqrt() + 1 / 254) ** 3 / 254
    return (bound + 1e-6) * scale


@pytest.mark.parametrize("map", MAPS)
def test_round_trip_error_bound(map):
    gen = torch.Generator().manual_seed(3)
    n = 40 * ib.BLOCK + 11
    x = torch.randn(n, generator=gen).sign() * torch.exp(torch.randn(n, generator=gen) * 5)  # decades apart
    codes, scales = ib.encode(x, map)
    per_element_scale = torch.repeat_interleave(scales, ib.BLOCK)[:n].double()
    error = (ib.decode(codes, scales, map).double() - x.double()).abs()
    assert (error <= error_bound(x, per_element_scale, map)).all()
    assert codes.min() >= -127 and codes.max() <= 127  # never -128: the code is symmetric


def test_fourth_root_keeps_values_sqrt_rounds_to_zero():
    # the reason for FOURTH_ROOT on second moments: v a billionth of its block's largest
    x = f32([1.0, 1e-9, 1e-5])
    assert round_trip(x, ib.SQRT)[1:].tolist() == [0.0, 0.0]  # sqrt code 0 below u = (1/254)^2 = 1.6e-5
    kept = round_trip(x, ib.FOURTH_ROOT)
    assert (kept[1:] > 0).all()  # fourth-root code 0 only below u = (1/254)^4 = 2.4e-10
    assert (kept[2] - 1e-5).abs() < 1e-5 * 0.15


def test_channels_last_walks_memory_order():
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 3, 5, 7, generator=gen) * torch.arange(1, 4).view(1, 3, 1, 1) ** 6)
    x = x.to(memory_format=torch.channels_last)  # NHWC in memory: blocks mix the channels
    for map in MAPS:
        codes, scales = ib.encode(x, map)
        assert codes.stride() == x.stride()
        nhwc_codes, nhwc_scales = ib.encode(x.permute(0, 2, 3, 1).contiguous(), map)
        assert torch.equal(codes.permute(0, 2, 3, 1), nhwc_codes) and torch.equal(scales, nhwc_scales)
        decoded = ib.decode(codes, scales, map)
        assert decoded.stride() == x.stride()
        assert torch.equal(decoded.permute(0, 2, 3, 1), ib.decode(nhwc_codes, nhwc_scales, map))


@pytest.mark.parametrize("shape", [(0,), (0, 3), ()])
def test_empty_and_scalar_tensors(shape):
    x = torch.full(shape, -1.5)
    codes, scales = ib.encode(x, ib.SQRT)
    assert codes.shape == shape and scales.shape == (ib.num_blocks(x.numel()),)
    assert torch.equal(ib.decode(codes, scales, ib.SQRT), x)


def test_half_precision_input_and_output():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, generator=gen).bfloat16()
    codes, scales = ib.encode(x, ib.FOURTH_ROOT)
    assert all(torch.equal(a, b) for a, b in zip((codes, scales), ib.encode(x.float(), ib.FOURTH_ROOT)))
    as_bf16 = ib.decode(codes, scales, ib.FOURTH_ROOT, dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16, ib.decode(codes, scales, ib.FOURTH_ROOT).bfloat16())


def test_map_of_list_names():
    assert ib.map_of("exp_avg_sqs") is ib.FOURTH_ROOT and ib.map_of("max_exp_avg_sqs") is ib.FOURTH_ROOT
    assert ib.map_of("exp_avg_sq" + "s") is ib.FOURTH_ROOT  # a state key's map: map_of(key + "s")
    for name in ("exp_avgs", "momentum_buffers", "exp_avg_diffs", "pre_grads", "grokfast_emas"):
        assert ib.map_of(name) is ib.SQRT


def test_num_blocks():
    assert [ib.num_blocks(n) for n in (0, 1, 127, 128, 129, 256, 257)] == [0, 1, 1, 1, 2, 2, 3]


def test_bad_inputs_raise_one_line():
    dense = torch.randn(4, 64)
    codes, scales = ib.encode(dense, ib.SQRT)
    cases = [
        (lambda: ib.encode(dense[:, ::2], ib.SQRT), "not dense"),
        (lambda: ib.encode(torch.ones(3, dtype=torch.int64), ib.SQRT), "floating"),
        (lambda: ib.encode(dense, "sqrt"), "map"),
        (lambda: ib.decode(codes.float(), scales, ib.SQRT), "int8"),
        (lambda: ib.decode(codes, scales[:1], ib.SQRT), "scales"),
        (lambda: ib.decode(codes, scales.double(), ib.SQRT), "scales"),
        (lambda: ib.decode(codes[:, ::2], scales[:1], ib.SQRT), "not dense"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError, match=words) as info:
            call()
        assert "\n" not in str(info.value)


def test_a_nonzero_second_moment_never_decodes_to_zero():
    """FOURTH_ROOT: a value under 2.4e-10 of its block's largest would round to code 0 and
    decode to 0, and an Adam step over it to m / eps; it takes code 1 (decoding larger, the
    safe side). SQRT rounds a tiny first moment to 0 as it is (a zero update)."""
    x = f32([9839.0, 5.9e-10, -5.9e-10, 0.0])
    codes, scales = ib.encode(x, ib.FOURTH_ROOT)
    assert codes.tolist() == [127, 1, -1, 0]
    decoded = ib.decode(codes, scales, ib.FOURTH_ROOT)
    assert decoded[1] > x[1] and decoded[3] == 0
    codes, _ = ib.encode(x, ib.SQRT)
    assert codes.tolist() == [127, 0, 0, 0]
