"""The flat layout (flat=True): the params of a group with one (device, dtype) in one buffer.

A step over thousands of small tensors is bound by the host: the dispatcher converts every
list of tensors element by element, and the optimizer reads each one. apex, DeepSpeed and
Megatron place a model's params in one contiguous buffer instead; so does this opt-in. A
`FlatSet` is such a set: each param's data becomes a view of one flat param buffer and its
grad a view of one flat grad buffer (autograd accumulates into an existing grad in place,
so backward writes the flat buffer). Once every param of the set has its state, each state
tensor becomes a view of one flat buffer per key, and each step count an element of one
float32 vector. A step over the set is then one kernel call over one buffer per list; the
step counts of the other params follow the first one's (one copy). The state stays per
param (views), so state_dict() is torch's.

A set is eligible per param: a dense param (its elements fill one block, any strides) that
requires grad; a view is laid out like its param. The optimizer (base.py) decides each step
whether a set runs flat; else its params take the per-param path, which reads the views
like any tensors.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from operator import attrgetter, is_
from typing import Optional

import torch

from ..layout import SUPPORTED_DTYPES, is_dense

GRAD = attrgetter("grad")
DATA_PTR = torch.Tensor.data_ptr


def flattenable(p: torch.Tensor) -> bool:
    """Whether p can live in a flat buffer: a plain dense tensor that training updates
    (a frozen param keeps no grad, and torch skips it)."""
    return (p.requires_grad and type(p.data) is torch.Tensor and p.layout is torch.strided
            and p.dtype in SUPPORTED_DTYPES and p.device.type != "meta" and is_dense(p))


@dataclass
class FlatSet:
    """Params of one group with one device and dtype, laid out in one buffer."""
    group_index: int
    indices: list      # the params' indices in their group
    params: list
    offsets: list      # per param: where its elements start in the buffers
    param: torch.Tensor  # the flat param buffer: each param's data is a view of it
    grad: torch.Tensor   # the flat grad buffer: each param's grad is a view of it
    grads: list          # per param: its grad view
    ptrs: list           # per param: its data's address (a `p.data = x` moves it out)
    state: dict = field(default_factory=dict)  # state key -> flat buffer, while `state_keys` is set
    steps: Optional[torch.Tensor] = None  # per param its step count (state["step"] are views of it)
    state_keys: Optional[tuple] = None  # the keys that `state` (and `steps`) hold; None: per param
    bucket: object = None  # the step's Bucket over the buffers, while `state_keys` is set
    diverged: bool = False  # the params' step counts differ: per param until a load_state_dict

    @property
    def slots(self) -> list:
        return [(self.group_index, i) for i in self.indices]

    def views(self, flat: torch.Tensor) -> list:
        """Per param: its view of a buffer laid out like `param`."""
        return [flat.as_strided(p.shape, p.stride(), off) for p, off in zip(self.params, self.offsets)]

    def in_place(self) -> bool:
        """Whether every param's data is still its view of the buffer."""
        return list(map(DATA_PTR, self.params)) == self.ptrs

    def take_grads(self) -> bool:
        """Whether every grad is its view, after copying in any grad that replaced its view
        (a `model.zero_grad()` that set it to None, then backward) and putting the view back.
        False, leaving everything as it is, where a grad is missing or does not fit its view:
        the per-param path then takes the set (and names what is wrong)."""
        grads = list(map(GRAD, self.params))
        if all(map(is_, grads, self.grads)):
            return True
        moved = [i for i, (g, v) in enumerate(zip(grads, self.grads)) if g is not v]
        if not all(grads[i] is not None and _fits(grads[i], self.grads[i]) for i in moved):
            return False
        torch._foreach_copy_([self.grads[i] for i in moved], [grads[i] for i in moved])
        for i in moved:
            self.params[i].grad = self.grads[i]
        return True

    def zero_grads(self) -> None:
        """Zero the grad buffer, and give back its view to any param whose grad replaced it."""
        self.grad.zero_()
        grads = list(map(GRAD, self.params))
        if not all(map(is_, grads, self.grads)):
            for p, g, v in zip(self.params, grads, self.grads):
                if g is not v:
                    p.grad = v

    def spread_step(self) -> None:
        """After a flat step, which counted the first param's step: the others' counts follow."""
        if self.steps is not None and len(self.params) > 1:
            self.steps[1:].copy_(self.steps[0])


def flatten(group_index: int, group: dict) -> list[FlatSet]:
    """Lay out the flattenable params of a group in one buffer per (device, dtype): their data
    and any grads are copied in, and each param's data and grad become views."""
    by_key: dict = {}
    for i, p in enumerate(group["params"]):
        if flattenable(p):
            by_key.setdefault((p.device, p.dtype), []).append(i)
    sets = []
    for (device, dtype), indices in by_key.items():
        params = [group["params"][i] for i in indices]
        sizes = [p.numel() for p in params]
        offsets = list(itertools.accumulate([0] + sizes[:-1]))
        total = sum(sizes)
        flat = FlatSet(group_index, indices, params, offsets, torch.empty(total, dtype=dtype, device=device),
                       torch.zeros(total, dtype=dtype, device=device), [], [])
        datas = flat.views(flat.param)
        flat.grads = flat.views(flat.grad)
        with torch.no_grad():
            torch._foreach_copy_(datas, [p.detach() for p in params])
            given = [(v, p.grad) for p, v in zip(params, flat.grads) if p.grad is not None and _fits(p.grad, v)]
            if given:
                torch._foreach_copy_([v for v, _ in given], [g for _, g in given])
        for p, data, view in zip(params, datas, flat.grads):
            p.data = data
            if p.grad is None or _fits(p.grad, view):  # a grad that does not fit: the step's checks name it
                p.grad = view
        flat.ptrs = list(map(DATA_PTR, params))
        sets.append(flat)
    return sets


def _fits(grad: torch.Tensor, view: torch.Tensor) -> bool:
    """Whether a grad can be copied into its view."""
    return grad.layout is torch.strided and grad.shape == view.shape and grad.dtype is view.dtype \
        and grad.device == view.device
