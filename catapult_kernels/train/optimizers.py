"""The optimizer a config names: catapult_kernels.optim's (every option fused), or torch.optim's
own SGD/Adam/AdamW (--impl torch) for side-by-side runs."""
from __future__ import annotations

import torch

from .. import optim
from .config import TrainConfig

CATAPULT = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW, "lion": optim.Lion,
            "lamb": optim.LAMB, "lars": optim.LARS}
TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Groups from model.param_groups (muP lr multipliers), each at lr * its multiplier."""
    groups = model.param_groups(cfg.optimizer) if hasattr(model, "param_groups") else \
        [{"params": list(model.parameters()), "lr_mult": 1.0}]
    groups = [dict(g, lr=lr * g["lr_mult"]) for g in groups]
    kwargs = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer in ("sgd", "lars"):
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        kwargs["betas"] = (cfg.beta1, cfg.beta2)
        if cfg.optimizer != "lion":
            kwargs["eps"] = cfg.eps
    if cfg.impl == "torch":
        return TORCH[cfg.optimizer](groups, lr=lr, **kwargs)  # the trainer clips for it
    grokfast = dict(alpha=cfg.grokfast_alpha, lamb=cfg.grokfast_lamb) if cfg.grokfast == "ema" else None
    return CATAPULT[cfg.optimizer](groups, lr=lr, max_grad_norm=cfg.max_grad_norm, grokfast=grokfast,
                                   agc=cfg.agc, **kwargs)
