"""Built-in tasks, generated on the fly from the seed (no downloads): modular arithmetic,
teacher-student regression, sklearn's bundled digits when scikit-learn is installed, and
MNIST-1D, built from its templates, when mnist1d is installed."""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Optional

import torch

from .config import TrainConfig
from .label_noise import corrupt_labels


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor  # class labels (int64), or float targets of shape (n, out_dim)
    x_val: torch.Tensor
    y_val: torch.Tensor
    in_dim: int            # features per example (MLP), or vocabulary size (token inputs)
    out_dim: int
    n_classes: Optional[int]  # None for regression
    noisy_mask: Optional[torch.Tensor] = None  # the training examples whose label --label-noise replaced

    def to(self, device) -> "Data":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Data(move(self.x_train), move(self.y_train), move(self.x_val), move(self.y_val),
                    self.in_dim, self.out_dim, self.n_classes, move(self.noisy_mask))


def make_task(cfg: TrainConfig) -> Data:
    data = clean_task(cfg)
    if cfg.label_noise > 0:  # the training labels only: validation measures the clean task
        data.y_train, data.noisy_mask = corrupt_labels(data.y_train, data.n_classes, cfg.label_noise, cfg.seed)
    return data


def clean_task(cfg: TrainConfig) -> Data:
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.task == "modular":
        return modular(cfg.p, cfg.op, cfg.train_frac, gen, tokens=cfg.model == "transformer",
                       power=cfg.model == "transformer" and cfg.transformer == "power")
    if cfg.task == "teacher-student":
        return teacher_student(cfg.n_train, cfg.n_val, cfg.input_dim, gen)
    if cfg.task == "mnist1d":
        return mnist1d(cfg.n_train, cfg.seed)
    return digits(cfg.n_train, gen)


def modular_table(p: int, op: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pair (a, b) with its c = a op b mod p; division skips b = 0."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    if op == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
        inverse = torch.tensor([pow(int(v), p - 2, p) for v in range(p)])  # Fermat: b^(p-2) = 1/b
        c = a * inverse[b] % p
    else:
        c = {"add": a + b, "sub": a - b, "mul": a * b}[op] % p
    return a, b, c


def modular(p: int, op: str, train_frac: float, gen: torch.Generator, tokens: bool = False,
            power: bool = False) -> Data:
    """a op b mod p. MLP inputs: one-hot a and one-hot b concatenated (2p features).
    Token inputs (transformer): [a, b, =] with '=' the token p. power: Power et al.'s
    equations as the Grokfast paper's code writes them, [a, op, b, =] with '=' the token p and
    'op' p + 1; mul skips b = 0, as div does (that code's x * y runs over 0 < y < p); out_dim
    is the whole vocabulary (p + 2: the head scores every token; the labels stay 0 .. p - 1)."""
    a, b, c = modular_table(p, op)
    if power:
        if op == "mul":
            a, b, c = a[b != 0], b[b != 0], c[b != 0]
        x = torch.stack([a, torch.full_like(a, p + 1), b, torch.full_like(a, p)], dim=1)
        in_dim = p + 2
    elif tokens:
        x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
        in_dim = p + 1
    else:
        x = torch.cat([torch.nn.functional.one_hot(a, p), torch.nn.functional.one_hot(b, p)], 1).float()
        in_dim = 2 * p
    perm = torch.randperm(len(c), generator=gen)
    n_train = max(1, min(len(c) - 1, round(train_frac * len(c))))
    tr, va = perm[:n_train], perm[n_train:]
    return Data(x[tr], c[tr], x[va], c[va], in_dim, in_dim if power else p, p)


def teacher_student(n_train: int, n_val: int, input_dim: int, gen: torch.Generator,
                    teacher_width: int = 32) -> Data:
    """Gaussian inputs labelled by a random 2-layer tanh teacher, targets of unit variance."""
    x = torch.randn(n_train + n_val, input_dim, generator=gen)
    w = torch.randn(input_dim, teacher_width, generator=gen) / input_dim ** 0.5
    v = torch.randn(teacher_width, 1, generator=gen)
    y = torch.tanh(x @ w) @ v
    y = (y - y.mean()) / y.std()
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:], input_dim, 1, None)


def digits(n_train: int, gen: torch.Generator) -> Data:
    """sklearn's 8x8 digits (1797 images, shipped inside the wheel); pixels standardized
    with the training split's statistics; the rest of the images are the validation set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("task 'digits' needs scikit-learn, which ships the images offline: "
                         "pip install scikit-learn (or use --task modular / teacher-student)") from None
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    if not n_train < len(y):
        raise ValueError(f"--n-train {n_train}: digits has {len(y)} images; keep some for validation")
    perm = torch.randperm(len(y), generator=gen)
    tr, va = perm[:n_train], perm[n_train:]
    x_train, x_val = standardize(x[tr], x[va])
    return Data(x_train, y[tr], x_val, y[va], x.shape[1], 10, 10)


def standardize(train: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both scaled per feature by the training split's mean and std. A feature constant over
    the training split is only centered (scale 1, as sklearn's StandardScaler): dividing by a
    tiny floor would send its rare nonzero values elsewhere (a border pixel of a validation
    digit) to thousands of stds, and every validation loss with them."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (train - mean) / std, (other - mean) / std


def mnist1d(n_train: int, seed: int) -> Data:
    """MNIST-1D (Greydanus 2020): 5000 1-D signals of 40 points, 10 classes, built from the
    package's templates with its default arguments and `seed` (never downloaded). Validation:
    its 1000 test signals; training: the first n_train of its 4000 training signals (already
    shuffled). Standardized per feature with the training examples' statistics."""
    if seed >= 2 ** 32:
        raise ValueError(f"--seed {seed}: mnist1d builds its signals with numpy's global RNG, which takes seeds < 2**32")
    x_all, y_all, x_val, y_val = _mnist1d_arrays(seed)
    if not n_train <= len(y_all):
        raise ValueError(f"--n-train {n_train}: mnist1d has {len(y_all)} training signals (and 1000 for validation)")
    x = x_all[:n_train]
    x, x_val = standardize(x, x_val)
    # the labels are copies: the arrays stay cached, whatever a caller does to its Data
    return Data(x, y_all[:n_train].clone(), x_val, y_val.clone(), x.shape[1], 10, 10)


@functools.lru_cache(maxsize=8)  # building takes about a second: once per seed in a process (a sweep)
def _mnist1d_arrays(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ValueError("task 'mnist1d' needs the mnist1d package, which builds the signals offline: "
                         "pip install mnist1d (or use --task digits / modular / teacher-student)") from None
    import numpy as np
    args = get_dataset_args()
    args.seed = seed
    saved = random.getstate(), np.random.get_state()
    try:  # make_dataset seeds the global random and numpy RNGs: leave them as they were
        d = make_dataset(args)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(d["x"]), as_y(d["y"]), as_x(d["x_test"]), as_y(d["y_test"])
