"""What a DTensor's placements mean for the kernels and for a norm.

The kernels run on a DTensor's local shard (its `_local_tensor`: contiguous, maybe uneven
or empty), and state made with zeros_like(param) is a DTensor with the param's placements,
so its local shard lines up with the param's. A norm over shards must count each element
once: along a mesh dim that shards a tensor, the ranks hold different pieces (sum them);
along a dim that replicates it, they hold copies (count one). So a rank counts its shard
only where its mesh coordinate is 0 along every dim that replicates the tensor, and the
counted squares are summed over the whole mesh: one all-reduce per mesh.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Optional

import torch


def is_dtensor(t) -> bool:
    """Whether t is a DTensor; without importing DTensor (a third of a second) when no
    DTensor can exist because nothing imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels update for t: a DTensor's local shard (the same object every
    call, unlike to_local()), else t itself."""
    return t._local_tensor if is_dtensor(t) else t


def local_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The local shard of DTensor param p's grad, laid out over the mesh like p's own (a grad
    that is still Partial, or placed otherwise, is redistributed first: a collective)."""
    if not is_dtensor(g):
        raise RuntimeError(f"a DTensor param has a plain {tuple(g.shape)} grad: its grad must be a DTensor "
                           "on the param's mesh, as FSDP2 and tensor parallel make them")
    if g.device_mesh is not p.device_mesh and g.device_mesh != p.device_mesh:
        raise RuntimeError(f"a DTensor param on {p.device_mesh} has its grad on another mesh, {g.device_mesh}")
    if g.placements != p.placements:
        g = g.redistribute(p.device_mesh, p.placements)
    return g._local_tensor


def norm_piece(g: torch.Tensor) -> torch.Tensor:
    """What this rank's shard of DTensor g counts in a norm of g: its local shard, or, where g
    is still Partial (pieces that sum to the values), the values made whole (a collective)."""
    if any(placement.is_partial() for placement in g.placements):
        from torch.distributed.tensor import Replicate
        g = g.redistribute(g.device_mesh, [Replicate() if p.is_partial() else p for p in g.placements])
    return g


@dataclass(frozen=True)
class Sharding:
    """Where the pieces of a DTensor lie: its mesh and placements."""
    mesh: object        # a DeviceMesh
    placements: tuple

    @staticmethod
    def of(t: torch.Tensor) -> Optional["Sharding"]:
        return Sharding(t.device_mesh, tuple(t.placements)) if is_dtensor(t) else None

    @functools.cached_property  # a step asks once per tensor; the answer never changes
    def counted_here(self) -> bool:
        """Whether this rank's shard counts in a sum over the mesh: its coordinate is 0 along
        every mesh dim that replicates the tensor. Every other placement of a param shards
        it (Shard, and _StridedShard under FSDP2 over tensor parallel, which is_shard() does
        not count); a param is never Partial (local_grad and norm_piece make grads whole)."""
        coordinate = self.mesh.get_coordinate()
        if coordinate is None:  # this rank is not on the mesh: it holds no piece
            return False
        return all(c == 0 for c, placement in zip(coordinate, self.placements) if placement.is_replicate())

    def unit_splitting_dims(self, ndim: int) -> tuple:
        """The mesh dims along which the ranks hold pieces of one AGC unit (a row, dim 0
        slice, of a 2+ dim tensor; a 1-D tensor is one unit): those that shard a tensor
        dim other than 0, or any dim of a 1-D tensor."""
        return tuple(d for d, placement in enumerate(self.placements)
                     if not placement.is_replicate() and (ndim < 2 or placement.dim != 0))
