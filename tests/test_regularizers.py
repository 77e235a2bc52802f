"""The grad pipeline's regularizers at op level (csrc/ops.cpp, csrc/grad_pipeline.h): AGC's
per-row factors (agc_scales) and Grokfast's EMA filter (grokfast_emas), on all four update
ops (adamw_, sgd_, lion_, lamb_), every backend and dtype, against tests/reference.py.
The pipeline order is 1. unscale and clip, 2. AGC, 3. Grokfast, 4. maximize, then each
optimizer's weight decay and update."""
import math

import pytest
import torch

from catapult_kernels import ops
from conftest import BACKEND_DEVICES, DTYPES
from reference import (adamw_reference, agc_factor_view, assert_bitwise_equal, assert_close_to_reference,
                       grad_multiplier_reference, grad_pipeline_reference, lamb_reference, lion_reference,
                       norm_reference, sgd_reference)

# Every op in the variants that take different paths through the pipeline's consumers.
OPS = ["adamw", "adam", "sgd", "lars", "lion", "lamb"]
FOUR_OPS = ["adamw", "sgd", "lion", "lamb"]
LR = {"adamw": 1e-2, "adam": 1e-2, "sgd": 0.05, "lars": 0.05, "lion": 1e-2, "lamb": 1e-2}
WD = 0.05
BETAS = (0.9, 0.99)
EPS = 1e-8
MOMENTUM, DAMPENING = 0.9, 0.1
MAX_WEIGHT_NORM = 5.0
STATE = {  # the per-param state lists of each op, besides param and grad
    "adamw": ["exp_avg", "exp_avg_sq"], "adam": ["exp_avg", "exp_avg_sq"], "sgd": ["momentum_buffer"],
    "lars": ["momentum_buffer"], "lion": ["exp_avg"], "lamb": ["exp_avg", "exp_avg_sq"],
}
AGC_SHAPES = [(37,), (3, 5), (7, 33, 2), (2, 3, 4, 5), (1, 9), (6, 1), (0, 4), (1,)]


def big_shape(backend, device):
    """A matrix whose rows of 129 cross chunk bounds: 300 x 129 = 38700 elements, more than
    the CPU kernel's chunk of 2^15; 40 x 129 under the (slow) Triton interpreter, whose
    chunks are 1024 elements."""
    return (40, 129) if backend == "triton" and device == "cpu" else (300, 129)


def agc_rows(shape):
    return shape[0] if len(shape) >= 2 else 1


def _rows(p):
    return p.shape[0] if p.dim() >= 2 else 1


