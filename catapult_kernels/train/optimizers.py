"""The optimizer a config names: catapult_kernels.optim's (every option fused), or torch.optim's
own SGD/Adam/AdamW (--impl torch) for side-by-side runs."""
from __future__ import annotations

import dataclasses
import inspect

import torch

from .. import optim
from .config import TrainConfig

CATAPULT = {name.lower(): getattr(optim, name) for name in optim.__all__}
TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Options whose None means the optimizer's own default (and, on --resume, the run's).
RUN_DEFAULTS = ("decay_steps", "beta1", "beta2", "beta3", "eps")


def _class(cfg: TrainConfig) -> type:
    return TORCH[cfg.optimizer] if cfg.impl == "torch" else CATAPULT[cfg.optimizer]


def _betas_and_eps(cfg: TrainConfig) -> dict:
    """betas (as many as the optimizer takes) and eps, where it takes them: the config's,
    or for those it leaves None the optimizer's defaults."""
    defaults = inspect.signature(_class(cfg)).parameters
    kwargs = {}
    if "betas" in defaults:
        own = defaults["betas"].default
        given = (cfg.beta1, cfg.beta2, cfg.beta3)[:len(own)]
        kwargs["betas"] = tuple(d if g is None else g for g, d in zip(given, own))
    if "eps" in defaults:
        kwargs["eps"] = defaults["eps"].default if cfg.eps is None else cfg.eps
    return kwargs


def with_optimizer_defaults(cfg: TrainConfig) -> TrainConfig:
    """cfg with the betas and eps the optimizer will use written in (None where it takes none)."""
    kwargs = _betas_and_eps(cfg)
    betas = kwargs.get("betas", ())
    return dataclasses.replace(cfg, beta1=betas[0] if len(betas) > 0 else None,
                               beta2=betas[1] if len(betas) > 1 else None,
                               beta3=betas[2] if len(betas) > 2 else None, eps=kwargs.get("eps"))


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Groups from model.param_groups (muP lr multipliers), each at lr * its multiplier."""
    groups = model.param_groups(cfg.optimizer) if hasattr(model, "param_groups") else \
        [{"params": list(model.parameters()), "lr_mult": 1.0}]
    groups = [dict(g, lr=lr * g["lr_mult"]) for g in groups]
    kwargs = {"weight_decay": cfg.weight_decay, **_betas_and_eps(cfg)}
    if cfg.optimizer in ("sgd", "lars"):
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.impl == "torch":
        return _class(cfg)(groups, lr=lr, **kwargs)  # the trainer clips for it
    grokfast = dict(alpha=cfg.grokfast_alpha, lamb=cfg.grokfast_lamb) if cfg.grokfast == "ema" else None
    return _class(cfg)(groups, lr=lr, max_grad_norm=cfg.max_grad_norm, grokfast=grokfast, agc=cfg.agc, **kwargs)
