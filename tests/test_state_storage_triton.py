"""The Triton update ops with their states and Grokfast emas stored in another dtype than
the params (csrc/state_storage.h): int8 blocks, bfloat16, float32.

Each call is checked bit for bit against a plain reference: the stored states decoded to
float32 (int8_blocks.decode, or a float widened), one step of the same op with float32
states on float32 copies of the params and grads (S == T == float32, the path the op suite
checks), then everything stored again (params rounded to their dtype, states encoded by
int8_blocks.encode or rounded to S). The reference step runs on the C++ CPU op where the
op's math has no powf, and on the Triton op itself where it has (powf differs by an ulp
between the interpreter and the C library)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from catapult_kernels import int8_blocks, ops
from catapult_kernels.triton.kernel_common import QUANT_BLOCK, STORAGE_DTYPES, update_sizes
from conftest import BACKEND_DEVICES
from reference import assert_bitwise_equal

TRITON = [bd.values[0] for bd in BACKEND_DEVICES if bd.values[0][0] == "triton"]
pytestmark = pytest.mark.skipif(not TRITON, reason="needs the Triton backend (the interpreter on CPU)")
DEVICE = TRITON[0][1] if TRITON else "cpu"  # where the Triton op runs: CPU interpreted, or CUDA

# The backend of the reference step: the Triton op for the ops whose constants take powf
# (bias corrections) or a written FMA (muon_momentum_'s lerp, rounded twice under the
# interpreter), the C++ CPU op for the others.
REFERENCE_BACKEND = {"adamw_": "triton", "adopt_": "triton", "adan_": "triton", "muon_momentum_": "triton",
                     "sgd_": "cpu", "lion_": "cpu", "grad_pipeline_": "cpu"}


@dataclass(frozen=True)
class Case:
    """One op in one configuration: the state lists it uses (by schema name) and its
    own arguments."""
    id: str
    op: str
    hyper: dict
    unused: tuple = ()

    @property
    def states(self):
        return ops.UPDATE_OPS[self.op].states

    @property
    def used(self):
        return [s for s in self.states if s not in self.unused]

    @property
    def has_step(self):
        return ops.UPDATE_OPS[self.op].has_step


ADAMW_AMSGRAD = Case("adamw-amsgrad", "adamw_", dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                                                      decoupled_weight_decay=True, amsgrad=True))
CASES = [
    ADAMW_AMSGRAD,
    Case("adam", "adamw_", dict(ADAMW_AMSGRAD.hyper, decoupled_weight_decay=False, amsgrad=False),
         unused=("max_exp_avg_sqs",)),
    Case("sgd-momentum", "sgd_", dict(momentum=0.9, dampening=0.1, weight_decay=0.05, nesterov=False,
                                      first_step=False, trust_ratios=None)),
    # the first step writes the buffers without reading them
    Case("sgd-nesterov-first", "sgd_", dict(momentum=0.9, dampening=0.0, weight_decay=0.05, nesterov=True,
                                            first_step=True, trust_ratios=None)),
    Case("lion", "lion_", dict(beta1=0.9, beta2=0.99, weight_decay=0.1)),
    Case("adopt", "adopt_", dict(beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1)),
    Case("adan", "adan_", dict(beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.02, no_prox=False)),
    Case("muon_momentum", "muon_momentum_", dict(momentum=0.95, nesterov=True)),
    Case("grad_pipeline", "grad_pipeline_", {}),  # its one stored list: the emas
]
# (params' dtype, storage dtype): every case with the first three, AdamW with all
STORAGES = [(torch.float32, torch.int8), (torch.bfloat16, torch.int8), (torch.float32, torch.bfloat16)]
MORE_STORAGES = [(torch.float16, torch.int8), (torch.bfloat16, torch.float32)]
# Around the quantization block of 128, one matrix, and one laid out column-major (blocks
# run in memory order).
SHAPES = [(1,), (127,), (128,), (129,), (300,), (3, 70)]
COLUMN_MAJOR = (5, 70)


@dataclass
class Stored:
    """A call's tensors: params and grads in T, the stored lists (the used states, then
    "grokfast_emas") in S, with int8 their block scales by list name."""
    params: list
    grads: list
    steps: list
    lists: dict
    scales: dict = field(default_factory=dict)

    def copy(self, device=None) -> "Stored":
        """A copy of every tensor (on device: where it is)."""
        def to(ts):
            return [t.to(device or t.device, copy=True) for t in ts]
        return Stored(to(self.params), to(self.grads), to(self.steps), {k: to(v) for k, v in self.lists.items()},
                      {k: to(v) for k, v in self.scales.items()})

    def state_scales(self) -> list:
        """state_scales of the op: list-major, in the order of ``lists``."""
        return [s for name in self.lists for s in self.scales.get(name, [])]

    def float32_lists(self) -> dict:
        """Each stored list as float32 (int8: decoded), a copy."""
        if not self.scales:
            return {k: [t.to(torch.float32, copy=True) for t in v] for k, v in self.lists.items()}
        return {k: [int8_blocks.decode(c, s, int8_blocks.map_of(k)) for c, s in zip(v, self.scales[k])]
                for k, v in self.lists.items()}


def store(values: dict, storage: torch.dtype) -> tuple[dict, dict]:
    """float32 lists by name -> (the lists in `storage`, their block scales when int8)."""
    if storage != torch.int8:
        return {k: [t.to(storage) for t in v] for k, v in values.items()}, {}
    encoded = {k: [int8_blocks.encode(t, int8_blocks.map_of(k)) for t in v] for k, v in values.items()}
    return ({k: [c for c, _ in v] for k, v in encoded.items()}, {k: [s for _, s in v] for k, v in encoded.items()})


def make(case: Case, shapes, dtype, storage, seed=0, emas=True, device=DEVICE) -> Stored:
    """Random params and grads in dtype, mid-training states (a second moment's list
    non-negative) stored as `storage`, with a zero block (fresh state) in the 300s."""
    gen = torch.Generator().manual_seed(seed)

    def mk(shape, scale=1.0):
        t = (torch.randn(shape, generator=gen) * scale).to(device)
        return t.t().contiguous().t() if shape == COLUMN_MAJOR else t

    params = [mk(s).to(dtype) for s in shapes]
    grads = [mk(s).to(dtype) for s in shapes]
    names = case.used + (["grokfast_emas"] if emas else [])
    values = {}
    for name in names:
        values[name] = [mk(s, 0.1).abs() if name.endswith("_sqs") else mk(s, 0.1) for s in shapes]
        for t in values[name]:
            if t.numel() == 300:
                t[128:256] = 0.0
    lists, scales = store(values, storage)
    return Stored(params, grads, [torch.tensor(3.0, device=device) for _ in shapes], lists, scales)


def call(case: Case, st: Stored, backend: str, lr=1e-2, state_scales=None, **pipeline) -> None:
    """One step of case.op on st, in place, with st's stored lists and scales (or these);
    the pipeline's tensors go to st's device."""
    device = st.params[0].device
    states = [st.lists[name] if name in case.used else [] for name in case.states]
    emas = st.lists.get("grokfast_emas", [])
    kwargs = {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) if torch.is_tensor(v) else v
              for k, v in dict(pipeline, grokfast_alpha=pipeline.get("grokfast_alpha", 0.9)).items()}
    ops.update_(case.op, st.params, st.grads, states, st.steps if case.has_step else None,
                torch.tensor(lr, device=device), pipeline=ops.PipelineArgs(grokfast_emas=emas, **kwargs),
                backend=backend, state_scales=st.state_scales() if state_scales is None else state_scales,
                **case.hyper)


def reference(case: Case, st: Stored, storage: torch.dtype, **pipeline) -> Stored:
    """st after one step: decoded, stepped in float32 (REFERENCE_BACKEND), stored again."""
    dtype = st.params[0].dtype
    backend = REFERENCE_BACKEND[case.op]
    device = "cpu" if backend == "cpu" else DEVICE

    def widen(ts):
        return [t.to(device, torch.float32, copy=True) for t in ts]
    f32 = Stored(widen(st.params), widen(st.grads), widen(st.steps),
                 {k: widen(v) for k, v in st.float32_lists().items()})
    call(case, f32, backend, **pipeline)
    lists, scales = store(f32.lists, storage)
    return Stored([p.to(dtype) for p in f32.params], st.grads, f32.steps, lists, scales)


def assert_same_scales(name, a, b):
    """Bit for bit, except that a NaN scale may be any NaN in the reference (torch's amax)."""
    assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN scales differ"
    assert_bitwise_equal(name, torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


def assert_matches(got: Stored, want: Stored):
    for i, (a, b) in enumerate(zip(got.params, want.params)):
        assert a.stride() == b.stride() or a.numel() <= 1
        assert_bitwise_equal(f"params[{i}]", a, b)
    for name in want.lists:
        for i, (a, b) in enumerate(zip(got.lists[name], want.lists[name])):
            assert_bitwise_equal(f"{name}[{i}]", a, b)
        for i, (a, b) in enumerate(zip(got.scales.get(name, []), want.scales.get(name, []))):
            assert_same_scales(f"{name} scales[{i}]", a, b)
    for i, (a, b) in enumerate(zip(got.steps, want.steps)):
        assert_bitwise_equal(f"state_steps[{i}]", a, b)


def _reference_cases():
    return [pytest.param(case, dtype, storage, id=f"{case.id}-{str(dtype)[6:]}-{str(storage)[6:]}")
            for case in CASES for dtype, storage in STORAGES + (MORE_STORAGES if case is ADAMW_AMSGRAD else [])]


@pytest.mark.parametrize("case, dtype, storage", _reference_cases())
def test_matches_the_float32_reference(case, dtype, storage):
    st = make(case, SHAPES + [COLUMN_MAJOR], dtype, storage)
    want = reference(case, st, storage)
    call(case, st, "triton")
    assert_matches(st, want)


@pytest.mark.parametrize("case", [c for c in CASES if REFERENCE_BACKEND[c.op] == "cpu"], ids=lambda c: c.id)
def test_agrees_with_the_cpp_op(case):
    """The C++ CPU op with the same storage gives the same bits (both implement
    csrc/state_storage.h; the ops without powf, where the math agrees to the bit)."""
    st = make(case, SHAPES + [COLUMN_MAJOR], torch.bfloat16, torch.int8, seed=6)
    cpp = st.copy("cpu")
    call(case, cpp, "cpu")
    call(case, st, "triton")
    assert_matches(st, cpp)


def test_blocks_hold_whole_quantization_blocks():
    """The int8 path updates a quantization block whole in one vector step of one program:
    every block size is a multiple of QUANT_BLOCK and every chunk (where a program starts)
    a multiple of the block, compiled and interpreted."""
    for interpreted in (False, True):
        for dtype in STORAGE_DTYPES[:3]:
            for storage in (None, *STORAGE_DTYPES):
                block, chunk, _ = update_sizes(dtype, interpreted, storage)
                assert block % QUANT_BLOCK == 0 and chunk % block == 0, (dtype, storage, interpreted)


def test_a_storage_dtype_per_param():
    """Float storage may differ from param to param (and from the params' dtype): a launch
    per (dtype, storage) pair; each tensor as the reference steps it alone."""
    case = ADAMW_AMSGRAD
    pairs = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32),
             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16)]
    parts = [make(case, [(129,)], dtype, storage, seed=10 + k) for k, (dtype, storage) in enumerate(pairs)]
    st = Stored(*([t for part in parts for t in getattr(part, f)] for f in ("params", "grads", "steps")),
                {name: [t for part in parts for t in part.lists[name]] for name in parts[0].lists})
    wants = [reference(case, part, storage) for part, (_, storage) in zip(parts, pairs)]  # st holds parts' tensors
    call(case, st, "triton")
    for k, want in enumerate(wants):
        assert_matches(Stored([st.params[k]], [st.grads[k]], [st.steps[k]],
                              {name: [lst[k]] for name, lst in st.lists.items()}), want)


