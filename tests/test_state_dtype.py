"""state_dtype: how the optimizers store their state (float32, bfloat16, int8 blocks).

The reference of a run with state_dtype S is the same optimizer with float32 states whose
every state tensor is replaced, after each step, by its stored-and-restored value (bf16:
rounded to bf16; int8: int8_blocks.encode then decode). That is exact: a kernel decodes,
computes in float32 and stores, as a float32 state holding the decoded values does. So the
params match bit for bit, and the stored state is exactly the reference's state stored.
LAMB's states too; its params within lamb_tolerance (its trust ratio is summed otherwise
with other storage). CPU backend; the Triton kernels have their own tests."""
import io
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from catapult_kernels import int8_blocks
from catapult_kernels.optim import ADOPT, LAMB, LARS, SGD, Adam, Adan, AdamW, Lion, Muon, torch_state_dict
from catapult_kernels.optim.state_storage import codec_map
from lamb_tolerance import assert_close_value, ulp, update_tolerance
from optimizer_steps import (assert_same_snapshot, give_grads, make_params, muon_split, run_steps, same_bits,
                             snapshot)

SHAPES = [(1,), (127,), (128,), (129,), (1000,), (33, 40)]  # partial, whole and several blocks; a matrix
STATE_DTYPES = [torch.float32, torch.bfloat16, torch.int8]
PARAM_DTYPES = [torch.float32, torch.bfloat16]
GF = dict(alpha=0.9, lamb=2.0)
STEPS = 5


# Every optimizer, with Grokfast where it takes another path (LARS runs the grad pipeline op
# first; plain SGD keeps the EMA alone; LAMB's two passes read it twice).
OPTIMIZERS = {
    "adamw": lambda ps, **kw: AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "adamw_amsgrad": lambda ps, **kw: AdamW(ps, lr=1e-2, amsgrad=True, **kw),
    "adam": lambda ps, **kw: Adam(ps, lr=1e-2, weight_decay=1e-2, **kw),
    "sgd_momentum": lambda ps, **kw: SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "sgd_nesterov": lambda ps, **kw: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, **kw),
    "lars": lambda ps, **kw: LARS(ps, lr=0.5, weight_decay=1e-3, **kw),
    "lion": lambda ps, **kw: Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
    "adopt": lambda ps, **kw: ADOPT(ps, lr=1e-2, **kw),
    "adan": lambda ps, **kw: Adan(ps, lr=1e-2, **kw),
    "muon": muon_split,
    "adamw_grokfast": lambda ps, **kw: AdamW(ps, lr=1e-2, grokfast=GF, **kw),
    "lars_grokfast": lambda ps, **kw: LARS(ps, lr=0.5, grokfast=GF, **kw),
    "sgd_plain_grokfast": lambda ps, **kw: SGD(ps, lr=0.05, grokfast=GF, **kw),
    "muon_grokfast": lambda ps, **kw: muon_split(ps, grokfast=GF, **kw),
    "lamb": lambda ps, **kw: LAMB(ps, lr=1e-2, weight_decay=0.01, **kw),
    "lamb_grokfast": lambda ps, **kw: LAMB(ps, lr=1e-2, grokfast=GF, max_weight_norm=5.0, **kw),
}


def _params(dtype=torch.float32, seed=0) -> list:
    return make_params(SHAPES, dtype, seed)


def _stored(key: str, value: torch.Tensor, state_dtype: torch.dtype) -> dict:
    """A float32 state as state_dtype stores it: {key: ...} plus its scales for int8."""
    if state_dtype is torch.int8:
        codes, scales = int8_blocks.encode(value, codec_map(key))
        return {key: codes, key + "_scales": scales}
    return {key: value.to(state_dtype)}


