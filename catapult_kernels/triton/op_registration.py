"""The Triton twin of a C++ update op, registered once by one helper.

An update op is a C++ op whose schema ends with the grad pipeline's 9 arguments
(kPipelineSchema, csrc/update_op.h; ``GradPipeline`` here), then the storage arguments
op_contract.STORAGE_ARGS: the int8 storage's block scales (kStorageSchema,
csrc/state_storage.h) and the params' master weights (kMasterSchema, csrc/master_weights.h):

    <name>(Tensor(a!)[] params, Tensor[] grads, <Tensor(x!)[] state>..., [Tensor(s!)[] state_steps,]
           Tensor lr, <its own arguments>, <the grad pipeline>[, Tensor(y!)[] state_scales,
           Tensor(w!)[] master_weights]) -> ()

``register_update_op(name, body)`` registers catapult::<base>_triton_ (``adamw_`` ->
``adamw_triton_``) as a torch.library.triton_op with the C++ op's schema (its name
replaced), mutating what the schema's alias annotations say, with a fake kernel that
checks the devices (ops.device_checked_fake), kept whole under torch.compile's
functionalization (multi_tensor_table.keep_whole_under_functionalization), and
returns its eager entry point: the same call without the dispatcher's Python layers
(microseconds per tensor), which falls back to the op under torch.compile, a dispatch
mode, tensor subclasses or autograd, so it is always safe to call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.library import triton_op

from ..op_contract import STORAGE_ARGS, device_checked_fake
from .kernel_common import GradPipeline
from .multi_tensor_table import can_bypass_dispatcher, keep_whole_under_functionalization, set_wrap_triton_enabled

__all__ = ["UpdateSchema", "update_schema", "register_update_op"]


@dataclass(frozen=True)
class UpdateSchema:
    """An update op's schema, read by argument position."""

    name: str                     # the C++ op, e.g. "adamw_"
    triton_name: str              # its Triton twin, "adamw_triton_"
    signature: str                # the schema without the name: "(Tensor(a!)[] params, ...) -> ()"
    first: str                    # the name of the list written (argument 0): "params", grad_pipeline_'s "out"
    states: tuple[str, ...]       # the state lists, in order (arguments 2, 3, ...)
    has_step: bool                # state_steps right before lr
    lr_index: int
    hyper: tuple[str, ...]        # the op's own arguments, between lr and the grad pipeline
    storage_args: tuple[str, ...]  # after the grad pipeline: STORAGE_ARGS, or none (an op without)
    mutated: tuple[str, ...]      # the arguments its alias annotations say it writes
    mutated_lists: tuple[int, ...]   # their positions (all are lists)
    tensor_lists: tuple[int, ...]    # positions of the Tensor[] arguments
    tensors: tuple[int, ...]         # positions of the Tensor and Tensor? arguments


def update_schema(schema: torch.FunctionSchema) -> Optional[UpdateSchema]:
    """The UpdateSchema of a C++ op's schema, or None when it is not an update op's."""
    args = schema.arguments
    names = [a.name for a in args]
    stored = len(names) >= len(STORAGE_ARGS) and tuple(names[-len(STORAGE_ARGS):]) == STORAGE_ARGS
    end = len(names) - len(STORAGE_ARGS) * stored  # where the grad pipeline ends
    if tuple(names[end - len(GradPipeline._fields):end]) != GradPipeline._fields or "lr" not in names[2:]:
        return None
    lr = names.index("lr")
    has_step = names[lr - 1] == "state_steps"
    name = schema.name.split("::")[-1]
    text = str(schema)
    kinds = [str(a.type) for a in args]
    mutated = [i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]
    return UpdateSchema(
        name=name, triton_name=name.rstrip("_") + "_triton_", signature=text[text.index("("):], first=names[0],
        states=tuple(names[2:lr - has_step]), has_step=has_step, lr_index=lr,
        hyper=tuple(names[lr + 1:end - len(GradPipeline._fields)]), storage_args=STORAGE_ARGS if stored else (),
        mutated=tuple(names[i] for i in mutated), mutated_lists=tuple(mutated),
        tensor_lists=tuple(i for i, k in enumerate(kinds) if k == "List[Tensor]"),
        tensors=tuple(i for i, k in enumerate(kinds) if k in ("Tensor", "Optional[Tensor]")))


def register_update_op(name: str, body: Callable, namespace: str = "catapult") -> Callable:
    """Registers <namespace>::<base>_triton_, the Triton twin of the update op ``name``,
    with ``body(*args)`` (the op's arguments by schema position) as its implementation;
    returns its eager entry point (module docstring)."""
    schema = update_schema(getattr(getattr(torch.ops, namespace), name).default._schema)
    if schema is None:
        raise RuntimeError(f"catapult: {namespace}::{name} is not an update op (its schema does not end with the "
                           f"grad pipeline's arguments {', '.join(GradPipeline._fields)}"
                           f"[, {', '.join(STORAGE_ARGS)}])")
    op = triton_op(f"{namespace}::{schema.triton_name}", mutates_args=schema.mutated,
                   schema=schema.signature)(body)
    op.register_fake(device_checked_fake(schema.triton_name))
    keep_whole_under_functionalization(op)
    dispatched = getattr(getattr(torch.ops, namespace), schema.triton_name)

    def eager(*args) -> None:
        sample = [t for i in schema.tensor_lists for t in args[i][:1]]
        sample += [args[i] for i in schema.tensors if args[i] is not None]
        if not can_bypass_dispatcher(sample):
            return dispatched(*args)
        with set_wrap_triton_enabled(False):  # launch the kernels directly, as the op's backend does
            body(*args)
        # what the dispatcher would do for the mutated lists, in one C++ call
        torch._C._increment_version([t for i in schema.mutated_lists for t in args[i]])

    eager.__name__ = f"{schema.triton_name}eager"
    eager.__doc__ = (f"torch.ops.{namespace}.{schema.triton_name} without the dispatcher, for eager steps "
                     "(catapult_kernels/triton/op_registration.py); same arguments and effect.")
    return eager
