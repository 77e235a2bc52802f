"""Shared machinery to launch one Triton kernel over many tensors.

A kernel launch covers a whole group of tensors (one dtype, one device) through
tables instead of one launch per tensor:

* the address table, int64 [n, L]: row i holds ``lists[l][i].data_ptr()`` for each
  of the L lists (params, grads, exp_avgs, ..., state_steps). The addresses are
  read every call, since grads are reallocated every step; the device copy is
  cached keyed by the addresses themselves (so it cannot be stale), and a new one
  goes up from pinned memory with non_blocking=True (no host sync).
* the plan, cached: ``numels`` int64 [n]; ``blocks`` int64 [nblocks, 2], one row
  (tensor index, first element) per program, each program covering ``chunk``
  elements of one tensor; ``segments`` int64 [n + 1, 2], the [begin, end) range
  of block indices that belong to tensor i (row n: all blocks, for a global
  reduction); when asked with AGC rows, ``row_lens`` int64 [n], the elements per
  row of each tensor (numel // rows, where the update kernels find their AGC
  factors). It depends only on the numels, the group of each tensor, the chunk size
  of each group and the rows, and is keyed by them.

The blocks of one group are contiguous in ``blocks`` (groups in order of first
appearance, tensors in list order inside a group), so the kernel of a group is
launched over ``blocks[begin:end]`` and partial results indexed by block (as the
norm writes) land in disjoint slots of one buffer. Within a tensor, blocks are
in element order, so ``segments`` rows are contiguous ranges.

In a kernel, row ``t`` of list ``l`` becomes a typed pointer with
``tl.load(addrs + t * L + l).to(tl.pointer_type(DTYPE))`` (see ``tensor_ptr``),
which runs under the interpreter and compiles (an int-to-pointer cast).
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

__all__ = [
    "TL_DTYPE",
    "keep_whole_under_functionalization",
    "MultiTensorPlan",
    "get_plan",
    "address_table",
    "is_fake",
    "is_interpreted",
    "check_runnable",
    "can_bypass_dispatcher",
    "clear_caches",
    "tensor_ptr",
]


# --------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class MultiTensorPlan:
    """The per-block tables of one list of tensors (see the module docstring)."""

    device: torch.device
    n_tensors: int
    n_blocks: int
    numels: torch.Tensor    # int64 [max(n, 1)] on device
    blocks: torch.Tensor    # int64 [max(nblocks, 1), 2] on device: (tensor index, start)
    segments: torch.Tensor  # int64 [n + 1, 2] on device: blocks [begin, end) of tensor i; row n: all
    # (group key, first block, end block, chunk), in order of first appearance
    groups: tuple[tuple[Hashable, int, int, int], ...]
    row_lens: Optional[torch.Tensor] = None  # int64 [max(n, 1)] on device: numel // rows; None without rows

    def group_blocks(self, begin: int) -> torch.Tensor:
        """The view of ``blocks`` a group's launch starts at (program 0 = block begin)."""
        return self.blocks[begin:]


_PLAN_CACHE: "collections.OrderedDict[tuple, MultiTensorPlan]" = collections.OrderedDict()
_PLAN_CACHE_SIZE = 64
_PLAN_LOCK = threading.Lock()


