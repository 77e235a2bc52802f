"""torch.distributed support of the fused optimizers: DTensor shards (FSDP2, tensor
parallel, HSDP) and ZeRO-1 partitions, whose global and per-tensor norms need one
collective over the ranks that hold the other pieces.

sharding.py: what a DTensor's placements mean for the kernels and for a norm.
norms.py: the placement-aware reductions (global norm, per-tensor norms, AGC rows).
zero.py: ZeroRedundancyOptimizer, whose ranks each hold a part of the params.
muon.py: Muon's Newton-Schulz on whole matrices, each done once, spread over the ranks.

Nothing here imports torch.distributed's DTensor or collectives until a step meets a
DTensor: a program that never uses them does not pay for their import.
"""
