"""One run from a TrainConfig: task, model, lambda0, optimizer, schedule, then the loop."""
from __future__ import annotations

import dataclasses
from pathlib import Path
import torch

from .config import RESUMABLE, TrainConfig, computation_changes
from .loop import Trainer, TensorBatches, loss_by_name, sharpness
from .models import make_model
from .optimizers import make_optimizer
from .run_folder import RunFolder
from .schedule import lr_factor
from .tasks import make_task


def resolve_resume(out, overrides: dict) -> TrainConfig:
    """The config the run in `out` computes with (the one its checkpoint holds), with the
    RESUMABLE options taken from its config.json, then from `overrides`. Any other option
    that config.json or `overrides` would change is refused, by name."""
    with RunFolder(out, resume=True) as folder:
        computed = folder.load_checkpoint(map_location="cpu", mmap=True).get("config")
        stored = folder.read_json("config.json")
        checkpoint, config_json = folder.file("checkpoint.pt"), folder.file("config.json")
    if not computed:
        raise ValueError(f"--resume: {checkpoint} holds no run config (fit() wrote it, not catapult-train)")
    if stored is None:
        raise ValueError(f"--resume: {out} has no config.json")
    cfg = TrainConfig.from_dict(computed)
    try:
        edited = TrainConfig.from_dict(stored).validate()
    except ValueError as e:
        raise ValueError(f"{config_json}: {e}") from None
    changed = computation_changes(cfg, edited.to_dict())
    if changed:
        raise ValueError(f"--resume: {config_json} was edited after the run began: {', '.join(changed)} "
                         f"would change what it computes (its checkpoint was computed with the first "
                         f"values); put them back, or start a new run in another --out")
    changed = computation_changes(cfg, overrides)
    if changed:
        raise ValueError(f"--resume continues the run as configured; these options differ from its "
                         f"config: {', '.join(changed)} (start a new run in another --out instead)")
    resumable = {k: getattr(edited, k) for k in RESUMABLE}
    resumable.update({k: v for k, v in overrides.items() if k in RESUMABLE})
    return dataclasses.replace(cfg, **resumable)


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
    try:
        if resume:  # the checkpoint loaded: config.json now says how long the run goes and what it writes
            trainer.folder.read_metrics(allow_cut_last_line=True)  # a corrupt line: refused before any write
            trainer.folder.write_json("config.json", cfg.to_dict())
        return trainer.run()
    finally:
        if trainer.folder is not None:
            trainer.folder.close()  # let go of the folder's lock now, not whenever the trainer is collected


def default_out(cfg: TrainConfig, root: str = "runs") -> Path:
    """runs/<task>-<model>-w<width>-<n>, made here: the first n whose folder this call creates
    (mkdir is atomic), so runs started at once never pick the same folder."""
    stem = f"{cfg.task}-{cfg.model}" + (f"-w{cfg.width}" if cfg.model == "mlp" else f"-d{cfg.d_model}")
    Path(root).mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        out = Path(root) / f"{stem}-{n}"
        try:
            out.mkdir()
            return out
        except FileExistsError:
            n += 1


def describe(summary: dict) -> str:
    """The summary as a few aligned lines for the console."""
    rows = [(k, v) for k, v in summary.items() if v is not None]
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.5g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"  {k:<{width}}  {fmt(v)}" for k, v in rows)
