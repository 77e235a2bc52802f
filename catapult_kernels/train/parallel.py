"""Data parallelism for the trainer under torchrun: DDP (each rank a full replica) or FSDP2
(`fully_shard`: each rank holds a shard of every param), over the GLOBAL batch.

Each rank takes its contiguous slice of every batch (torch.tensor_split: 33 examples on 2
ranks are 17 + 16) and weights its mean loss by its share of the batch times the world
size, so that the gradient DDP and FSDP average over the ranks is the gradient of the whole
batch's mean loss, uneven slices included. Every logged number is a global one: the ranks'
loss shares, correct counts and example counts are summed by all-reduce; evaluation runs on
every rank's slice (FSDP's forward is a collective), in as many pieces on every rank.

Rank 0 alone writes the run folder, prints, draws and measures the sharpness (on its full
replica: DDP's own module, or for FSDP a full copy of the model made before sharding and
refreshed from the gathered params); what rank 0 reads or decides (a checkpoint, a config,
an error, a sharpness) reaches the other ranks by broadcast (from_rank0). Checkpoints hold
full tensors, FSDP's shards gathered, in a single-process checkpoint's format."""
from __future__ import annotations

import contextlib
import os
import pickle
from typing import Callable, Optional

import torch

from ..distributed.sharding import is_dtensor
from .config import PARALLEL

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for each process


def parallel_mode(mode: Optional[str]) -> str:
    """mode checked, None as "none"."""
    mode = mode or "none"
    if mode not in PARALLEL:
        raise ValueError(f"unknown parallel {mode!r}; choose one of: {', '.join(PARALLEL)}")
    return mode


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def is_main_process() -> bool:
    """Rank 0, or a process that torchrun did not start: the one that prints."""
    return os.environ.get("RANK", "0") == "0"


def _group_ready() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def _needs_group(what: str) -> ValueError:
    return ValueError(f"{what} needs a process group: launch with torchrun --nproc-per-node N "
                      "(or call torch.distributed.init_process_group first)")


