"""The muP coordinate check (Yang et al. 2022): the mean |pre-activation| of every layer over
the first few steps, across widths. Under muP the curves stay flat in width; under the
standard parametrization with one global lr they grow with width after the first update."""
from __future__ import annotations

import dataclasses

import torch

from .config import TrainConfig
from .loop import TensorBatches, loss_by_name
from .models import make_model
from .optimizers import make_optimizer
from .tasks import make_task


def activation_scales(cfg: TrainConfig, steps: int) -> list[list[float]]:
    """[layer][step] mean |output of each weight layer| on the training batch, before update `step`."""
    cfg.validate()
    if cfg.model != "mlp":
        raise ValueError("the coordinate check reads the MLP's layers: use --model mlp")
    data = make_task(cfg)
    model = make_model(cfg, data.in_dim, data.out_dim)
    opt = make_optimizer(cfg, model, cfg.learning_rate.resolve(None))
    loss_fn = loss_by_name(cfg.loss)
    batches = TensorBatches(data.x_train, data.y_train, cfg.batch_size, cfg.seed)
    scales: list[list[float]] = [[] for _ in model.layers]
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: scales[k].append(float(o.detach().abs().mean())))
             for k, layer in enumerate(model.layers)]
    try:
        for t in range(steps):
            x, y = batches(t)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
    finally:
        for h in hooks:
            h.remove()
    return scales


def coord_check(base: TrainConfig, widths: list[int], parametrizations=("standard", "mup"),
                steps: int = 3) -> dict:
    """results[parametrization][width] = activation_scales(...), one seed per width."""
    return {pz: {w: activation_scales(dataclasses.replace(base, width=w, parametrization=pz), steps)
                 for w in widths} for pz in parametrizations}


def growth(results: dict) -> dict:
    """Per parametrization and layer: the last step's scale at the widest width over the
    narrowest's (1 is flat in width)."""
    out = {}
    for pz, by_width in results.items():
        lo, hi = by_width[min(by_width)], by_width[max(by_width)]
        out[pz] = [h[-1] / l[-1] for l, h in zip(lo, hi)]
    return out


def format_growth(results: dict) -> str:
    widths = sorted(next(iter(results.values())))
    lines = [f"mean |pre-activation| at the last step, width {widths[-1]} over width {widths[0]} (1 = flat):"]
    for pz, ratios in growth(results).items():
        cells = ", ".join(f"{'output' if k == len(ratios) - 1 else f'layer {k + 1}'} {r:.3g}x"
                          for k, r in enumerate(ratios))
        lines.append(f"  {pz:<9} {cells}")
    return "\n".join(lines)
