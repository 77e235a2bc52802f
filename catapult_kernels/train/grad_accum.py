"""--grad-accum K: each step's batch (the global one: --batch-size, or the whole training set)
split into K micro-batches, contiguous and as equal as tensor_split makes them, one forward
and backward each (nanoGPT's and HF Trainer's convention: the batch stays the batch, its
memory is divided by K). Each micro-batch's mean loss is weighted by its share of the batch,
so the grads summed over the K are the grads of the batch's mean loss: the step equals the
unaccumulated one up to float rounding, and its loss is the batch's mean (for equal parts,
the mean of the micro-batches' losses). In a parallel run each rank splits its slice, and
the grads are reduced over the ranks once, with the last micro-batch."""
from __future__ import annotations

import contextlib

import torch


def micro_batches(x: torch.Tensor, y: torch.Tensor, k: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(inputs, targets, share of the batch) of each of the k micro-batches of (x, y)."""
    if len(y) < k:
        raise ValueError(f"a batch of {len(y)} examples cannot be split into --grad-accum {k} micro-batches: "
                         "each needs at least one example")
    if k == 1:
        return [(x, y, 1.0)]
    return [(xi, yi, len(yi) / len(y)) for xi, yi in zip(x.tensor_split(k), y.tensor_split(k))]


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, parallel: str, index: int, k: int):
    """The backward of micro-batch `index` of k: under DDP, all but the last in no_sync() (the
    grads accumulate locally, one all-reduce with the last); under FSDP2 the reduce-scatter
    waits for the last the same way (set_requires_gradient_sync)."""
    last = index == k - 1
    if k > 1 and parallel == "ddp" and not last:
        with model.no_sync():
            yield
        return
    if k > 1 and parallel == "fsdp":
        model.set_requires_gradient_sync(last)
    yield
