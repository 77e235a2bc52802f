"""One run from a TrainConfig: task, model, lambda0, optimizer, schedule, then the loop."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional

from .adversarial import Attack
from .cli import check_device
from .config import RESUMABLE, TrainConfig, computation_changes
from .loop import Trainer, TensorBatches, loss_by_name, sharpness
from .models import make_model
from .optimizers import RUN_DEFAULTS, make_optimizer, with_optimizer_defaults
from .param_dtype import with_param_dtype
from .parallel import from_rank0, process_group, rank_device, world_size
from .run_folder import RunFolder
from .schedule import lr_factor
from .tasks import make_task


def resolve_resume(out, overrides: dict) -> TrainConfig:
    """The config to continue the run in `out` with: its config.json (where the RESUMABLE
    options may have been edited), then `overrides`. run() refuses, by name, any option that
    would change what the run computes."""
    with RunFolder(out, resume=True) as folder:  # a folder in use: refused now, naming its holder
        stored, config_json = folder.read_json("config.json"), folder.file("config.json")
    if stored is None:
        raise ValueError(f"--resume: {out} has no config.json")
    try:
        edited = TrainConfig.from_dict(stored).validate()
    except ValueError as e:
        raise ValueError(f"{config_json}: {e}") from None
    return dataclasses.replace(edited, **overrides)


def continuation(cfg: TrainConfig, computed: Optional[dict], source: Path) -> TrainConfig:
    """The config that continues a run computed with `computed` (read from `source`) as cfg
    asks: the run's own, with cfg's RESUMABLE options. Any other option of cfg that would
    change what the run computes is refused, by name; a decay_steps, beta or eps of None means the run's."""
    if not computed:
        raise ValueError(f"--resume: {source} holds no run config (fit() wrote it, not catapult-train)")
    began = TrainConfig.from_dict(computed)
    if cfg.world_size != began.world_size:  # the ranks' slices set the rounding: the same count continues exactly
        raise ValueError(f"--resume: the run in {source.parent} trained on {began.world_size} process(es), this one "
                         f"has {cfg.world_size}: resume it with torchrun --nproc-per-node {began.world_size}"
                         if began.world_size > 1 else
                         f"--resume: the run in {source.parent} trained in one process: resume it without torchrun")
    requested = {k: v for k, v in cfg.to_dict().items() if not (k in RUN_DEFAULTS and v is None)}
    changed = computation_changes(began, requested)
    if changed:
        raise ValueError(f"--resume continues the run in {source.parent} as it began; these options differ "
                         f"from the config it computed with ({source.name}): {', '.join(changed)} (put them "
                         "back, or start a new run in another --out)")
    return dataclasses.replace(began, **{k: getattr(cfg, k) for k in RESUMABLE})


def run(cfg: TrainConfig, out=None, *, resume: bool = False, overwrite: bool = False,
        quiet: bool = False) -> dict:
    """Train as configured; returns the summary (also written to out/summary.json). resume:
    continue the run in `out`, as it began (see continuation)."""
    cfg.validate()
    check_device(cfg.device)
    if resume and out is None:
        raise ValueError("--resume needs --out (the run to continue)")
    with process_group(cfg.parallel != "none", device=cfg.device):
        cfg = dataclasses.replace(cfg, world_size=world_size() if cfg.parallel != "none" else 1)
        if not resume:
            if cfg.decay_steps is None:  # fix the cosine horizon now, so a longer resumed run keeps it
                cfg = dataclasses.replace(cfg, decay_steps=cfg.steps)
            cfg = with_optimizer_defaults(cfg)  # recorded, so that config.json says what ran
            return _train(cfg, out, resume=False, overwrite=overwrite, quiet=quiet)
        with contextlib.ExitStack() as held:
            def resumed_config() -> TrainConfig:  # rank 0's folder, held until the run ends: the checkpoint
                folder = held.enter_context(RunFolder(out, resume=True))  # compared is the one resumed
                computed = folder.load_checkpoint(map_location="cpu", mmap=True).get("config")
                return continuation(cfg, computed, folder.file("checkpoint.pt"))
            cfg = from_rank0(resumed_config)
            return _train(cfg, out, resume=True, overwrite=False, quiet=quiet)


def _train(cfg: TrainConfig, out, *, resume: bool, overwrite: bool, quiet: bool) -> dict:
    device = rank_device(cfg.device, cfg.parallel)
    data = make_task(cfg).to(device)
    if cfg.batch_size is not None and cfg.batch_size > len(data.y_train):
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {len(data.y_train)} training examples")
    model = with_param_dtype(make_model(cfg, data.in_dim, data.out_dim).to(device), cfg.dtype)
    loss_fn = loss_by_name(cfg.loss)
    lambda0 = None
    if not resume:  # a resumed run takes lambda0 (and its lr) from the checkpoint's optimizer state
        batch = TensorBatches(data.x_train, data.y_train, None, cfg.seed).sample(cfg.sharpness_batch)
        lambda0 = from_rank0(lambda: sharpness(model, loss_fn, batch, cfg.sharpness_iters, cfg.seed, 0))
    lr = cfg.learning_rate.resolve(lambda0) if not resume else 1.0
    trainer = Trainer(  # the optimizer is made over the model's params as the trainer places them (FSDP shards)
        model, lambda m: make_optimizer(cfg, m, lr), (data.x_train, data.y_train), (data.x_val, data.y_val),
        loss=loss_fn, parallel=cfg.parallel, noisy_mask=data.noisy_mask,
        steps=cfg.steps, batch_size=cfg.batch_size,
        lr_factor=None if cfg.schedule == "constant" and cfg.warmup == 0 else
        (lambda t, *measured: lr_factor(t, cfg, cfg.decay_steps, *measured)),
        lr_sharpness_every=cfg.cycle_period if cfg.cycle_unit == "sharpness" else 0,
        log_every=cfg.log_every, sharpness_every=cfg.sharpness_every, sharpness_iters=cfg.sharpness_iters,
        sharpness_batch=cfg.sharpness_batch, lambda0=lambda0, grok_threshold=cfg.grok_threshold,
        max_grad_norm=cfg.max_grad_norm if cfg.impl == "torch" else None,
        out=out, resume=resume, overwrite=overwrite, checkpoint_every=cfg.checkpoint_every,
        amp=cfg.amp, grad_accum=cfg.grad_accum, tensorboard=cfg.tensorboard,
        config=cfg.to_dict(), plots=cfg.plots and out is not None, quiet=quiet, seed=cfg.seed,
        attack=None if cfg.adv_eval == "none" else Attack(cfg.adv_eval, cfg.adv_eps, cfg.adv_steps, cfg.adv_step_size))
    try:
        summary = trainer.run()  # it writes config.json: how long the run goes and what it writes, from now on
        if cfg.schedule == "cyclic" and cfg.plots and trainer.folder is not None:  # the cycles on a linear axis
            from .config_words import config_title
            from .plots import plot_cyclic
            plot_cyclic(trainer.folder.read_metrics(), trainer.folder.file("cyclic.png"),
                        title=config_title(cfg.to_dict()))
        return summary
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
