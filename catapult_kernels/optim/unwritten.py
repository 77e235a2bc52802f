"""New state whose first write may have been skipped on the device.

A new momentum buffer or Grokfast EMA is *set* on its first step (to the grad), not
updated, so its kernel call differs from the later ones. When that first step may be
skipped on the device (GradScaler's found_inf, skip_nonfinite), the host cannot tell
without a sync whether the set happened. Such state carries an `UnwrittenFlag`: a 0-d
float32 device tensor, 1 while the state was never written. A step over it runs both
kernel calls, each gated on the device by the flag (a gated call reads its skip flag and
returns), so the result is exactly that of the call the flag selects: a skipped step
leaves the optimizer as if it never happened. The host drops a flag once its value can
be read without a sync: at once on the CPU, when its copy has landed on CUDA, or on the
first step that cannot be skipped.
"""
from __future__ import annotations

from typing import Optional

import torch


class UnwrittenFlag:
    """1 (on the device) while the state it guards was never written."""

    def __init__(self, value: torch.Tensor):
        self.value = value.detach().to(torch.float32).reshape(())
        self._host: Optional[torch.Tensor] = None
        self._ready: Optional[torch.cuda.Event] = None
        if self.value.is_cuda and not torch.compiler.is_compiling():
            # a copy that lands on its own; read once the event says so (no sync)
            self._host = torch.empty((), dtype=torch.float32, pin_memory=True)
            self._host.copy_(self.value, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def known(self, sync: bool = False) -> Optional[bool]:
        """True (never written) or False (written) when the host can read it without a
        sync (or with one, if sync); else None."""
        if torch.compiler.is_compiling():
            return None
        if self.value.device.type == "cpu" or sync:
            return bool(self.value != 0)
        if self.value.device.type == "cuda" and self._ready is not None and self._ready.query():
            return bool(self._host != 0)
        return None

    def after(self, skip: Optional[torch.Tensor]) -> Optional["UnwrittenFlag"]:
        """The flag after a step whose device skip flag is `skip` (None: not skippable,
        so the state is now written and needs no flag)."""
        return None if skip is None else UnwrittenFlag(self.value * skip.to(self.value.device))


def gate(skip: Optional[torch.Tensor], conditions: list) -> Optional[torch.Tensor]:
    """The skip flag of a kernel call that must run only where every (flag, unwritten)
    condition holds, on top of the step's own skip flag."""
    for flag, unwritten in conditions:
        miss = (1.0 - flag.value) if unwritten else flag.value
        skip = miss if skip is None else torch.maximum(skip, miss.to(skip.device))
    return skip