# ~3 s on 2 cores (8 s when the machine is busy): two interpreted runs (the op and its
# Triton reference) over 65 blocks of 512 elements.
def test_many_chunks_with_the_whole_pipeline():
    """33000 elements: full chunks and a tail ending inside a quantization block, with
    unscale, clip, AGC, Grokfast and maximize all on."""
    shapes = [(33000,), (3, 70)]
    st = make(ADAMW_AMSGRAD, shapes, torch.float32, torch.int8, seed=1)
    pipeline = dict(grad_norm=torch.tensor(40.0), max_grad_norm=5.0, grad_scale=torch.tensor(4.0),
                    agc_scales=[torch.full((1,), 0.7), torch.tensor([0.5, 1.0, 0.25])], maximize=True)
    want = reference(ADAMW_AMSGRAD, st, torch.int8, **pipeline)
    call(ADAMW_AMSGRAD, st, "triton", **pipeline)
    assert_matches(st, want)


@pytest.mark.parametrize("storage", [torch.int8, torch.bfloat16], ids=str)
def test_several_steps_stay_on_the_reference(storage):
    """Three steps in a row: each decodes what the last encoded."""
    st = make(ADAMW_AMSGRAD, [(300,), (129,)], torch.bfloat16, storage, seed=2)
    for _ in range(3):
        want = reference(ADAMW_AMSGRAD, st, storage)
        call(ADAMW_AMSGRAD, st, "triton")
        assert_matches(st, want)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy on inf / inf