def _restored(key: str, value: torch.Tensor, state_dtype: torch.dtype) -> torch.Tensor:
    """A float32 state stored as state_dtype and loaded back, in float32."""
    stored = _stored(key, value, state_dtype)
    if state_dtype is torch.int8:
        return int8_blocks.decode(stored[key], stored[key + "_scales"], codec_map(key))
    return stored[key].float()


# ---- bad values -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [torch.float16, torch.float64, torch.int32, torch.uint8, "float32", "int8", 8],
                         ids=str)
@pytest.mark.parametrize("cls", [AdamW, SGD, Lion, Muon, LAMB], ids=lambda c: c.__name__)
def test_bad_state_dtype_is_refused_naming_it(cls, bad):
    with pytest.raises(ValueError, match=r"state_dtype.*torch\.float32, torch\.bfloat16, torch\.int8"):
        cls([nn.Parameter(torch.randn(4, 3))], state_dtype=bad)


def test_flat_refuses_int8_states():
    with pytest.raises(ValueError, match="flat=True does not take state_dtype=torch.int8"):
        AdamW([nn.Parameter(torch.randn(4, 3))], flat=True, state_dtype=torch.int8)


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flat_takes_float_storage_and_steps_as_per_param(state_dtype, param_dtype):
    """flat=True lays the states out in one buffer of the storage dtype: the same bits as
    per param, with Grokfast's EMA, over steps that make the state flat."""
    flat_params, params = _params(param_dtype), _params(param_dtype)
    flat = AdamW(flat_params, lr=1e-2, grokfast=GF, flat=True, state_dtype=state_dtype, backend="cpu")
    per_param = AdamW(params, lr=1e-2, grokfast=GF, state_dtype=state_dtype, backend="cpu")
    for t in range(4):
        run_steps(flat, flat_params, [t])
        run_steps(per_param, params, [t])
    assert flat._flat_sets and flat._flat_sets[0].state["exp_avg"].dtype is state_dtype  # flat after step 1
    assert_same_snapshot(snapshot(flat, flat_params), snapshot(per_param, params))


