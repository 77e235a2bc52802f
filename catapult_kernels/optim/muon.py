"""Muon (Jordan et al. 2024; torch.optim.Muon's formula): momentum, then Newton-Schulz
orthogonalization of each 2-D update, then decoupled weight decay and a shape-scaled step.
Groups with use_muon=False take AdamW's step instead, so one optimizer trains a whole model
(muon_param_groups splits one).

A Muon group's step, per (device, dtype) bucket:
1. muon_momentum_ (one fused multi-tensor op): the grad pipeline (clip, AGC, Grokfast,
   maximize, skip), buf = lerp(buf, g, 1 - momentum), and the direction (Nesterov's
   lerp(g, buf, momentum), or buf) written into a buffer;
2. Newton-Schulz (newton_schulz.py: torch's bfloat16 chain, per matrix on the CPU, batched
   by shape on a GPU);
3. muon_update_ (one fused op): p = p (1 - lr wd) - lr ratio u, one lr ratio per param
   from its shape (adjust_lr_fn).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .. import ops
from .base import Bucket, FusedOptimizer, Part, StepControl
from .newton_schulz import orthogonalize

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")
# An AdamW group's defaults where it omits them (Muon's eps, 1e-7, is not AdamW's).
ADAMW_DEFAULTS = {"betas": (0.9, 0.95), "eps": 1e-8}


def lr_ratio(shape: tuple, adjust_lr_fn: Optional[str]) -> float:
    """torch.optim.Muon's lr adjustment for a matrix of `shape` (A, B = its first two dims)."""
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    return math.sqrt(a / b)  # spectral_unclamped


def matrix_shape(shape: tuple, flatten: bool) -> tuple:
    """The shape of the matrix Muon orthogonalizes for a param of `shape`: itself (2-D), or
    with flatten its dims after the first flattened (a conv weight (out, in, kh, kw) is
    (out, in * kh * kw))."""
    return (shape[0], math.prod(shape[1:])) if flatten and len(shape) > 2 else tuple(shape)


def as_matrix(t: torch.Tensor, flatten: bool) -> torch.Tensor:
    return t.reshape(matrix_shape(t.shape, flatten))