def test_a_nonfinite_block_is_not_hidden():
    """A NaN in a state's block and an inf in a grad's: those blocks get codes 0 and the
    non-finite scale (a NaN as the C++ kernels' quiet NaN, 0x7FC00000), and decode to NaN;
    the block between steps as usual."""
    st = make(ADAMW_AMSGRAD, [(300,)], torch.float32, torch.int8, seed=3)
    st.scales["exp_avgs"][0][0] = float("nan")  # block 0 of exp_avg decodes to NaN
    st.grads[0][260] = float("inf")             # block 2: the inf reaches every state
    want = reference(ADAMW_AMSGRAD, st, torch.int8)
    call(ADAMW_AMSGRAD, st, "triton")
    assert_matches(st, want)
    codes, scales = st.lists["exp_avgs"][0], st.scales["exp_avgs"][0]
    assert scales[0:1].view(torch.int32).item() == 0x7FC00000 and scales[1].isfinite() and scales[2].isinf()
    assert (codes[:128] == 0).all() and (codes[256:] == 0).all() and (codes[128:256] != 0).any()
    decoded = int8_blocks.decode(codes, scales, int8_blocks.SQRT)
    assert decoded[:128].isnan().all() and decoded[256:].isnan().all() and decoded[128:256].isfinite().all()