def make_state(op, shapes, dtype, device, seed=0, step=3.0):
    """Random params, grads, mid-training state, Grokfast emas, step counts and LARS trust
    ratios for each shape: a dict of lists (trust a tensor)."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda s, f=1.0: (torch.randn(s, generator=gen) * f).to(dtype=dtype, device=device)  # noqa: E731
    st = {"param": [mk(s) for s in shapes], "grad": [mk(s) for s in shapes]}
    for name in STATE[op]:
        st[name] = [mk(s, 0.1).abs() if name == "exp_avg_sq" else mk(s, 0.1) for s in shapes]
    st["ema"] = [mk(s, 0.5) for s in shapes]
    st["step"] = [torch.tensor(step, device=device) for _ in shapes]
    st["trust"] = (torch.rand(len(shapes), generator=gen) * 1.9 + 0.1).to(device)
    return st


def make_agc(params, seed=1):
    """A random factor in (0, 1] per row of each param, float32 on its device."""
    gen = torch.Generator().manual_seed(seed)
    return [(1.0 - torch.rand(_rows(p), generator=gen)).to(p.device) for p in params]


def clone_state(st):
    return {k: ([t.clone() for t in v] if isinstance(v, list) else v.clone()) for k, v in st.items()}


def run(op, backend, st, agc=(), emas=(), alpha=0.98, lamb=2.0, maximize=False, grad_norm=None,
        max_grad_norm=0.0, grad_scale=None, found_inf=None, lr=None):
    p, g = st["param"], st["grad"]
    device = p[0].device if p else torch.device("cpu")
    lr = torch.tensor(LR[op] if lr is None else lr, device=device)
    tail = (grad_norm, max_grad_norm, grad_scale, found_inf)
    kw = dict(agc_scales=agc, grokfast_emas=emas, grokfast_alpha=alpha, grokfast_lamb=lamb, backend=backend)
    if op in ("adamw", "adam"):
        ops.adamw_(p, g, st["exp_avg"], st["exp_avg_sq"], [], st["step"], lr, *BETAS, EPS, WD, False, maximize,
                   *tail, decoupled_weight_decay=op == "adamw", **kw)
    elif op in ("sgd", "lars"):
        ops.sgd_(p, g, st["momentum_buffer"], lr, MOMENTUM, DAMPENING, WD, False, maximize, False, *tail,
                 trust_ratios=st["trust"] if op == "lars" else None, **kw)
    elif op == "lion":
        ops.lion_(p, g, st["exp_avg"], lr, *BETAS, WD, maximize, *tail, **kw)
    else:
        ops.lamb_(p, g, st["exp_avg"], st["exp_avg_sq"], st["step"], lr, *BETAS, EPS, WD, True, MAX_WEIGHT_NORM,
                  maximize, *tail, **kw)


def reference(op, st, i, compute_dtype, mult=1.0, maximize=False, agc=None, ema=None, alpha=0.98, lamb=2.0):
    """The op's reference for tensor i of the state st (CPU tensors): {name: tensor}."""
    t = {k: (v[i].cpu() if isinstance(v, list) else v) for k, v in st.items()}
    kw = dict(agc_scale=agc, ema=ema, grokfast_alpha=alpha, grokfast_lamb=lamb)
    lr = LR[op]
    if op in ("adamw", "adam"):
        out = adamw_reference(t["param"], t["grad"], t["exp_avg"], t["exp_avg_sq"], None, float(t["step"]), lr,
                              *BETAS, EPS, WD, False, maximize, mult, compute_dtype,
                              decoupled_weight_decay=op == "adamw", **kw)
        names = ["param", "exp_avg", "exp_avg_sq", None, "ema"]
    elif op in ("sgd", "lars"):
        trust = float(st["trust"][i]) if op == "lars" else 1.0
        out = sgd_reference(t["param"], t["grad"], t["momentum_buffer"], lr, MOMENTUM, DAMPENING, WD, False,
                            maximize, False, mult, compute_dtype, trust=trust, **kw)
        names = ["param", "momentum_buffer", "ema"]
    elif op == "lion":
        out = lion_reference(t["param"], t["grad"], t["exp_avg"], lr, *BETAS, WD, maximize, mult, compute_dtype, **kw)
        names = ["param", "exp_avg", "ema"]
    else:
        out = lamb_reference(t["param"], t["grad"], t["exp_avg"], t["exp_avg_sq"], float(t["step"]), lr, *BETAS, EPS,
                             WD, True, MAX_WEIGHT_NORM, maximize, mult, compute_dtype, **kw)
        names = ["param", "exp_avg", "exp_avg_sq", "ema"]
    return {n: o for n, o in zip(names, out) if n is not None and o is not None}


def check(op, st, before, mult=1.0, maximize=False, agc=None, emas=None, alpha=0.98, lamb=2.0):
    """Every written tensor of st against the reference from the state before the step."""
    for i in range(len(st["param"])):
        kw = dict(mult=mult, maximize=maximize, agc=None if agc is None else agc[i].cpu(),
                  ema=None if emas is None else before["ema"][i].cpu(), alpha=alpha, lamb=lamb)
        gold = reference(op, before, i, torch.float64, **kw)
        same = reference(op, before, i, torch.float32, **kw)
        for name in gold:
            assert_close_to_reference(f"{op} {name}[{i}]", st[name][i], gold[name], same[name])
    for a, b in zip(st["grad"], before["grad"]):
        assert_bitwise_equal("grad", a, b)
    if emas is None:
        for a, b in zip(st["ema"], before["ema"]):
            assert_bitwise_equal("ema (not passed)", a, b)


def assert_all_unchanged(st, before, extra=()):
    for k in st:
        now, then = st[k], before[k]
        for a, b in (zip(now, then) if isinstance(now, list) else [(now, then)]):
            assert_bitwise_equal(k, a, b)
    for a, b in extra:
        assert_bitwise_equal("regularizer state", a, b)


