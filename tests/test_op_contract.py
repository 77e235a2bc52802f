"""The device rule of every catapult op (csrc/multi_tensor_checks.h): all tensor arguments on
one device. A meta tensor among CPU ones sends the whole call to the fake kernel (the
dispatcher ranks Meta above CPU), which must refuse it as the real kernels do, not do nothing
or return empty memory. Checked for each tensor argument of each op, through torch.ops, the
Python wrappers, the CPU kernels reached directly, and under FakeTensorMode; nothing is written."""
import dataclasses
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from catapult_kernels import clip_grad_norm_, ops
from conftest import BACKEND_DEVICES, _triton_ok

# The backends that take the CPU tensors these tests build.
CPU_BACKENDS = [p for p in BACKEND_DEVICES if p.values[0][1] == "cpu"]

SHAPES = [(4, 3), (5,)]  # two params, so that params[1] can differ from params[0]


def _like_params(fill=0.5):
    return [torch.full(s, fill) for s in SHAPES]


def _pipeline():
    """The grad pipeline's arguments (the tail of every update op), every tensor given, skip 0."""
    return dict(grad_norm=torch.tensor(2.0), max_grad_norm=1.0, grad_scale=torch.tensor(1.0),
                skip=torch.tensor(0.0), agc_scales=[torch.ones(4), torch.ones(1)],
                grokfast_emas=_like_params(0.1), grokfast_alpha=0.98, grokfast_lamb=2.0, maximize=False)


def _args(op: str) -> dict:
    """Every argument of catapult::<op> by name, every optional tensor given, skip 0:
    on CPU tensors the op would write. States in the params' dtype: no state_scales, no master_weights."""
    args = _own_args(op)
    if op in ops.UPDATE_OPS and ops.UPDATE_OPS[op].stored:
        args["state_scales"] = []
        args["master_weights"] = []
    return args


def _own_args(op: str) -> dict:
    steps = lambda: [torch.tensor(1.0) for _ in SHAPES]  # noqa: E731
    common = dict(params=_like_params(), grads=_like_params(0.25), lr=torch.tensor(0.1), **_pipeline())
    if op == "adamw_":
        return dict(common, exp_avgs=_like_params(0.1), exp_avg_sqs=_like_params(0.1),
                    max_exp_avg_sqs=_like_params(0.1), state_steps=steps(), beta1=0.9, beta2=0.99, eps=1e-8,
                    weight_decay=0.01, decoupled_weight_decay=True, amsgrad=True)
    if op == "sgd_":
        return dict(common, momentum_buffers=_like_params(0.1), momentum=0.9, dampening=0.0, weight_decay=0.01,
                    nesterov=False, first_step=False, trust_ratios=torch.ones(len(SHAPES)))
    if op == "lion_":
        return dict(common, exp_avgs=_like_params(0.1), beta1=0.9, beta2=0.99, weight_decay=0.01)
    if op == "lamb_":
        return dict(common, exp_avgs=_like_params(0.1), exp_avg_sqs=_like_params(0.1), state_steps=steps(),
                    beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01, bias_correction=True, max_weight_norm=0.0)
    if op == "adopt_":
        return dict(common, exp_avgs=_like_params(0.1), exp_avg_sqs=_like_params(0.1), state_steps=steps(),
                    beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01)
    if op == "adan_":
        return dict(common, exp_avgs=_like_params(0.1), exp_avg_diffs=_like_params(0.1),
                    exp_avg_sqs=_like_params(0.1), pre_grads=_like_params(0.2), state_steps=steps(), beta1=0.98,
                    beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.02, no_prox=False)
    if op == "grad_pipeline_":
        return dict(out=common.pop("params"), **common)
    assert op == "multi_tensor_norm"
    return dict(tensors=_like_params(), ord=2.0, per_tensor=True)


UPDATE_OPS = ["adamw_", "sgd_", "lion_", "lamb_", "adopt_", "adan_", "grad_pipeline_"]
OPS = UPDATE_OPS + ["multi_tensor_norm"]


def _update(op: str, a: dict, backend: str) -> None:
    """catapult::<op> through ops.update_, from its arguments by name."""
    spec = ops.UPDATE_OPS[op]
    first = "out" if op == "grad_pipeline_" else "params"
    pipeline = ops.PipelineArgs(**{f.name: a[f.name] for f in dataclasses.fields(ops.PipelineArgs)})
    ops.update_(op, a[first], a["grads"], [a[s] for s in spec.states], a.get("state_steps"), a["lr"],
                pipeline=pipeline, backend=backend, **{h: a[h] for h in spec.hyper})


def _tensor_slots(args: dict) -> list:
    """(label, name, index or None) of every tensor argument: each scalar tensor, and the last
    entry of each list (entry 0 of params or tensors is the device every other must match)."""
    slots = []
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            slots.append((name, name, None))
        elif isinstance(value, list) and value:
            slots.append((f"{name}[{len(value) - 1}]", name, len(value) - 1))
    return slots


def _cases():
    return [pytest.param(op, slot, id=f"{op}-{slot[0]}") for op in OPS for slot in _tensor_slots(_args(op))]