@pytest.mark.parametrize("storage", [torch.int8, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [ADAMW_AMSGRAD, CASES[2]], ids=lambda c: c.id)
def test_skip_leaves_everything_bit_identical(case, storage):
    st = make(case, [(300,), (3, 70)], torch.bfloat16, storage, seed=4)
    before = st.copy()
    call(case, st, "triton", skip=torch.ones(1))
    assert_matches(st, before)


# -------------------------------------------------------------- bad arguments

def _bad_storage_cases(st: Stored):
    """(what, the call's lists and scales, the message's part that names it)."""
    codes, scales = st.lists, st.scales
    m, v = codes["exp_avgs"], codes["exp_avg_sqs"]
    flat = st.state_scales()
    n = len(st.params)
    return [
        ("a float64 state", dict(codes, exp_avgs=[m[0].double(), m[1]]), flat,
         r"exp_avgs\[0\] has dtype .*; state storage: float32, bfloat16, float16 or int8"),
        ("two storage dtypes for one param", dict(codes, exp_avg_sqs=[v[0], v[1].to(torch.bfloat16)]), flat,
         r"exp_avg_sqs\[1\] has dtype .* but exp_avgs\[1\] has .* \(one storage dtype per param\)"),
        ("int8 for one param only", {k: [lst[0], lst[1].to(torch.bfloat16)] for k, lst in codes.items()}, flat,
         r"exp_avgs\[1\] has dtype .* but exp_avgs\[0\] has .* \(int8 storage for every param of a call or for none\)"),
        ("int8 emas beside bfloat16 states", dict(codes, exp_avgs=[t.to(torch.bfloat16) for t in m],
                                                  exp_avg_sqs=[t.to(torch.bfloat16) for t in v],
                                                  max_exp_avg_sqs=[t.to(torch.bfloat16)
                                                                   for t in codes["max_exp_avg_sqs"]]), flat,
         r"grokfast_emas\[0\] has dtype .* but exp_avgs\[0\] has"),
        ("a state of another shape", dict(codes, exp_avgs=[m[0], m[1].reshape(-1)]), flat,
         r"exp_avgs\[1\] has shape"),
        ("one scale tensor missing", codes, flat[:-1], r"state_scales has 7 tensors but int8 storage needs 8"),
        ("no scales", codes, [], r"state_scales has 0 tensors"),
        ("a scale too few", codes, flat[:n + 1] + [flat[n + 1][:-1]] + flat[n + 2:],
         r"state_scales\[3\] has 1 scales but exp_avg_sqs\[1\] has 2 blocks"),
        ("float64 scales", codes, [flat[0].double()] + flat[1:], r"state_scales\[0\] must be a contiguous 1-D float32"),
        ("strided scales", codes, flat[:1] + [torch.zeros(2 * flat[1].numel(), device=flat[1].device)[::2]]
         + flat[2:],
         r"state_scales\[1\] must be a contiguous 1-D float32"),
        ("2-D scales", codes, flat[:1] + [flat[1].reshape(1, -1)] + flat[2:],
         r"state_scales\[1\] must be a contiguous 1-D float32"),
        ("scales beside float storage", {k: [t.float() for t in lst] for k, lst in codes.items()}, flat,
         r"state_scales must be empty: no state is stored as int8"),
    ]


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_bad_storage_changes_nothing(backend):
    """The Triton op refuses what the C++ op refuses, with a message naming the same
    thing (the C++ twin is checked alongside), and writes nothing."""
    st = make(ADAMW_AMSGRAD, [(300,), (3, 70)], torch.float32, torch.int8, seed=5,
              device="cpu" if backend == "cpu" else DEVICE)
    before = st.copy()
    for what, lists, flat, message in _bad_storage_cases(st):
        with pytest.raises(RuntimeError, match=message):
            call(ADAMW_AMSGRAD, Stored(st.params, st.grads, st.steps, lists), backend, state_scales=flat)
            pytest.fail(f"took {what}")
    assert_matches(st, before)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_scales_without_stored_lists_are_refused(backend):
    case = Case("sgd-plain", "sgd_", dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                                          first_step=False, trust_ratios=None), unused=("momentum_buffers",))
    device = "cpu" if backend == "cpu" else DEVICE
    st = make(case, [(10,)], torch.float32, torch.int8, emas=False, device=device)
    before = st.copy()
    with pytest.raises(RuntimeError, match="state_scales must be empty: no state is stored as int8"):
        call(case, st, backend, state_scales=[torch.zeros(1, device=device)])
    assert_matches(st, before)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck_with_int8_storage(backend):
    """torch.library.opcheck with int8 states and scales: the schema marks state_scales as
    written (torch.compile's functionalization must see the scales change), the fake kernel
    and the dispatch agree."""
    device = "cpu" if backend == "cpu" else DEVICE
    gen = torch.Generator().manual_seed(5)
    shapes = [(130,), (3, 7)]
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    stored = {name: [int8_blocks.encode(torch.randn(s, generator=gen) ** (2 if name.endswith("_sqs") else 1),
                                        int8_blocks.map_of(name)) for s in shapes]
              for name in ("exp_avgs", "exp_avg_sqs")}
    codes = [[c.to(device) for c, _ in stored[name]] for name in stored]
    scales = [s.to(device) for name in stored for _, s in stored[name]]
    steps = [torch.tensor(3.0, device=device) for _ in shapes]
    args = (params, grads, *codes, [], steps, torch.tensor(1e-2, device=device), 0.9, 0.99, 1e-8, 0.01, True, False,
            *ops.PipelineArgs().args(), scales, [])
    op = torch.ops.catapult.adamw_ if backend == "cpu" else torch.ops.catapult.adamw_triton_
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_tiny_second_moment_keeps_a_nonzero_code(backend):
    """A v 1e-16 of its block's largest: FOURTH_ROOT code 1, not 0 (whose decoded 0 would make
    the next Adam step m / eps), on both backends, as int8_blocks.encode."""
    device = "cpu" if backend == "cpu" else DEVICE
    g = torch.tensor([1e4, 1e-4, -1e-4, 0.0] * 40)  # 160 elements: a full block and a partial one
    hyper = dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True, amsgrad=False)
    lr = torch.tensor(1e-3)
    p_ref, m_ref, v_ref = torch.ones(160), torch.zeros(160), torch.zeros(160)
    ops.update_("adamw_", [p_ref], [g], [[m_ref], [v_ref], []], [torch.zeros(())], lr, backend="cpu", **hyper)
    want_m, want_m_scales = int8_blocks.encode(m_ref, int8_blocks.SQRT)
    want_v, want_v_scales = int8_blocks.encode(v_ref, int8_blocks.FOURTH_ROOT)
    assert want_v[1] == 1 and want_v[3] == 0

    p = torch.ones(160, device=device)
    m, v = torch.zeros(160, dtype=torch.int8, device=device), torch.zeros(160, dtype=torch.int8, device=device)
    scales = [torch.zeros(2, device=device) for _ in range(2)]
    ops.update_("adamw_", [p], [g.to(device)], [[m], [v], []], [torch.zeros((), device=device)], lr.to(device),
                backend=backend, state_scales=scales, **hyper)
    for got, want in ((p, p_ref), (m, want_m), (v, want_v), (scales[0], want_m_scales), (scales[1], want_v_scales)):
        assert_bitwise_equal("adamw_ int8", got.cpu(), want)
