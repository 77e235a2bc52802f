"""catapult_kernels.master_weights, the reference of the kernels' master weights: hand-worked
codes, a pure-Python mirror (struct and int arithmetic, no torch), and the properties the
modes promise (the ecc pair keeps 16 significant bits; stochastic rounding is unbiased)."""
import math
import struct

import pytest
import torch

from catapult_kernels import master_weights as mw


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _float(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def _ecc_mirror(x: float, P: float, mantissa: int, min_exp: int) -> int:
    """The code of float32 x over its 16-bit rounding P, from the definition."""
    if not math.isfinite(P):
        return 0
    e = max(((_bits(P) >> 23) & 0xFF) - 127, min_exp)
    c = round((x - P) * 2.0 ** -(e - mantissa - 8))  # Python's round: half to even
    return max(-127, min(127, c))


@pytest.mark.parametrize("x, code, value", [
    (1 + 2 ** -9, 64, 1 + 2 ** -9),                 # a quarter ulp above 1: q = 2^-15
    (1 + 2 ** -8, 127, 1 + 127 * 2 ** -15),         # an exact tie rounds to 1 (even): 128 clamped
    (-(3 + 2 ** -10), -16, -(3 + 2 ** -10)),        # P = -3, e = 1, q = 2^-14
    (2 - 2 ** -20, 0, 2.0),                         # rounds up to 2; below a quantum of 2's binade
    (float("inf"), 0, float("inf")),
])
def test_ecc_bf16_hand_worked(x, code, value):
    p, c = mw.ecc_encode(torch.tensor([x]), torch.bfloat16)
    assert c.item() == code
    assert mw.ecc_decode(p, c).item() == value


def test_ecc_half_hand_worked():
    p, c = mw.ecc_encode(torch.tensor([1 + 2 ** -12]), torch.float16)  # fp16: q = 2^-18 at 1
    assert (p.item(), c.item()) == (1.0, 64)


def test_ecc_nan_and_overflow():
    x = torch.tensor([float("nan"), 3.4e38, -3.4e38, 70000.0])
    p, c = mw.ecc_encode(x[:3], torch.bfloat16)
    assert c.tolist() == [0, 0, 0] and torch.isnan(p[0]) and p[1] == float("inf") and p[2] == -float("inf")
    p16, c16 = mw.ecc_encode(x[3:], torch.float16)  # over float16's range
    assert p16.item() == float("inf") and c16.item() == 0 and mw.ecc_decode(p16, c16).item() == float("inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ecc_matches_a_python_mirror(dtype):
    g = torch.Generator().manual_seed(0)
    scale = 1e-6 if dtype is torch.float16 else 1e-30
    x = torch.cat([torch.randn(500, generator=g) * 10.0 ** torch.randint(-8, 8, (500,), generator=g),
                   torch.randn(50, generator=g) * scale, torch.zeros(2)])
    p, c = mw.ecc_encode(x, dtype)
    mantissa, min_exp = mw.MANTISSA_BITS[dtype], mw.ECC_MIN_EXPONENT[dtype]
    expected = [_ecc_mirror(xi, Pi, mantissa, min_exp) for xi, Pi in zip(x.tolist(), p.float().tolist())]
    assert c.tolist() == expected


@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 16), (torch.float16, 19)])
def test_ecc_keeps_sixteen_significant_bits(dtype, bits):
    """|decoded - x| <= q / 2 <= 2^-bits |x| (normal range) but where the code 128 (x within q / 2
    of a midpoint between params) is clamped to 127: there within q."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g) * 10.0 ** torch.randint(-3, 3, (20000,), generator=g)
    x = x[x.abs() >= 2.0 ** -14]  # float16's normal range (below it the quantum stays 2^-32)
    p, c = mw.ecc_encode(x, dtype)
    err = (mw.ecc_decode(p, c) - x).abs() / x.abs()
    clamped = c.abs() == 127
    assert err[~clamped].max().item() <= 2.0 ** -bits
    assert err[clamped].max().item() <= 2.0 ** -(bits - 1) and clamped.float().mean() < 0.02  # 127 itself: ~1 in 128
    assert err.mean() < ((p.float() - x).abs() / x.abs()).mean() / 100  # the param alone: 8 bits fewer


def test_ecc_exact_for_sixteen_bit_values():
    """A value with 16 significant bits is kept exactly (the correction's 8 bits below the param's)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5000, generator=g)
    x16 = (x.view(torch.int32) & ~0xFF_FF).view(torch.float32)  # 9 fraction bits + 7 more: 16 significant
    p, c = mw.ecc_encode(x16, torch.bfloat16)
    assert torch.equal(mw.ecc_decode(p, c), x16) or (c.abs() == 127).any()  # only a clamped tie may differ
    kept = c.abs() < 127
    assert torch.equal(mw.ecc_decode(p, c)[kept], x16[kept])


