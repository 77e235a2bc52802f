"""Adversarial evaluation: how much accuracy remains when each input is moved, within an
L-infinity ball of radius eps, in the direction that raises the loss the most.

Inputs are perturbed as the model sees them: the trainer's digits and MNIST-1D are
standardized by the training split's per-feature mean and std, so there eps is in units of
a feature's std; the modular MLP's one-hot operands are floats too (eps < 0.5 there, so
that every input in the ball still reads as its own operands: see TrainConfig.validate).
Nothing is clamped to a data range: the ball is the whole threat model. The attacked loss
is the one the model trains with (cross-entropy or MSE).

FGSM (Goodfellow et al. 2015): one step of eps along the sign of the input gradient.
PGD (Madry et al. 2018): `steps` signed steps of `step_size` (default 2.5 eps / steps, Madry
et al.'s, so the iterates can cross the ball and back), each projected onto the ball. It
starts at the clean input, not at a random point of the ball: the evaluation draws no random
numbers, and one step of eps is FGSM exactly.

The attacks run the model in eval mode (Dropout off, BatchNorm on its running statistics;
every module's flag restored after), so each example is attacked on its own even in a batch;
they ask autograd for the gradient of the inputs alone (no param's .grad is written, no
graph is kept) and return detached tensors."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch

ATTACKS = ("fgsm", "pgd")
PIECE = 8192  # examples per forward: bounded memory on large validation sets


def default_step_size(eps: float, steps: int) -> float:
    return 2.5 * eps / steps


def fgsm(model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """x moved by eps along the sign of the loss's input gradient."""
    _check_radius(eps)
    x = x.detach()
    return x + eps * _ascent(model, loss_fn, x, y)


def pgd(model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, eps: float,
        steps: int, step_size: float) -> torch.Tensor:
    """`steps` signed gradient steps of `step_size` from x, each projected onto the L-inf
    ball of radius eps around x."""
    _check_radius(eps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"PGD steps must be an integer >= 1, got {steps!r}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"PGD step_size must be a finite number > 0, got {step_size}")
    x = x.detach()
    low, high = x - eps, x + eps
    x_adv = x
    for _ in range(steps):
        x_adv = torch.clamp(x_adv + step_size * _ascent(model, loss_fn, x_adv, y), low, high)
    return x_adv


@dataclass(frozen=True)
class Attack:
    """An attack and its settings, applied by calling it: attack(model, loss_fn, x, y).
    step_size None: default_step_size(eps, steps). steps and step_size are PGD's."""
    kind: str
    eps: float
    steps: int = 10
    step_size: Optional[float] = None

    def __post_init__(self):
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; choose one of: {', '.join(ATTACKS)}")
        _check_radius(self.eps)
        if self.kind == "fgsm" and self.step_size is not None:
            raise ValueError("step_size is PGD's: FGSM takes one step of eps")

    def __call__(self, model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "fgsm":
            return fgsm(model, loss_fn, x, y, self.eps)
        step_size = default_step_size(self.eps, self.steps) if self.step_size is None else self.step_size
        return pgd(model, loss_fn, x, y, self.eps, self.steps, step_size)


def robust_accuracy(model: torch.nn.Module, loss_fn: Callable,
                    data: Union[tuple[torch.Tensor, torch.Tensor], Iterable], attack: Attack) -> float:
    """The fraction of examples the model classifies correctly both as given and after the
    attack (the clean input lies in the ball: an example wrong there is not robust either),
    so it is at most the clean accuracy. data: (inputs, labels) tensors, or batches of them."""
    batches = [data] if isinstance(data, (tuple, list)) and torch.is_tensor(data[0]) else data
    device = next(model.parameters()).device
    robust, total = 0, 0
    for x, y, *_ in batches:
        _check_attackable(x, y)
        for xi, yi in zip(x.to(device).split(PIECE), y.to(device).split(PIECE)):
            x_adv = attack(model, loss_fn, xi, yi)
            with torch.no_grad(), _eval_mode(model):
                right = (model(xi).argmax(-1) == yi) & (model(x_adv).argmax(-1) == yi)
            robust += int(right.sum())
            total += len(yi)
    if total == 0:
        raise ValueError("robust accuracy: the data holds no examples")
    return robust / total


def _ascent(model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sign of d loss / d x at x."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), _eval_mode(model):
        # times len(x): a sum over examples, each example's gradient at full scale (a mean's
        # 1/n would shrink a confident example's to 0 in float32, and its sign with it)
        (grad,) = torch.autograd.grad(loss_fn(model(x), y) * len(x), x)
    return grad.sign()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    saved = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, was_training in saved:
            m.training = was_training


def _check_radius(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"attack radius eps must be a finite number > 0, got {eps!r}")


def _check_attackable(x: torch.Tensor, y: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"an L-inf attack perturbs float inputs; these are {x.dtype} (tokens have no ball around "
                         "them, and replacing one changes the answer)")
    if y.is_floating_point():
        raise ValueError("robust accuracy needs class labels; these targets are floats (a regression)")
