"""What every catapult op promises on every backend, and the leaf every backend imports
(besides catapult_kernels.layout): the update ops as their schemas describe them
(UPDATE_OPS, read from the C++ registrations), the one-device rule, and the fake kernels
that torch.compile traces with."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch

try:
    from . import _C  # noqa: F401  (importing it registers the C++ ops)

    _C_ERROR: Optional[BaseException] = None
except ImportError as e:  # not built
    _C_ERROR = e

# The grad pipeline's arguments: the last arguments of every update op (csrc/update_op.h),
# followed in the generic elementwise ones by STORAGE_ARGS (csrc/state_storage.h: the int8
# states' block scales; csrc/master_weights.h: the 16-bit params' master weights).
PIPELINE_ARGS = ("grad_norm", "max_grad_norm", "grad_scale", "skip", "agc_scales", "grokfast_emas",
                 "grokfast_alpha", "grokfast_lamb", "maximize")
STORAGE_ARGS = ("state_scales", "master_weights")


class UpdateOp(NamedTuple):
    """An update op as its schema describes it: its state lists (read and written, in
    order), whether it takes step counts, its own arguments after lr, and whether its
    states may be stored in another dtype than the params' (int8 too) and its params
    carry master weights (STORAGE_ARGS)."""
    name: str
    states: tuple
    has_step: bool
    hyper: tuple
    stored: bool = False


def _update_ops() -> dict:
    """Every update op the C++ extension defines: those whose schema ends with the pipeline."""
    found = {}
    for qualified in torch._C._dispatch_get_all_op_names():
        ns, _, name = qualified.partition("::")
        if ns != "catapult" or name.endswith("_triton_"):
            continue
        names = [a.name for a in getattr(torch.ops.catapult, name).default._schema.arguments]
        stored = tuple(names[-len(STORAGE_ARGS):]) == STORAGE_ARGS
        if stored:
            names = names[:-len(STORAGE_ARGS)]
        if tuple(names[-len(PIPELINE_ARGS):]) != PIPELINE_ARGS:
            continue
        lr = names.index("lr")
        states = tuple(n for n in names[2:lr] if n != "state_steps")
        found[name] = UpdateOp(name, states, "state_steps" in names[2:lr],
                               tuple(names[lr + 1:-len(PIPELINE_ARGS)]), stored)
    return dict(sorted(found.items()))


UPDATE_OPS: dict = _update_ops() if _C_ERROR is None else {}


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
    for _name in UPDATE_OPS:
        torch.library.register_fake(f"catapult::{_name}")(device_checked_fake(_name))
