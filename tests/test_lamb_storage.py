"""catapult::lamb_ with m, v (and the Grokfast ema) stored otherwise than the params
(bfloat16, int8 blocks: csrc/state_storage.h) and with master weights of 16-bit params
(csrc/master_weights.h), on the C++ CPU kernel and the Triton kernel (the interpreter on
CPU, compiled on CUDA).

The reference of a call is the same op on the same backend over float32 params holding
the values the call's params stand for (the master's value, the ecc value, or the param)
and float32 states holding the decoded ones: the float32 path, whose pass 1 stores m, v
and whose pass 2 reads them back. The states do not depend on the trust ratio: encoded
by the references (int8_blocks.encode, rounding to bfloat16), they are ours bit for bit.
The params do: the stored path sums r^2 and p^2 in another order, so its trust ratio
may differ from the float32 path's (on the C++ kernel by the float32 path's float lane
sums: lamb_tolerance.py). So a new value x is held to |x - x_ref| <= rel |x_ref -
x_before| + ulp32(x_ref) (lamb_tolerance; measured on the C++ kernel: 1.5e-7, two ulps,
on 300 elements; on the Triton kernel the values were the float32 path's bit for bit),
and then to the encoding's resolution: the copy exactly, the ecc value within its
quantum, the stochastically rounded param the reference's rounding but where x_ref lies
that close to a rounding boundary. The two kernels agree bit for bit (betas with exact
powers)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from catapult_kernels import int8_blocks, ops
from catapult_kernels import master_weights as mw
from conftest import BACKEND_DEVICES
from lamb_tolerance import assert_close_value, ulp, update_tolerance
from op_call import Call, assert_same_bits, pipeline_of
from reference import assert_bitwise_equal

# The interpreter computes both sides of a tl.where: 0 / 0 in the lanes past a tensor's end
# with eps = 0, and in the trust ratio of an empty tensor (then 1).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered")
# (backend, device) pairs that take storage and master weights: the C++ CPU kernel and the
# Triton kernel (the CUDA C++ kernels refuse them)
BACKENDS = [bd for bd in BACKEND_DEVICES if bd.values[0][0] in ("cpu", "triton")]
TRITON = [bd.values[0] for bd in BACKENDS if bd.values[0][0] == "triton"]
# Betas whose powers are exact in float32, so that powf rounds alike in the C library and
# the interpreter (the backends can then agree to the bit).
HYPER = dict(beta1=0.5, beta2=0.75, eps=1e-6, weight_decay=0.01, bias_correction=True)
LR = 1e-2
MAPS = {"exp_avgs": int8_blocks.SQRT, "exp_avg_sqs": int8_blocks.FOURTH_ROOT, "grokfast_emas": int8_blocks.SQRT}


@dataclass(frozen=True)
class Case:
    """Params of `dtype`, m, v and emas stored as `storage` (None: the params' dtype),
    master weights of `mode` (None: none), the grad pipeline on (Grokfast, AGC, clipping,
    unscaling) or off."""
    id: str
    dtype: torch.dtype
    storage: torch.dtype | None = None
    mode: str | None = None
    regularized: bool = False
    shapes: tuple = ((1,), (129,), (300,))
    max_weight_norm: float = 0.0


CASES = [
    Case("float32-bf16-states", torch.float32, torch.bfloat16, max_weight_norm=5.0),
    Case("float32-int8-states-grokfast-agc-clip", torch.float32, torch.int8, regularized=True,
         shapes=((1,), (129,), (3, 100))),
    Case("bf16-int8-states", torch.bfloat16, torch.int8),
    Case("bf16-fp32-masters", torch.bfloat16, mode="fp32"),
    Case("bf16-ecc", torch.bfloat16, mode="ecc"),
    Case("bf16-stochastic", torch.bfloat16, mode="stochastic", shapes=((1,), (0,), (129,), (300,))),  # 0: counted too
    Case("fp16-fp32-masters-bf16-states", torch.float16, torch.bfloat16, mode="fp32"),
    Case("bf16-int8-states-ecc-grokfast-agc-clip", torch.bfloat16, torch.int8, mode="ecc", regularized=True,
         shapes=((1,), (129,), (3, 100))),
    # past the Triton chunk (1024 interpreted) and the C++ one (32768): int8 blocks and
    # random bits indexed from the param's first element, not the chunk's
    Case("bf16-int8-states-stochastic-chunks", torch.bfloat16, torch.int8, mode="stochastic",
         shapes=((33000,), (5, 70))),
]


def make(case: Case, device, seed=0) -> Call:
    """Params whose values span a few decades (with their masters: the copy, the ecc
    corrections of the value over its rounding, or counters of every bit pattern), grads
    and mid-training states of matching sizes, stored as the case stores them."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device)

    magnitudes = [10.0 ** (torch.rand(s, generator=gen) * 3 - 2).to(device) for s in case.shapes]
    x = [rand(s) * k for s, k in zip(case.shapes, magnitudes)]
    params = [t.to(case.dtype) for t in x]
    grads = [rand(s).to(case.dtype) for s in case.shapes]
    storage = case.storage or case.dtype
    lists, scales = {}, {}
    for name in ("exp_avgs", "exp_avg_sqs") + (("grokfast_emas",) if case.regularized else ()):
        values = [rand(s, 0.1) for s in case.shapes]
        if name == "exp_avg_sqs":
            values = [v * v for v in values]
        if storage == torch.int8:
            encoded = [int8_blocks.encode(v, MAPS[name]) for v in values]
            lists[name], scales[name] = [c for c, _ in encoded], [s for _, s in encoded]
        else:
            lists[name] = [v.to(storage) for v in values]
    if case.mode == "fp32":
        masters = x
    elif case.mode == "ecc":
        masters = [mw.ecc_correction(v, p) for v, p in zip(x, params)]
    elif case.mode == "stochastic":
        bumps = [0xFFFFFFFF, 1 << 31, 12345]  # the low half about to carry, negative values
        masters = [torch.tensor(mw.initial_counter(seed + 1, i) + bumps[i % len(bumps)], dtype=torch.int64,
                                device=device) for i in range(len(case.shapes))]
    else:
        masters = []
    agc = [(torch.rand(s[0] if len(s) >= 2 else 1, generator=gen) + 0.5).to(device) for s in case.shapes]
    return Call(params, grads, [torch.tensor(3.0, device=device) for _ in case.shapes], lists, scales, masters,
                agc if case.regularized else [])


def run(case: Case, call: Call, backend: str, skip=None, **hyper) -> None:
    """One lamb_ step on call, in place."""
    pipeline = pipeline_of(call, case.regularized, skip)
    scales = [s for name in call.lists for s in call.scales.get(name, [])]  # m's, v's, then the emas'
    ops.update_("lamb_", call.params, call.grads, [call.lists["exp_avgs"], call.lists["exp_avg_sqs"]], call.steps,
                torch.tensor(LR, device=call.params[0].device), pipeline=pipeline, backend=backend, state_scales=scales,
                master_weights=call.masters, **{**HYPER, "max_weight_norm": case.max_weight_norm, **hyper})


def values(case: Case, call: Call) -> list:
    """The float32 values the params stand for (new tensors)."""
    if case.mode == "fp32":
        return [m.clone() for m in call.masters]
    if case.mode == "ecc":
        return [mw.ecc_decode(p, c) for p, c in zip(call.params, call.masters)]
    return [p.float().clone() for p in call.params]


def decoded_lists(call: Call) -> dict:
    return {name: [int8_blocks.decode(c, s, MAPS[name]) for c, s in zip(lst, call.scales[name])]
            if name in call.scales else [t.float().clone() for t in lst] for name, lst in call.lists.items()}


def reference(case: Case, call: Call, backend: str, **hyper) -> tuple[list, Call]:
    """(the new float32 values x_ref, the float32 op's call with its states encoded as the
    case stores them and the counters advanced) of one step of `call`."""
    f32 = Call(values(case, call), [g.float() for g in call.grads], [s.clone() for s in call.steps],
               decoded_lists(call), {}, [], call.agc_scales)
    run(case, f32, backend, **hyper)
    storage = case.storage or case.dtype
    lists, scales = {}, {}
    for name, lst in f32.lists.items():
        if storage == torch.int8:
            encoded = [int8_blocks.encode(v, MAPS[name]) for v in lst]
            lists[name], scales[name] = [c for c, _ in encoded], [s for _, s in encoded]
        else:
            lists[name] = [v.to(storage) for v in lst]
    masters = [c + 1 for c in call.masters] if case.mode == "stochastic" else []
    return f32.params, Call([], [], f32.steps, lists, scales, masters)


def memory_order(t: torch.Tensor) -> torch.Tensor:
    return t.as_strided((t.numel(),), (1,))


def assert_params(case: Case, call: Call, x_ref: list, before: list, counters: list, backend: str) -> int:
    """The params (and master weights) of call against the new reference values x_ref;
    returns how many stochastically rounded elements differ from the reference's rounding
    (each where x_ref is within our tolerance of a rounding boundary)."""
    near_misses = 0
    for i, (p, want, was) in enumerate(zip(call.params, x_ref, before)):
        name = f"params[{i}]"
        rel = update_tolerance(backend, p.numel())
        if case.mode == "fp32":
            master = call.masters[i]
            assert_close_value(f"master_weights[{i}]", master, want, was, rel)
            assert_bitwise_equal(f"{name} (the copy rounded)", p, master.to(case.dtype))
        elif case.mode == "ecc":
            exponent = ((p.float().view(torch.int32) >> 23) & 0xFF) - 127  # the quantum's: master_weights.py
            quantum = torch.exp2(exponent.clamp(min=mw.ECC_MIN_EXPONENT[case.dtype]).float()
                                 - (mw.MANTISSA_BITS[case.dtype] + 8))
            assert_close_value(f"{name} with its corrections", mw.ecc_decode(p, call.masters[i]), want, was, rel,
                               quantum)
        elif case.mode == "stochastic":
            expected = torch.empty_like(p)
            memory_order(expected).copy_(mw.stochastic_round(memory_order(want), counters[i]))
            miss = memory_order(p.view(torch.int16) != expected.view(torch.int16))
            if miss.any():
                # where the reference's bits plus the random ones land within our tolerance
                # (in float32 ulps) of a carry into the upper 16: there x and x_ref may round apart
                tolerance = memory_order(rel * (want - was).abs() / ulp(want, torch.float32)).ceil().long() + 1
                r = mw.random_bits(p.numel(), counters[i]) & 0xFFFF
                low = ((memory_order(want).view(torch.int32).long() & 0xFFFF) + r) & 0xFFFF
                near = (low < tolerance) | (low >= 0x10000 - tolerance)
                assert bool(near[miss].all()), f"{name}: rounded otherwise than the reference away from a boundary"
                near_misses += int(miss.sum())
            assert_close_value(name, p, want, was, rel, ulp(want, torch.bfloat16))
        else:
            assert_close_value(name, p, want, was, rel, ulp(want, case.dtype) if case.dtype != torch.float32 else 0.0)
    return near_misses


def assert_states(call: Call, want: Call) -> None:
    """Step counts, m, v, the emas, their scales and the counters: bit for bit."""
    got_tensors = {k: t for k, t in call.tensors().items() if not k.startswith("params")}
    if not want.masters:
        got_tensors = {k: t for k, t in got_tensors.items() if not k.startswith("master_weights")}
    want_tensors = want.tensors()
    assert got_tensors.keys() == want_tensors.keys()
    for name, t in got_tensors.items():
        assert_bitwise_equal(name, t, want_tensors[name])


# ~25 s on 2 cores, most of it the interpreter (the 33000-element case ~5 s on it).
@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_two_steps_match_the_float32_op_then_the_encodings(backend_device, case):
    """Two steps, each against the reference from what the last one left: the counters
    advance by one per step, and the second rounds with the first's plus one."""
    backend, device = backend_device
    call = make(case, device)
    for step in range(2):
        before = values(case, call)
        counters = [int(c) for c in call.masters] if case.mode == "stochastic" else []
        x_ref, want = reference(case, call, backend)
        run(case, call, backend)
        assert_states(call, want)
        near_misses = assert_params(case, call, x_ref, before, counters, backend)
        assert near_misses <= max(2, sum(p.numel() for p in call.params) // 1000), f"step {step}: {near_misses}"


@pytest.mark.skipif(not TRITON, reason="needs the Triton backend (the interpreter on CPU)")
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[7]], ids=lambda c: c.id)
def test_the_cpp_and_triton_kernels_agree(case):
    """The C++ CPU op and the Triton op give the same bits (betas whose powers are exact:
    powf rounds alike; the trust ratios' sums, in double on both in other orders, round
    to the same float32 here)."""
    _, device = TRITON[0]
    triton_call, cpu_call = make(case, device, seed=5), make(case, "cpu", seed=5)
    run(case, cpu_call, "cpu")
    run(case, triton_call, "triton")
    assert_same_bits(triton_call, cpu_call)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[8]], ids=lambda c: c.id)