@contextlib.contextmanager
def process_group(needed: bool, what: str = "--parallel", device: str = "cpu"):
    """The process group a run on `device` needs: one that exists, or under torchrun one made
    here (gloo; for a CUDA run also NCCL, with this process on cuda:LOCAL_RANK: a CPU run on
    a machine with GPUs touches none), ended after the run: a barrier, then
    destroy_process_group (which also stops gloo's occasional abort at exit). On an error,
    destroyed without the barrier: the other ranks may be waiting in another collective, and
    see the connection close instead."""
    if not needed or _group_ready():
        yield
        return
    if not launched_by_torchrun():
        raise _needs_group(what)
    import torch.distributed as dist
    cuda = str(device).startswith("cuda")  # not parsed here: the run checks its device itself
    if cuda:
        torch.cuda.set_device(torch.device(rank_device("cuda", "ddp")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    finished = False
    try:
        yield
        finished = True
    finally:
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def rank_device(device: str, parallel: str) -> str:
    """The device of this rank: under --parallel, --device cuda is cuda:LOCAL_RANK (one GPU
    per process: more processes than GPUs is refused)."""
    if parallel == "none" or torch.device(device).type != "cuda":
        return device
    local_rank = os.environ.get("LOCAL_RANK")
    visible = torch.cuda.device_count()
    index = int(local_rank) if local_rank is not None else torch.distributed.get_rank() % visible
    if index >= visible:
        raise ValueError(f"--device cuda under torchrun runs one GPU per process, but this is local rank {index} "
                         f"and {visible} GPU(s) are visible: start at most {visible} processes per node")
    return f"cuda:{index}"


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if _group_ready() else 1


def from_rank0(fn: Callable, device: Optional[torch.device] = None):
    """fn() run on rank 0 alone; its result on every rank, or its error raised on every rank
    (a copy of it elsewhere), so that no rank waits for one that stopped. Without a process
    group of several ranks: fn()."""
    if not _group_ready() or world_size() == 1:
        return fn()
    import torch.distributed as dist
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = (fn(), None)
        except BaseException as e:  # KeyboardInterrupt too: the other ranks wait for an answer
            outcome[0] = (None, e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))
            dist.broadcast_object_list(outcome, src=0, device=device)
            raise
    dist.broadcast_object_list(outcome, src=0, device=device)
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


def _picklable(e: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:
        return False


def full_tensors(tree):
    """tree (dicts, lists, tuples) with each DTensor made whole (a collective: every rank
    calls this with the same tree, in the same order)."""
    if is_dtensor(tree):
        return tree.full_tensor()
    if isinstance(tree, dict):
        return {k: full_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(full_tensors(v) for v in tree)
    return tree


def shard_like(value, like):
    """A full tensor placed as DTensor `like` (each rank keeps its own chunk, no collective);
    anything else as it is."""
    if not (is_dtensor(like) and torch.is_tensor(value) and value.shape == like.shape):
        return value
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


class DataParallel:
    """This process's part in a run: rank 0 of 1, every collective a no-op (mode "none"), or
    a rank of the process group's data-parallel run ("ddp", "fsdp")."""

    def __init__(self, mode: Optional[str], device: torch.device):
        mode = parallel_mode(mode)
        if mode != "none" and not _group_ready():
            raise _needs_group(f"parallel={mode!r}")
        import torch.distributed as dist
        self.mode, self.active, self.device = mode, mode != "none", torch.device(device)
        if self.active and self.device.type == "cuda":  # NCCL's collectives run on the current device
            torch.cuda.set_device(self.device)
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if self.active else (0, 1)
        # object collectives (broadcast_object_list) go through the device's backend
        self._object_device = self.device if self.device.type == "cuda" else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- the model ----
    def wrap(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(what the training step calls, the module that holds the params): DDP around the
        model; the model itself, sharded with fully_shard unless it already is; the model twice."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            if isinstance(model, DDP):
                return model, model.module
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids), model
        if self.mode == "fsdp" and not self.is_sharded(model):
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            with torch.no_grad():  # every rank shards rank 0's values, as DDP starts from them
                for t in model.state_dict().values():
                    if not is_dtensor(t):
                        dist.broadcast(t, 0)
            fully_shard(model, mesh=init_device_mesh(self.device.type, (self.world_size,)))
        return model, model

    def reshard(self, model: torch.nn.Module) -> None:
        """Under FSDP, every module's params back to their shards: FSDP's root keeps them
        gathered after a forward, waiting for a backward, which a forward without grads
        never has (the optimizer updates the shards, so those must be what the module holds)."""
        if self.mode == "fsdp":
            from torch.distributed.fsdp import FSDPModule
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    @staticmethod
    def is_sharded(model: torch.nn.Module) -> bool:
        from torch.distributed.fsdp import FSDPModule
        return isinstance(model, FSDPModule)

    # ---- the data ----
    def local_part(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's slice of a batch, and its share of the batch's examples."""
        if not self.active:
            return x, y, 1.0
        if len(y) < self.world_size:
            raise ValueError(f"a batch of {len(y)} examples cannot be split over {self.world_size} ranks: "
                             "every rank needs at least one (use a batch size >= the number of processes)")
        xs, ys = x.tensor_split(self.world_size)[self.rank], y.tensor_split(self.world_size)[self.rank]
        return xs, ys, len(ys) / len(y)

    def pieces(self, x: torch.Tensor, y: torch.Tensor, size: int):
        """This rank's slices of (x, y), at most `size` examples each, as many on every rank."""
        step = size * self.world_size
        for i in range(0, len(x), step):
            xi, yi = x[i:i + step], y[i:i + step]
            if self.active:
                xi, yi = xi.tensor_split(self.world_size)[self.rank], yi.tensor_split(self.world_size)[self.rank]
            yield xi, yi

    # ---- collectives ----
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks, in place."""
        if self.active:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([int(flag)], device=self.device)).item())

    def from_rank0(self, fn: Callable):
        return from_rank0(fn, self._object_device) if self.active else fn()

    def per_rank(self, obj) -> Optional[list]:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere); obj itself when alone."""
        if not self.active:
            return obj
        import torch.distributed as dist
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def own(self, saved, what: str):
        """This rank's entry of a per_rank list read from a checkpoint."""
        if not self.active:
            return saved
        if not isinstance(saved, list) or len(saved) != self.world_size:
            raise ValueError(f"the checkpoint's {what} is not one per rank of {self.world_size}: it was written "
                             "by a run on another number of processes; resume on as many as it ran on")
        return saved[self.rank]
