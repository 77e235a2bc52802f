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
    """1 (on the device) while the state it guards was never written. One object for the
    state's whole unwritten life, updated in place each step (torch.compile sees the same
    object), and read by the host once it can be without a sync."""

    def __init__(self, skip: torch.Tensor):
        self.value = skip.detach().to(torch.float32).reshape(()).clone()
        self._host: Optional[torch.Tensor] = None
        self._ready: Optional[torch.cuda.Event] = None
        self._watch()

    def _watch(self) -> None:
        """On CUDA: copy the value to pinned memory without waiting, to read once it has
        landed. One copy in flight at a time: a host running steps ahead still gets an
        answer, as a written state never becomes unwritten again."""
        if self.value.is_cuda and self._ready is None and not torch.compiler.is_compiling():
            self._host = torch.empty((), dtype=torch.float32, pin_memory=True)
            self._host.copy_(self.value, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def update(self, skip: torch.Tensor) -> None:
        """After a step whose device skip flag is `skip`: still unwritten only if it skipped too."""
        self.value.mul_(skip.to(self.value.device))
        self._watch()

    def known(self, sync: bool = False) -> Optional[bool]:
        """True (never written) or False (written) when the host can tell without a sync
        (or with one, if sync); else None."""
        if torch.compiler.is_compiling():
            return None
        if sync or self.value.device.type == "cpu":
            return bool(self.value != 0)
        if self._ready is not None and self._ready.query():
            self._ready = None
            if not bool(self._host != 0):
                return False  # written by the time of that copy, so for good
            self._watch()  # unwritten then: look again at what the steps since made of it
        return None


def gate(skip: Optional[torch.Tensor], conditions: list) -> Optional[torch.Tensor]:
    """The skip flag of a kernel call that must run only where every (flag, unwritten)
    condition holds, on top of the step's own skip flag."""
    for flag, unwritten in conditions:
        miss = (1.0 - flag.value) if unwritten else flag.value.clone()  # a copy: the flag moves on
        skip = miss if skip is None else torch.maximum(skip, miss.to(skip.device))
    return skip
