"""The optimizer a config names: catapult_kernels.optim's (every option fused), or torch.optim's
own SGD/Adam/AdamW (--impl torch) for side-by-side runs. Muon gets the model's hidden matrices
and steps every other param with AdamW, in the same optimizer (the model's param_groups say which)."""
from __future__ import annotations

import dataclasses
import inspect

import torch

from .. import optim
from ..optim.muon import ADAMW_DEFAULTS as MUON_ADAMW_DEFAULTS
from .config import MOMENTUM_DEFAULTS, TrainConfig

CATAPULT = {name.lower(): getattr(optim, name) for name in optim.__all__}
TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, None: None}  # --state-dtype
# Options whose None means the optimizer's own default (and, on --resume, the run's).
RUN_DEFAULTS = ("decay_steps", "beta1", "beta2", "beta3", "eps", "momentum", "nesterov", "adjust_lr")


def _class(cfg: TrainConfig) -> type:
    return TORCH[cfg.optimizer] if cfg.impl == "torch" else CATAPULT[cfg.optimizer]


def _own_betas_and_eps(cfg: TrainConfig) -> dict:
    """The optimizer's default betas and eps, those it takes. Muon's are its AdamW groups' (its
    own eps, Newton-Schulz's, stays at its default)."""
    if cfg.optimizer == "muon":
        return dict(MUON_ADAMW_DEFAULTS)
    defaults = inspect.signature(_class(cfg)).parameters
    return {k: defaults[k].default for k in ("betas", "eps") if k in defaults}


def _betas_and_eps(cfg: TrainConfig) -> dict:
    """betas (as many as the optimizer takes) and eps, where it takes them: the config's,
    or for those it leaves None the optimizer's defaults."""
    own = _own_betas_and_eps(cfg)
    kwargs = {}
    if "betas" in own:
        given = (cfg.beta1, cfg.beta2, cfg.beta3)[:len(own["betas"])]
        kwargs["betas"] = tuple(d if g is None else g for g, d in zip(given, own["betas"]))
    if "eps" in own:
        kwargs["eps"] = own["eps"] if cfg.eps is None else cfg.eps
    return kwargs


def _momentum(cfg: TrainConfig) -> dict:
    """momentum and nesterov where the optimizer takes them: the config's, or for those it
    leaves None the trainer's defaults for that optimizer (MOMENTUM_DEFAULTS)."""
    if cfg.optimizer not in MOMENTUM_DEFAULTS:
        return {}
    momentum, nesterov = MOMENTUM_DEFAULTS[cfg.optimizer]
    return dict(momentum=momentum if cfg.momentum is None else cfg.momentum,
                nesterov=nesterov if cfg.nesterov is None else cfg.nesterov)


def _adjust_lr(cfg: TrainConfig):
    """Muon's adjust_lr_fn, named (torch's None is "original"); None for the other optimizers."""
    return (cfg.adjust_lr or "original") if cfg.optimizer == "muon" else None


def with_optimizer_defaults(cfg: TrainConfig) -> TrainConfig:
    """cfg with the betas, eps, momentum, nesterov and adjust_lr the optimizer will use written in
    (None where it takes none)."""
    kwargs, momentum = _betas_and_eps(cfg), _momentum(cfg)
    betas = kwargs.get("betas", ())
    return dataclasses.replace(cfg, beta1=betas[0] if len(betas) > 0 else None,
                               beta2=betas[1] if len(betas) > 1 else None,
                               beta3=betas[2] if len(betas) > 2 else None, eps=kwargs.get("eps"),
                               momentum=momentum.get("momentum"), nesterov=momentum.get("nesterov"),
                               adjust_lr=_adjust_lr(cfg))


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Groups from model.param_groups (muP lr multipliers), each at lr * its multiplier. Muon's
    AdamW groups (use_muon False) take the betas and eps; Muon's own groups its momentum."""
    if hasattr(model, "param_groups"):
        groups = model.param_groups(cfg.optimizer, _adjust_lr(cfg))
    elif cfg.optimizer == "muon":
        groups = [dict(g, lr_mult=1.0) for g in optim.muon_param_groups(model)]
    else:
        groups = [{"params": list(model.parameters()), "lr_mult": 1.0}]
    groups = [dict(g, lr=lr * g["lr_mult"]) for g in groups]
    kwargs = {"weight_decay": cfg.weight_decay, **_momentum(cfg)}
    if cfg.optimizer == "muon":
        groups = [g if g["use_muon"] else dict(g, **_betas_and_eps(cfg)) for g in groups]
        kwargs["adjust_lr_fn"] = _adjust_lr(cfg)
    else:
        kwargs.update(_betas_and_eps(cfg))
    if cfg.impl == "torch":
        return _class(cfg)(groups, lr=lr, **kwargs)  # the trainer clips for it
    grokfast = dict(alpha=cfg.grokfast_alpha, lamb=cfg.grokfast_lamb) if cfg.grokfast == "ema" else None
    return _class(cfg)(groups, lr=lr, max_grad_norm=cfg.max_grad_norm, grokfast=grokfast, agc=cfg.agc,
                       state_dtype=STATE_DTYPES[cfg.state_dtype], master_weights=cfg.master_weights,
                       rounding_seed=cfg.seed, **kwargs)
