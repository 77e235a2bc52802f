"""Python entry points over torch.ops.catapult.*: backend choice, fake kernels,
and the global norm over tensors on several devices.

The C++ ops (catapult::multi_tensor_norm and the update ops adamw_, sgd_, lion_,
lamb_) have CPU and CUDA kernels in csrc/; the Triton ops (catapult::*_triton) live in catapult_kernels/triton.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import torch

try:
    from . import _C  # noqa: F401  (importing it registers the C++ ops)

    _C_ERROR: Optional[BaseException] = None
except ImportError as e:  # not built: the Triton ops may still work
    _C_ERROR = e

BACKENDS = ("auto", "cpu", "cuda", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels take


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its numel() elements fill [data_ptr, data_ptr + numel)."""
    if t.is_contiguous() or t.numel() <= 1:
        return True
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, and strides that agree on every dim of size > 1 (a size-1 dim's stride
    is arbitrary), so both walk their memory in the same order."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _built_kernels() -> dict:
    if _C_ERROR is not None:
        return {"cpu": False, "cuda": False}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    ops_ = ("catapult::multi_tensor_norm", "catapult::adamw_", "catapult::sgd_", "catapult::lion_",
            "catapult::lamb_")
    return {d: all(has(op, d.upper()) for op in ops_) for d in ("cpu", "cuda")}


# Read once at import: torch.compile cannot trace the dispatcher query inside a step.
_BUILT = _built_kernels()


def has_cpp_kernels(device_type: str) -> bool:
    """Whether the C++ extension was built with kernels for this device type."""
    return _BUILT.get(device_type, False)


