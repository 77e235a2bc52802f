"""Muon's Newton-Schulz across ranks: each matrix orthogonalized exactly once per step, by
one rank, the matrices spread over the ranks.

Newton-Schulz needs each matrix whole, and under FSDP2 (or tensor parallel) each rank
holds a shard of it; under DDP each rank holds all of it, and would orthogonalize every
matrix again. So, per step: the matrices are dealt to the ranks round robin, largest
first (each rank's share of the work about equal); each sharded direction is made whole
(an all-gather per matrix; a replicated one already is); each rank orthogonalizes its own
matrices (newton_schulz.py); each result is broadcast from its rank, and
every rank keeps its shard of it (a DTensor's local chunk; a whole tensor all of it).
Collectives per step: one all-gather per sharded matrix and one broadcast per matrix.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..optim.newton_schulz import orthogonalize
from .sharding import Sharding


def _group_of(sharding: Optional[Sharding], group):
    """The process group a matrix's work is spread over: its mesh's (1-D, or spanning the
    world), else `group` (whole tensors: DDP), else None (computed here alone)."""
    if sharding is None:
        return group
    mesh = sharding.mesh
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(f"Muon on DTensors of a {mesh.ndim}-D mesh that is not the whole world ({mesh}) is not "
                     "supported: put such params in an AdamW group (use_muon=False)")


def _whole(local: torch.Tensor, param: torch.Tensor, sharding: Optional[Sharding]) -> torch.Tensor:
    """The whole direction of param from this rank's piece (an all-gather for a shard)."""
    if sharding is None:
        return local
    from torch.distributed.tensor import DTensor
    piece = DTensor.from_local(local, sharding.mesh, sharding.placements, run_check=False, shape=param.shape,
                               stride=param.stride())
    return piece.full_tensor()


def _my_piece(whole: torch.Tensor, sharding: Optional[Sharding]) -> torch.Tensor:
    """This rank's shard of a whole result, laid out as its local shard (no collective)."""
    if sharding is None:
        return whole
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(whole, sharding.mesh, sharding.placements, src_data_rank=None)._local_tensor


def orthogonalize_across_ranks(directions: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                               shardings: Sequence[Optional[Sharding]], as_matrix, coefficients: Sequence[float],
                               steps: int, eps: float, group=None) -> list[torch.Tensor]:
    """Per param, this rank's piece of its orthogonalized direction (bfloat16): directions[i]
    is the local piece of params[i]'s (placed as shardings[i]; None: whole); as_matrix maps
    a whole tensor to the matrix Newton-Schulz takes (and back by reshape). `group`: the
    process group over which whole params' work is spread (None: each rank does its own)."""
    groups = [_group_of(s, group) for s in shardings]
    wholes = [_whole(d, p, s) for d, p, s in zip(directions, params, shardings)]
    owners: list = [None] * len(wholes)  # the global rank that orthogonalizes each matrix
    by_group: dict = {}
    for i, g in enumerate(groups):
        if g is not None:
            by_group.setdefault(g, []).append(i)
    for g, idx in by_group.items():
        ranks = dist.get_process_group_ranks(g)
        largest_first = sorted(idx, key=lambda i: (-math.prod(params[i].shape), i))  # the same order everywhere
        for k, i in enumerate(largest_first):
            owners[i] = ranks[k % len(ranks)]
    me = dist.get_rank() if by_group else None
    mine = [i for i in range(len(wholes)) if owners[i] is None or owners[i] == me]
    results = dict(zip(mine, orthogonalize([as_matrix(wholes[i]) for i in mine], coefficients, steps, eps)))
    out = []
    for i, whole in enumerate(wholes):
        if owners[i] is None:
            result = results[i]
        else:
            result = results[i].contiguous() if owners[i] == me else torch.empty(
                as_matrix(whole).shape, dtype=torch.bfloat16, device=whole.device)
            dist.broadcast(result, src=owners[i], group=groups[i])
        out.append(_my_piece(result.reshape(whole.shape), shardings[i]))
    return out