# ---------------------------------------------------------------------------- AGC


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_agc_matches_reference(backend_device, dtype, op):
    """g = grad * agc_scales[i][row], row the index along dim 0 (one row for 1-D params),
    over params of 1 to 4 dims and rows that do not divide any chunk size."""
    backend, device = backend_device
    shapes = AGC_SHAPES + [big_shape(backend, device)]
    st = make_state(op, shapes, dtype, device)
    agc = make_agc(st["param"])
    before, agc_before = clone_state(st), [a.clone() for a in agc]
    run(op, backend, st, agc=agc)
    check(op, st, before, agc=agc)
    for a, b in zip(agc, agc_before):
        assert_bitwise_equal("agc_scales", a, b)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", FOUR_OPS)
def test_agc_row_factors_are_per_row(backend_device, op):
    """A zero factor on every other row: exactly those rows see no grad (sgd: p moves only
    by weight decay; every op: a row's update does not depend on the other rows' grads)."""
    backend, device = backend_device
    shapes = [big_shape(backend, device), (7, 33, 2)]
    st = make_state(op, shapes, torch.float32, device, seed=5)
    agc = [(torch.arange(_rows(p)) % 2).float().to(device) for p in st["param"]]
    zero_grads = clone_state(st)
    for g in zero_grads["grad"]:
        g.zero_()
    run(op, backend, st, agc=agc)
    run(op, backend, zero_grads, agc=agc)
    for p, p0 in zip(st["param"], zero_grads["param"]):
        # rows with factor 0 saw a zero grad: they match the run with zero grads bit for bit,
        # except through LAMB's per-tensor trust ratio, which mixes the rows
        if op != "lamb":
            assert_bitwise_equal("rows with factor 0", p[0::2], p0[0::2])
        assert (p[1::2] != p0[1::2]).any(), "rows with factor 1 must see their grads"


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", FOUR_OPS)
def test_agc_ones_is_no_agc(backend_device, op):
    """Factors of exactly 1 change nothing, bit for bit (grad * (mult * 1) == grad * mult)."""
    backend, device = backend_device
    shapes = [(257,), (13, 17), (3, 4, 5)]
    results = []
    for agc in (False, True):
        st = make_state(op, shapes, torch.float32, device, seed=9)
        run(op, backend, st, agc=[torch.ones(_rows(p), device=device) for p in st["param"]] if agc else (),
            grad_norm=torch.tensor(30.0, device=device), max_grad_norm=1.0)
        results.append(st)
    assert_all_unchanged(results[1], results[0])


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", FOUR_OPS)
def test_agc_with_permuted_params(backend_device, op):
    """AGC needs each row in one contiguous run, not a contiguous param: dims after the
    first may be permuted (here (4, 6, 5) with strides (30, 1, 6))."""
    backend, device = backend_device
    st = make_state(op, [(4, 5, 6), (9,)], torch.float32, device, seed=6)
    for k in ["param", "grad", "ema"] + STATE[op]:
        st[k][0] = st[k][0].permute(0, 2, 1)
    assert not st["param"][0].is_contiguous()
    agc = make_agc(st["param"])
    before = clone_state(st)
    run(op, backend, st, agc=agc)
    check(op, st, before, agc=agc)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_agc_many_small_matrices(backend_device):
    """Each param reads its own factor table: 200 small matrices in one call."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(8)
    shapes = [tuple(int(x) for x in torch.randint(1, 12, (2,), generator=gen)) for _ in range(200)]
    st = make_state("sgd", shapes, torch.float32, device, seed=8)
    agc = make_agc(st["param"], seed=9)
    before = clone_state(st)
    run("sgd", backend, st, agc=agc)
    check("sgd", st, before, agc=agc)


# ----------------------------------------------------------------------- Grokfast


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", FOUR_OPS)
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_grokfast_alpha_zero_starts_at_the_grad(backend_device, dtype, op, maximize):
    """alpha = 0: the new ema is exactly the pipeline's grad after AGC (and before maximize),
    bit for bit: here grad * agc / 1024 (grad_scale 1024, a power of two, so the order of the
    products cannot matter), rounded once to the dtype."""
    backend, device = backend_device
    shapes = [(37,), (7, 33, 2), big_shape(backend, device)]
    st = make_state(op, shapes, dtype, device, seed=3)
    agc = make_agc(st["param"], seed=4)
    before = clone_state(st)
    st["grad"] = [g * 1024 for g in st["grad"]]  # exact in every dtype
    before["grad"] = [g.clone() for g in st["grad"]]
    scale = torch.tensor(1024.0, device=device)
    run(op, backend, st, agc=agc, emas=st["ema"], alpha=0.0, lamb=2.0, maximize=maximize, grad_scale=scale)
    for i, (e, g, a, p) in enumerate(zip(st["ema"], before["grad"], agc, st["param"])):
        expected = (g.float().cpu() * agc_factor_view(a.cpu(), p)) / 1024.0
        assert_bitwise_equal(f"ema[{i}]", e, expected.to(dtype))
    check(op, st, before, mult=1 / 1024, maximize=maximize, agc=agc, emas=st["ema"], alpha=0.0, lamb=2.0)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_grokfast_matches_reference(backend_device, dtype, op):
    """alpha = 0.98, lamb = 2 (the paper's defaults) from a mid-training ema."""
    backend, device = backend_device
    shapes = [(0,), (1,), (131,), (257, 33), (4099,)]
    st = make_state(op, shapes, dtype, device, seed=2)
    before = clone_state(st)
    run(op, backend, st, emas=st["ema"], alpha=0.98, lamb=2.0)
    check(op, st, before, emas=st["ema"], alpha=0.98, lamb=2.0)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", FOUR_OPS)
def test_grokfast_lamb_zero_only_tracks(backend_device, op):
    """lamb = 0: the update is bit for bit the one without Grokfast (g + 0 * ema == g) while the
    ema still moves toward the grad."""
    backend, device = backend_device
    shapes = [(257,), (13, 17)]
    off = make_state(op, shapes, torch.float32, device, seed=10)
    on = make_state(op, shapes, torch.float32, device, seed=10)
    before = clone_state(on)
    run(op, backend, off, alpha=0.9, lamb=0.0)
    run(op, backend, on, emas=on["ema"], alpha=0.9, lamb=0.0)
    check(op, on, before, emas=on["ema"], alpha=0.9, lamb=0.0)
    for k in ["param"] + STATE[op]:
        for a, b in zip(off[k], on[k]):
            assert_bitwise_equal(k, a, b)
    assert all((a != b).any() for a, b in zip(on["ema"], before["ema"])), "the ema must move"


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", FOUR_OPS)
def test_grokfast_several_steps(backend_device, op):
    """The ema carries over steps: four steps from a zero ema (alpha 0.9) track the reference
    run step after step in float64."""
    backend, device = backend_device
    st = make_state(op, [(129,), (5, 7)], torch.float32, device, seed=13)
    for e in st["ema"]:
        e.zero_()
    gold = {k: ([t.cpu().double() for t in v] if isinstance(v, list) else v.cpu()) for k, v in st.items()}
    gen = torch.Generator().manual_seed(14)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in st["param"]]
        st["grad"] = [g.to(device) for g in grads]
        gold["grad"] = [g.double() for g in grads]
        run(op, backend, st, emas=st["ema"], alpha=0.9, lamb=2.0)
        new = [reference(op, gold, i, torch.float64, ema=gold["ema"][i], alpha=0.9, lamb=2.0)
               for i in range(len(grads))]
        for i, out in enumerate(new):
            for name, t in out.items():
                gold[name][i] = t
    for name in ["param", "ema"] + STATE[op]:
        for i, (a, b) in enumerate(zip(st[name], gold[name])):
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item(),
                                       msg=lambda msg: f"{op} {name}[{i}]: {msg}")


