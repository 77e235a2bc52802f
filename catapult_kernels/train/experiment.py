"""One run from a TrainConfig: task, model, lambda0, optimizer, schedule, then the loop."""
from __future__ import annotations

import dataclasses
from pathlib import Path
import torch

from .config import TrainConfig
from .loop import Trainer, TensorBatches, loss_by_name, sharpness
from .models import make_model
from .optimizers import make_optimizer
from .run_folder import RunFolder
from .schedule import lr_factor
from .tasks import make_task

# What a resumed run may change: how long it runs and what it writes, never what it computes.
RESUMABLE = ("steps", "checkpoint_every", "plots")


def resolve_resume(out, overrides: dict) -> TrainConfig:
    """The stored config of the run in `out`, with the options a resume may change."""
    stored = RunFolder(out, resume=True).read_json("config.json")
    if stored is None:
        raise ValueError(f"--resume: {out} has no config.json")
    cfg = TrainConfig.from_dict(stored)
    changed = sorted(k for k, v in overrides.items() if k not in RESUMABLE and getattr(cfg, k) != v)
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)!r} -> {overrides[k]!r}" for k in changed)
        raise ValueError(f"--resume continues the run as configured; these options differ from its "
                         f"config.json: {diffs} (start a new run in another --out instead)")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in RESUMABLE})


def run(cfg: TrainConfig, out=None, *, resume: bool = False, overwrite: bool = False,
        quiet: bool = False) -> dict:
    """Train as configured; returns the summary (also written to out/summary.json)."""
    cfg.validate()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is visible")
    if cfg.decay_steps is None:  # fix the cosine horizon now, so a longer resumed run keeps it
        cfg = dataclasses.replace(cfg, decay_steps=cfg.steps)
    data = make_task(cfg).to(device)
    if cfg.batch_size is not None and cfg.batch_size > len(data.y_train):
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {len(data.y_train)} training examples")
    model = make_model(cfg, data.in_dim, data.out_dim).to(device)
    loss_fn = loss_by_name(cfg.loss)
    lambda0 = None
    if not resume:  # a resumed run takes lambda0 (and its lr) from the checkpoint's optimizer state
        batch = TensorBatches(data.x_train, data.y_train, None, cfg.seed).sample(cfg.sharpness_batch)
        lambda0 = sharpness(model, loss_fn, batch, cfg.sharpness_iters, cfg.seed, 0)
    lr = cfg.learning_rate.resolve(lambda0) if not resume else 1.0
    optimizer = make_optimizer(cfg, model, lr)
    trainer = Trainer(
        model, optimizer, (data.x_train, data.y_train), (data.x_val, data.y_val), loss=loss_fn,
        steps=cfg.steps, batch_size=cfg.batch_size,
        lr_factor=None if cfg.schedule == "constant" and cfg.warmup == 0 else
        (lambda t: lr_factor(t, cfg, cfg.decay_steps)),
        log_every=cfg.log_every, sharpness_every=cfg.sharpness_every, sharpness_iters=cfg.sharpness_iters,
        sharpness_batch=cfg.sharpness_batch, lambda0=lambda0, grok_threshold=cfg.grok_threshold,
        max_grad_norm=cfg.max_grad_norm if cfg.impl == "torch" else None,
        out=out, resume=resume, overwrite=overwrite, checkpoint_every=cfg.checkpoint_every,
        config=cfg.to_dict(), plots=cfg.plots and out is not None, quiet=quiet, seed=cfg.seed)
    return trainer.run()


def default_out(cfg: TrainConfig, root: str = "runs") -> Path:
    """runs/<task>-<model>-w<width>-<n>: the first n whose folder does not exist yet."""
    stem = f"{cfg.task}-{cfg.model}" + (f"-w{cfg.width}" if cfg.model == "mlp" else f"-d{cfg.d_model}")
    n = 0
    while (Path(root) / f"{stem}-{n}").exists():
        n += 1
    return Path(root) / f"{stem}-{n}"


def describe(summary: dict) -> str:
    """The summary as a few aligned lines for the console."""
    rows = [(k, v) for k, v in summary.items() if v is not None]
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.5g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"  {k:<{width}}  {fmt(v)}" for k, v in rows)