def laid_out_like(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The update u (a bfloat16 matrix, maybe a transposed view) as the kernels take it: p's
    shape, dtype and layout, in one copy."""
    return torch.empty_like(p).copy_(u.reshape(p.shape))


@functools.lru_cache(maxsize=256)
def _ratios(values: tuple, device: torch.device) -> torch.Tensor:
    """The lr ratios of a bucket as a float32 tensor on device, made once (a copy from host
    memory each step would wait for the GPU)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


class Muon(FusedOptimizer):
    """torch.optim.Muon's arguments, defaults and numbers on 2-D params: momentum (state key
    `momentum_buffer`), Nesterov, Newton-Schulz in bfloat16 with ns_coefficients and
    ns_steps, weight decay p *= 1 - lr * weight_decay with the unadjusted lr, and the step
    lr * ratio, ratio from adjust_lr_fn ("original": sqrt(max(1, A / B)); "match_rms_adamw":
    0.2 sqrt(max(A, B)), Moonlight's, which lets AdamW's lr and weight decay carry over;
    "spectral_unclamped": sqrt(A / B)).

    Group keys beyond torch's: use_muon (default True): False steps the group with AdamW
    (its own lr, betas (default (0.9, 0.95)), eps (default 1e-8), weight_decay; state keys
    `step`, `exp_avg`, `exp_avg_sq`); flatten (default False): a Muon group's N-D params
    (conv weights, stacked experts) are orthogonalized as matrices of their first dim by the
    rest, instead of refused. Plus the options of FusedOptimizer (max_grad_norm over every
    group, skip_nonfinite, grokfast, agc, backend), each applied to the grads before the
    momentum; state_dtype: how every group's state (momentum, AdamW's moments, the Grokfast
    EMA) is stored; master_weights and rounding_seed: how 16-bit params keep their updates.

    Distributed (distributed/muon.py): DTensor params (FSDP2, tensor parallel) are made whole
    for Newton-Schulz, each matrix orthogonalized once, by one rank, the matrices dealt round
    robin over the ranks, and every rank keeps its shard of the result. ns_group: a process
    group (e.g. torch.distributed.group.WORLD under DDP) over which the Newton-Schulz of
    whole params is spread the same way (None: each rank orthogonalizes all of its own)."""

    _op = "muon_update_"
    _flattenable = False  # Newton-Schulz needs each matrix whole

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn: Optional[str] = None, *,
                 maximize=False, max_grad_norm: Optional[float] = None, skip_nonfinite=False, grokfast=None,
                 agc: Optional[float] = None, backend="auto", flat=False, ns_group=None,
                 state_dtype: Optional[torch.dtype] = None,
                 master_weights: Optional[str] = None, rounding_seed: int = 0):
        if ns_group is not None and not isinstance(ns_group, torch.distributed.ProcessGroup):
            raise ValueError(f"Invalid ns_group: {ns_group!r} (a torch.distributed process group, or None)")
        self.ns_group = ns_group
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, maximize=maximize, use_muon=True, flatten=False)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         grokfast=grokfast, agc=agc, backend=backend, flat=flat, state_dtype=state_dtype,
                         master_weights=master_weights, rounding_seed=rounding_seed)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("ns_group", None)  # a process group is not pickled

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("use_muon", True) is False:
            param_group = {**ADAMW_DEFAULTS, **param_group}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"] if group["use_muon"] else ():
            why = None
            if p.dim() != 2 and not (group["flatten"] and p.dim() > 2):
                why = (f"Muon only supports 2D parameters whereas we found a parameter with size: {tuple(p.shape)} "
                       "(give it to an AdamW group, use_muon=False, as muon_param_groups does; or flatten=True "
                       "for N-D weights)")
            if why:
                self.param_groups.pop()
                raise ValueError(why)

    def _check_group(self, group: dict, full: bool = True) -> None:
        super()._check_group(group, full)
        if not isinstance(group["use_muon"], bool):
            raise ValueError(f"Invalid use_muon: {group['use_muon']!r} (True: Muon, False: AdamW)")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"weight decay should be >= 0 but is: {group['weight_decay']}")
        if not group["use_muon"]:
            self._check_adam_like(group)
            return
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"momentum should be in [0, 1) but is: {group['momentum']}")
        if len(group["ns_coefficients"]) != 3:
            raise ValueError(f"ns_coefficients must be 3 numbers (a, b, c), got {group['ns_coefficients']!r}")
        if not (isinstance(group["ns_steps"], int) and 0 <= group["ns_steps"] < 100):
            raise ValueError(f"ns_steps must be an int in [0, 100), got {group['ns_steps']!r}")
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {group['adjust_lr_fn']} is not supported; "
                             f"use one of {ADJUST_LR_FNS}")

    def _group_op(self, group: dict) -> str:
        return "muon_update_" if group["use_muon"] else "adamw_"

    def _state_keys(self, group: dict) -> tuple:
        return ("momentum_buffer",) if group["use_muon"] else ("exp_avg", "exp_avg_sq")

    def _hyper(self, group: dict, part: Part) -> dict:  # an AdamW group's adamw_ arguments
        beta1, beta2 = group["betas"]
        return dict(beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), decoupled_weight_decay=True, amsgrad=False)

    def _update(self, bucket: Bucket, control: StepControl) -> None:
        if not bucket.group["use_muon"]:
            return super()._update(bucket, control)
        group = bucket.group
        directions = [torch.empty_like(g) for g in bucket.grads]
        lr = self._lr_tensor(group, bucket.device)
        for part in self._parts(bucket):
            pipeline = self._pipeline_args(bucket, part, control)
            ops.update_("muon_momentum_", part.take(directions), part.take(bucket.grads),
                        [part.take(bucket.columns["momentum_buffer"])], None, lr, pipeline, self.backend,
                        state_scales=self._state_scales(bucket, part, ("momentum_buffer",), pipeline),
                        momentum=float(group["momentum"]), nesterov=bool(group["nesterov"]))
        flatten, ns = group["flatten"], (group["ns_coefficients"], group["ns_steps"], float(group["eps"]))
        if bucket.shardings is not None or self.ns_group is not None:  # the work spread over the ranks
            from ..distributed.muon import orthogonalize_across_ranks
            matrices = orthogonalize_across_ranks(directions, bucket.keys, bucket.shardings or [None] * len(directions),
                                                  lambda t: as_matrix(t, flatten), *ns, group=self.ns_group)
        else:
            matrices = orthogonalize([as_matrix(d, flatten) for d in directions], *ns)
        updates = [laid_out_like(p, u) for u, p in zip(matrices, bucket.params)]
        # the whole param's shape (a DTensor's, not its shard's)
        ratios = _ratios(tuple(lr_ratio(matrix_shape(k.shape, flatten), group["adjust_lr_fn"]) for k in bucket.keys),
                         bucket.device)
        ops.update_("muon_update_", bucket.params, updates, [], None, lr, ops.PipelineArgs(skip=control.skip),
                    self.backend, master_weights=self._masters(bucket), weight_decay=float(group["weight_decay"]),
                    lr_ratios=ratios)


def muon_param_groups(model: torch.nn.Module, exclude: tuple = ("embed", "head", "lm_head", "unembed"),
                      flatten: bool = False) -> list[dict]:
    """Param groups that train a whole model with one Muon: the 2-D params (and with flatten
    the N-D ones, as matrices of their first dim by the rest) outside the modules whose
    qualified name contains an excluded word (a case-sensitive substring: embeddings and
    output heads, as Muon's authors advise) in a Muon group, every other param (biases, norm
    scales, embeddings, heads) in an AdamW group (use_muon=False). Tied params appear once.
    Empty groups are left out."""
    muon, adamw = [], []
    for name, p in model.named_parameters():  # each tied param once
        module = name.rpartition(".")[0]
        matrix = p.dim() == 2 or (flatten and p.dim() > 2)
        (muon if matrix and not any(word in module for word in exclude) else adamw).append(p)
    groups = [{"params": muon, "use_muon": True, "flatten": flatten}] if muon else []
    return groups + ([{"params": adamw, "use_muon": False}] if adamw else [])