def test_ecc_correction_over_a_given_param():
    """ecc_correction codes x over the param it is given, not over x's rounding; a NaN x
    (a loaded NaN master) over a finite param is code 0, not a NaN cast to int8."""
    x = torch.tensor([1 + 2 ** -10])
    assert mw.ecc_correction(x, torch.tensor([1.0], dtype=torch.bfloat16)).item() == 32
    assert mw.ecc_correction(torch.tensor([float("nan")]), torch.tensor([1.0], dtype=torch.bfloat16)).item() == 0
    assert mw.ecc_correction(x, torch.tensor([1.0078125], dtype=torch.bfloat16)).item() == -127  # clamped


def test_random_bits_match_a_python_mirror():
    for counter in (0, 1, 12345, (7 << 32) + 3, -1, mw.initial_counter(3, 5)):
        lo, hi = counter & 0xFFFFFFFF, (counter >> 32) & 0xFFFFFFFF
        key = _mix32(lo ^ _mix32((hi + 0x7F4A7C15) & 0xFFFFFFFF))
        expected = [_mix32(_mix32(i) ^ key) for i in range(64)]
        assert mw.random_bits(64, counter).tolist() == expected


def test_consecutive_steps_do_not_share_bits_between_nearby_elements():
    """Streams of consecutive counters are not the same bits permuted among nearby elements."""
    a, b = mw.random_bits(4096, 7), mw.random_bits(4096, 8)
    shared = set(a.tolist()) & set(b.tolist())
    assert len(shared) <= 2  # 4096^2 / 2^32 pairs expected by chance: about 4 in 1000 runs hit 1
    assert (a != 0).all() and (mw.random_bits(1, 0) != 0).all()


def test_initial_counters_differ_by_seed_and_param():
    counters = {mw.initial_counter(seed, i) for seed in range(4) for i in range(50)}
    assert len(counters) == 200
    assert mw.initial_counter(0, 0) == 0 and mw.initial_counter(0, 1) == 1 << 32
    assert -(1 << 63) <= mw.initial_counter(2 ** 31 - 1, 7) < 1 << 63
    assert len({mw.initial_counter(seed, 0) for seed in (0, 1 << 32, 1 << 40, -1)}) == 4  # every bit of a seed counts


def test_stochastic_round_mirror_and_neighbours():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, generator=g)
    counter = mw.initial_counter(1, 2) + 17
    r = mw.stochastic_round(x, counter)
    lo, hi = counter & 0xFFFFFFFF, (counter >> 32) & 0xFFFFFFFF
    key = _mix32(lo ^ _mix32((hi + 0x7F4A7C15) & 0xFFFFFFFF))
    for i, xi in enumerate(x.tolist()):
        b = ((_bits(xi) + (_mix32(_mix32(i) ^ key) & 0xFFFF)) & 0xFFFF0000)
        assert r[i].float().item() == _float(b)
    down = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)  # toward zero
    up = torch.nextafter(down.bfloat16(), down.sign().bfloat16() * float("inf")).float()
    assert ((r.float() == down) | (r.float() == up)).all()


def test_stochastic_round_is_unbiased_and_keeps_representable_values():
    x = torch.full((4096,), 1 + 2 ** -9)  # a quarter of the way from 1 to 1 + 2^-7
    draws = torch.stack([mw.stochastic_round(x, c).float() for c in range(8)])
    assert set(draws.unique().tolist()) == {1.0, 1 + 2 ** -7}
    assert abs(draws.mean().item() - (1 + 2 ** -9)) < 2 ** -7 * 0.01  # 32768 draws: 0.01 of an ulp ~ 4 sigma
    exact = torch.tensor([1.0, -2.5, 0.0, float("inf"), -float("inf")])
    assert torch.equal(mw.stochastic_round(exact, 5).float(), exact)
    assert torch.isnan(mw.stochastic_round(torch.tensor([float("nan")]), 5)).all()


def test_check_mode_and_param_dtype():
    for ok in mw.MODES:
        mw.check_mode(ok)
    for bad in ("FP32", "kahan", 1, True, torch.float32):
        with pytest.raises(ValueError, match="master_weights"):
            mw.check_mode(bad)
    mw.check_param_dtype("ecc", torch.float16, "group 0")
    with pytest.raises(ValueError, match="master_weights='ecc' is for bfloat16 or float16 params; group 0 has float32"):
        mw.check_param_dtype("ecc", torch.float32, "group 0")
    with pytest.raises(ValueError, match="'stochastic' is for bfloat16 params; group 1 has float16"):
        mw.check_param_dtype("stochastic", torch.float16, "group 1")