def test_a_skipped_step_writes_nothing(backend_device, case):
    """skip nonzero: params, masters, counters, codes, scales and step counts keep their bits."""
    backend, device = backend_device
    case = Case(case.id, case.dtype, case.storage, case.mode, case.regularized)  # small shapes
    call = make(case, device, seed=3)
    before = call.snapshot()
    run(case, call, backend, skip=torch.ones(1, device=device))
    for name, t in call.tensors().items():
        assert_bitwise_equal(name, t, before[name])


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_eps_zero_takes_the_trust_ratio_of_the_float32_path(backend_device):
    """eps = 0 (LAMB takes it, as torch's Adam) at the first step, v > 0 everywhere: r =
    sign(g) exactly, |r| = sqrt(129), |p| = 11.546: trust 1.0166 on the float32 path, and
    so with bfloat16 states. The C++ stored path once summed the zero padding of the last
    128-element group too, where r = 0 / (sqrt(0) + 0) is NaN: |r| NaN, trust 1."""
    backend, device = backend_device
    case = Case("eps-zero", torch.float32, torch.bfloat16, shapes=((129,),))
    call = make(case, device)
    gen = torch.Generator().manual_seed(0)
    call.params[0].copy_(torch.randn(129, generator=gen))
    call.grads[0].copy_(torch.randn(129, generator=gen))
    for t in (*call.lists["exp_avgs"], *call.lists["exp_avg_sqs"], *call.steps):
        t.zero_()
    before = values(case, call)
    x_ref, want = reference(case, call, backend, eps=0.0, weight_decay=0.0)
    run(case, call, backend, eps=0.0, weight_decay=0.0)
    assert_states(call, want)
    assert_params(case, call, x_ref, before, [], backend)