def _load_triton() -> None:
    try:
        from . import triton as _  # noqa: F401  (registers the catapult::*_triton ops)
    except ImportError as e:
        raise RuntimeError(f"backend='triton' needs the triton package: {e}") from e


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ('cpu', 'cuda' or 'triton') for tensors on `device`."""
    check_backend_name(backend)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"catapult_kernels runs on CPU and CUDA tensors, not on {device}")
    if backend == "auto":
        if device.type == "cpu":
            backend = "cpu"
        else:
            backend = "cuda" if has_cpp_kernels("cuda") else "triton"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors")
        if not has_cpp_kernels(backend):
            why = f"the extension failed to import: {_C_ERROR}" if _C_ERROR else "it was built without them"
            raise RuntimeError(f"catapult_kernels has no {backend.upper()} C++ kernels: {why}. "
                               "Rebuild with `pip install --no-build-isolation -e .`")
        return backend
    _load_triton()
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before importing triton")
    return "triton"


def multi_tensor_norm(tensors: Sequence[torch.Tensor], ord: float = 2.0, per_tensor: bool = False,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(norm of all tensors together, per-tensor norms or an empty tensor), float32,
    for tensors on one device. ord is 2 or inf."""
    tensors = list(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    if resolve_backend(backend, device) == "triton":
        from .triton.multi_tensor_norm import multi_tensor_norm_triton_eager
        return multi_tensor_norm_triton_eager(tensors, float(ord), per_tensor)
    return torch.ops.catapult.multi_tensor_norm(tensors, float(ord), per_tensor)


def global_norm(tensors: Sequence[torch.Tensor], ord: float = 2.0, backend: str = "auto") -> torch.Tensor:
    """The ord-norm of all tensors taken together, on the first tensor's device: float32, or
    float64 when some tensor is float64. As torch's clip_grad_norm_ defines it, the ord-norm
    of the per-tensor norms (the same thing for ord > 0; for ord 0, the count of nonzero
    tensors). ord 2 and inf over float32/bfloat16/float16 tensors run as one fused op per
    device (finite whenever the tensors are and the norm fits a float32); other ords and
    dtypes fall back to torch's per-tensor norms, computed in float32 at least."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    ord = float(ord)
    first = tensors[0].device
    fusable = ord in (2.0, math.inf)
    groups: dict[tuple[torch.device, bool], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, fusable and t.dtype in SUPPORTED_DTYPES), []).append(t)
    devices = {device for device, _ in groups}
    if len(devices) > 1 and any(d.type == "meta" for d in devices):
        raise RuntimeError(f"catapult: global_norm: tensors on meta (no data) mixed with tensors on "
                           f"{', '.join(str(d) for d in devices if d.type != 'meta')}")
    norms = []
    for (_, fused), ts in groups.items():
        if fused:
            norms.append(multi_tensor_norm(ts, ord, False, backend)[0])
        else:
            norms += [torch.linalg.vector_norm(t, ord, dtype=torch.promote_types(t.dtype, torch.float32)) for t in ts]
    if len(groups) == 1 and next(iter(groups))[1]:
        return norms[0]  # one fused op: its norm is the total
    # In float64, so that combining float32 norms cannot overflow (torch's norms square in float32).
    total = torch.linalg.vector_norm(torch.stack([n.to(first, torch.float64) for n in norms]), ord)
    return total.to(torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32)


# The regularizer arguments every update op ends with (csrc/ops.cpp: the grad pipeline).
def _tail(grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas, grokfast_alpha,
          grokfast_lamb) -> tuple:
    return (grad_norm, float(max_grad_norm), grad_scale, found_inf, list(agc_scales), list(grokfast_emas),
            float(grokfast_alpha), float(grokfast_lamb))


def _update_op(name: str, params, backend: str):
    """torch.ops.catapult.<name>, or for the Triton backend its eager entry point (which
    is the op itself under torch.compile)."""
    device = params[0].device if params else torch.device("cpu")
    if resolve_backend(backend, device) == "triton":
        from . import triton as triton_ops  # loaded by resolve_backend
        base = name.rstrip("_")
        return getattr(getattr(triton_ops, base), f"{base}_triton_eager")
    return getattr(torch.ops.catapult, name)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr: torch.Tensor,
           beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
           grad_norm: Optional[torch.Tensor] = None, max_grad_norm: float = 0.0,
           grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None, *,
           decoupled_weight_decay: bool = True, agc_scales=(), grokfast_emas=(), grokfast_alpha: float = 0.98,
           grokfast_lamb: float = 2.0, backend: str = "auto") -> None:
    """One fused Adam/AdamW step in place; see csrc/ops.cpp for the contract."""
    _update_op("adamw_", params, backend)(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
        decoupled_weight_decay, amsgrad, maximize,
        *_tail(grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas, grokfast_alpha,
               grokfast_lamb))


def sgd_(params, grads, momentum_buffers, lr: torch.Tensor, momentum: float, dampening: float,
         weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
         grad_norm: Optional[torch.Tensor] = None, max_grad_norm: float = 0.0,
         grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None, *,
         trust_ratios: Optional[torch.Tensor] = None, agc_scales=(), grokfast_emas=(),
         grokfast_alpha: float = 0.98, grokfast_lamb: float = 2.0, backend: str = "auto") -> None:
    """One fused SGD (or LARS, with trust_ratios) step in place; see csrc/ops.cpp for the contract."""
    _update_op("sgd_", params, backend)(
        params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
        trust_ratios,
        *_tail(grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas, grokfast_alpha,
               grokfast_lamb))


def lion_(params, grads, exp_avgs, lr: torch.Tensor, beta1: float, beta2: float, weight_decay: float,
          maximize: bool, grad_norm: Optional[torch.Tensor] = None, max_grad_norm: float = 0.0,
          grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None, *,
          agc_scales=(), grokfast_emas=(), grokfast_alpha: float = 0.98, grokfast_lamb: float = 2.0,
          backend: str = "auto") -> None:
    """One fused Lion step in place; see csrc/ops.cpp for the contract."""
    _update_op("lion_", params, backend)(
        params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize,
        *_tail(grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas, grokfast_alpha,
               grokfast_lamb))


def lamb_(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr: torch.Tensor, beta1: float, beta2: float,
          eps: float, weight_decay: float, bias_correction: bool, max_weight_norm: float, maximize: bool,
          grad_norm: Optional[torch.Tensor] = None, max_grad_norm: float = 0.0,
          grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None, *,
          agc_scales=(), grokfast_emas=(), grokfast_alpha: float = 0.98, grokfast_lamb: float = 2.0,
          backend: str = "auto") -> None:
    """One fused LAMB step (two passes) in place; see csrc/ops.cpp for the contract."""
    _update_op("lamb_", params, backend)(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay, bias_correction,
        max_weight_norm, maximize,
        *_tail(grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas, grokfast_alpha,
               grokfast_lamb))


def check_one_device(op: str, args: Sequence, kwargs: Optional[dict] = None) -> None:
    """The device rule of every catapult op (csrc/multi_tensor_checks.h): each tensor argument,
    listed or not, is on the device of the first (params[0], or lr when there are no params;
    tensors[0] for the norm). The fake kernels check it too: a meta tensor among real ones sends
    the whole call to them (the dispatcher ranks Meta above CPU and CUDA), where doing nothing or
    returning empty memory would hide the mistake."""
    names = [a.name for a in getattr(torch.ops.catapult, op).default._schema.arguments]
    values = dict(zip(names, args), **(kwargs or {}))
    first = None
    for name in names:
        value = values.get(name)
        listed = isinstance(value, (list, tuple))
        for i, t in enumerate(value if listed else [value]):
            if not isinstance(t, torch.Tensor):
                continue
            label = f"{name}[{i}]" if listed else name
            if first is None:
                first = (label, t.device)
            elif t.device != first[1]:
                raise RuntimeError(f"catapult: {op}: {label} is on {t.device} but {first[0]} is on {first[1]} "
                                   "(every tensor argument must be on one device)")


def device_checked_fake(op: str, outputs: Callable = lambda *args: None) -> Callable:
    """A fake kernel for catapult::<op>: check_one_device, then outputs(*args), the outputs'
    shapes and dtypes (None: the update ops return nothing)."""
    def fake(*args, **kwargs):
        check_one_device(op, args, kwargs)
        return outputs(*args, **kwargs)
    return fake


def norm_fake_outputs(tensors, ord, per_tensor):
    """multi_tensor_norm's outputs without data: (total, per-tensor norms or empty), float32."""
    like = tensors[0] if tensors else torch.empty(0)
    return (like.new_empty((), dtype=torch.float32),
            like.new_empty((len(tensors) if per_tensor else 0,), dtype=torch.float32))


if _C_ERROR is None:
    torch.library.register_fake("catapult::multi_tensor_norm")(
        device_checked_fake("multi_tensor_norm", norm_fake_outputs))
    for _name in ("adamw_", "sgd_", "lion_", "lamb_"):
        torch.library.register_fake(f"catapult::{_name}")(device_checked_fake(_name))