# ------------------------------------------------------------- the whole pipeline


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_full_pipeline(backend_device, dtype, op, maximize=True):
    """Unscale, clip, AGC, Grokfast and maximize together, on every op."""
    backend, device = backend_device
    shapes = [(37,), (3, 5), (7, 33, 2), (2, 3, 4, 5), big_shape(backend, device)]
    st = make_state(op, shapes, dtype, device, seed=4)
    st["grad"] = [g * 256 for g in st["grad"]]
    agc = make_agc(st["param"], seed=5)
    before = clone_state(st)
    norm = torch.tensor(float(norm_reference(st["grad"])[0]), device=device)
    scale = torch.tensor(256.0, device=device)
    run(op, backend, st, agc=agc, emas=st["ema"], alpha=0.9, lamb=1.5, maximize=maximize, grad_norm=norm,
        max_grad_norm=10.0, grad_scale=scale)
    mult = grad_multiplier_reference(norm, 10.0, scale)
    assert mult < 1 / 256 / 2, "the clip must be active"
    check(op, st, before, mult=mult, maximize=maximize, agc=agc, emas=st["ema"], alpha=0.9, lamb=1.5)


def _alternative_pipelines(grad, agc, ema, mult, alpha, lamb):
    """The contract's order and orders it rules out, each as (pipeline grad, new ema) in float64."""
    g = grad.double()
    a = agc.double().reshape(-1, 1)
    e = ema.double()
    out = {"contract": grad_pipeline_reference(grad, mult, agc, ema, alpha, lamb, maximize=True)}
    # Grokfast before unscale/clip and AGC
    e1 = alpha * e + (1 - alpha) * g
    out["grokfast_first"] = (-((g + lamb * e1) * mult * a), e1)
    # AGC after Grokfast
    e2 = alpha * e + (1 - alpha) * g * mult
    out["agc_after_grokfast"] = (-((g * mult + lamb * e2) * a), e2)
    # maximize before Grokfast
    gm = -(g * mult * a)
    e3 = alpha * e + (1 - alpha) * gm
    out["maximize_first"] = (gm + lamb * e3, e3)
    return out


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_pipeline_order(backend_device):
    """Plain SGD with lr 1 from a zero param writes p = -g_pipeline exactly, so the grad the
    pipeline produced can be read off. The inputs are chosen so that every other order of
    clip, AGC, Grokfast and maximize gives a different grad or ema; the kernel must give the
    contract's: clip before AGC before Grokfast before maximize."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(15)
    rows, cols = 6, 11
    grad = torch.randn(rows, cols, generator=gen) * 50
    ema0 = torch.randn(rows, cols, generator=gen)
    agc = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    grad_norm, max_grad_norm, alpha, lamb = 100.0, 2.0, 0.8, 2.0
    mult = grad_multiplier_reference(grad_norm, max_grad_norm, None)
    p, g, ema = torch.zeros(rows, cols, device=device), grad.clone().to(device), ema0.clone().to(device)
    ops.sgd_([p], [g], [], torch.tensor(1.0, device=device), 0.0, 0.0, 0.0, False, True, False,
             torch.tensor(grad_norm, device=device), max_grad_norm, agc_scales=[agc.to(device)], grokfast_emas=[ema],
             grokfast_alpha=alpha, grokfast_lamb=lamb, backend=backend)
    got_g, got_ema = -p.cpu().double(), ema.cpu().double()
    orders = _alternative_pipelines(grad, agc, ema0, mult, alpha, lamb)
    want_g, want_ema = orders.pop("contract")
    torch.testing.assert_close(got_g, want_g, rtol=1e-6, atol=1e-6 * want_g.abs().max().item())
    torch.testing.assert_close(got_ema, want_ema, rtol=1e-6, atol=1e-6 * want_ema.abs().max().item())
    for name, (alt_g, alt_ema) in orders.items():
        differs = max(((alt_g - want_g).abs().max() / want_g.abs().max()).item(),
                      ((alt_ema - want_ema).abs().max() / want_ema.abs().max()).item())
        assert differs > 1e-2, f"the case does not tell the contract's order from {name}"


# ---------------------------------------------------------- found_inf, bad inputs


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("found_inf", [1.0, math.inf])
def test_found_inf_leaves_everything(backend_device, op, found_inf):
    """An overflowed step writes nothing: params, state and the Grokfast emas keep their bits."""
    backend, device = backend_device
    st = make_state(op, [(1000,), (7, 33, 2)], torch.bfloat16, device, seed=16)
    st["grad"][0][3] = math.nan
    agc = make_agc(st["param"])
    before, agc_before = clone_state(st), [a.clone() for a in agc]
    run(op, backend, st, agc=agc, emas=st["ema"], alpha=0.0, maximize=True,
        grad_norm=torch.tensor(5.0, device=device), max_grad_norm=1.0, grad_scale=torch.tensor(4.0, device=device),
        found_inf=torch.tensor(found_inf, device=device))
    assert_all_unchanged(st, before, zip(agc, agc_before))


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", FOUR_OPS)
def test_found_inf_zero_updates_emas(backend_device, op):
    backend, device = backend_device
    st = make_state(op, [(100,), (5, 9)], torch.float32, device, seed=17)
    agc = make_agc(st["param"])
    before = clone_state(st)
    run(op, backend, st, agc=agc, emas=st["ema"], found_inf=torch.tensor(0.0, device=device))
    check(op, st, before, agc=agc, emas=st["ema"])


def _bad_regularizer_cases(st, device):
    """(description, agc_scales, grokfast_emas) that every op must refuse."""
    params, emas = st["param"], st["ema"]
    agc = make_agc(params)
    rows = _rows(params[1])
    cases = [
        ("one agc_scales too few", agc[:1], ()),
        ("one agc_scales too many", agc + [torch.ones(1, device=device)], ()),
        ("agc_scales one row too many", [agc[0], torch.ones(rows + 1, device=device)], ()),
        ("agc_scales one row too few", [agc[0], torch.ones(rows - 1, device=device)], ()),
        ("agc_scales per element", [agc[0], torch.ones(params[1].numel(), device=device)], ()),
        ("agc_scales float64", [agc[0], agc[1].double()], ()),
        ("agc_scales bfloat16", [agc[0], agc[1].to(torch.bfloat16)], ()),
        ("agc_scales like the param's dtype", [agc[0], agc[1].to(torch.float16)], ()),
        ("agc_scales 2-D", [agc[0], agc[1].reshape(rows, 1)], ()),
        ("agc_scales not contiguous", [agc[0], torch.ones(2 * rows, device=device)[::2]], ()),
        ("one grokfast_emas too few", (), emas[:1]),
        ("grokfast_emas of the wrong shape", (), [emas[0], torch.zeros(params[1].numel(), device=device)]),
        ("grokfast_emas transposed", (), [emas[0], emas[1].t().contiguous().t()]),
        ("grokfast_emas float32 beside float16 params", (), [emas[0], emas[1].float()]),
        ("grokfast_emas bfloat16 beside float16 params", (), [emas[0], emas[1].to(torch.bfloat16)]),
        ("both, the emas wrong", agc, [emas[0], emas[1][:-1]]),
    ]
    if device == "cuda":
        cases.append(("agc_scales on the CPU", [agc[0], agc[1].cpu()], ()))
        cases.append(("grokfast_emas on the CPU", (), [emas[0], emas[1].cpu()]))
    return cases


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_bad_regularizer_args_change_nothing(backend_device, op):
    backend, device = backend_device
    st = make_state(op, [(10,), (5, 4)], torch.float16, device, seed=18)
    before = clone_state(st)
    for what, agc, emas in _bad_regularizer_cases(st, device):
        kept = [t.clone() for t in list(agc) + list(emas)]
        with pytest.raises(RuntimeError):
            run(op, backend, st, agc=agc, emas=emas)
            pytest.fail(f"{op} took {what}")
        for a, b in zip(list(agc) + list(emas), kept):
            assert_bitwise_equal(f"{what}: the regularizer state", a, b)
    assert_all_unchanged(st, before)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", FOUR_OPS)
def test_agc_refuses_rows_that_are_not_contiguous(backend_device, op):
    """A transposed 2-D param is dense (fine without AGC) but its rows are strided: AGC
    refuses it and nothing changes; the same call without AGC runs."""
    backend, device = backend_device
    st = make_state(op, [(10,), (5, 7)], torch.float32, device, seed=19)
    for k in ["param", "grad", "ema"] + STATE[op]:
        st[k][1] = st[k][1].t().contiguous().t()  # shape (5, 7), strides (1, 5)
    assert not st["param"][1].is_contiguous()
    agc = make_agc(st["param"])
    before = clone_state(st)
    with pytest.raises(RuntimeError):
        run(op, backend, st, agc=agc, emas=st["ema"])
    assert_all_unchanged(st, before)
    run(op, backend, st, emas=st["ema"])  # without AGC: a dense param, taken
    check(op, st, before, emas=st["ema"])
