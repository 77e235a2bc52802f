"""What every fused optimizer shares: the step pipeline around its update kernel.

step() = validate every grad, every state tensor and every hyperparameter (before anything
changes; missing state is created as zeros, as torch does; or, while nothing they came from
changed, take the lists the last step checked: plan.py) -> one global grad-norm pass
(when clipping or skip_nonfinite needs it) -> the AGC row factors of every group (when it
has agc) -> per (group, device, dtype) bucket: the optimizer's fused update op
(ops.UPDATE_OPS), which reads the clip coefficient, the GradScaler scale and the skip flag
from device tensors, applies the grad pipeline of regularizers.py and counts the step. No
host sync.

A new elementwise optimizer is its op (csrc/optimizers/<name>.h) and a subclass naming it
in `_op`, with its defaults, `_check_group`, `_state_keys` and `_hyper`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .. import master_weights as masters
from .. import ops
from ..distributed.sharding import Sharding, is_dtensor, local, local_grad
from ..distributed.zero import zero_process_group
from ..layout import SUPPORTED_DTYPES, check_no_overlap, gather_if_strided, has_internal_overlap, same_layout
from .flat import FlatSet, flatten
from .plan import StepPlan
from .regularizers import agc_rows, agc_scales, check_agc, check_grokfast, grad_multiplier, rows_are_contiguous
from .state_storage import (bytes_per_element, check_state_dtype, scales_key, scales_problem, storage_dtype, stored,
                            zeros)
from .unwritten import UnwrittenFlag, gate

# The kinds of new state whose first step sets it rather than updates it (unwritten.py).
OWN, EMA = "own", "grokfast_ema"


def kernel_pair(p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels take for a param and its grad when either is not contiguous: a
    dense copy of a strided param (written back after the update), and the grad laid out
    like what they take (the kernels walk grads laid out like params)."""
    kernel_p = gather_if_strided(p)
    if not (g.is_contiguous() and kernel_p.is_contiguous()) and not same_layout(g, kernel_p):
        g = torch.empty_like(kernel_p).copy_(g)
    return kernel_p, g


@dataclass
class Bucket:
    """The params of one group on one device with one dtype, their grads and states."""
    group: dict
    device: torch.device
    keys: list     # the params: the keys of the optimizer's state
    slots: list    # per param: (group index, index in the group)
    params: list   # what the kernels update: the params, or a dense copy of a strided one
    grads: list    # the grads, laid out like `params`
    states: Optional[list] = None
    fresh: Optional[list] = None      # per param: its own state is new and set, not zeroed, on its first
    #                                   step (True), not (False), or maybe (an UnwrittenFlag)
    ema_fresh: Optional[list] = None  # the same for its grokfast_ema
    agc_scales: Optional[list] = None  # per param: its AGC row factors, or None: in its grad (group agc set)
    maybe_written: bool = False  # some state of the bucket has an UnwrittenFlag
    columns: dict = field(default_factory=dict)  # state key (`step` too) -> per param its tensor
    noncontiguous: list = field(default_factory=list)  # params whose param or grad is not contiguous
    strided: list = field(default_factory=list)  # params whose `params` entry is a dense copy, written back
    rows_apart: list = field(default_factory=list)  # params whose rows are not contiguous (AGC pre-scales)
    # Per param: the Sharding of a DTensor (its `params`, `grads` and `columns` entries are
    # local shards; its `keys` and state entries DTensors), None for a plain tensor. None:
    # no DTensor in the bucket.
    shardings: Optional[list] = None

    def template(self) -> "Bucket":
        """What a StepPlan keeps for the next steps: no grads, dense copies or AGC factors
        (each step makes its own), and no new state (the next step finds it made)."""
        steady = [False] * len(self.keys)
        params = self.keys if self.shardings is None else list(map(local, self.keys))
        return replace(self, params=params, grads=[], agc_scales=None, fresh=steady, ema_fresh=steady,
                       maybe_written=False, strided=[])


