"""How tensors lie in memory, as the kernels need it (a leaf: it imports only torch):
the dtypes they take, dense tensors and matching layouts (the lists of one update are
walked as flat arrays), params that share memory (refused: their updates would race in
the kernels), and strided params (updated through a dense copy)."""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels take


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its numel() elements fill [data_ptr, data_ptr + numel)."""
    if t.is_contiguous() or t.numel() <= 1:
        return True
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, and strides that agree on every dim of size > 1 (a size-1 dim's stride
    is arbitrary), so both walk their memory in the same order."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of t are one memory location (an expand()ed view): torch's
    in-place ops refuse to write such a tensor, and so do we."""
    return t.device.type != "meta" and torch._debug_has_internal_overlap(t) == 1


def gather_if_strided(p: torch.Tensor) -> torch.Tensor:
    """p itself when its elements fill one dense block of memory (the kernels walk such a
    block in its own order), else a contiguous copy for the kernels to update, to be
    copied back (x[:, ::2]: rare, so the common layouts pay nothing)."""
    return p if is_dense(p) else p.contiguous()


def _span(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) that t's elements touch."""
    size = t.element_size()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    start = t.storage_offset() * size
    return t.untyped_storage().data_ptr(), start, start + (last + 1) * size


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """The storage offset of every element of t."""
    idx = torch.tensor(t.storage_offset(), dtype=torch.int64)
    for n, s in zip(t.shape, t.stride()):
        idx = idx.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * s
    return idx.flatten()


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b, whose spans overlap, have an element in common."""
    if is_dense(a) and is_dense(b) or a.dtype != b.dtype:
        return True  # a dense span is all elements; other dtypes: any byte counts
    return bool(torch.isin(_offsets(a), _offsets(b)).any())


def check_no_overlap(params: list[torch.Tensor], group_index: int, spans: dict, record: bool = True) -> None:
    """Refuse a param of a new group that shares memory with one given before or in the same
    group (two Parameters over one storage, overlapping views): the kernels update params in
    parallel, so such updates would be lost at random. Disjoint views of one buffer (a flat
    parameter layout) are fine. `spans` (storage address -> [(first byte, end, group, index,
    param)]) holds the params so far and gains the group's once all of them pass (unless not
    record); only params on one storage are compared, by a sweep over their spans in address
    order, so adding groups one by one, or thousands of views of one buffer, stays near linear."""
    new: dict = {}
    for i, p in enumerate(params):
        if p.device.type == "meta" or p.numel() == 0:
            continue
        ptr, start, end = _span(p)
        new.setdefault(ptr, []).append((start, end, group_index, i, p))
    for ptr, items in new.items():
        added = {id(item) for item in items}
        open_spans: list = []  # the spans so far that reach past the current start
        for item in sorted(spans.get(ptr, []) + items, key=lambda e: (e[0], e[2], e[3])):
            start, end, _, _, p = item
            open_spans = [e for e in open_spans if e[1] > start]
            for other in open_spans:
                if (id(other) in added or id(item) in added) and (other[4] is p or _share_elements(p, other[4])):
                    (_, _, gj, j, _), (_, _, gi, i, _) = sorted((other, item), key=lambda e: (e[2], e[3]))
                    raise ValueError(f"param {j} of group {gj} and param {i} of group {gi} share memory: "
                                     "their fused updates would race and lose updates; give each param its "
                                     "own storage (clone()), or pass one of them once")
            open_spans.append(item)
    if record:
        for ptr, items in new.items():
            spans.setdefault(ptr, []).extend(items)
