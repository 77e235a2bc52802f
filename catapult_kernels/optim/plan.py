"""The step plan: what the last step's checks produced, reused while nothing it came from changed.

A step over thousands of small tensors is bound by the host: checking every grad and state
and building the kernels' lists costs more than the kernels. The plan keeps, per bucket
(FusedOptimizer._buckets), its params, state dicts and state tensors by key, and which
params need a dense copy or a relaid grad, together with what they were built from. The
next step compares that whole lists at a time, in C loops over ids and metadata (no
Python branch per param), and the optimizer checks everything anew when anything differs,
before anything is written.

What is compared, each step: the param groups (the dicts, in order) and each group's
params (identity) and state keys; per param its dtype, device, shape and contiguity (a
`p.data = x` may change them) and the type of its grad (None where it has none); per grad
its layout, dtype, device, shape and contiguity (grads are new tensors every step); per
bucket the identity of each param's state dict and of each state tensor in it, int8 scales
included (a state tensor replaced by the user is seen), and of each DTensor param's local shard. State tensors are the same objects from step to step
and are taken to keep their metadata: an in-place change of it (`t.set_()`, `t.data = x`)
is left to the ops' own checks, which refuse a call whose lists do not match before it
writes (other buckets of that step may have been updated by then). A float lr's 0-d
tensor is kept too, and made anew when the lr changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter, is_, itemgetter
from typing import Optional

import torch

from ..distributed.sharding import local

# What the plan records of each param and each grad, in the order compared: a grad's layout
# first, as a sparse grad has no contiguity to ask about (a param's .data stays dense).
PARAM_METADATA = (attrgetter("dtype"), attrgetter("device"), attrgetter("shape"), torch.Tensor.is_contiguous,
                  torch.Tensor.stride)  # a dense strided param's layout decides its AGC path
GRAD_METADATA = (attrgetter("layout"),) + PARAM_METADATA


def same_objects(a: list, b: list) -> bool:
    """Whether two lists hold the same objects in the same order."""
    return len(a) == len(b) and all(map(is_, a, b))


def metadata(tensors: list, getters: tuple) -> list:
    """Per getter, its value for each tensor."""
    return [list(map(get, tensors)) for get in getters]


def same_metadata(tensors: list, getters: tuple, recorded: list) -> bool:
    """Whether metadata(tensors, getters) == recorded, stopping at the first getter that differs."""
    return all(list(map(get, tensors)) == values for get, values in zip(getters, recorded))


@dataclass
class GroupPlan:
    """One param group as the last step checked it."""
    group: dict
    params: list          # its params, in order
    state_keys: tuple     # the state each of its params keeps (FusedOptimizer._plan_keys)
    param_metadata: list  # metadata(params, PARAM_METADATA)
    grad_types: list      # per param: type(p.grad), type(None) where it has none
    all_grads: bool       # every param has a grad
    grad_metadata: list   # metadata(the grads, GRAD_METADATA)
    buckets: list         # its buckets as Bucket.template() gives them
    positions: list       # per bucket: its params' indices in the group, or None: the whole group

    def grads(self) -> Optional[list]:
        """Per bucket, this step's grads in the bucket's order, or None when they or the
        params do not fit the plan any more."""
        if not same_metadata(self.params, PARAM_METADATA, self.param_metadata):
            return None
        grads = [p.grad for p in self.params]
        if list(map(type, grads)) != self.grad_types:
            return None
        present = grads if self.all_grads else [g for g in grads if g is not None]
        if not same_metadata(present, GRAD_METADATA, self.grad_metadata):
            return None
        return [grads if where is None else [grads[i] for i in where] for where in self.positions]


def states_unchanged(template, state: dict) -> bool:
    """Whether each param of the bucket still has the state dict, and each of its state
    keys the tensor, that the plan holds."""
    if not template.columns:
        return True  # nothing kept (plain SGD): nothing to compare
    dicts = list(map(state.get, template.keys))
    if not same_objects(dicts, template.states):
        return False
    try:
        if template.shardings is not None:  # the columns hold DTensors' local shards
            return all(all(map(is_, (local(d[key]) for d in dicts), column)) for key, column in template.columns.items())
        return all(all(map(is_, map(itemgetter(key), dicts), column)) for key, column in template.columns.items())
    except KeyError:  # a state key was deleted
        return False


class StepPlan:
    """The buckets of a checked step (without their grads) and what they were built from.
    Made only in eager steps: under torch.compile, the compiled step's guards do its job."""

    def __init__(self, param_groups: list, buckets: list, state_keys: list):
        """From the checked buckets of a step; state_keys: per group, its _plan_keys."""
        self.groups: list[GroupPlan] = []
        for group, keys in zip(param_groups, state_keys):
            mine = [b for b in buckets if b.group is group]
            params = list(group["params"])
            grads = [p.grad for p in params]
            present = [g for g in grads if g is not None]
            positions = [[pi for _, pi in b.slots] for b in mine]
            if len(mine) == 1 and len(positions[0]) == len(params):
                positions = [None]  # the common group: one bucket of all its params, in order
            self.groups.append(GroupPlan(group, params, keys, metadata(params, PARAM_METADATA),
                                         list(map(type, grads)), len(present) == len(grads),
                                         metadata(present, GRAD_METADATA), [b.template() for b in mine],
                                         positions))
        self.param_groups = [g.group for g in self.groups]
        self.lrs: dict = {}  # (id(group), device) -> (the float lr, its 0-d tensor)

    def buckets(self, param_groups: list, state: dict, state_keys: list) -> Optional[list]:
        """[(bucket template, this step's grads for it)], or None when anything the plan
        was built from changed. Reads only: nothing is made or written."""
        if not same_objects(param_groups, self.param_groups):
            return None
        planned = []
        for plan, group, keys in zip(self.groups, param_groups, state_keys):
            if keys != plan.state_keys or not same_objects(group["params"], plan.params):
                return None
            grads = plan.grads()
            if grads is None:
                return None
            for template, bucket_grads in zip(plan.buckets, grads):
                if not states_unchanged(template, state):
                    return None
                if template.shardings is not None and not same_objects(list(map(local, template.keys)),
                                                                       template.params):
                    return None  # a DTensor's local shard was replaced (load_state_dict(assign=True))
                planned.append((template, bucket_grads))
        return planned

    def lr_tensor(self, group: dict, device: torch.device, lr: float) -> torch.Tensor:
        """A 0-d float32 tensor holding the group's float lr on device: the last step's
        while the lr is the same (the ops only read it)."""
        key = (id(group), device)  # the plan holds the group: its id stays its own
        kept = self.lrs.get(key)
        if kept is None or kept[0] != lr:
            kept = self.lrs[key] = (lr, torch.ones((), dtype=torch.float32, device=device) * lr)
        return kept[1]