def test_state_dtype_survives_copies():
    import copy
    import pickle
    opt = AdamW([nn.Parameter(torch.randn(5))], state_dtype=torch.int8)
    assert copy.deepcopy(opt).state_dtype is torch.int8
    assert pickle.loads(pickle.dumps(opt)).state_dtype is torch.int8


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_dtensor_params_refuse_int8_and_take_float_storage(tmp_path):
    """In a subprocess: a one-rank process group. int8 blocks would not follow the shards:
    refused at construction; bfloat16 storage makes bf16 DTensor states placed like the params."""
    script = textwrap.dedent(f"""
        import os, sys
        import torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor
        from catapult_kernels.optim import AdamW
        dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        try:
            AdamW([p], state_dtype=torch.int8)
            sys.exit("int8 was taken")
        except ValueError as e:
            assert "state_dtype=torch.int8 does not take DTensor params" in str(e), e
        opt = AdamW([p], lr=1e-2, state_dtype=torch.bfloat16)
        p.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
        opt.step()
        m = opt.state[p]["exp_avg"]
        assert isinstance(m, DTensor) and m.dtype is torch.bfloat16 and m.placements == p.placements, m
        dist.destroy_process_group()
        print("OK", flush=True)
        os._exit(0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


# ---- steps against the stored-and-restored reference -------------------------------------
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_steps_match_float32_states_stored_and_restored(name, state_dtype, param_dtype):
    make = OPTIMIZERS[name]
    params, ref_params = _params(param_dtype), _params(param_dtype)
    opt = make(params, backend="cpu", state_dtype=state_dtype)
    ref = make(ref_params, backend="cpu", state_dtype=torch.float32)
    lamb = isinstance(opt, LAMB)
    for t in range(STEPS):
        before = [p.detach().float().clone() for p in params]
        run_steps(opt, params, [t])
        run_steps(ref, ref_params, [t])
        for p, q, was in zip(params, ref_params, before):
            where = f"step {t}: a param of shape {tuple(p.shape)}"
            if lamb:  # its trust ratio is summed otherwise with other storage: as close as that allows
                resolution = ulp(q.detach(), param_dtype) if param_dtype != torch.float32 else 0.0
                assert_close_value(where, p, q, was, update_tolerance("cpu", p.numel()), resolution)
                with torch.no_grad():
                    q.copy_(p)  # the next step from one start
            else:
                assert same_bits(p, q), f"{where} differs"
            state, ref_state = opt.state[p], ref.state[q]
            expected = {}
            for key, value in ref_state.items():
                expected.update({key: value} if key == "step" else _stored(key, value, state_dtype))
            assert state.keys() == expected.keys()
            for key, value in expected.items():
                assert same_bits(state[key], value), f"step {t}: state[{key!r}] of shape {tuple(p.shape)}"
            for key, value in ref_state.items():  # the reference keeps what was stored
                if key != "step":
                    value.copy_(_restored(key, value, state_dtype))


@pytest.mark.parametrize("cls", [AdamW, LAMB], ids=lambda c: c.__name__)
def test_int8_state_layout(cls):
    """Codes laid out like the param, one float32 scale per 128 elements, on its device."""
    params = _params()
    opt = cls(params, lr=1e-2, grokfast=GF, state_dtype=torch.int8)
    run_steps(opt, params, range(1))
    for p in params:
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_scales", "exp_avg_sq", "exp_avg_sq_scales",
                              "grokfast_ema", "grokfast_ema_scales"}
        for key in ("exp_avg", "exp_avg_sq", "grokfast_ema"):
            assert state[key].dtype is torch.int8 and state[key].shape == p.shape
            assert state[key].stride() == p.stride()
            scales = state[key + "_scales"]
            assert scales.dtype is torch.float32 and scales.shape == (math.ceil(p.numel() / 128),)


# ---- state_bytes --------------------------------------------------------------------------
@pytest.mark.parametrize("state_dtype, param_dtype, expected", [
    (None, torch.float32, 8.0), (torch.float32, torch.float32, 8.0), (torch.bfloat16, torch.float32, 4.0),
    (None, torch.bfloat16, 4.0), (torch.float32, torch.bfloat16, 8.0), (torch.int8, torch.float32, 2.0625),
    (torch.int8, torch.bfloat16, 2.0625)], ids=str)
@pytest.mark.parametrize("cls", [AdamW, LAMB], ids=lambda c: c.__name__)
def test_state_bytes_of_adamw_and_lamb(cls, state_dtype, param_dtype, expected):
    params = [nn.Parameter(torch.randn(shape).to(param_dtype)) for shape in [(1280,), (10, 128)]]
    opt = cls(params, state_dtype=state_dtype)
    assert opt.state_bytes() == 0.0  # no state yet
    run_steps(opt, params, range(2))
    assert opt.state_bytes() == expected


def test_state_bytes_counts_partial_blocks_and_only_params_with_state():
    params = _params()
    opt = AdamW(params, state_dtype=torch.int8)
    give_grads(params, 0)
    params[0].grad = None  # no state for it
    opt.step()
    numel = sum(p.numel() for p in params[1:])
    scales = sum(math.ceil(p.numel() / 128) for p in params[1:])
    assert opt.state_bytes() == (2 * numel + 2 * 4 * scales) / numel <= 2.2


# ---- state_dict: saved as stored, loaded as this optimizer stores ------------------------
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", [torch.int8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [AdamW, LAMB], ids=lambda c: c.__name__)
def test_resumed_run_equals_uninterrupted_run(cls, state_dtype, param_dtype):
    make = lambda ps: cls(ps, lr=1e-2, grokfast=GF, state_dtype=state_dtype)  # noqa: E731
    whole_params = _params(param_dtype)
    whole = make(whole_params)
    run_steps(whole, whole_params, range(6))

    first_params = _params(param_dtype)
    first = make(first_params)
    run_steps(first, first_params, range(3))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first_params], "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    state = saved["optimizer"]["state"][0]
    assert state["exp_avg"].dtype is state_dtype and state["grokfast_ema"].dtype is state_dtype
    if state_dtype is torch.int8:
        assert state["exp_avg_scales"].dtype is torch.float32 and state["grokfast_ema_scales"].dtype is torch.float32

    params = [nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = make(params)
    resumed.load_state_dict(saved["optimizer"])
    assert_same_snapshot(snapshot(resumed, params), snapshot(first, first_params))  # kept as stored
    run_steps(resumed, params, range(3, 6))
    assert_same_snapshot(snapshot(resumed, params), snapshot(whole, whole_params))


def _stepped_torch_adamw(params: list) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(params, lr=1e-2)
    run_steps(opt, params, range(3))
    return opt


def test_torch_adamw_state_dict_loads_quantized_into_int8_adamw():
    source = _stepped_torch_adamw(_params())
    params = _params(seed=1)
    opt = AdamW(params, lr=1e-2, state_dtype=torch.int8)
    opt.load_state_dict(source.state_dict())
    for p, q in zip(params, source.param_groups[0]["params"]):
        state, theirs = opt.state[p], source.state[q]
        for key in ("exp_avg", "exp_avg_sq"):
            expected = _stored(key, theirs[key], torch.int8)
            assert same_bits(state[key], expected[key])
            assert same_bits(state[key + "_scales"], expected[key + "_scales"])
        assert float(state["step"]) == float(theirs["step"])
    run_steps(opt, params, [3])  # it steps from there
    assert opt.state[params[0]]["exp_avg"].dtype is torch.int8


def test_torch_state_dict_of_int8_adamw_loads_into_torch_adamw():
    params = _params()
    opt = AdamW(params, lr=1e-2, state_dtype=torch.int8)
    run_steps(opt, params, range(3))
    saved = opt.state_dict()
    converted = torch_state_dict(saved)
    assert set(converted["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert saved["state"][0]["exp_avg"].dtype is torch.int8  # the state_dict given is left as it is
    torch_params = _params(seed=1)
    theirs = torch.optim.AdamW(torch_params, lr=1e-2)
    theirs.load_state_dict(converted)
    for p, q in zip(params, torch_params):
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p]
            decoded = int8_blocks.decode(state[key], state[key + "_scales"], codec_map(key))
            assert same_bits(theirs.state[q][key], decoded)
    run_steps(theirs, torch_params, [3])


def test_torch_state_dict_of_int8_lamb_loads_into_float32_lamb():
    """torch has no LAMB: torch_state_dict's format (float states, no scales) loads into a
    LAMB with float states, the decoded values kept, and it steps on."""
    params = _params()
    opt = LAMB(params, lr=1e-2, state_dtype=torch.int8)
    run_steps(opt, params, range(3))
    converted = torch_state_dict(opt.state_dict())
    assert set(converted["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    plain_params = [nn.Parameter(p.detach().clone()) for p in params]
    plain = LAMB(plain_params, lr=1e-2)
    plain.load_state_dict(converted)
    for p, q in zip(params, plain_params):
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p]
            assert same_bits(plain.state[q][key], int8_blocks.decode(state[key], state[key + "_scales"],
                                                                      codec_map(key)))
    run_steps(plain, plain_params, [3])


@pytest.mark.parametrize("source, target", [(torch.int8, None), (torch.int8, torch.bfloat16),
                                            (torch.bfloat16, torch.int8), (torch.float32, torch.int8),
                                            (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("cls", [AdamW, LAMB], ids=lambda c: c.__name__)
def test_loading_converts_to_this_optimizers_storage(cls, source, target):
    first_params = _params()
    first = cls(first_params, lr=1e-2, grokfast=GF, state_dtype=source)
    run_steps(first, first_params, range(2))
    params = _params()
    opt = cls(params, lr=1e-2, grokfast=GF, state_dtype=target)
    opt.load_state_dict(first.state_dict())
    for p, q in zip(params, first_params):
        state, theirs = opt.state[p], first.state[q]
        for key in ("exp_avg", "exp_avg_sq", "grokfast_ema"):
            value = (int8_blocks.decode(theirs[key], theirs[key + "_scales"], codec_map(key))
                     if source is torch.int8 else theirs[key].float())
            expected = _stored(key, value, target or p.dtype)
            assert (key + "_scales" in state) == (key + "_scales" in expected)
            for k, v in expected.items():
                assert same_bits(state[k], v), k
    run_steps(opt, params, [2])


def test_int8_state_without_its_scales_is_refused_on_load():
    params = _params()
    opt = AdamW(params, state_dtype=torch.int8)
    run_steps(opt, params, range(1))
    saved = opt.state_dict()
    del saved["state"][2]["exp_avg_sq_scales"]
    target = AdamW(_params(), state_dtype=torch.int8)
    with pytest.raises(ValueError, match="'exp_avg_sq_scales' of the int8 'exp_avg_sq' is None"):
        target.load_state_dict(saved)
    assert not target.state


def test_replaced_scales_are_checked_on_the_planned_path():
    """The step plan lists the scales too: a scales tensor replaced between steps is seen."""
    params = _params()
    opt = AdamW(params, state_dtype=torch.int8)
    run_steps(opt, params, range(2))  # the second step ran planned
    opt.state[params[4]]["exp_avg_scales"] = torch.zeros(3)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"state\['exp_avg_scales'\] of a param is \(3,\)"):
        run_steps(opt, params, [2])
    assert_same_snapshot(snapshot(opt, params), before)


# ---- skipped steps --------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["found_inf", "skip_nonfinite"])
@pytest.mark.parametrize("name", ["adamw_grokfast", "sgd_momentum", "muon", "lamb_grokfast"])
def test_skipped_step_leaves_params_codes_and_scales(name, how):
    params = _params()
    opt = OPTIMIZERS[name](params, skip_nonfinite=how == "skip_nonfinite", state_dtype=torch.int8)
    run_steps(opt, params, range(2))
    before = snapshot(opt, params)
    give_grads(params, 2)
    if how == "found_inf":
        opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())
    else:
        params[5].grad[3, 7] = math.inf
    opt.step()
    assert_same_snapshot(snapshot(opt, params), before)
    assert int(opt.skipped_steps) == 1


def test_never_written_int8_state_goes_with_its_scales():
    """A momentum buffer whose only step was skipped is removed, its scales with it: the next
    real step starts it as a fresh optimizer does."""
    params, fresh_params = _params(), _params()
    opt = SGD(params, lr=0.05, momentum=0.9, skip_nonfinite=True, grokfast=GF, state_dtype=torch.int8)
    give_grads(params, 0)
    params[0].grad[0] = math.inf
    opt.step()
    assert not opt.state_dict()["state"]
    assert not any(opt.state.values())
    fresh = SGD(fresh_params, lr=0.05, momentum=0.9, skip_nonfinite=True, grokfast=GF, state_dtype=torch.int8)
    run_steps(opt, params, [1])
    run_steps(fresh, fresh_params, [1])
    assert_same_snapshot(snapshot(opt, params), snapshot(fresh, fresh_params))


def test_backend_cuda_refuses_storage_its_kernels_lack():
    """The CUDA C++ kernels walk every list in the params' dtype: other storage is refused when
    the group enters, not at the first step (backend='auto' sends it to Triton on CUDA)."""
    with pytest.raises(ValueError, match="backend='cuda' does not take state_dtype=torch.int8"):
        AdamW([nn.Parameter(torch.zeros(3))], backend="cuda", state_dtype=torch.int8)
    AdamW([nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], backend="cuda", state_dtype=torch.bfloat16)
