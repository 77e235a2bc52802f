"""--dtype bf16: the params (hence grads and, unless --state-dtype says otherwise, the optimizer
state) in bfloat16. The model is built in float32 from the seed, as always, and its params
rounded to nearest (even) once; every update is stored rounded to nearest by the kernels. As
under --amp, the loss and every metric are computed in float32: the model's float inputs are
cast to bf16 on the way in and its outputs to float32 on the way out (forward hooks, so the
model's state_dict and param groups are those of a float32 run)."""
from __future__ import annotations

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs_in(dtype: torch.dtype):
    def hook(module, args):
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return hook


def _outputs_float32(module, args, out):
    return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def with_param_dtype(model: nn.Module, name: str) -> nn.Module:
    """model with its params in DTYPES[name]; for a dtype other than float32, also the hooks that
    feed it inputs in that dtype and hand back float32 outputs."""
    dtype = DTYPES[name]
    if dtype == torch.float32:
        return model
    model.to(dtype)
    model.register_forward_pre_hook(_inputs_in(dtype))
    model.register_forward_hook(_outputs_float32)
    return model