# ----------------------------------------------------------------- bad storage and masters

def _bad_calls(device) -> list:
    """(what, case, a change to its call, the first line of the message with {op} and the
    dtypes by their C++ names)."""
    int8 = Case("int8", torch.float32, torch.int8, regularized=True)
    bf16 = Case("bf16-states", torch.float32, torch.bfloat16)
    ecc = Case("bf16-ecc", torch.bfloat16, mode="ecc")

    def set_list(name, i, t):
        return lambda call: call.lists[name].__setitem__(i, t(call.lists[name][i]))

    def drop_scales(call):
        call.scales["grokfast_emas"] = []

    def set_masters(masters):
        return lambda call: setattr(call, "masters", masters(call))

    return [
        ("v stored otherwise than m", bf16, set_list("exp_avg_sqs", 1, lambda t: t.half()),
         "catapult: {op}: exp_avg_sqs[1] has dtype {Half} but exp_avgs[1] has {BFloat16} (one storage dtype per "
         "param)"),
        ("float64 states", bf16, set_list("exp_avgs", 0, lambda t: t.double()),
         "catapult: {op}: exp_avgs[0] has dtype {Double}; state storage: float32, bfloat16, float16 or int8"),
        ("the emas' scales missing", int8, drop_scales,
         "catapult: {op}: state_scales has 6 tensors but int8 storage needs 9 (one per param for each of 3 stored "
         "lists)"),
        ("a scale too few", int8, lambda call: call.scales["exp_avg_sqs"].__setitem__(2, torch.zeros(2)),
         "catapult: {op}: state_scales[5] has 2 scales but exp_avg_sqs[2] has 3 blocks of 128"),
        ("copies of float32 params", bf16, set_masters(lambda call: [p.clone() for p in call.params]),
         "catapult: {op}: master_weights as float32 copies need bfloat16 or float16 params; params[0] is Float"),
        ("a counter of two elements", ecc, set_masters(
            lambda call: [torch.zeros((), dtype=torch.int64, device=device)] * 2
            + [torch.zeros(2, dtype=torch.int64, device=device)]),
         "catapult: {op}: master_weights[2] (a stochastic rounding counter) must have one element, got shape [2]"),
        ("corrections of another shape", ecc, set_masters(
            lambda call: call.masters[:2] + [torch.zeros(3, 100, dtype=torch.int8, device=device)]),
         "catapult: {op}: master_weights[2] has shape [3, 100] strides [100, 1] but params[2] has shape [300] "
         "strides [1]"),
    ]


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_bad_storage_and_masters_are_refused_before_anything_is_written(backend_device):
    """check_lamb_args' storage and master checks, with the C++ messages (the Triton op
    names itself), and nothing written."""
    backend, device = backend_device
    op = "lamb_" if backend == "cpu" else "lamb_triton_"
    # dtypes as C++ prints them; the Triton op's storage checks (kernel_common, shared with
    # the elementwise ops) print torch's names
    names = {"Half": torch.float16, "BFloat16": torch.bfloat16, "Double": torch.float64}
    names = {k: k if backend == "cpu" else str(v) for k, v in names.items()}
    for what, case, change, message in _bad_calls(device):
        call = make(case, device, seed=7)
        change(call)
        before = call.snapshot()
        with pytest.raises(RuntimeError) as e:
            run(case, call, backend)
        assert str(e.value).splitlines()[0] == message.format(op=op, **names), what
        for name, t in call.tensors().items():
            assert_bitwise_equal(f"{what}: {name}", t, before[name])
