"""Python entry points over torch.ops.catapult.*: backend choice (an explicit table of
the kernels of each backend), the update ops' common call (update_, PipelineArgs), and
the global norm over tensors on several devices. What the ops promise (UPDATE_OPS, the
device rule, the fake kernels) is in op_contract.py.

The C++ ops (catapult::multi_tensor_norm, lamb_, and the elementwise update ops each
defined by its spec in csrc/optimizers/) have CPU and CUDA kernels; the Triton twins
(catapult::*_triton_) live in catapult_kernels/triton.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .layout import SUPPORTED_DTYPES
from .op_contract import _C_ERROR, UPDATE_OPS, UpdateOp  # noqa: F401  (UpdateOp: for users of UPDATE_OPS)

BACKENDS = ("auto", "cpu", "cuda", "triton")


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _built_kernels() -> dict:
    if _C_ERROR is not None:
        return {"cpu": False, "cuda": False}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    ops_ = ["catapult::multi_tensor_norm"] + [f"catapult::{name}" for name in UPDATE_OPS]
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
    return kernel("multi_tensor_norm", resolve_backend(backend, device))(tensors, float(ord), per_tensor)


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


def kernel(op: str, backend: str) -> Callable:
    """What runs catapult::<op> on a concrete backend (resolve_backend's answer): the C++ op
    on 'cpu' and 'cuda'; on 'triton' its Triton twin's eager entry point (which is the
    op itself under torch.compile)."""
    if backend == "triton":
        from . import triton as triton_ops  # loaded by resolve_backend
        return triton_ops.KERNELS[op]
    return getattr(torch.ops.catapult, op)


@dataclass(frozen=True)
class PipelineArgs:
    """The grad pipeline's arguments, the tail of every update op (csrc/ops.cpp): the
    global norm to clip by (max_grad_norm > 0) and GradScaler's scale, all read on the
    device; skip: a float32 flag, nonzero = nothing at all is written; AGC row factors
    per param; Grokfast EMAs per param with their alpha and lamb; maximize. The
    defaults switch everything off."""
    grad_norm: Optional[torch.Tensor] = None
    max_grad_norm: float = 0.0
    grad_scale: Optional[torch.Tensor] = None
    skip: Optional[torch.Tensor] = None
    agc_scales: Sequence[torch.Tensor] = ()
    grokfast_emas: Sequence[torch.Tensor] = ()
    grokfast_alpha: float = 0.98
    grokfast_lamb: float = 2.0
    maximize: bool = False

    def args(self) -> tuple:
        """The values in schema order, as the ops take them."""
        return (self.grad_norm, float(self.max_grad_norm), self.grad_scale, self.skip, list(self.agc_scales),
                list(self.grokfast_emas), float(self.grokfast_alpha), float(self.grokfast_lamb),
                bool(self.maximize))


NO_PIPELINE = PipelineArgs()


def update_op(op: str) -> UpdateOp:
    """UPDATE_OPS[op], or an error that says why there is none."""
    if _C_ERROR is not None:
        raise RuntimeError(f"catapult_kernels' C++ extension failed to import ({_C_ERROR}); every backend's "
                           "update ops take their schemas from it. Rebuild with `pip install --no-build-isolation -e .`")
    if op not in UPDATE_OPS:
        raise ValueError(f"unknown update op {op!r}; the update ops are {', '.join(UPDATE_OPS)}")
    return UPDATE_OPS[op]


def update_(op: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            states: Sequence[Sequence[torch.Tensor]], state_steps: Optional[Sequence[torch.Tensor]],
            lr: torch.Tensor, pipeline: PipelineArgs = NO_PIPELINE, backend: str = "auto", *,
            state_scales: Sequence[torch.Tensor] = (), master_weights: Sequence[torch.Tensor] = (),
            **hyper) -> None:
    """One fused step of update op `op` (UPDATE_OPS) in place: states holds one list per
    state list of the op, in its order (an unused one empty); state_steps the step counts
    (None for an op without), which the op advances; hyper the op's own arguments by name.
    The states a call uses and its Grokfast EMAs share one storage dtype, the params' or
    another (float32, bfloat16, float16, int8); with int8, state_scales holds their block
    scales (csrc/state_storage.h). master_weights: per param of 16-bit params, its float32
    copy, int8 correction or stochastic rounding counter (csrc/master_weights.h; the
    reference is master_weights.py). The contract of each op is beside its math
    (csrc/optimizers/<name>.h, csrc/ops.cpp)."""
    spec = update_op(op)
    if len(states) != len(spec.states):
        raise ValueError(f"{op} takes {len(spec.states)} state lists ({', '.join(spec.states)}), got {len(states)}")
    if (state_steps is not None) != spec.has_step:
        raise ValueError(f"{op} takes {'' if spec.has_step else 'no '}state_steps")
    if set(hyper) != set(spec.hyper):
        raise ValueError(f"{op} takes the arguments {', '.join(spec.hyper)}; got {', '.join(hyper) or 'none'}")
    device = params[0].device if params else torch.device("cpu")
    steps = () if state_steps is None else (list(state_steps),)
    storage = (list(state_scales), list(master_weights)) if spec.stored else ()
    if (state_scales or master_weights) and not spec.stored:
        raise ValueError(f"{op} keeps its states in the params' dtype: it takes no state_scales or master_weights")
    if backend == "auto" and device.type == "cuda" and params and (
            master_weights or _stored_otherwise(params[0], states, pipeline)):
        backend = "triton"  # the CUDA kernels walk every list in one dtype and have no master weights
    kernel(op, resolve_backend(backend, device))(
        list(params), list(grads), *(list(s) for s in states), *steps, lr, *(hyper[h] for h in spec.hyper),
        *pipeline.args(), *storage)


def _stored_otherwise(param: torch.Tensor, states: Sequence[Sequence[torch.Tensor]], pipeline: PipelineArgs) -> bool:
    """Whether a call's states (or Grokfast EMAs) are stored in another dtype than its params."""
    first = next((s[0] for s in states if len(s)), None)
    if first is None and len(pipeline.grokfast_emas):
        first = pipeline.grokfast_emas[0]
    return first is not None and first.dtype != param.dtype
