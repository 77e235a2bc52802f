"""SGD, a drop-in for torch.optim.SGD (momentum, dampening, nesterov, coupled weight
decay, maximize) with the grad pipeline fused in. Plain SGD (momentum=0), what the
catapult experiments run, reads p and g and writes p: nothing else."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .base import Bucket, FusedOptimizer, Part, StepControl


class SGD(FusedOptimizer):
    """torch.optim.SGD's arguments and state key (`momentum_buffer`), plus the options of
    FusedOptimizer (max_grad_norm, skip_nonfinite, grokfast, agc, backend, flat, state_dtype:
    how the momentum buffer is stored, master_weights and rounding_seed: how 16-bit params
    keep their updates; plain SGD too).

    A momentum buffer starts as the first step's grad, as in torch, also when the steps
    before were skipped (GradScaler overflow, skip_nonfinite)."""

    _op = "sgd_"
    _sets_new_state = True

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 *, maximize=False, foreach: Optional[bool] = None, differentiable=False,
                 fused: Optional[bool] = None, max_grad_norm: Optional[float] = None,
                 skip_nonfinite=False, grokfast=None, agc: Optional[float] = None, backend="auto", flat=False,
                 state_dtype: Optional[torch.dtype] = None,
                 master_weights: Optional[str] = None, rounding_seed: int = 0):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         grokfast=grokfast, agc=agc, backend=backend, flat=flat, state_dtype=state_dtype,
                         master_weights=master_weights, rounding_seed=rounding_seed)

    def _check_group(self, group: dict, full: bool = True) -> None:
        super()._check_group(group, full)
        if not group["momentum"] >= 0.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _state_keys(self, group: dict) -> tuple:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _state(self, p: torch.Tensor, group: dict, device: torch.device) -> dict:
        if group["momentum"] == 0:
            return {}  # plain SGD keeps no state, as torch
        return super()._state(p, group, device)

    def _hyper(self, group: dict, part: Part, weight_decay=None, trust_ratios=None) -> dict:
        momentum = float(group["momentum"])
        return dict(momentum=momentum, dampening=float(group["dampening"]),
                    weight_decay=float(group["weight_decay"] if weight_decay is None else weight_decay),
                    nesterov=bool(group["nesterov"]), first_step=bool(part.fresh and momentum != 0),
                    trust_ratios=trust_ratios)

    def _sgd_step(self, bucket: Bucket, control: StepControl, weight_decay: float,
                  trust_ratios=None, only=None, pipeline=None) -> None:
        """The sgd_ op over the params of the bucket listed in `only` (all of them by default),
        with optional trust ratios (LARS), one per param of `only`, in its order; pipeline:
        (bucket, part, control) -> its PipelineArgs, by default the optimizer's."""
        group = bucket.group
        momentum = float(group["momentum"])
        lr = self._lr_tensor(group, bucket.device)
        only = list(range(len(bucket.params))) if only is None else only
        position = {i: k for k, i in enumerate(only)}
        # New buffers are set to the grad (torch's first step), the others updated.
        for part in self._parts(bucket, by_fresh=momentum != 0):
            part.idx = [i for i in part.idx if i in position]
            if not part.idx:
                continue
            trust = trust_ratios
            if trust is not None and part.idx != only:  # a subset: its ratios, gathered on the device
                index = torch.tensor([position[i] for i in part.idx], dtype=torch.int64)
                if trust.is_cuda:  # a list index would copy from pageable memory: a sync
                    index = index.pin_memory().to(trust.device, non_blocking=True)
                trust = trust.index_select(0, index)
            buffers = part.take(bucket.columns["momentum_buffer"]) if momentum != 0 else []
            args = (pipeline or self._pipeline_args)(bucket, part, control)
            scales = self._state_scales(bucket, part, ("momentum_buffer",) if momentum != 0 else (), args)
            ops.update_("sgd_", part.take(bucket.params), part.take(bucket.grads), [buffers], None, lr, args,
                        self.backend, state_scales=scales, master_weights=self._masters(bucket, part),
                        **self._hyper(group, part, weight_decay, trust))