@dataclass
class Part:
    """The params of a bucket that one kernel call takes: those whose state and Grokfast
    EMA are equally new (a new momentum buffer or EMA is set, not updated). `run_if`:
    (flag, unwritten) conditions on the device under which the call runs (unwritten.py).
    `agc`: whether the call applies AGC factors (not where the grads come pre-scaled).
    `idx` is increasing, so a part as long as a bucket's list is all of it."""
    idx: list
    fresh: bool
    ema_fresh: bool
    run_if: list
    agc: bool

    def take(self, items: list) -> list:
        return items if len(self.idx) == len(items) else [items[i] for i in self.idx]

    def skip(self, skip: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The skip flag of this call: the step's, or the gate of its conditions."""
        return gate(skip, self.run_if)


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
    """Base of the drop-in optimizers. Subclasses name their update op (`_op`), set
    `defaults`, validate their own hyperparameters in `_check_group`, and give the state
    keys (`_state_keys`) and the op's own arguments (`_hyper`) for a group.

    Options every optimizer takes (keyword-only; grokfast and agc are also per-group keys):
    max_grad_norm: clip the global L2 norm of all grads to this (None: no clipping);
        equals torch.nn.utils.clip_grad_norm_ then step, but the grads are left as given.
    skip_nonfinite: skip the whole step on the device when that norm is inf or nan.
    grokfast: None, or dict(alpha=0.98, lamb=2.0): the Grokfast EMA gradient filter.
    agc: None, or the adaptive gradient clipping ratio (NFNets; e.g. 0.01).
    backend: 'auto', 'cpu', 'cuda' or 'triton'.
    flat: lay out the params (and grads, then state) of each group with one (device, dtype)
        in one buffer, so that a step over them is one kernel call (flat.py); p.data
        becomes a view of it. Groups with agc stay per param. Not with int8 states.
    state_dtype: how every state tensor (Grokfast EMA included) is stored (state_storage.py):
        None (the param's dtype, as torch), torch.float32, torch.bfloat16, or torch.int8
        (int8 codes under the state's key plus float32 scales under `<key>_scales`, one per
        128 elements: about 2.06 bytes per element for AdamW's two moments against 8 in
        float32). The math runs in float32 either way. `state_bytes()` says what it costs.
    master_weights: how bfloat16 / float16 params keep the bits that rounding each update
        into 16 bits would lose (master_weights.py; the state is made on a param's first step):
        None: none, the update is rounded to nearest into the param (torch's way; small
            updates relative to the weights may round away, and training stalls).
        "fp32": a float32 copy under state key `master` (4 bytes per param): exact, the
            steps of float32 params; the param is the copy rounded to nearest.
        "ecc": an int8 correction per element under `master_ecc` (1 byte per param): param
            plus correction keep the value to ~16 significant bits (bfloat16 alone keeps 8,
            float16 11), so updates down to ~1/256 of the param's last bit add up; most of
            "fp32"'s benefit for a quarter of its bytes.
        "stochastic" (bfloat16 only): the new value is rounded up or down at random,
            unbiased, so small updates survive on average; no extra bytes, just a 0-d
            counter per param (`rounding_counter`) whose stream makes each step, and a
            resumed run, reproducible bit for bit. Noisier than "ecc".
        Float32 params beside 16-bit ones keep none (they are exact already); an optimizer
        whose params are all float32 refuses a mode, as flat=True, DTensor params and
        backend='cuda' (use 'auto' or 'triton') do. State dicts keep the keys as stored and
        load across modes (torch's too) through the master value; torch_state_dict drops them.
    rounding_seed: the seed of the "stochastic" streams (each param has its own, from its
        index in the optimizer).
    The pipeline order (unscale, global clip, AGC, Grokfast, weight decay, update) is in
    regularizers.py. After a step, `grad_norm` holds the pre-clip global norm (a 0-d device
    tensor) when it was computed (max_grad_norm or skip_nonfinite), and `skipped_steps`
    the count of skips (also in state_dict()). A skipped step leaves params and state as
    if it never happened. Params that share memory are refused (their updates would race).

    Distributed: DTensor params (FSDP2, tensor parallel, HSDP) are updated on their local
    shards, their state made as DTensors placed like them, and the global norm reduced
    across the ranks that hold other shards, counting replicas once (distributed/), with
    no host sync; `grad_norm` is then a plain tensor holding the whole model's norm on
    every rank. As the local optimizer of a ZeroRedundancyOptimizer, the norm is summed
    over ZeRO's process group."""

    # torch.amp.GradScaler then hands us grad_scale and found_inf instead of unscaling
    # the grads itself, as it does for torch's fused optimizers.
    _step_supports_amp_scaling = True
    # Whether the optimizer's own new state is set on its first step (SGD's momentum
    # buffer starts at the grad) rather than starting at zeros (Adam's moments).
    _sets_new_state = False
    # The update op (ops.UPDATE_OPS) that runs a step. Its state lists are the state keys
    # plus "s" (exp_avg -> exp_avgs); a state key the group does not keep gets an empty list.
    _op = ""
    # Attributes that pickle, copy.deepcopy and torch.save(optimizer) keep besides torch's.
    _options = ("backend", "max_grad_norm", "skip_nonfinite", "flat", "state_dtype", "master_weights",
                "rounding_seed", "_report")
    # Whether flat=True may lay the params out in one buffer: not where the update needs a
    # norm per param (LAMB, LARS).
    _flattenable = True
    # Group options of ours that torch's optimizers do not have (state_dict() leaves them
    # out where they hold the default).
    _extra_group_keys = ("grokfast", "agc")

    def __init__(self, params, defaults: dict, *, max_grad_norm: Optional[float] = None,
                 skip_nonfinite: bool = False, grokfast=None, agc: Optional[float] = None,
                 backend: str = "auto", flat: bool = False, state_dtype: Optional[torch.dtype] = None,
                 master_weights: Optional[str] = None, rounding_seed: int = 0):
        ops.check_backend_name(backend)
        check_state_dtype(state_dtype)
        masters.check_mode(master_weights)
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
            raise ValueError(f"Invalid rounding_seed: {rounding_seed!r} (an int)")
        if master_weights is not None and flat:
            raise ValueError(f"flat=True does not take master_weights={master_weights!r} (not built); leave flat off")
        if master_weights is not None and backend == "cuda":
            raise ValueError(f"backend='cuda' does not take master_weights={master_weights!r} (its kernels have no "
                             "master weights); use backend='auto' or 'triton', which runs them on the Triton kernels")
        if flat and state_dtype is torch.int8:
            raise ValueError("flat=True does not take state_dtype=torch.int8: its blocks would cross params in "
                             "the flat buffer; leave flat off, or store states as torch.bfloat16")
        if flat and not self._flattenable:
            raise ValueError(f"{type(self).__name__} does not take flat=True: its update needs each param's own norm")
        if flat and agc is not None:
            raise ValueError("flat=True does not take agc (AGC needs each param's rows); "
                             "set agc on the groups to leave per param instead")
        defaults = dict(defaults, grokfast=check_grokfast(grokfast), agc=check_agc(agc))
        if max_grad_norm is not None and not (max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0, or None for no clipping)")
        if defaults.get("differentiable"):
            raise ValueError("differentiable=True is not supported: the fused kernels update in place "
                             "and are not differentiable; use torch.optim for that")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.backend = backend
        self.flat = bool(flat)
        self.state_dtype = state_dtype  # before the groups: add_param_group reads it
        self.master_weights = master_weights  # likewise
        self.rounding_seed = rounding_seed
        self._flat_sets: list[FlatSet] = []  # the params laid out flat (flat.py)
        self._plan_flat: tuple = ()  # the flat sets that the step of the plan left out
        # What step() reports. A dict mutated in place, not attributes set on self:
        # torch.compile (dynamo) refuses attribute writes on an optimizer inside a step.
        self._report: dict[str, Optional[torch.Tensor]] = {"grad_norm": None, "skipped_steps": None}
        # (group index, param index) -> {OWN or EMA: UnwrittenFlag} for new state that a
        # skippable step created. Keyed by ints: torch.compile guards cheaply on them.
        self._unwritten: dict = {}
        self._spans: dict = {}  # storage address -> the memory spans of the params on it
        self._plan: Optional[StepPlan] = None  # the last eager step's checked lists (plan.py)
        # ZeroRedundancyOptimizer's process group when it builds us over this rank's part of
        # the params: the global norm sums every rank's part (distributed/zero.py).
        self._zero_group = zero_process_group()
        super().__init__(params, defaults)
        dtypes = {p.dtype for group in self.param_groups for p in group["params"]}
        if master_weights is not None and not dtypes & set(masters.MANTISSA_BITS):
            masters.check_param_dtype(master_weights, min(dtypes, key=str), "every param group")

    # ---- pickle, deepcopy, torch.save(optimizer) --------------------------------------
    def __getstate__(self) -> dict:
        self._settle_unwritten(sync=True)
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._options}}

    def __setstate__(self, state: dict) -> None:
        flat_sets = self.__dict__.get("_flat_sets")  # None when unpickled
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("skip_nonfinite", False)
        self.__dict__.setdefault("flat", False)
        self.__dict__.setdefault("state_dtype", None)
        self.__dict__.setdefault("master_weights", None)
        self.__dict__.setdefault("rounding_seed", 0)
        self.__dict__.setdefault("_report", {"grad_norm": None, "skipped_steps": None})
        self.__dict__.setdefault("_zero_group", None)
        self._unwritten = {}
        self._spans = {}
        # Never saved; load_state_dict comes here too: let go of the replaced state now.
        self._plan = None
        if flat_sets is None:  # unpickled: new params, laid out anew
            self._flat_sets = []
            self._plan_flat = ()
            if self.flat:
                for gi, group in enumerate(self.param_groups):
                    if group["agc"] is None:
                        self._flat_sets += flatten(gi, group)
        for gi, group in enumerate(self.param_groups):
            check_no_overlap(list(map(local, group["params"])), gi, self._spans)
        for flat_set in self._flat_sets:  # a loaded state is per param: flat again at the next step
            flat_set.state_keys, flat_set.bucket, flat_set.diverged = None, None, False

    # ---- hyperparameters ------------------------------------------------------------
    def _check_group(self, group: dict, full: bool = True) -> None:
        """Raise ValueError naming the bad hyperparameter. Subclasses extend this. `full`
        also reads tensor hyperparameters' values (a host sync on CUDA): at construction,
        add_param_group and load_state_dict; each step checks what it can without one."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must have one element")
            if full and not bool(lr.detach() >= 0):  # also refuses nan, as torch does
                raise ValueError(f"Invalid learning rate: {lr.item()}")
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
            if self.flat and any(map(is_dtensor, group["params"])):
                raise ValueError("flat=True does not take DTensor params (FSDP2, tensor parallel): their "
                                 "shards are laid out by torch; leave flat off")
            if self.master_weights is not None and any(map(is_dtensor, group["params"])):
                raise ValueError(f"master_weights={self.master_weights!r} does not take DTensor params (FSDP2, "
                                 "tensor parallel) yet; leave master_weights None")
            for dtype in dict.fromkeys(p.dtype for p in group["params"]):
                if dtype in masters.MANTISSA_BITS:  # float32 params beside them are exact already: none
                    masters.check_param_dtype(self.master_weights, dtype, f"param group {len(self.param_groups) - 1}")
            if self.state_dtype is torch.int8 and any(map(is_dtensor, group["params"])):
                raise ValueError("state_dtype=torch.int8 does not take DTensor params (FSDP2, tensor parallel): "
                                 "its blocks of 128 would not follow the shards; use torch.bfloat16 or "
                                 "torch.float32 storage")
            stored_otherwise = [p.dtype for p in group["params"] if storage_dtype(self.state_dtype, p) != p.dtype]
            if self.backend == "cuda" and stored_otherwise:
                raise ValueError(f"backend='cuda' does not take state_dtype={self.state_dtype} with "
                                 f"{stored_otherwise[0]} params yet (its kernels walk every list in one dtype); "
                                 "use backend='auto' or 'triton', which runs them on the Triton kernels")
            for i, p in enumerate(group["params"]):
                if p.is_complex():
                    raise ValueError(f"complex params are not supported (a param of dtype {p.dtype})")
                if p.dtype not in SUPPORTED_DTYPES:
                    raise ValueError(f"param dtype {p.dtype} is not supported; use float32, bfloat16 or float16")
                if has_internal_overlap(local(p)):
                    raise ValueError(f"param {i} of group {len(self.param_groups) - 1} has elements that share "
                                     f"memory (strides {p.stride()}, an expand()ed view?): an update cannot "
                                     "write it; pass a clone(), as torch.optim needs too")
            check_no_overlap(list(map(local, group["params"])), len(self.param_groups) - 1, self._spans,
                             record=not self.flat)
        except ValueError:
            self.param_groups.pop()
            raise
        if self.flat:
            self._flatten(len(self.param_groups) - 1, group)

    def _flatten(self, gi: int, group: dict) -> None:
        """Lay out the group's params flat (flat.py) unless it has agc, and record where they lie."""
        if group["agc"] is None:
            self._flat_sets += flatten(gi, group)
        check_no_overlap(group["params"], gi, self._spans)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad, except that the grads of params laid out flat are zeroed in place
        and stay views of the flat grad buffer, also with set_to_none=True (a param that
        backward does not reach then has a zero grad, and is updated with it)."""
        if not self._flat_sets:
            return super().zero_grad(set_to_none)
        flat = set()
        for flat_set in self._flat_sets:
            flat_set.zero_grads()
            flat.update(map(id, flat_set.params))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in flat:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    # ---- state_dict -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's state_dict, plus `skipped_steps`. Reads the device flags of new state
        whose first steps were all skipped (a sync), and leaves that state out. The group
        options torch's optimizers lack (grokfast, agc) are left out where a group holds the
        optimizer's default, as load_state_dict fills them in from it (as any option a
        state_dict lacks): a checkpoint then has the keys of torch's, and
        torch.distributed.checkpoint, which loads only what both sides have, moves it between
        us and torch. States are saved as stored (state_dtype): int8 ones as their codes and
        `<key>_scales`; state_storage.torch_state_dict makes one that torch.optim loads."""
        self._settle_unwritten(sync=True)
        state_dict = super().state_dict()
        defaults = {k: self.defaults[k] for k in self._extra_group_keys}
        state_dict["param_groups"] = [{k: v for k, v in g.items() if not (k in defaults and v == defaults[k])}
                                      for g in state_dict["param_groups"]]
        state_dict["skipped_steps"] = self.skipped_steps.clone()
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, after checking, before anything changes, that every
        group's hyperparameters are valid and every param's state has exactly the keys this
        optimizer keeps for it (a state_dict of another optimizer is refused, naming the key).
        Each state tensor comes in this optimizer's storage (state_dtype) on its param's
        device: a state stored otherwise (torch's float states too) is converted
        (state_storage.stored: int8 codes keep their bits, floats are encoded into int8 or cast).
        Master weights of this optimizer's kind load bit-exact; a state with another kind or
        none (torch's) is converted through the value it gives its param
        (master_weights.converted_state): load the model's params first."""
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", None)
        groups = [{**self.defaults, **g} for g in state_dict["param_groups"]]
        stored_keys = {}  # saved param id -> its state tensors that this optimizer stores its way
        for gi, group in enumerate(groups):
            self._check_group(group)
            needed = set(self._state_keys(group)) | ({"step"} if self._has_step(group) else set())
            tensor_keys = needed - {"step"} | {EMA}
            known = needed | {EMA} | set(map(scales_key, tensor_keys)) | set(masters.STATE_KEYS.values())
            for idx in group["params"]:
                state = state_dict["state"].get(idx)
                if not state:
                    continue
                for key in state:
                    if key not in known and state[key] is not None:  # torch saves some absent buffers as None
                        raise KeyError(f"state of param {idx} (group {gi}) has key {key!r}, which "
                                       f"{type(self).__name__} does not keep (it keeps {sorted(known)}): "
                                       "a state_dict of another optimizer?")
                for key in sorted(needed - set(state)):  # a None buffer counts: it is set on the next step
                    raise KeyError(f"state of param {idx} (group {gi}) lacks {key!r}, which "
                                   f"{type(self).__name__} needs: a state_dict of another optimizer?")
                self._check_loaded_scales(state, tensor_keys, f"param {idx} (group {gi})")
                stored_keys[idx] = [k for k in tensor_keys if isinstance(state.get(k), torch.Tensor)]
        # torch casts every loaded state tensor to its param's dtype (it calls
        # Optimizer._process_value_according_to_param_policy by that class, so no override
        # reaches it): the stored ones are converted here and given to it without them.
        params = dict(zip(itertools.chain.from_iterable(g["params"] for g in groups),
                          itertools.chain.from_iterable(g["params"] for g in self.param_groups)))
        index = {idx: i for i, idx in enumerate(params)}  # the stochastic streams' numbering
        master_keys = set(masters.STATE_KEYS.values())
        converted, rest = {}, {}
        for idx, state in state_dict["state"].items():
            keys = stored_keys.get(idx, ()) if idx in params else ()
            if idx in params and state and self._master_key(params[idx].dtype) is not None:
                problem = masters.loaded_problem(state, params[idx])
                if problem:
                    raise ValueError(f"state of param {idx}: {problem}")
                converted[params[idx]] = masters.converted_state(state, self.master_weights, params[idx],
                                                                 self.rounding_seed, index[idx])
            if keys:
                p = params[idx]
                converted.setdefault(p, {}).update(
                    {k: v for key in keys for k, v in stored(state, key, p, self.state_dtype).items()})
                keys = set(keys) | set(map(scales_key, keys))
            rest[idx] = {k: v for k, v in state.items() if k not in keys and k not in master_keys}
        super().load_state_dict({**state_dict, "state": rest})
        for p, tensors in converted.items():
            self.state[p].update(tensors)
        # A state_dict from torch (or an older torch) may lack some of our group keys.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._unwritten = {}
        self._report["skipped_steps"] = None if skipped is None else torch.as_tensor(skipped).clone()

    @staticmethod
    def _check_loaded_scales(state: dict, keys: set, where: str) -> None:
        """The scales of the int8 states among a loaded state's `keys`, and no scales without them."""
        for key in sorted(keys):
            codes, scales = state.get(key), state.get(scales_key(key))
            if isinstance(codes, torch.Tensor) and codes.dtype is torch.int8:
                problem = scales_problem(codes, scales, codes.device)
                if problem:
                    raise ValueError(f"state of {where}: {scales_key(key)!r} of the int8 {key!r} {problem}")
            elif scales is not None:
                what = codes.dtype if isinstance(codes, torch.Tensor) else repr(codes)
                raise ValueError(f"state of {where} has {scales_key(key)!r} but its {key!r} is {what}, "
                                 "not int8 codes")

    def state_bytes(self) -> float:
        """Bytes of optimizer state per element of the params that have state: every state
        tensor (int8 scales included, 0-d step counts not). AdamW: 8.0 with float32 states,
        4.0 with bfloat16, 2.0625 with int8; master_weights adds 4 ("fp32"), 1 ("ecc") or 0
        ("stochastic": its 0-d counters are not counted)."""
        return bytes_per_element(self.state)

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

    def _buckets(self, flat: dict) -> list[Bucket]:
        """Params with grads, grouped by (group, device, dtype), all checked before any change,
        except those that run flat (flat: group index -> their indices in it).
        A step over thousands of small tensors is bound by this loop: keep it lean."""
        buckets: list[Bucket] = []
        for gi, group in enumerate(self.param_groups):
            skip = flat.get(gi, ())
            if skip and len(skip) == len(group["params"]):  # all flat: checked there
                continue
            self._check_group(group, full=False)
            by_key: dict[tuple, Bucket] = {}
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None or (skip and pi in skip):
                    continue
                key = (p.device, p.dtype)
                if (g.layout is not torch.strided or g.dtype is not key[1] or key[1] not in SUPPORTED_DTYPES
                        or g.shape != p.shape or g.device != key[0]):
                    self._raise_bad_grad(gi, group, p)
                bucket = by_key.get(key)
                if bucket is None:
                    bucket = by_key[key] = Bucket(group, key[0], [], [], [], [])
                param = p
                if is_dtensor(p):  # the kernels take its local shard
                    param, g = local(p), local_grad(p, g)
                    if bucket.shardings is None:
                        bucket.shardings = [None] * len(bucket.keys)
                if bucket.shardings is not None:
                    bucket.shardings.append(Sharding.of(p))
                kernel_p = param
                if not (param.is_contiguous() and g.is_contiguous()):
                    bucket.noncontiguous.append(len(bucket.keys))
                    kernel_p, g = kernel_pair(param, g)
                    if kernel_p is not param:
                        bucket.strided.append(len(bucket.keys))
                if not rows_are_contiguous(kernel_p):
                    bucket.rows_apart.append(len(bucket.keys))
                bucket.keys.append(p)
                bucket.slots.append((gi, pi))
                bucket.params.append(kernel_p)
                bucket.grads.append(g)
            devices = {device for device, _ in by_key}
            if len(devices) > 1:
                raise RuntimeError(f"the params of group {gi} are on several devices: {sorted(map(str, devices))}")
            for bucket in by_key.values():
                ops.resolve_backend(self.backend, bucket.device)
                buckets.append(bucket)
        return buckets

    def _bucket_from(self, template: Bucket, grads: list) -> Bucket:
        """A bucket of this step from a plan's template and this step's grads."""
        ops.resolve_backend(self.backend, template.device)
        params, strided = template.params, []
        if template.shardings is not None:
            grads = [g if s is None else local_grad(p, g) for p, g, s in zip(template.keys, grads, template.shardings)]
        if template.noncontiguous:
            params = list(params)
            for i in template.noncontiguous:
                params[i], grads[i] = kernel_pair(params[i], grads[i])
                if params[i] is not template.params[i]:
                    strided.append(i)
        return replace(template, params=params, grads=grads, strided=strided)

    def _raise_bad_grad(self, gi: int, group: dict, p: torch.Tensor) -> None:
        """The error naming what is wrong with param p and its grad."""
        g, where = p.grad, f"param {[id(q) for q in group['params']].index(id(p))} of group {gi}"
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({where})")
        if p.is_complex():
            raise RuntimeError(f"complex params are not supported ({where})")
        if p.dtype not in SUPPORTED_DTYPES:
            raise RuntimeError(f"param dtype {p.dtype} is not supported ({where}); use float32, bfloat16 or float16")
        raise RuntimeError(f"the grad of {where} is {tuple(g.shape)} {g.dtype} on {g.device} "
                           f"but the param is {tuple(p.shape)} {p.dtype} on {p.device}")

    def _step_control(self, buckets: list[Bucket]) -> StepControl:
        grad_scale = getattr(self, "grad_scale", None)   # set by GradScaler.step
        found_inf = getattr(self, "found_inf", None)
        grad_norm = None
        if self.max_grad_norm is not None or self.skip_nonfinite:
            grads = [g for b in buckets for g in b.grads]
            if self._zero_group is not None or any(b.shardings is not None for b in buckets):
                from ..distributed.norms import global_norm  # pieces on other ranks too
                shardings = [s for b in buckets for s in (b.shardings or [None] * len(b.grads))]
                grad_norm = global_norm(grads, shardings, 2.0, self.backend, group=self._zero_group,
                                        device=self._some_device())
            else:
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
            # the count lives where the flag does: a loaded count on the CPU would cost a sync per step
            self._report["skipped_steps"] = counted if skipped is None else skipped.to(counted.device) + counted
        return StepControl(grad_norm, grad_scale, skip)

    def _some_device(self) -> torch.device:
        """Where a rank without grads takes part in a collective: its params' device, or
        the process group's (ZeRO may give a rank no params)."""
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        if self._zero_group is not None and torch.distributed.get_backend(self._zero_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @staticmethod
    def _step_tensor(state: dict, device: torch.device) -> torch.Tensor:
        """state['step'] as the kernels read it: a float32 tensor on the param's device.
        torch may have saved it as a CPU tensor or a float; convert once."""
        step = state.get("step", 0.0)
        if isinstance(step, torch.Tensor) and step.numel() != 1:
            raise RuntimeError(f"state['step'] of a param has {step.numel()} elements; it must hold one number")
        if type(step) is not torch.Tensor or step.dtype is not torch.float32 or step.device != device:
            step = torch.as_tensor(step, dtype=torch.float32).to(device).reshape(())
            state["step"] = step
        return step

    def _lr_tensor(self, group: dict, device: torch.device) -> torch.Tensor:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return lr.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
        if not torch.compiler.is_compiling() and self._plan is not None:
            return self._plan.lr_tensor(group, device, lr)
        # ones * lr, not torch.full((), lr): torch.compile keeps a float lr symbolic in a
        # product, so a scheduler's new lr each step does not recompile the step.
        return torch.ones((), dtype=torch.float32, device=device) * lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._settle_unwritten()
        flat_sets = self._flat_sets_to_run()
        buckets = self._planned_buckets(flat_sets) + [flat_set.bucket for flat_set in flat_sets]
        control = self._step_control(buckets)
        on_device = {b.device: control.on(b.device) for b in buckets}
        for bucket in buckets:
            if bucket.group["agc"] is not None:
                self._agc(bucket, on_device[bucket.device])
        for bucket in buckets:
            self._update(bucket, on_device[bucket.device])
        for bucket in buckets:
            for i in bucket.strided:  # a strided param: its dense copy was updated
                local(bucket.keys[i]).copy_(bucket.params[i])
        for flat_set in flat_sets:
            flat_set.spread_step()
        self._track_unwritten(buckets, on_device)
        return loss

    def _flat_sets_to_run(self) -> list[FlatSet]:
        """The flat sets (flat.py) whose step is one kernel call over their buffers: those
        whose params are all in place with their grads (a grad that replaced its view is
        copied in), whose state is all there and not maybe unwritten, and whose group has
        no agc. Their state is made flat here when it is not yet (checked as the per-param
        path checks it). The others take the per-param path; their step counts may then
        part, so their state is made flat again (and the counts compared) before they next
        run flat. Under torch.compile, every param takes the per-param path."""
        if not self._flat_sets or torch.compiler.is_compiling():
            return []
        runs, moved = [], []
        for flat_set in self._flat_sets:
            group = self.param_groups[flat_set.group_index]
            self._check_group(group, full=False)
            if not flat_set.in_place():  # a `p.data = x`: these params are no longer flat
                moved.append(flat_set)
            elif (not flat_set.diverged and group["agc"] is None
                  and not (self._unwritten and any(slot in self._unwritten for slot in flat_set.slots))
                  and flat_set.take_grads() and self._flat_state(flat_set, group)):
                ops.resolve_backend(self.backend, flat_set.param.device)
                runs.append(flat_set)
            else:
                flat_set.state_keys = flat_set.bucket = None
        self._flat_sets = [f for f in self._flat_sets if f not in moved]
        return runs

    def _flat_state(self, flat_set: FlatSet, group: dict) -> bool:
        """Whether the set's state is flat, after making it so if every param has all of its
        state, each laid out like its param, with one step count (else False: the per-param
        path makes or checks it). A step count that differs between the params keeps the set
        per param until the next load_state_dict."""
        keys = self._plan_keys(group)
        if flat_set.state_keys == keys:
            return True
        tensor_keys = [k for k in keys if k != "step"]
        states = [self.state.get(p) for p in flat_set.params] if keys else []
        for p, state in zip(flat_set.params, states):
            if not state or any(state.get(k) is None for k in keys):
                return False
            stored_as = storage_dtype(self.state_dtype, p)
            for k in tensor_keys:
                t = state[k]
                if not isinstance(t, torch.Tensor) or t.dtype is not stored_as or t.device != p.device \
                        or not same_layout(t, p):
                    return False
        device = flat_set.param.device
        steps = None
        if "step" in keys:
            steps = torch.stack([self._step_tensor(state, device) for state in states])
            if not bool((steps == steps[0]).all()):  # a sync on CUDA: only when the state turns flat
                flat_set.diverged = True
                return False
        flat_set.state = {}
        for k in tensor_keys:
            flat_set.state[k] = torch.empty_like(flat_set.param, dtype=storage_dtype(self.state_dtype, flat_set.param))
            views = flat_set.views(flat_set.state[k])
            torch._foreach_copy_(views, [state[k] for state in states])
            for state, view in zip(states, views):
                state[k] = view
        columns = {k: [flat_set.state[k]] for k in tensor_keys}
        if steps is not None:
            flat_set.steps = steps
            for state, step in zip(states, steps.unbind()):
                state["step"] = step
            columns["step"] = [steps[0]]
        flat_set.bucket = Bucket(group, device, [flat_set.param], [(flat_set.group_index, -1)], [flat_set.param],
                                 [flat_set.grad], states=[dict(flat_set.state)], fresh=[False],
                                 ema_fresh=[False], columns=columns)
        flat_set.state_keys = keys
        return True

    def _planned_buckets(self, flat_sets: list[FlatSet] = ()) -> list[Bucket]:
        """The step's buckets of the params outside `flat_sets`, every state made and checked
        before anything changes: the last step's (plan.py) while nothing they came from
        changed, else checked anew."""
        if torch.compiler.is_compiling():  # its guards do the plan's job (dynamo cannot trace the plan)
            return self._checked_buckets()
        flat: dict = {}  # group index -> the indices of its params in flat_sets
        for flat_set in flat_sets:
            flat.setdefault(flat_set.group_index, set()).update(flat_set.indices)
        groups = [g for gi, g in enumerate(self.param_groups) if not (gi in flat and len(flat[gi]) == len(g["params"]))]
        flat_key = tuple(map(id, flat_sets))
        if self._plan is not None and not self._unwritten and self._plan_flat == flat_key:
            # state that may be unwritten: checked anew
            state_keys = []
            for group in groups:
                self._check_group(group, full=False)
                state_keys.append(self._plan_keys(group))
            planned = self._plan.buckets(groups, self.state, state_keys)
            if planned is not None:
                return [self._bucket_from(template, grads) for template, grads in planned]
        self._plan = None  # let go of what it holds before new state is made
        buckets = self._checked_buckets(flat)
        self._plan = StepPlan(groups, buckets, [self._plan_keys(g) for g in groups])
        self._plan_flat = flat_key
        return buckets

    def _checked_buckets(self, flat: Optional[dict] = None) -> list[Bucket]:
        buckets = self._buckets(flat or {})
        for bucket in buckets:  # every state made and checked before anything changes
            self._prepare_states(bucket)
        return buckets

    def _prepare_states(self, bucket: Bucket) -> None:
        """The bucket's states (new ones as zeros), whether each is new, and their checks."""
        group = bucket.group
        own_keys = self._state_keys(group) if self._sets_new_state else ()
        grokfast = group["grokfast"] is not None
        unwritten, no_flags = self._unwritten, {}
        master_key = self._master_key(bucket.params[0].dtype) if bucket.params else None
        bucket.fresh, bucket.ema_fresh, bucket.states = [], [], []
        sharded = bucket.shardings is not None
        for p, slot, kernel_p in zip(bucket.keys, bucket.slots, bucket.params):
            state = self.state.get(p, no_flags)
            flags = unwritten.get(slot, no_flags) if unwritten else no_flags
            bucket.maybe_written |= bool(flags)
            # a None buffer (torch saves those) is no buffer: set, not updated
            bucket.fresh.append(bool(own_keys) and flags.get(OWN, any(state.get(k) is None for k in own_keys)))
            bucket.ema_fresh.append(grokfast and flags.get(EMA, EMA not in state))
            state = self._state(p, group, bucket.device)
            if group["grokfast"] is not None:
                state = self.state[p]  # also for plain SGD, which keeps no state of its own
                if EMA not in state:  # a DTensor's is a DTensor placed like it
                    zeros(state, EMA, p if is_dtensor(p) else kernel_p, self.state_dtype)
            if master_key is not None:
                state = self.state[p]  # plain SGD too
                if master_key not in state:  # laid out like what the kernels update (a strided param's copy)
                    state[master_key] = masters.new_state(self.master_weights, kernel_p, self.rounding_seed,
                                                          self._param_index(slot))
            bucket.states.append(state)
        # .get: a missing int8 scales tensor is named by _check_states
        bucket.columns = {key: [local(s[key]) if sharded else s.get(key) for s in bucket.states]
                          for key in self._plan_keys(group)}
        self._check_states(bucket)

    def _agc(self, bucket: Bucket, control: StepControl) -> None:
        """The AGC row factors of the bucket. A param whose rows are not contiguous in memory
        (a transposed weight) takes them in a pre-scaled copy of its grad instead (its factors
        become None): the kernels find an element's row from its offset."""
        mult = grad_multiplier(control.grad_norm, self.max_grad_norm or 0.0, control.grad_scale, bucket.device)
        weights = self._weights(bucket, range(len(bucket.params)))  # AGC's |w|: the values the update takes
        bucket.agc_scales = agc_scales(weights, bucket.grads, bucket.group["agc"], mult,
                                       reduce_units=self._unit_reduction(bucket))
        for i in bucket.rows_apart:
            g = bucket.grads[i]
            rows = bucket.agc_scales[i].reshape((-1,) + (1,) * (g.dim() - 1))
            bucket.grads[i] = (g.float() * rows).to(g.dtype)
            bucket.agc_scales[i] = None

    @staticmethod
    def _unit_reduction(bucket: Bucket):
        """For a bucket with DTensors: what turns the local AGC unit norms into whole ones
        (the units a sharding cuts across ranks), else None."""
        if bucket.shardings is None:
            return None
        from ..distributed.norms import reduce_unit_squares
        sizes = [agc_rows(p) for p in bucket.params]
        ndims = [p.dim() for p in bucket.keys] * 2

        def reduce(w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            squares = list(torch.cat([w, g]).to(torch.float64).square().split(sizes * 2))
            whole = torch.cat(reduce_unit_squares(squares, bucket.shardings * 2, ndims)).sqrt().to(w.dtype)
            return whole[:w.numel()], whole[w.numel():]
        return reduce

    def _track_unwritten(self, buckets: list[Bucket], on_device: dict) -> None:
        """After the kernels: flag new state that a skippable step created, update in place
        the flags of state still unwritten, drop those a step that cannot be skipped wrote."""
        if not self._unwritten and not any(any(b.fresh) or any(b.ema_fresh) for b in buckets):
            return  # the common step: no new state, nothing unwritten
        made: dict = {}   # one new flag per device per step
        updated: set = set()  # a flag shared by several params moves once
        for bucket in buckets:
            skip = on_device[bucket.device].skip
            for slot, fresh, ema_fresh in zip(bucket.slots, bucket.fresh, bucket.ema_fresh):
                flags = {}
                for kind, status in ((OWN, fresh), (EMA, ema_fresh)):
                    if skip is None or not status:
                        continue  # written now for good, or nothing new
                    if isinstance(status, UnwrittenFlag):
                        if id(status) not in updated:
                            status.update(skip)
                            updated.add(id(status))
                        flags[kind] = status
                    else:
                        if bucket.device not in made:
                            made[bucket.device] = UnwrittenFlag(skip)
                        flags[kind] = made[bucket.device]
                if flags:
                    self._unwritten[slot] = flags
                else:
                    self._unwritten.pop(slot, None)

    def _settle_unwritten(self, sync: bool = False) -> None:
        """Drop the flags whose value the host can read (without a sync, unless sync):
        state written since is plain state; state never written is removed, as if the
        skipped steps never happened (the next step makes it anew)."""
        known: dict = {}  # id(flag) -> what it says: a flag shared by params is read once
        for slot in list(self._unwritten):
            flags = self._unwritten[slot]
            for kind in list(flags):
                flag = flags[kind]
                if id(flag) not in known:
                    known[id(flag)] = flag.known(sync)
                if known[id(flag)] is None:
                    continue
                del flags[kind]
                if known[id(flag)]:
                    group = self.param_groups[slot[0]]
                    p = group["params"][slot[1]]
                    state = self.state.get(p, {})
                    for key in (self._state_keys(group) if kind == OWN else (EMA,)):
                        state.pop(key, None)
                        state.pop(scales_key(key), None)
                    if not state:
                        self.state.pop(p, None)
            if not flags:
                del self._unwritten[slot]

    @staticmethod
    def _parts(bucket: Bucket, by_fresh: bool = False) -> list[Part]:
        """The bucket in as few kernel calls as the newness of its states allows: one,
        except on the step where some params are new and others not. State that may or
        may not have been written (an UnwrittenFlag) takes both calls, gated on the device;
        grads that come with their AGC factors applied take a call without factors."""
        agc = bucket.agc_scales is not None
        if not bucket.maybe_written and not (agc and bucket.rows_apart):  # no call without AGC factors
            if not any(bucket.fresh) and not any(bucket.ema_fresh):  # the common step: one call
                return [Part(list(range(len(bucket.params))), False, False, [], agc)]
            keys = [(bool(f) and by_fresh, bool(e)) for f, e in zip(bucket.fresh, bucket.ema_fresh)]
            parts: dict[tuple, Part] = {}
            for i, key in enumerate(keys):
                parts.setdefault(key, Part([], *key, [], agc)).idx.append(i)
            return list(parts.values())
        parts = {}
        for i, (fresh, ema_fresh) in enumerate(zip(bucket.fresh, bucket.ema_fresh)):
            statuses = (fresh if by_fresh else False, ema_fresh)
            flags = list({id(s): s for s in statuses if isinstance(s, UnwrittenFlag)}.values())
            applies_agc = agc and bucket.agc_scales[i] is not None
            for choice in itertools.product((True, False), repeat=len(flags)):
                unwritten = {id(f): c for f, c in zip(flags, choice)}
                new = [unwritten[id(s)] if isinstance(s, UnwrittenFlag) else bool(s) for s in statuses]
                key = (*new, tuple(unwritten.items()), applies_agc)
                if key not in parts:
                    parts[key] = Part([], new[0], new[1], list(zip(flags, choice)), applies_agc)
                parts[key].idx.append(i)
        return list(parts.values())

    def _pipeline_args(self, bucket: Bucket, part: Part, control: StepControl) -> ops.PipelineArgs:
        """The grad pipeline's arguments of one kernel call."""
        group = bucket.group
        grokfast = group["grokfast"]
        return ops.PipelineArgs(
            grad_norm=control.grad_norm, max_grad_norm=self.max_grad_norm or 0.0,
            grad_scale=control.grad_scale, skip=part.skip(control.skip),
            agc_scales=part.take(bucket.agc_scales) if part.agc else (),
            grokfast_emas=part.take(bucket.columns[EMA]) if grokfast else (),
            # alpha = 0 starts a new EMA at the grad
            grokfast_alpha=0.0 if part.ema_fresh or grokfast is None else grokfast["alpha"],
            grokfast_lamb=0.0 if grokfast is None else grokfast["lamb"],
            maximize=bool(group.get("maximize", False)))

    def _through_pipeline(self, bucket: Bucket, control: StepControl) -> Bucket:
        """The bucket with its grads replaced by the grad pipeline's output (grad_pipeline_:
        unscaled, clipped, AGC'd, Grokfast-filtered, the EMAs advanced, maximize applied), in
        the grads' dtype."""
        out = [torch.empty_like(g) for g in bucket.grads]
        lr = self._lr_tensor(bucket.group, bucket.device)
        for part in self._parts(bucket):
            pipeline = self._pipeline_args(bucket, part, control)
            ops.update_("grad_pipeline_", part.take(out), part.take(bucket.grads), [], None, lr, pipeline,
                        self.backend, state_scales=self._state_scales(bucket, part, (), pipeline))
        return replace(bucket, grads=out)

    def _check_states(self, bucket: Bucket) -> None:
        """State tensors (a loaded state_dict may hold anything) laid out like their params,
        checked before any kernel runs so that a bad one changes nothing."""
        for key in self._param_like_state_keys(bucket.group):
            if bucket.shardings is not None:
                for state, sharding in zip(bucket.states, bucket.shardings):
                    if Sharding.of(state[key]) != sharding:
                        where = "a plain tensor" if sharding is None else f"a DTensor with {sharding.placements}"
                        raise RuntimeError(f"state[{key!r}] of a param is not placed like the param, {where} "
                                           f"(state: {Sharding.of(state[key])}): a state_dict of another sharding?")
            scales = bucket.columns.get(scales_key(key))
            for i, (p, t) in enumerate(zip(bucket.params, bucket.columns[key])):  # the kernels' tensors: local shards
                dtype = storage_dtype(self.state_dtype, p)
                if t.dtype is not dtype or t.device != p.device or not same_layout(t, p):
                    raise RuntimeError(f"state[{key!r}] of a param is {tuple(t.shape)} {t.dtype} on {t.device} "
                                       f"(strides {t.stride()}) but the param is {tuple(p.shape)} {p.dtype} "
                                       f"on {p.device} (strides {p.stride()}), its state stored as {dtype}")
                problem = scales is not None and scales_problem(t, scales[i], p.device)
                if problem:
                    raise RuntimeError(f"state[{scales_key(key)!r}] of a param {problem}")
        key = self._bucket_master_key(bucket)
        if key is not None:
            for p, t in zip(bucket.params, bucket.columns[key]):
                problem = masters.state_problem(key, t, p)
                if problem:
                    raise RuntimeError(f"state[{key!r}] of a param {problem}")

    def _master_key(self, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """The state key of the master weights of params of `dtype` (None: of any 16-bit
        params), None without: float32 params keep none."""
        if dtype is not None and dtype not in masters.MANTISSA_BITS:
            return None
        return masters.STATE_KEYS.get(self.master_weights)

    def _bucket_master_key(self, bucket: Bucket) -> Optional[str]:
        return self._master_key(bucket.params[0].dtype) if bucket.params else None

    def _param_index(self, slot: tuple) -> int:
        """The index of the param at slot (group index, index in the group) in the
        state_dict's numbering."""
        gi, pi = slot
        return sum(len(g["params"]) for g in self.param_groups[:gi]) + pi

    def _masters(self, bucket: Bucket, part: Optional[Part] = None) -> list:
        """The master_weights argument of a kernel call over `part` (None: the whole bucket)."""
        key = self._bucket_master_key(bucket)
        if key is None:
            return []
        column = bucket.columns[key]
        return column if part is None else part.take(column)

    def _weights(self, bucket: Bucket, idx: list) -> list:
        """The values the update takes for the params listed in idx (their norms are
        LARS's and AGC's): the float32 masters, the params decoded with their corrections
        ("ecc"), else the params."""
        params = [bucket.params[i] for i in idx]
        key = self._bucket_master_key(bucket)
        if key == "master":
            return [bucket.columns["master"][i] for i in idx]
        if key == "master_ecc":
            return [masters.ecc_decode(p, bucket.columns["master_ecc"][i]) for p, i in zip(params, idx)]
        return params

    def _param_like_state_keys(self, group: dict) -> tuple:
        """The state tensors shaped like the param, for this group's options."""
        return self._state_keys(group) + ((EMA,) if group["grokfast"] is not None else ())

    def _plan_keys(self, group: dict) -> tuple:
        """The state of each param of the group that its bucket lists by key (Bucket.columns):
        the int8 scales too, so that a planned step checks and passes what a checked one does."""
        keys = self._param_like_state_keys(group)
        if self.state_dtype is torch.int8:
            keys += tuple(map(scales_key, keys))
        if self.master_weights is not None:
            keys += (self._master_key(),)
        return keys + (("step",) if self._has_step(group) else ())

    def _state_keys(self, group: dict) -> tuple:
        """The optimizer's own state tensors shaped like the param, for this group's options."""
        raise NotImplementedError

    def _hyper(self, group: dict, part: Part) -> dict:
        """The update op's own arguments (after lr) for one kernel call over `part`."""
        raise NotImplementedError

    def _group_op(self, group: dict) -> str:
        """The update op (ops.UPDATE_OPS) of the group's step: the optimizer's, unless it
        runs several kinds of group (Muon's AdamW groups)."""
        return self._op

    def _has_step(self, group: dict) -> bool:
        """Whether the group's state holds a step count (`step`), as torch's Adam does."""
        return ops.update_op(self._group_op(group)).has_step

    def _state(self, p: torch.Tensor, group: dict, device: torch.device) -> dict:
        """p's state, made on its first step as torch makes it (zeros like p, in the storage of
        state_dtype), with a float32 step tensor on device when the op counts steps."""
        state = self.state[p]
        for key in self._state_keys(group):
            if state.get(key) is None:  # a None buffer (torch saves those) is no buffer
                zeros(state, key, p, self.state_dtype)
        if self._has_step(group):
            self._step_tensor(state, device)
        return state

    def _update(self, bucket: Bucket, control: StepControl) -> None:
        """The update op over the bucket, in as few calls as _parts allows."""
        group = bucket.group
        name = self._group_op(group)
        op = ops.update_op(name)
        keys = self._state_keys(group)
        lr = self._lr_tensor(group, bucket.device)
        used = [listed[:-1] for listed in op.states if listed[:-1] in keys]  # in the op's order
        for part in self._parts(bucket, by_fresh=self._sets_new_state and bool(keys)):
            lists = [part.take(bucket.columns[listed[:-1]]) if listed[:-1] in keys else [] for listed in op.states]
            pipeline = self._pipeline_args(bucket, part, control)
            ops.update_(name, part.take(bucket.params), part.take(bucket.grads), lists,
                        part.take(bucket.columns["step"]) if op.has_step else None, lr, pipeline, self.backend,
                        state_scales=self._state_scales(bucket, part, used, pipeline),
                        master_weights=self._masters(bucket, part), **self._hyper(group, part))

    def _state_scales(self, bucket: Bucket, part: Part, keys, pipeline: ops.PipelineArgs) -> list:
        """The state_scales of a kernel call over `part` whose state lists hold `keys` (in the
        op's order): with int8 storage, per key and then per Grokfast EMA the pipeline takes,
        the scales of the call's params; else none."""
        if self.state_dtype is not torch.int8:
            return []
        keys = list(keys) + ([EMA] if pipeline.grokfast_emas else [])
        return [t for key in keys for t in part.take(bucket.columns[scales_key(key)])]
