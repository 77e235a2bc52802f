"""HostSyncs: count the host's reads of tensor values in a region of code.

    with HostSyncs() as syncs:
        opt.step()
    assert syncs.count == 0

Each `.item()`, `float(t)`, `bool(t)` (an `if` on a tensor) is an `aten._local_scalar_dense`,
which on a GPU waits for every kernel queued before it. A TorchDispatchMode sees each one
that dispatches through torch (not reads inside a C++ kernel, e.g. a CPU kernel reading its
step count directly). On the CPU such a read waits for nothing, but counts all the same:
the count says what a GPU run of the same code would wait for.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncs(TorchDispatchMode):
    """A dispatch mode whose `count` is the number of host reads of a tensor's value
    (aten._local_scalar_dense) among the ops run inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


__all__ = ["HostSyncs"]
