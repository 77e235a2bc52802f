"""Master weights of 16-bit params in the generic update ops (csrc/master_weights.h), on the
C++ CPU kernel and the Triton kernel (the interpreter on CPU, compiled on CUDA).

Each call is checked bit for bit against the definition: the masters decoded to float32
values x (the float32 copy, ecc_decode(param, code), or the param), one step of the same op
on the same backend with float32 params = x (states stored alike on both sides: the
element function sees them as float32 either way), then x' encoded by the reference
catapult_kernels/master_weights.py (rounded to nearest even beside the copy, ecc_encode,
or stochastic_round in memory order with the counter from before the step, which then
advances by one)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from catapult_kernels import int8_blocks, ops
from catapult_kernels import master_weights as mw
from conftest import BACKEND_DEVICES
from op_call import Call, assert_same_bits, pipeline_of
from reference import assert_bitwise_equal

# (backend, device) pairs that take master weights: the C++ CPU kernel, the Triton kernel
# (the CUDA C++ kernels refuse them)
BACKENDS = [bd for bd in BACKEND_DEVICES if bd.values[0][0] in ("cpu", "triton")]
TRITON = [bd.values[0] for bd in BACKENDS if bd.values[0][0] == "triton"]
MODES = ["fp32", "ecc", "stochastic"]


@dataclass(frozen=True)
class Case:
    """One op in one configuration: its own arguments, the state lists the call uses,
    their storage (None: the params' dtype) and the grad pipeline (pipeline_for)."""
    id: str
    op: str
    hyper: dict
    used: tuple
    storage: torch.dtype | None = None
    regularized: bool = False  # Grokfast, AGC, clipping and unscaling
    maximize: bool = False

    @property
    def states(self):
        return ops.UPDATE_OPS[self.op].states

    @property
    def has_step(self):
        return ops.UPDATE_OPS[self.op].has_step


# Betas whose powers are exact in float32 (0.5^t, 0.75^t, 0.875^t for small t), so that powf
# rounds alike in the C library and the interpreter: the backends agree to the bit.
CASES = [
    Case("adamw-amsgrad", "adamw_", dict(beta1=0.5, beta2=0.75, eps=1e-8, weight_decay=0.1,
                                          decoupled_weight_decay=True, amsgrad=True),
         ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")),
    Case("sgd-nesterov-grokfast-agc-clip", "sgd_", dict(momentum=0.9, dampening=0.1, weight_decay=0.05,
                                                         nesterov=True, first_step=False, trust_ratios=None),
         ("momentum_buffers",), regularized=True),
    Case("lion-int8", "lion_", dict(beta1=0.9, beta2=0.99, weight_decay=0.1), ("exp_avgs",), storage=torch.int8),
    Case("adan-maximize", "adan_", dict(beta1=0.5, beta2=0.75, beta3=0.875, eps=1e-8, weight_decay=0.02,
                                         no_prox=False), ("exp_avgs", "exp_avg_diffs", "exp_avg_sqs", "pre_grads"),
         maximize=True),
]
CHANNELS_LAST = (2, 3, 4, 5)
# sizes around the vector widths and the int8 blocks of 128, an empty param (its counter
# advances too) and a channels_last 4-D one (AGC takes contiguous rows: not there)
SHAPES = [(1,), (127,), (0,), (129,), (300,), CHANNELS_LAST]
AGC_SHAPES = [(1,), (127,), (0,), (129,), (3, 100)]


def shapes_of(case: Case) -> list:
    return AGC_SHAPES if case.regularized else SHAPES


def dense_like(shape, values: torch.Tensor) -> torch.Tensor:
    """values (any layout) in a tensor of `shape`, channels_last when 4-D."""
    out = torch.empty(shape, dtype=values.dtype, device=values.device)
    if len(shape) == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.copy_(values)


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor as they lie in memory (a 1-D view)."""
    return t.as_strided((t.numel(),), (1,))


def make(case: Case, dtype: torch.dtype, mode: str, device, seed=0, shapes=None) -> Call:
    """16-bit params whose float32 values x span many magnitudes (ecc's smallest quanta,
    float16 subnormals), with their masters: the copy x, the corrections of x over its
    rounding, or (stochastic) x = the param and a counter per param; grads and
    mid-training states of the same magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    low = -36.0 if dtype == torch.bfloat16 else -7.0
    shapes = shapes or shapes_of(case)

    def rand(shape, scale):
        return dense_like(shape, torch.randn(shape, generator=gen) * scale).to(device)

    scales = [10.0 ** (torch.rand(s, generator=gen) * (1.0 - low) + low) for s in shapes]
    x = [rand(s, scale) for s, scale in zip(shapes, scales)]
    params = [t.to(dtype) for t in x]
    grads = [rand(s, scale).to(dtype) for s, scale in zip(shapes, scales)]
    names = list(case.used) + (["grokfast_emas"] if case.regularized else [])
    storage = case.storage or dtype
    lists, list_scales = {}, {}
    for name in names:
        values = [rand(s, 0.1 * scale) for s, scale in zip(shapes, scales)]
        if name.endswith("_sqs"):
            values = [v * v for v in values]
        if storage == torch.int8:
            encoded = [int8_blocks.encode(v, int8_blocks.map_of(name)) for v in values]
            lists[name], list_scales[name] = [c for c, _ in encoded], [s for _, s in encoded]
        else:
            lists[name] = [v.to(storage) for v in values]
    if mode == "fp32":
        masters = x
    elif mode == "ecc":
        masters = [mw.ecc_correction(v, p) for v, p in zip(x, params)]
    else:
        # counters with every bit pattern: the low half about to carry, negative values
        bumps = [0, 0xFFFFFFFF, 5, 1 << 31, 12345, 7]
        masters = [torch.tensor(mw.initial_counter(seed + 1, i) + bumps[i % len(bumps)], dtype=torch.int64,
                                device=device) for i in range(len(shapes))]
    agc = [torch.rand(s[0] if len(s) >= 2 else 1, generator=gen).to(device) + 0.5 for s in shapes]
    return Call(params, grads, [torch.tensor(3.0, device=device) for _ in shapes], lists, list_scales, masters,
                agc if case.regularized else [])


def pipeline_for(case: Case, call: Call, skip=None) -> ops.PipelineArgs:
    return pipeline_of(call, case.regularized, skip, case.maximize)


def run(case: Case, call: Call, backend: str, lr=1e-2, skip=None, masters=None) -> None:
    """One step of case.op on call, in place, with call's masters (or these)."""
    device = call.params[0].device
    states = [call.lists[name] if name in case.used else [] for name in case.states]
    scales = [s for name in call.lists for s in call.scales.get(name, [])]
    ops.update_(case.op, call.params, call.grads, states, call.steps if case.has_step else None,
                torch.tensor(lr, device=device), pipeline=pipeline_for(case, call, skip), backend=backend,
                state_scales=scales, master_weights=call.masters if masters is None else masters, **case.hyper)


def decoded(call: Call, mode: str) -> list:
    """The float32 values x the masters hold, laid out like the params."""
    if mode == "fp32":
        return [m.clone() for m in call.masters]
    if mode == "ecc":
        return [dense_like(p.shape, mw.ecc_decode(p, c)) for p, c in zip(call.params, call.masters)]
    return [dense_like(p.shape, p.float()) for p in call.params]


def reference(case: Case, call: Call, mode: str, backend: str, lr=1e-2) -> Call:
    """call after one step: the op on float32 params = the decoded masters (on `backend`),
    then the new values encoded by the reference."""
    dtype = call.params[0].dtype
    f32 = Call(decoded(call, mode), [g.float() for g in call.grads], [s.clone() for s in call.steps],
               {k: [t.clone() for t in v] for k, v in call.lists.items()},
               {k: [t.clone() for t in v] for k, v in call.scales.items()}, [], call.agc_scales)
    run(case, f32, backend, lr)
    x = f32.params
    if mode == "fp32":
        params, masters = [t.to(dtype) for t in x], x
    elif mode == "ecc":
        encoded = [mw.ecc_encode(t, dtype) for t in x]
        params, masters = [p for p, _ in encoded], [c for _, c in encoded]
    else:
        params = []
        for t, counter in zip(x, call.masters):
            p = torch.empty_like(t, dtype=dtype)
            memory_order(p).copy_(mw.stochastic_round(memory_order(t), int(counter)))
            params.append(p)
        masters = [c + 1 for c in call.masters]
    return Call(params, call.grads, f32.steps, f32.lists, f32.scales, masters, call.agc_scales)


def assert_same(got: Call, want: Call) -> None:
    for i, (a, b) in enumerate(zip(got.params, want.params)):
        assert a.stride() == b.stride() or a.numel() <= 1, f"params[{i}] strides"
    got_tensors, want_tensors = got.tensors(), want.tensors()
    assert got_tensors.keys() == want_tensors.keys()
    for name, t in got_tensors.items():
        assert_bitwise_equal(name, t, want_tensors[name])


def _reference_cases():
    return [pytest.param(case, mode, dtype, id=f"{case.id}-{mode}-{str(dtype)[6:]}")
            for case in CASES for mode in MODES
            for dtype in ((torch.bfloat16,) if mode == "stochastic" else (torch.bfloat16, torch.float16))]


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("case, mode, dtype", _reference_cases())
def test_matches_the_float32_op_then_the_reference_encoding(backend_device, case, mode, dtype):
    backend, device = backend_device
    call = make(case, dtype, mode, device)
    want = reference(case, call, mode, backend)
    run(case, call, backend)
    assert_same(call, want)


# ~1.5 s on 2 cores, most of it the interpreter's two runs over 35 programs of 1024 elements.
@pytest.mark.parametrize("backend_device", BACKENDS)
def test_a_param_across_chunks_rounds_by_its_memory_order(backend_device):
    """33000 elements: past the Triton chunk (programs from element 1024 on) and the CPU
    chunk (32768), so a stochastic element's index is its offset in the param, not in its
    program's chunk."""
    backend, device = backend_device
    case = CASES[0]
    call = make(case, torch.bfloat16, "stochastic", device, seed=1, shapes=[(33000,), (5, 70)])
    want = reference(case, call, "stochastic", backend)
    run(case, call, backend)
    assert_same(call, want)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_counters_advance_once_per_step(backend_device, mode):
    """Three steps in a row, each on the reference: every step decodes what the last
    encoded, and a stochastic step rounds with the counter the last one left (one more)."""
    backend, device = backend_device
    case = CASES[0]
    call = make(case, torch.bfloat16, mode, device, seed=2, shapes=[(129,), (0,), (3, 70)])
    first = [int(c) for c in call.masters] if mode == "stochastic" else None
    for _ in range(3):
        want = reference(case, call, mode, backend)
        run(case, call, backend)
        assert_same(call, want)
    if mode == "stochastic":
        assert [int(c) for c in call.masters] == [c + 3 for c in first]


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=lambda c: c.id)
def test_a_skipped_step_writes_nothing(backend_device, mode, case):
    """skip nonzero (GradScaler's inf, skip_nonfinite): params, masters, counters, states,
    scales and step counts keep their bits."""
    backend, device = backend_device
    call = make(case, torch.bfloat16, mode, device, seed=3)
    before = call.snapshot()
    run(case, call, backend, skip=torch.ones(1, device=device))
    for name, t in call.tensors().items():
        assert_bitwise_equal(name, t, before[name])


def _special_values(dtype: torch.dtype) -> torch.Tensor:
    """float32 values at the edges: zeros, infinities, NaN, the format's largest and past
    it, float32 and 16-bit subnormals, around ecc's smallest quantum, and exact ties between
    two 16-bit neighbours (their correction 128 q is clamped to 127 q)."""
    ulp = 2.0 ** -mw.MANTISSA_BITS[dtype]
    tiny = 2.0 ** mw.ECC_MIN_EXPONENT[dtype]
    big = float(torch.finfo(dtype).max)
    values = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), big, -big, big * (1 + ulp / 2),
              big * (1 + ulp / 4), 1e-40, -1e-45, tiny, -tiny * 1.375, tiny / 3, tiny * 3.3, 6e-8, -3e-5,
              1 + ulp / 2, 1 + 1.5 * ulp, -(1 + ulp / 2), 1 + ulp / 2 + ulp / 512, 1 - ulp / 4, 3.14159]
    return torch.tensor(values * 3, dtype=torch.float32)[:64]


