"""The tensors of one update-op call, by name, for the op tests of state storage and master
weights (what a call may write, and a snapshot of it to compare with after)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from catapult_kernels import ops
from reference import assert_bitwise_equal


@dataclass
class Call:
    """A call's tensors: params and grads (16-bit, or float32 for the reference), the used
    states and Grokfast emas by list name (int8: with their scales), step counts, master
    weights (empty for the reference) and the pipeline's tensors."""
    params: list
    grads: list
    steps: list
    lists: dict
    scales: dict = field(default_factory=dict)
    masters: list = field(default_factory=list)
    agc_scales: list = field(default_factory=list)

    def tensors(self) -> dict:
        """Every tensor the op may write, by a name for messages."""
        named = {f"params[{i}]": t for i, t in enumerate(self.params)}
        named.update({f"state_steps[{i}]": t for i, t in enumerate(self.steps)})
        named.update({f"master_weights[{i}]": t for i, t in enumerate(self.masters)})
        for name, lst in self.lists.items():
            named.update({f"{name}[{i}]": t for i, t in enumerate(lst)})
        for name, lst in self.scales.items():
            named.update({f"{name} scales[{i}]": t for i, t in enumerate(lst)})
        return named

    def snapshot(self) -> dict:
        return {k: t.clone() for k, t in self.tensors().items()}


def assert_same_bits(got: Call, want: Call) -> None:
    """Every tensor of two calls (one on another device) bit for bit."""
    expected = want.tensors()
    for name, t in got.tensors().items():
        assert_bitwise_equal(name, t.cpu(), expected[name])


def pipeline_of(call: Call, regularized: bool, skip=None, maximize: bool = False) -> ops.PipelineArgs:
    """The grad pipeline of a call: off, or (regularized) unscale, clipping, AGC and Grokfast."""
    device = call.params[0].device
    extra = {}
    if regularized:
        extra = dict(grad_norm=torch.tensor(40.0, device=device), max_grad_norm=5.0,
                     grad_scale=torch.tensor(4.0, device=device), agc_scales=call.agc_scales,
                     grokfast_emas=call.lists["grokfast_emas"], grokfast_alpha=0.9, grokfast_lamb=2.0)
    return ops.PipelineArgs(skip=skip, maximize=maximize, **extra)
