"""ZeroRedundancyOptimizer (ZeRO-1) builds one local optimizer per rank over that rank's part
of the params. A global norm (max_grad_norm, skip_nonfinite) is then over every rank's part:
the local optimizer sums its squares with the others' over ZeRO's process group, or each
rank would clip by the norm of its own part."""
from __future__ import annotations

import inspect
import sys
from typing import Optional

# How far up the stack ZeroRedundancyOptimizer._init_local_optimizer may be from
# FusedOptimizer.__init__ (through the subclasses' __init__s).
_FRAMES = 12


def zero_process_group() -> Optional[object]:
    """The process group of the ZeroRedundancyOptimizer that is constructing the caller's
    optimizer as its local one, or None."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if module is None:  # not imported: nothing is constructing us through it
        return None
    zero_class = module.ZeroRedundancyOptimizer
    frame = inspect.currentframe()
    try:
        for _ in range(_FRAMES):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, zero_class):
                return owner.process_group
        return None
    finally:
        del frame