def _to_device(cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host table to the device without a host sync (pinned + non_blocking on CUDA)."""
    if device.type == "cpu":
        return cpu
    if device.type == "cuda":
        cpu = cpu.pin_memory()
    return cpu.to(device, non_blocking=True)


def _build_plan(device: torch.device, numels: Sequence[int], keys: Sequence[Hashable],
                chunks: dict, agc_rows: Optional[Sequence[int]]) -> MultiTensorPlan:
    n = len(numels)
    group_members: "collections.OrderedDict[Hashable, list[int]]" = collections.OrderedDict()
    for i, k in enumerate(keys):
        group_members.setdefault(k, []).append(i)
    numel_t = torch.tensor(list(numels), dtype=torch.int64)
    rows, starts, groups = [], [], []
    nb_per_tensor = torch.zeros(n, dtype=torch.int64)
    first_block = torch.zeros(n, dtype=torch.int64)
    begin = 0
    for k, members in group_members.items():
        chunk = int(chunks[k])
        idx = torch.tensor(members, dtype=torch.int64)
        nb = (numel_t[idx] + chunk - 1) // chunk
        total = int(nb.sum())
        # rows: tensor index repeated once per block; starts: 0, chunk, 2*chunk, ...
        r = torch.repeat_interleave(idx, nb)
        first = torch.cumsum(nb, 0) - nb  # first block of each member, relative
        local = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(first, nb)
        rows.append(r)
        starts.append(local * chunk)
        nb_per_tensor[idx] = nb
        first_block[idx] = first + begin
        groups.append((k, begin, begin + total, chunk))
        begin += total
    n_blocks = begin
    if n_blocks:
        blocks = torch.stack([torch.cat(rows), torch.cat(starts)], dim=1)
    else:
        blocks = torch.zeros((1, 2), dtype=torch.int64)  # never read; keeps pointers non-null
    segments = torch.empty((n + 1, 2), dtype=torch.int64)
    segments[:n, 0] = first_block
    segments[:n, 1] = first_block + nb_per_tensor
    segments[n, 0] = 0
    segments[n, 1] = n_blocks
    if n == 0:
        numel_t = torch.zeros(1, dtype=torch.int64)
    parts = [numel_t, blocks.flatten(), segments.flatten()]
    if agc_rows is not None:  # a tensor of 0 rows has 0 elements: its row length is never used
        parts.append(numel_t // torch.tensor(list(agc_rows) or [1], dtype=torch.int64).clamp(min=1))
    # One host table, one copy to the device; the views live as long as the plan.
    views = torch.split(_to_device(torch.cat(parts), device), [t.numel() for t in parts])
    return MultiTensorPlan(device=device, n_tensors=n, n_blocks=n_blocks, numels=views[0],
                           blocks=views[1].view(-1, 2), segments=views[2].view(n + 1, 2), groups=tuple(groups),
                           row_lens=views[3] if agc_rows is not None else None)


def get_plan(device: torch.device, numels: Sequence[int], keys: Sequence[Hashable],
             chunks: dict, agc_rows: Optional[Sequence[int]] = None) -> MultiTensorPlan:
    """The cached plan for tensors of these numels, grouped by ``keys`` (one per tensor,
    e.g. its dtype), each group cut into chunks of ``chunks[key]`` elements; with
    ``agc_rows`` (one per tensor), also the table of row lengths numel // rows."""
    numels = tuple(int(x) for x in numels)
    keys = tuple(keys)
    agc_rows = None if agc_rows is None else tuple(int(x) for x in agc_rows)
    present = set(keys)
    chunk_key = tuple(sorted((str(k), int(v)) for k, v in chunks.items() if k in present))
    cache_key = (str(device), numels, keys, chunk_key, agc_rows)
    with _PLAN_LOCK:
        plan = _PLAN_CACHE.get(cache_key)
        if plan is not None:
            _PLAN_CACHE.move_to_end(cache_key)
            return plan
    plan = _build_plan(device, numels, keys, chunks, agc_rows)
    with _PLAN_LOCK:
        _PLAN_CACHE[cache_key] = plan
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    return plan


def clear_caches() -> None:
    """Drop the cached plans and address tables (and the device memory they hold)."""
    with _PLAN_LOCK:
        _PLAN_CACHE.clear()
        _ADDR_CACHE.clear()


# ----------------------------------------------------------------- address tables

_ADDR_CACHE: "collections.OrderedDict[tuple, tuple[torch.Tensor, list]]" = collections.OrderedDict()
_ADDR_CACHE_SIZE = 16


def address_table(lists: Sequence[Sequence[torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, list]:
    """int64 [n, L] on device: row i = (lists[0][i].data_ptr(), ..., lists[L-1][i].data_ptr()),
    and for each list whether all its addresses are 16-byte aligned (then the kernels
    may tell the compiler so, and loads vectorize). Every list must have the same length.

    The addresses are read every call (grads are reallocated every step). The device
    table is cached keyed by the addresses themselves, so it is always right, and a
    step whose tensors sit where they sat before (the caching allocator usually hands
    grads the same blocks back) costs no copy. A new table goes to the device from
    pinned memory with non_blocking=True: the host never waits. Cached tables are
    never written after their copy, so kernels still reading one cannot race."""
    cols = [[t.data_ptr() for t in lst] for lst in lists]
    flat = tuple(a for row in zip(*cols) for a in row)
    key = (device, len(lists), flat)
    with _PLAN_LOCK:
        hit = _ADDR_CACHE.get(key)
        if hit is not None:
            _ADDR_CACHE.move_to_end(key)
            return hit
    aligned = [not any(a & 15 for a in col) for col in cols]
    if device.type == "cuda":
        cpu = torch.tensor(flat, dtype=torch.int64, pin_memory=True)
        table = cpu.to(device, non_blocking=True)
    else:
        table = torch.tensor(flat, dtype=torch.int64, device=device)
    result = (table.view(-1, len(lists)), aligned)
    with _PLAN_LOCK:
        _ADDR_CACHE[key] = result
        while len(_ADDR_CACHE) > _ADDR_CACHE_SIZE:
            _ADDR_CACHE.popitem(last=False)
    return result


@triton.jit
def tensor_ptr(addrs, row, L: tl.constexpr, l: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to the first element of tensor ``row`` of list ``l`` in an address table."""
    ptr = tl.load(addrs + row * L + l).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # the hint goes on the pointer: the int-to-pointer cast does not carry one on the int
        ptr = tl.multiple_of(ptr, 16)
    return ptr


# ------------------------------------------------------------------------ helpers

def is_fake(*tensors) -> bool:
    """Whether these tensors carry no data (FakeTensor, meta, functional wrapper), or a
    fake mode is on. Callers pass one tensor per list: a list is fake or real as a whole."""
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return True
    for t in tensors:
        if t is not None and (t.is_meta or isinstance(t, (FakeTensor, FunctionalTensor))):
            return True
    return False


try:
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:  # pragma: no cover - torch < 2.6 has no triton_op at all
    import contextlib

    def set_wrap_triton_enabled(enabled: bool):
        return contextlib.nullcontext()


def can_bypass_dispatcher(sample) -> bool:
    """Whether an eager call may run an op's implementation directly instead of going
    through torch.ops (whose Python layers cost microseconds per tensor): not under
    torch.compile, a dispatch or function mode, tensor subclasses, or autograd."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in sample:
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return False  # subclasses (fake, functional, DTensor, ...) need the dispatcher
        if grad and t.requires_grad:
            return False  # let autograd see the call
    return True


def is_interpreted(kernel) -> bool:
    """Whether this @triton.jit kernel runs under the Triton interpreter."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    k = kernel
    while hasattr(k, "fn") and not isinstance(k, InterpretedFunction):
        k = k.fn
    return isinstance(k, InterpretedFunction)


def _stdlib_interpreted():
    """Whether triton's own jit'd library (tl.sum, tl.zeros, ...) was created for the
    interpreter, i.e. TRITON_INTERPRET=1 was set when triton was imported; None if unknown."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover
        return None
    probe = getattr(getattr(tl, "standard", None), "sum", None)
    if isinstance(probe, InterpretedFunction):
        return True
    if isinstance(probe, JITFunction):
        return False
    return None


def check_runnable(device: torch.device, kernel) -> None:
    """CPU tensors run only under the interpreter; say how to switch it on."""
    interpreted = is_interpreted(kernel)
    stdlib = _stdlib_interpreted()
    if stdlib is not None and stdlib != interpreted:
        raise RuntimeError(
            "catapult Triton ops: TRITON_INTERPRET changed between importing triton and importing "
            "catapult_kernels.triton; set TRITON_INTERPRET=1 (or leave it unset) before importing triton")
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "catapult Triton ops on CPU tensors need the Triton interpreter: "
            "set TRITON_INTERPRET=1 before importing triton (or use CUDA tensors)")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"catapult Triton ops run on CUDA tensors (or CPU tensors under "
                           f"the interpreter), not on {device}")


def keep_whole_under_functionalization(op) -> None:
    """The kernels reach tensors through an address table, which torch.compile's analysis
    of Triton kernels cannot see (it would not know what is read or mutated): keep the op
    whole, functionalized as a custom op with its fake kernel, instead of tracing into it."""
    op.register_torch_dispatch(FunctionalTensorMode,
                               lambda mode, op_, types, args, kwargs: mode.__torch_dispatch__(op_, types, args, kwargs))
