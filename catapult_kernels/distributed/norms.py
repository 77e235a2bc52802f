"""Norms over tensors whose pieces lie on several ranks, without a host sync: each rank
takes its local norms with the fused ops, raises them to the power (squares for L2) in
float64, and one all-reduce per mesh (functional collectives: asynchronous; whoever reads
the result waits for it) sums what every rank counts (sharding.py). Tensors on several
meshes (FSDP + TP submeshes, expert parallel) take one all-reduce per mesh; every rank
must hold a piece (maybe empty) of the same set of meshes' tensors, as FSDP2 and tensor
parallel give them."""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .. import ops
from .sharding import Sharding, is_dtensor, local, norm_piece


def reduce_over_mesh(x: torch.Tensor, mesh, op: str = "sum") -> torch.Tensor:
    """x summed (or maxed) over every rank of the mesh: one all-reduce when the mesh is 1-D
    or spans the world, else one per mesh dim."""
    if mesh.ndim == 1:
        return funcol.all_reduce(x, op, mesh)
    if mesh.size() == dist.get_world_size():
        return funcol.all_reduce(x, op, dist.group.WORLD)
    for dim in range(mesh.ndim):
        x = funcol.all_reduce(x, op, (mesh, dim))
    return x


def _check_ord(ord: float) -> float:
    ord = float(ord)
    if not (ord == math.inf or 0 < ord < math.inf):
        raise ValueError(f"a norm over sharded tensors takes norm_type > 0 or inf, got {ord}")
    return ord


def _power(norm: torch.Tensor, ord: float) -> torch.Tensor:
    """What sums (max for inf) across pieces: |x|^ord, in float64 so that it cannot overflow."""
    norm = norm.to(torch.float64)
    return norm if ord == math.inf else norm * norm if ord == 2.0 else norm ** ord


def _root(total: torch.Tensor, ord: float) -> torch.Tensor:
    return total if ord == math.inf else total.sqrt() if ord == 2.0 else total ** (1.0 / ord)


def global_norm(tensors: Sequence[torch.Tensor], shardings: Sequence[Optional[Sharding]], ord: float = 2.0,
                backend: str = "auto", group=None, device: Optional[torch.device] = None) -> torch.Tensor:
    """The ord-norm of whole tensors given their local pieces: tensors[i] is the local shard of
    a DTensor with shardings[i], or a whole tensor (None). `group`: a process group whose
    ranks each hold different whole tensors (ZeRO's partition), summed over it too.
    float32 (float64 when a tensor is float64), on the first tensor's device (else device)."""
    ord = _check_ord(ord)
    combine = "max" if ord == math.inf else "sum"
    device = tensors[0].device if tensors else device
    whole: list = []
    by_mesh: dict = {}  # mesh -> the local pieces this rank counts (maybe none: it still joins)
    for t, sharding in zip(tensors, shardings):
        if sharding is None:
            whole.append(t)
        else:
            counted = by_mesh.setdefault(sharding.mesh, [])
            if sharding.counted_here:
                counted.append(t)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    powers = []
    if whole or group is not None:
        power = _power(ops.global_norm(whole, ord, backend), ord).to(device) if whole else zero
        powers.append(power if group is None else funcol.all_reduce(power, combine, group))
    for mesh, counted in by_mesh.items():
        power = _power(ops.global_norm(counted, ord, backend), ord).to(device) if counted else zero
        powers.append(reduce_over_mesh(power, mesh, combine))
    if not powers:
        return torch.zeros((), dtype=torch.float32, device=device)
    stacked = torch.stack(powers)
    total = _root(stacked.amax() if ord == math.inf else stacked.sum(), ord)
    return total.to(torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32)


def norm_of(tensors: Sequence[torch.Tensor], ord: float = 2.0, backend: str = "auto") -> torch.Tensor:
    """The ord-norm of tensors taken together, any of them DTensors (made whole first where
    Partial): global_norm over their local pieces. A plain tensor, the same on every rank."""
    pieces = [norm_piece(t) if is_dtensor(t) else t for t in tensors]
    return global_norm(list(map(local, pieces)), list(map(Sharding.of, pieces)), ord, backend)


@functools.lru_cache(maxsize=256)
def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """values as a tensor on device, made once: the same few index and mask vectors serve
    every step (a copy from pageable host memory each step would wait for the GPU)."""
    return torch.tensor(values, device=device)


def reduce_squares(squares: torch.Tensor, shardings: Sequence[Optional[Sharding]]) -> torch.Tensor:
    """Per tensor, the sum of squares of the whole tensor from each rank's local sums
    (squares[i] for the piece of tensor i here; whole tensors stay as given): one
    all-reduce of a vector per mesh."""
    by_mesh: dict = {}
    for i, sharding in enumerate(shardings):
        if sharding is not None:
            by_mesh.setdefault(sharding.mesh, []).append(i)
    out = squares
    for mesh, idx in by_mesh.items():
        counted = _constant(tuple(shardings[i].counted_here for i in idx), squares.device)
        where = _constant(tuple(idx), squares.device)
        mine = torch.where(counted, squares.index_select(0, where), 0.0)  # not * 0: inf * 0 is nan
        out = out.index_copy(0, where, reduce_over_mesh(mine, mesh))
    return out


def reduce_unit_squares(squares: list[torch.Tensor], shardings: Sequence[Optional[Sharding]],
                        ndims: Sequence[int]) -> list[torch.Tensor]:
    """AGC units (regularizers.py) cut across ranks: per tensor, the sums of squares of its
    units (squares[i], one per local unit) summed over the mesh dims whose ranks hold pieces
    of the same units (Sharding.unit_splitting_dims). Under Shard(0) of a 2+ dim tensor every
    row is whole on its rank and nothing moves. One all-reduce of a vector per (mesh, dim)."""
    by_dims: dict = {}  # (mesh, splitting dims) -> the tensors
    for i, (sharding, ndim) in enumerate(zip(shardings, ndims)):
        dims = () if sharding is None else sharding.unit_splitting_dims(ndim)
        if dims:
            by_dims.setdefault((sharding.mesh, dims), []).append(i)
    out = list(squares)
    for (mesh, dims), idx in by_dims.items():
        joined = torch.cat([squares[i] for i in idx])
        for dim in dims:
            joined = funcol.all_reduce(joined, "sum", (mesh, dim))
        for i, piece in zip(idx, joined.split([squares[i].numel() for i in idx])):
            out[i] = piece
    return out