def assert_same_nan_aside(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit, except that a NaN may be any NaN (a compiled kernel's NaN is the GPU's)."""
    assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaNs differ"
    assert_bitwise_equal(name, torch.where(a.isnan(), 0, a), torch.where(b.isnan(), 0, b))


# the interpreter's numpy on inf - inf and on casts past float16's largest
@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("mode, dtype", [("fp32", torch.bfloat16), ("fp32", torch.float16), ("ecc", torch.bfloat16),
                                         ("ecc", torch.float16), ("stochastic", torch.bfloat16)],
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("lr", [0.0, 1e-3])
def test_values_at_the_edges(backend_device, mode, dtype, lr):
    """SGD over special values (lr 0: the masters decoded and encoded again), masters made
    by the reference from them, against the reference."""
    backend, device = backend_device
    case = Case("sgd-plain", "sgd_", dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                                          first_step=False, trust_ratios=None), ())
    x = _special_values(dtype).to(device)
    call = make(case, dtype, mode, device, seed=4, shapes=[(64,)])
    call.params = [x.to(dtype)]
    if mode == "fp32":
        call.masters = [x]
    elif mode == "ecc":
        call.masters = [mw.ecc_correction(x, call.params[0])]
    want = reference(case, call, mode, backend, lr)
    run(case, call, backend, lr)
    for name, got in call.tensors().items():
        assert_same_nan_aside(name, got, want.tensors()[name])


@pytest.mark.skipif(not TRITON, reason="needs the Triton backend (the interpreter on CPU)")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_cpp_and_triton_kernels_agree(case, mode):
    """The C++ CPU op and the Triton op give the same bits (betas whose powers are exact:
    powf rounds alike)."""
    _, device = TRITON[0]
    triton_call = make(case, torch.bfloat16, mode, device, seed=5)
    cpu_call = make(case, torch.bfloat16, mode, "cpu", seed=5)
    run(case, cpu_call, "cpu")
    run(case, triton_call, "triton")
    assert_same_bits(triton_call, cpu_call)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_bfloat16_subnormals_are_read_exactly(backend_device):
    """bfloat16 params, grads and states below 2^-126 reach the update as their float32
    values, with and without master weights (the interpreter's own widening turns 0x8001
    into -0.0: the kernel widens by the bits there)."""
    backend, device = backend_device
    case = CASES[0]
    tiny = torch.arange(1, 257, dtype=torch.int16).view(torch.bfloat16).to(device)  # 0x0001 .. 0x0100
    for mode in ("ecc", None):
        call = make(case, torch.bfloat16, "fp32", device, seed=6, shapes=[(256,)])
        call.params[0].copy_(-tiny)
        call.grads[0].copy_(tiny.flip(0))
        call.lists["exp_avgs"][0].copy_(tiny)
        if mode == "ecc":
            call.masters = [torch.zeros(256, dtype=torch.int8, device=device)]
            want = reference(case, call, "ecc", backend, lr=1e-30)
            run(case, call, backend, lr=1e-30)
        else:  # the params rounded to nearest: as "fp32" from copies equal to them
            call.masters = [call.params[0].float()]
            want = reference(case, call, "fp32", backend, lr=1e-30)
            run(case, call, backend, lr=1e-30, masters=[])
            call.masters = want.masters
        assert_same(call, want)


# ----------------------------------------------------------------- bad master weights

def _bad_masters(device, backend) -> list:
    """(what, params' dtype, master_weights, the whole message with {op} for the op's
    name) of calls over two params (300,) and (3, 100); float32 params come with bfloat16
    states (other storage: allowed)."""
    p0, p1 = torch.zeros(300, device=device), torch.zeros(3, 100, device=device)
    counter = torch.zeros((), dtype=torch.int64, device=device)
    bf16 = torch.bfloat16
    cases = [
        ("one master missing", bf16, [p0],
         "catapult: {op}: master_weights has 1 tensors but params has 2"),
        ("float64 masters", bf16, [p0.double(), p1.double()],
         "catapult: {op}: master_weights[0] has dtype Double; master weights: float32 (copies), int8 (ecc "
         "corrections) or one-element int64 (stochastic rounding counters)"),
        ("two kinds", bf16, [p0, p1.to(torch.int8)],
         "catapult: {op}: master_weights[1] has dtype Char but master_weights[0] has Float (one kind per call)"),
        ("copies of float32 params", torch.float32, [p0, p1],
         "catapult: {op}: master_weights as float32 copies need bfloat16 or float16 params; params[0] is Float"),
        ("corrections of float32 params", torch.float32, [p0.to(torch.int8), p1.to(torch.int8)],
         "catapult: {op}: master_weights as int8 corrections (ecc) need bfloat16 or float16 params; params[0] is "
         "Float"),
        ("counters of float16 params", torch.float16, [counter, counter.clone()],
         "catapult: {op}: master_weights as stochastic rounding counters need bfloat16 params; params[0] is Half"),
        ("a counter of two elements", bf16, [counter, torch.zeros(2, dtype=torch.int64, device=device)],
         "catapult: {op}: master_weights[1] (a stochastic rounding counter) must have one element, got shape [2]"),
        ("a copy of another shape", bf16, [p0, p1.reshape(-1)],
         "catapult: {op}: master_weights[1] has shape [300] strides [1] but params[1] has shape [3, 100] strides "
         "[100, 1]"),
        ("a transposed copy", bf16, [p0, p1.t().contiguous().t()],
         "catapult: {op}: master_weights[1] has shape [3, 100] strides [1, 3] but params[1] has shape [3, 100] "
         "strides [100, 1]"),
        ("corrections of another shape", bf16, [p0.to(torch.int8), torch.zeros(100, 3, dtype=torch.int8,
                                                                              device=device)],
         "catapult: {op}: master_weights[1] has shape [100, 3] strides [3, 1] but params[1] has shape [3, 100] "
         "strides [100, 1]"),
    ]
    other = "meta" if p0.device.type == "cpu" else "cpu"
    if backend == "cpu":  # CPU tensors beside a meta one: the dispatcher sends the call to the fake kernel
        message = "catapult: {op}: master_weights[1] is on meta but params[0] is on cpu (every tensor argument " \
                  "must be on one device)"
    else:
        message = "catapult: {op}: master_weights[1] is on " + other + " but params are on " + str(p0.device)
    return cases + [("a copy on another device", bf16, [p0, p1.to(other)], message)]


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_bad_master_weights_are_refused_before_anything_is_written(backend_device):
    """Every check of check_master_weights, with the C++ message (the Triton op's names
    itself), and nothing written: params, states, step counts, masters."""
    backend, device = backend_device
    case = CASES[0]
    op = case.op if backend == "cpu" else case.op.rstrip("_") + "_triton_"
    for what, dtype, masters, message in _bad_masters(device, backend):
        call = make(case, torch.bfloat16, "fp32", device, seed=7, shapes=[(300,), (3, 100)])
        call.params = [p.to(dtype) for p in call.params]
        call.grads = [g.to(dtype) for g in call.grads]
        call.masters = masters
        before = call.snapshot()
        with pytest.raises(RuntimeError) as e:
            run(case, call, backend)
        assert str(e.value).splitlines()[0] == message.format(op=op), what
        for name, t in call.tensors().items():
            if t.device.type != "meta":
                assert_bitwise_equal(f"{what}: {name}", t, before[name])


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("mode", ["fp32", "ecc", "stochastic"])
def test_opcheck_with_master_weights(backend_device, mode):
    """torch.library.opcheck with master weights, on an elementwise op and on lamb_: the schema
    marks master_weights as written (torch.compile's functionalization must see the copies,
    corrections and counters change), the fake kernel and the dispatch agree."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(6)
    shapes = [(130,), (3, 7)]
    values = [torch.randn(s, generator=gen) for s in shapes]
    params = [v.to(device, torch.bfloat16) for v in values]
    grads = [torch.randn(s, generator=gen).to(device, torch.bfloat16) for s in shapes]
    masters = {"fp32": lambda: [v.to(device) for v in values],
               "ecc": lambda: [mw.ecc_encode(v, torch.bfloat16)[1].to(device) for v in values],
               "stochastic": lambda: [torch.tensor(mw.initial_counter(0, i), device=device) for i in range(2)]}[mode]
    moments = lambda: [[torch.rand(s, generator=gen).to(device, torch.bfloat16) for s in shapes]  # noqa: E731
                       for _ in range(2)]
    steps = [torch.tensor(3.0, device=device) for _ in shapes]
    lr = torch.tensor(1e-2, device=device)
    suffix = "_triton_" if backend == "triton" else "_"
    adamw = (params, grads, *moments(), [], steps, lr, 0.9, 0.99, 1e-8, 0.01, True, False,
             *ops.PipelineArgs().args(), [], masters())
    torch.library.opcheck(getattr(torch.ops.catapult, "adamw" + suffix), adamw)
    lamb = (params, grads, *moments(), steps, lr, 0.9, 0.99, 1e-6, 0.01, True, 0.0,
            *ops.PipelineArgs().args(), [], masters())
    torch.library.opcheck(getattr(torch.ops.catapult, "lamb" + suffix), lamb)
