"""What every fused optimizer shares: the step pipeline around its update kernel.

step() = validate every grad and every state tensor (before anything changes; missing
state is created as zeros, as torch does) -> one global grad-norm pass (when clipping or
skip_nonfinite needs it) -> per (group, device, dtype) bucket: the AGC row factors (when
the group has agc) -> bump the step counts and run the optimizer's fused update kernel,
which reads the clip coefficient, the GradScaler scale and the skip flag from device
tensors and applies the grad pipeline of regularizers.py. No host sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops
from .regularizers import agc_scales, check_agc, check_grokfast, grad_multiplier, rows_are_contiguous

SUPPORTED_DTYPES = ops.SUPPORTED_DTYPES


@dataclass
class Bucket:
    """The params of one group on one device with one dtype, their grads and states."""
    group: dict
    device: torch.device
    params: list
    grads: list
    states: Optional[list] = None
    fresh: Optional[list] = None      # per param: its state was empty before this step
    ema_fresh: Optional[list] = None  # per param: its grokfast_ema is new this step
    agc_scales: Optional[list] = None  # per param: its AGC row factors (group agc set)


@dataclass
class Part:
    """The params of a bucket that one kernel call takes: those whose state and Grokfast
    EMA are equally new (a new momentum buffer or EMA is set, not updated)."""
    idx: list
    fresh: bool
    ema_fresh: bool

    def take(self, items: list) -> list:
        return [items[i] for i in self.idx]


@dataclass
class StepControl:
    """Device tensors that one step's kernels read instead of host values."""
    grad_norm: Optional[torch.Tensor]      # global norm of the grads as given (scaled under AMP)
    grad_scale: Optional[torch.Tensor]     # GradScaler's scale, when grads are still scaled
    skip: Optional[torch.Tensor]           # float32, 1: leave everything untouched, else 0

    def on(self, device: torch.device) -> "StepControl":
        # A CPU kernel reads its scalars at once: a copy to the CPU must have landed.
        non_blocking = device.type == "cuda"
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return StepControl(move(self.grad_norm), move(self.grad_scale), move(self.skip))


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the drop-in optimizers. Subclasses set `defaults`, validate their own
    hyperparameters in `_check_group`, and implement `_state_keys`, `_state` and `_update`.

    Options every optimizer takes (keyword-only; grokfast and agc are also per-group keys):
    max_grad_norm: clip the global L2 norm of all grads to this (None: no clipping);
        equals torch.nn.utils.clip_grad_norm_ then step, but the grads are left as given.
    skip_nonfinite: skip the whole step on the device when that norm is inf or nan.
    grokfast: None, or dict(alpha=0.98, lamb=2.0): the Grokfast EMA gradient filter.
    agc: None, or the adaptive gradient clipping ratio (NFNets; e.g. 0.01).
    backend: 'auto', 'cpu', 'cuda' or 'triton'.
    The pipeline order (unscale, global clip, AGC, Grokfast, weight decay, update) is in
    regularizers.py. After a step, `grad_norm` holds the pre-clip global norm (a 0-d device
    tensor) when it was computed (max_grad_norm or skip_nonfinite), and `skipped_steps`
    the count of skips."""

    # torch.amp.GradScaler then hands us grad_scale and found_inf instead of unscaling
    # the grads itself, as it does for torch's fused optimizers.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, *, max_grad_norm: Optional[float] = None,
                 skip_nonfinite: bool = False, grokfast=None, agc: Optional[float] = None,
                 backend: str = "auto"):
        ops.check_backend_name(backend)
        defaults = dict(defaults, grokfast=check_grokfast(grokfast), agc=check_agc(agc))
        if max_grad_norm is not None and not (max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0, or None for no clipping)")
        if defaults.get("differentiable"):
            raise ValueError("differentiable=True is not supported: the fused kernels update in place "
                             "and are not differentiable; use torch.optim for that")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.backend = backend
        # What step() reports. A dict mutated in place, not attributes set on self:
        # torch.compile (dynamo) refuses attribute writes on an optimizer inside a step.
        self._report: dict[str, Optional[torch.Tensor]] = {"grad_norm": None, "skipped_steps": None}
        super().__init__(params, defaults)

    # ---- hyperparameters ------------------------------------------------------------
    def _check_group(self, group: dict) -> None:
        """Raise ValueError naming the bad hyperparameter. Subclasses extend this."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must have one element")
        elif not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        group["grokfast"] = check_grokfast(group.get("grokfast"))
        group["agc"] = check_agc(group.get("agc"))

    @staticmethod
    def _check_adam_like(group: dict, beta_one_allowed: bool = False) -> None:
        """torch.optim.Adam's checks, with torch's messages: eps >= 0 (when the group has
        one), weight_decay >= 0, betas in [0, 1) (or [0, 1] if beta_one_allowed)."""
        if "eps" in group and not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        for i, beta in enumerate(group["betas"]):
            if not (0.0 <= float(beta) < 1.0 or (beta_one_allowed and float(beta) == 1.0)):
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            devices = {p.device for p in group["params"]}
            if len(devices) > 1:
                raise ValueError(f"the params of one group must be on one device, got {sorted(map(str, devices))}")
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"complex params are not supported (a param of dtype {p.dtype})")
                if p.dtype not in SUPPORTED_DTYPES:
                    raise ValueError(f"param dtype {p.dtype} is not supported; use float32, bfloat16 or float16")
        except ValueError:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # A state_dict from torch (or an older torch) may lack some of our group keys.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ---- the step -------------------------------------------------------------------
    @property
    def grad_norm(self) -> Optional[torch.Tensor]:
        """The last step's global L2 grad norm before clipping (unscaled under AMP), a 0-d
        tensor on the params' device; None unless max_grad_norm or skip_nonfinite is set."""
        return self._report["grad_norm"]

    @property
    def skipped_steps(self) -> torch.Tensor:
        """Steps skipped on the device so far (non-finite grads), a 0-d int64 tensor."""
        skipped = self._report["skipped_steps"]
        return torch.zeros((), dtype=torch.int64) if skipped is None else skipped

    def _buckets(self) -> list[Bucket]:
        """Params with grads, grouped by (group, device, dtype), all checked before any change.
        A step over thousands of small tensors is bound by this loop: keep it lean."""
        buckets: list[Bucket] = []
        for gi, group in enumerate(self.param_groups):
            self._check_group(group)
            by_key: dict[tuple, Bucket] = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                key = (p.device, p.dtype)
                if (g.layout is not torch.strided or g.dtype is not key[1] or key[1] not in SUPPORTED_DTYPES
                        or g.shape != p.shape or g.device != key[0] or not (p.is_contiguous() or ops.is_dense(p))):
                    self._raise_bad_grad(gi, group, p)
                if not (g.is_contiguous() and p.is_contiguous()):
                    if not ops.same_layout(g, p):
                        g = torch.empty_like(p).copy_(g)  # the kernels walk grads laid out like params
                    if group["agc"] is not None and not rows_are_contiguous(p):
                        raise RuntimeError(f"AGC needs each row (dim 0 slice) of a param contiguous in memory; "
                                           f"param {[id(q) for q in group['params']].index(id(p))} of group {gi} has strides "
                                           f"{p.stride()}")
                bucket = by_key.get(key)
                if bucket is None:
                    bucket = by_key[key] = Bucket(group, key[0], [], [])
                bucket.params.append(p)
                bucket.grads.append(g)
            devices = {device for device, _ in by_key}
            if len(devices) > 1:
                raise RuntimeError(f"the params of group {gi} are on several devices: {sorted(map(str, devices))}")
            for bucket in by_key.values():
                ops.resolve_backend(self.backend, bucket.device)
                buckets.append(bucket)
        return buckets

    def _raise_bad_grad(self, gi: int, group: dict, p: torch.Tensor) -> None:
        """The error naming what is wrong with param p and its grad."""
        g, where = p.grad, f"param {[id(q) for q in group['params']].index(id(p))} of group {gi}"
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({where})")
        if p.is_complex():
            raise RuntimeError(f"complex params are not supported ({where})")
        if p.dtype not in SUPPORTED_DTYPES:
            raise RuntimeError(f"param dtype {p.dtype} is not supported ({where}); use float32, bfloat16 or float16")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise RuntimeError(f"the grad of {where} is {tuple(g.shape)} {g.dtype} on {g.device} "
                               f"but the param is {tuple(p.shape)} {p.dtype} on {p.device}")
        raise RuntimeError(f"{where} is a strided view (strides {p.stride()}); "
                           "the fused kernels need params that are dense in memory")

    def _step_control(self, buckets: list[Bucket]) -> StepControl:
        grad_scale = getattr(self, "grad_scale", None)   # set by GradScaler.step
        found_inf = getattr(self, "found_inf", None)
        grad_norm = None
        if self.max_grad_norm is not None or self.skip_nonfinite:
            grads = [g for b in buckets for g in b.grads]
            grad_norm = ops.global_norm(grads, 2.0, self.backend)
            self._report["grad_norm"] = (grad_norm if grad_scale is None
                                         else grad_norm / grad_scale.to(grad_norm.device))
        # GradScaler's found_inf is a sum over devices; the kernels and step counts want 0 or 1.
        skip = None if found_inf is None else (found_inf != 0).to(torch.float32)
        if self.skip_nonfinite and grad_norm is not None:
            nonfinite = (~torch.isfinite(grad_norm)).to(torch.float32)
            skip = nonfinite if skip is None else torch.maximum(skip.to(nonfinite.device), nonfinite)
        if skip is not None and buckets:
            counted = (skip != 0).to(torch.int64)
            skipped = self._report["skipped_steps"]
            self._report["skipped_steps"] = counted if skipped is None else skipped + counted.to(skipped.device)
        return StepControl(grad_norm, grad_scale, skip)

    @staticmethod
    def _advance_steps(steps: list, control: StepControl) -> None:
        """state['step'] += 1, or += 0 on a skipped step, without reading the flag on the host."""
        if control.skip is None:
            torch._foreach_add_(steps, 1.0)
        else:
            # A list of the one tensor, not the tensor: torch.compile would read a 0-d CPU
            # tensor given as a scalar on the host.
            keep = 1.0 - control.skip
            torch._foreach_add_(steps, [keep] * len(steps))

    @staticmethod
    def _step_tensor(state: dict, device: torch.device) -> torch.Tensor:
        """state['step'] as the kernels read it: a float32 tensor on the param's device.
        torch may have saved it as a CPU tensor or a float; convert once."""
        step = state.get("step", 0.0)
        if type(step) is not torch.Tensor or step.dtype is not torch.float32 or step.device != device:
            step = torch.as_tensor(step, dtype=torch.float32).to(device).reshape(())
            state["step"] = step
        return step

    @staticmethod
    def _lr_tensor(group: dict, device: torch.device) -> torch.Tensor:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return lr.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
        return torch.full((), lr, dtype=torch.float32, device=device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._buckets()
        for bucket in buckets:
            group = bucket.group
            bucket.fresh = [not self.state.get(p) for p in bucket.params]
            bucket.ema_fresh = [group["grokfast"] is not None and "grokfast_ema" not in self.state.get(p, ())
                                for p in bucket.params]
            bucket.states = [self._state(p, group, bucket.device) for p in bucket.params]
            if group["grokfast"] is not None:
                bucket.states = [self._with_ema(p) for p in bucket.params]
            self._check_states(bucket)
        control = self._step_control(buckets)
        for bucket in buckets:
            on_device = control.on(bucket.device)
            if bucket.group["agc"] is not None:
                mult = grad_multiplier(on_device.grad_norm, self.max_grad_norm or 0.0, on_device.grad_scale,
                                       bucket.device)
                bucket.agc_scales = agc_scales(bucket.params, bucket.grads, bucket.group["agc"], mult)
            self._update(bucket, on_device)
        return loss

    def _with_ema(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "grokfast_ema" not in state:
            state["grokfast_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _parts(bucket: Bucket, by_fresh: bool = False) -> list[Part]:
        """The bucket in as few kernel calls as the newness of its states allows: one,
        except on the step where some params are new and others not."""
        keys = [(bool(f) and by_fresh, e) for f, e in zip(bucket.fresh, bucket.ema_fresh)]
        parts: dict[tuple, Part] = {}
        for i, key in enumerate(keys):
            parts.setdefault(key, Part([], *key)).idx.append(i)
        return list(parts.values())

    def _pipeline_args(self, bucket: Bucket, part: Part, control: StepControl) -> dict:
        """The grad pipeline's arguments of one kernel call (csrc/ops.cpp: the shared tail)."""
        grokfast = bucket.group["grokfast"]
        return dict(
            grad_norm=control.grad_norm, max_grad_norm=self.max_grad_norm or 0.0,
            grad_scale=control.grad_scale, found_inf=control.skip,
            agc_scales=part.take(bucket.agc_scales) if bucket.agc_scales is not None else [],
            grokfast_emas=part.take([s["grokfast_ema"] for s in bucket.states]) if grokfast else [],
            # alpha = 0 starts a new EMA at the grad
            grokfast_alpha=0.0 if part.ema_fresh or grokfast is None else grokfast["alpha"],
            grokfast_lamb=0.0 if grokfast is None else grokfast["lamb"],
            backend=self.backend)

    def _check_states(self, bucket: Bucket) -> None:
        """State tensors (a loaded state_dict may hold anything) laid out like their params,
        checked before any kernel runs so that a bad one changes nothing."""
        for p, state in zip(bucket.params, bucket.states):
            for key in self._param_like_state_keys(bucket.group):
                t = state[key]
                if t.dtype is not p.dtype or t.device != p.device or not ops.same_layout(t, p):
                    raise RuntimeError(f"state[{key!r}] of a param is {tuple(t.shape)} {t.dtype} on {t.device} "
                                       f"(strides {t.stride()}) but the param is {tuple(p.shape)} {p.dtype} "
                                       f"on {p.device} (strides {p.stride()})")

    def _param_like_state_keys(self, group: dict) -> tuple:
        """The state tensors shaped like the param, for this group's options."""
        return self._state_keys(group) + (("grokfast_ema",) if group["grokfast"] is not None else ())

    def _state_keys(self, group: dict) -> tuple:
        """The optimizer's own state tensors shaped like the param, for this group's options."""
        raise NotImplementedError

    def _state(self, p: torch.Tensor, group: dict, device: torch.device) -> dict:
        """p's state, made on its first step (as torch makes it), with a float32 step tensor on device."""
        raise NotImplementedError

    def _update(self, bucket: Bucket, control: StepControl) -> None:
        """Run the fused update kernel on one bucket."""
        raise NotImplementedError
