"""Label noise: a fixed fraction of the training labels replaced by another class, for
measuring how much of the noise a network memorizes (Zhang et al. 2017; the noisy half of
deep double descent, Nakkiran et al. 2019)."""
from __future__ import annotations

import hashlib

import torch


def corrupt_labels(labels: torch.Tensor, n_classes: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with round(fraction * n) of them replaced, the boolean mask of those replaced).
    Which examples, and the class each gets (uniform over the n_classes - 1 others), come from
    a generator of their own derived from `seed`, so the split and the init drawn from the same
    seed are not correlated with the noise."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--label-noise must lie in [0, 1), got {fraction}")
    if n_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {n_classes}")
    gen = torch.Generator().manual_seed(_label_noise_seed(seed))
    n = len(labels)
    corrupted = torch.randperm(n, generator=gen)[:round(fraction * n)]
    shift = torch.randint(1, n_classes, (len(corrupted),), generator=gen)  # 1 .. C-1: never the label itself
    noisy_labels = labels.clone()
    noisy_labels[corrupted] = (labels[corrupted] + shift.to(labels.device)) % n_classes
    mask = torch.zeros(n, dtype=torch.bool, device=labels.device)
    mask[corrupted] = True
    return noisy_labels, mask


def _label_noise_seed(seed: int) -> int:
    """A 63-bit seed of its own for `seed`: not seed + k, which another seed's split would share."""
    return int.from_bytes(hashlib.sha256(f"label-noise/{seed}".encode()).digest()[:8], "little") >> 1