def _with_meta(args: dict, name: str, index) -> dict:
    """args with one tensor argument replaced by a meta tensor of its shape and dtype."""
    args = dict(args)
    if index is None:
        args[name] = torch.empty_like(args[name], device="meta")
    else:
        args[name] = list(args[name])
        args[name][index] = torch.empty_like(args[name][index], device="meta")
    return args


def _cpu_tensors(args: dict) -> list:
    out = []
    for value in args.values():
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                out.append(t)
    return out


def _refused(call, args: dict, label: str) -> None:
    """call(args) raises a RuntimeError naming label and meta, and changes no CPU tensor."""
    before = [t.clone() for t in _cpu_tensors(args)]
    with pytest.raises(RuntimeError, match=rf"{re.escape(label)} is on meta|is on meta.*{re.escape(label)}|"
                                           rf"{re.escape(label)} is on cpu but \S+ is on meta"):
        call(args)
    for t, b in zip(_cpu_tensors(args), before):
        assert torch.equal(t, b), "a refused call wrote"


def _triton_op(op: str) -> str:
    return "multi_tensor_norm_triton" if op == "multi_tensor_norm" else op.rstrip("_") + "_triton_"


@pytest.mark.parametrize("op, slot", _cases())
def test_meta_among_cpu_refused_by_the_op(op, slot):
    label, name, index = slot
    args = _with_meta(_args(op), name, index)
    _refused(lambda a: getattr(torch.ops.catapult, op)(**a), args, label)


@pytest.mark.parametrize("op, slot", _cases())
def test_meta_among_cpu_refused_by_the_cpu_kernel(op, slot):
    """The CPU kernel itself, reached past the dispatcher's choice of the fake one."""
    label, name, index = slot
    args = _with_meta(_args(op), name, index)
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    _refused(lambda a: getattr(torch.ops.catapult, op).default.redispatch(cpu, **a), args, label)


@pytest.mark.parametrize("op, slot", _cases() if _triton_ok() else [])
def test_meta_among_cpu_refused_by_the_triton_op(op, slot):
    """The fake kernel refuses before anything runs: no interpreter needed."""
    label, name, index = slot
    args = _with_meta(_args(op), name, index)
    _refused(lambda a: getattr(torch.ops.catapult, _triton_op(op))(**a), args, label)


@pytest.mark.parametrize("backend_device", CPU_BACKENDS)
@pytest.mark.parametrize("op, slot", _cases())
def test_meta_among_cpu_refused_by_the_wrapper(backend_device, op, slot):
    backend, _ = backend_device
    label, name, index = slot
    args = _with_meta(_args(op), name, index)
    if op == "multi_tensor_norm":
        call = lambda a: ops.multi_tensor_norm(a["tensors"], a["ord"], a["per_tensor"], backend=backend)  # noqa: E731
    else:
        call = lambda a: _update(op, a, backend)  # noqa: E731
    _refused(call, args, label)


@pytest.mark.parametrize("op", OPS)
def test_meta_params_refused_when_the_rest_is_cpu(op):
    """params[0] (out[0], tensors[0]) on meta: then the CPU tensors are the odd ones."""
    args = _args(op)
    first = next(iter(args))
    args = _with_meta(args, first, 0)
    before = [t.clone() for t in _cpu_tensors(args)]
    with pytest.raises(RuntimeError, match=r"is on cpu but \S+ is on meta"):
        getattr(torch.ops.catapult, op)(**args)
    assert all(torch.equal(t, b) for t, b in zip(_cpu_tensors(args), before))


@pytest.mark.parametrize("op", UPDATE_OPS)
def test_all_meta_is_fine(op):
    """Every tensor on meta (shape propagation, deferred init): the fake kernel runs."""
    args = _args(op)
    meta = {k: ([torch.empty_like(t, device="meta") for t in v] if isinstance(v, list)
                else torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v)
            for k, v in args.items()}
    getattr(torch.ops.catapult, op)(**meta)
    total, per = torch.ops.catapult.multi_tensor_norm([torch.empty(3, device="meta")], 2.0, True)
    assert total.device.type == "meta" and per.shape == (1,)


def test_fake_tensor_mode_refuses_mixed_devices():
    """Under FakeTensorMode (torch.compile's tracing) a fake meta lr beside fake CPU params
    is refused by the fake kernel, as the real kernel would refuse it at run time."""
    args = _args("adamw_")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: ([mode.from_tensor(t) for t in v] if isinstance(v, list)
                    else mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        torch.ops.catapult.adamw_(**fake)  # all CPU: fine
        fake["lr"] = torch.empty((), device="meta")
        with pytest.raises(RuntimeError, match="lr is on meta but params"):
            torch.ops.catapult.adamw_(**fake)


def test_global_norm_refuses_meta_among_real_tensors():
    """global_norm takes tensors on several devices (one fused op per device), but a meta
    tensor has no data to add: refused before any grad is scaled."""
    real = [torch.ones(3), torch.ones(2)]
    with pytest.raises(RuntimeError, match="meta .*mixed with tensors on cpu"):
        ops.global_norm(real + [torch.ones(4, device="meta")])
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4, device="meta"))]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="meta"):
        clip_grad_norm_(params, 0.1)
    assert torch.equal(params[0].grad, torch.ones(3))
