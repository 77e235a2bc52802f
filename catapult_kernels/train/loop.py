"""The training loop: any model, any torch optimizer, tensors or a DataLoader.

Step t's record describes the params after t updates (theta_t): the loss and accuracies at
theta_t, the norm of the grads taken there (read from the optimizer when it computed one,
so no extra pass), the weight norm, the lr that update t uses, and the sharpness at theta_t.
The loss of every step stays on the device and is read once per log step, so the loop adds
no host sync per step.

A checkpoint holds the state at the start of an iteration (params, optimizer state, global
RNG, trackers); resuming from it replays the run bit for bit on CPU, because the minibatch
order is a pure function of (seed, step) and so is the lr schedule.

parallel="ddp" or "fsdp" trains one run on the ranks of a process group (torchrun), over the
global batch, logging what one process would: see parallel.py."""
from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, IterableDataset

from .. import ops
from ..distributed.sharding import is_dtensor
from .adversarial import Attack, robust_accuracy
from .config_file import format_config
from .grad_accum import gradient_sync, micro_batches
from .mixed_precision import MixedPrecision
from .parallel import DataParallel, full_tensors, parallel_mode, process_group, shard_like
from .phase import classify, is_runaway
from .run_folder import RunFolder
from .sharpness import NoDoubleBackward, top_hessian_eigenvalue
from .tensorboard_log import TensorBoardLog, require_tensorboard

Pair = tuple[torch.Tensor, torch.Tensor]


def mse_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * sum over outputs, mean over examples (Lewkowycz et al.); class labels become one-hot."""
    if not target.is_floating_point():
        target = F.one_hot(target, out.shape[-1]).to(out.dtype)
    return 0.5 * (out - target.view_as(out)).square().sum(-1).mean() if out.dim() > 1 else \
        0.5 * (out - target).square().mean()


LOSSES = {"ce": F.cross_entropy, "mse": mse_loss}


def loss_by_name(loss: Union[str, Callable]) -> Callable:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}, or pass a callable")
    return LOSSES[loss]


class TensorBatches:
    """Full batch, or minibatches without replacement: epoch e is a permutation drawn from
    (seed, e), so the batch of step t is known without any state."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: Optional[int], seed: int):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"train inputs and targets must be non-empty and of one length, got {len(x)} and {len(y)}")
        if batch_size is not None and not 1 <= batch_size <= len(x):
            raise ValueError(f"batch_size must lie in [1, {len(x)}] (the training set's size), got {batch_size}")
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.per_epoch = len(x) // batch_size if batch_size else 1
        self._epoch, self._perm = -1, None

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None

    def __call__(self, step: int) -> Pair:
        if self.full_batch:
            return self.x, self.y
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.x), generator=gen).to(self.x.device)
            self._epoch = epoch
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]

    @property
    def training_set(self) -> Pair:
        return self.x, self.y

    def sample(self, n: int) -> Pair:
        return self.x[:n], self.y[:n]


class LoaderBatches:
    """Batches from a DataLoader, cycled. A resumed run starts a fresh iterator, so it is
    bit-identical only when the loader yields the same batches each epoch. The measurements
    read the loader through `measured` (see measurement_loader), never the training's iterator."""

    def __init__(self, loader: Iterable, device):
        self.loader, self.device, self._it = loader, device, None
        self.measured = measurement_loader(loader)
        self.full_batch = False
        self._sample = None

    def _move(self, batch) -> Pair:
        x, y = batch[0], batch[1]
        return x.to(self.device), y.to(self.device)

    def __call__(self, step: int) -> Pair:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return self._move(next(self._it))
        except StopIteration:
            self._it = iter(self.loader)
            return self._move(next(self._it))

    @property
    def training_set(self) -> Iterable:
        return self.measured

    def sample(self, n: int) -> Pair:
        """The first n examples of one pass (across batches), drawn once and kept."""
        if self._sample is None:
            xs, ys, have = [], [], 0
            with _unchanged_rng(self.measured):
                for batch in self.measured:
                    x, y = self._move(batch)
                    xs.append(x)
                    ys.append(y)
                    have += len(x)
                    if have >= n:
                        break
            self._sample = torch.cat(xs), torch.cat(ys)
        x, y = self._sample
        return x[:n], y[:n]


def measurement_loader(loader: Iterable) -> Iterable:
    """What a measurement iterates to see the training set: the loader itself, unless it keeps
    persistent workers. iter() of such a loader returns its one iterator, reset, so a pass over
    it would rewind the batches the training reads; then a loader of the same batches
    (dataset, sampler, collate_fn) that reads them in this process."""
    if not (isinstance(loader, DataLoader) and loader.persistent_workers):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last,
                          collate_fn=loader.collate_fn)
    if loader.batch_sampler is None:  # batch_size=None: the dataset yields whole batches
        return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, collate_fn=loader.collate_fn)
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)


@dataclass
class Trackers:
    """What the loop knows beyond the model and the optimizer; saved in every checkpoint."""
    loss0: Optional[float] = None
    peak_loss: float = -math.inf
    memorize_step: Optional[int] = None
    grok_step: Optional[int] = None
    noisy_memorize_step: Optional[int] = None  # with noisy_mask: memorize_step of the corrupted examples
    clean_memorize_step: Optional[int] = None  # and of the others
    lambda0: Optional[float] = None
    sharpness_last: Optional[float] = None
    sharpness_last_step: Optional[int] = None
    lr_sharpness: dict = field(default_factory=dict)  # step -> sharpness: what lr_sharpness_every measured
    last_record: dict = field(default_factory=dict)
    diverged: bool = False
    loop_s: float = 0.0    # time spent in the loop (lambda0's measurement excluded)
    updates: int = 0       # optimizer steps taken


@contextlib.contextmanager
def _unchanged_rng(data=None):
    """Measuring leaves every RNG the training draws from as it was, so that its batches and
    dropout masks do not depend on how often the loop measures: the global CPU RNG, and the
    generators of the DataLoader `data` (iterating one draws each iterator's base seed and its
    shuffle from them, or from the global RNG when it was given none)."""
    generators = _generators_of(data)
    states = [g.get_state() for g in generators]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for g, saved in zip(generators, states):
                g.set_state(saved)


def _generators_of(data) -> list:
    """The torch.Generators a DataLoader draws from: its own and its sampler's."""
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    owners = (data, sampler, getattr(batch_sampler, "sampler", None))
    found = {id(g): g for g in (getattr(o, "generator", None) for o in owners) if isinstance(g, torch.Generator)}
    return list(found.values())


@contextlib.contextmanager
def _modes(model: torch.nn.Module, training: Callable[[torch.nn.Module], bool]):
    """Each module's train/eval flag set to training(module), and every flag restored on exit
    (not model.train(): that would also flip submodules the user had put in eval mode)."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in saved:
            m.training = training(m)
        yield
    finally:
        for m, was_training in saved:
            m.training = was_training


@contextlib.contextmanager
def _sharpness_mode(model: torch.nn.Module):
    """The function the step descends, without its noise and without side effects: Dropout
    off (a mask would make the Hessian random and draw from the RNG); BatchNorm in the mode
    the step sees, so a training one normalizes by the batch's own statistics (its running
    ones are still mean 0, variance 1 at step 0); and every buffer (BatchNorm's running
    statistics and batch count) put back as it was."""
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        with _modes(model, lambda m: m.training and isinstance(m, _BatchNorm)):
            yield
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)


def sharpness(model: torch.nn.Module, loss_fn: Callable, batch: Pair, iters: int, seed: int, step: int) -> float:
    """The top Hessian eigenvalue of the loss on a fixed batch (the first examples of the
    training set), from a start vector drawn from (seed, step), in _sharpness_mode."""
    x, y = batch
    params = [p for p in model.parameters() if p.requires_grad]
    with _sharpness_mode(model):
        return top_hessian_eigenvalue(lambda: loss_fn(model(x), y), params, iters=iters,
                                      seed=seed * 1_000_003 + step)


def global_norm(tensors: list) -> float:
    if not tensors:
        return 0.0
    if any(is_dtensor(t) for t in tensors):  # FSDP's shards: each rank's pieces, one all-reduce
        from ..distributed.norms import norm_of
        return float(norm_of(tensors))
    if all(t.dtype in ops.SUPPORTED_DTYPES for t in tensors) and len({t.device for t in tensors}) == 1:
        return float(ops.global_norm(tensors))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])))


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (what SLURM, Kubernetes and `docker stop` send) as a request
    to stop at the next step boundary, where the loop checkpoints, so the run resumes exactly.
    A second signal while stopping stops at once (KeyboardInterrupt; the last checkpoint stays).
    Handlers go in only in the main thread (Python allows no other), never over a signal the
    process ignores, and the previous ones come back on exit. A nested use shares the outermost
    one, so one signal stops a sweep and the run in progress alike."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    _installed: Optional["StopSignals"] = None

    def __init__(self):
        self.signum: Optional[int] = None  # the signal that requested the stop
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if StopSignals._installed is not None:
            return StopSignals._installed
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # e.g. SIGINT of a background job
                    self._previous[s] = signal.signal(s, self._handle)
            StopSignals._installed = self
        return self

    def __exit__(self, *exc) -> None:
        if StopSignals._installed is self:
            for s, previous in self._previous.items():  # None: a handler not set from Python
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
            StopSignals._installed = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum


class Trainer:
    """Trains `model` with `optimizer` for `steps` updates; see fit()."""

    def __init__(self, model: torch.nn.Module,
                 optimizer: Union[torch.optim.Optimizer, Callable[[torch.nn.Module], torch.optim.Optimizer]],
                 train: Union[Pair, Iterable], val: Optional[Union[Pair, Iterable]] = None, *,
                 loss: Union[str, Callable] = "ce", steps: int, batch_size: Optional[int] = None,
                 lr_factor: Optional[Callable[..., float]] = None, lr_sharpness_every: int = 0, log_every: int = 10,
                 sharpness_every: int = 0, sharpness_iters: int = 20, sharpness_batch: int = 1024,
                 measure_lambda0: bool = True, lambda0: Optional[float] = None, grok_threshold: float = 0.95,
                 max_grad_norm: Optional[float] = None, out=None, resume: bool = False, overwrite: bool = False,
                 checkpoint_every: int = 0, config: Optional[dict] = None, plots: bool = True,
                 amp: Optional[str] = None, grad_accum: int = 1, tensorboard: bool = False,
                 quiet: bool = False, seed: int = 0, parallel: Optional[str] = None,
                 noisy_mask: Optional[torch.Tensor] = None,
                 attack: Optional[Attack] = None):
        check_noisy_mask(noisy_mask, train)
        for name, v in (("steps", steps), ("log_every", log_every), ("grad_accum", grad_accum)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name, v in (("sharpness_every", sharpness_every), ("checkpoint_every", checkpoint_every),
                        ("lr_sharpness_every", lr_sharpness_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if (resume or overwrite or checkpoint_every) and out is None:
            raise ValueError("resume, overwrite and checkpoint_every need a run folder: pass out=")
        self.device = next(model.parameters()).device
        self.dp = DataParallel(parallel, self.device)
        if self.dp.active and isinstance(train, (tuple, list)) and (batch_size or len(train[0])) < self.dp.world_size:
            raise ValueError(f"batch_size {batch_size or len(train[0])} on {self.dp.world_size} ranks: every rank "
                             "needs at least one example per step")
        if isinstance(train, (tuple, list)) and (batch_size or len(train[0])) // self.dp.world_size < grad_accum:
            on_ranks = f" on {self.dp.world_size} ranks" if self.dp.active else ""
            raise ValueError(f"grad_accum {grad_accum}: a batch of {batch_size or len(train[0])}{on_ranks} leaves a "
                             "micro-batch without examples (each needs at least one)")
        if tensorboard and out is None:
            raise ValueError("tensorboard writes into the run folder: pass out=")
        if tensorboard:
            require_tensorboard()
        self.amp = MixedPrecision(amp, self.device)
        fsdp_to_shard = self.dp.mode == "fsdp" and not self.dp.is_sharded(model)
        if fsdp_to_shard and isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("parallel='fsdp' replaces the model's params by their shards, so an optimizer made "
                             "before holds the wrong ones: pass optimizer as a function of the sharded model "
                             "(lambda m: AdamW(m.parameters())), or apply fully_shard(model) before making it")
        # sharpness on rank 0's full replica: DDP's module; under FSDP a copy made before sharding
        self._measurable = self.dp.mode != "fsdp" or fsdp_to_shard
        if (sharpness_every or lr_sharpness_every) and not self._measurable:
            raise ValueError("sharpness under parallel='fsdp' is measured on a full copy of the model made before "
                             "sharding: pass the model unsharded (the trainer shards it)")
        if attack is not None and (val is None or not self._measurable):
            raise ValueError("attack: robust accuracy is measured on the val data, by rank 0 on a full copy of the "
                             "model: pass val, and under parallel='fsdp' the model unsharded")
        self._replica = copy.deepcopy(model) if fsdp_to_shard and self.dp.is_main else None
        self.model, self.inner = self.dp.wrap(model)  # the training step calls model; inner holds the params
        self.opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer(self.inner)
        self.loss_fn = loss_by_name(loss)
        self.steps, self.log_every = steps, log_every
        if lr_sharpness_every and lr_factor is None:
            raise ValueError("lr_sharpness_every measures the sharpness for lr_factor(t, measured): pass lr_factor")
        self.lr_factor, self.lr_sharpness_every = lr_factor, lr_sharpness_every
        self.sharpness_every, self.sharpness_iters, self.sharpness_batch = sharpness_every, sharpness_iters, sharpness_batch
        self.measure_lambda0, self.grok_threshold = measure_lambda0, grok_threshold
        self.max_grad_norm = max_grad_norm  # torch optimizers only: ours clip inside step()
        self.grad_accum, self.tensorboard = grad_accum, tensorboard
        self.board: Optional[TensorBoardLog] = None  # rank 0's, from the folder's first write
        self.checkpoint_every, self.plots, self.quiet, self.seed = checkpoint_every, plots, quiet, seed
        self.batches = (TensorBatches(*train, batch_size, seed) if isinstance(train, (tuple, list))
                        else LoaderBatches(train, self.device))
        self.noisy_mask = None if noisy_mask is None else noisy_mask.to(self.device)
        self.val = measurement_loader(val) if val is train else val  # no pass may rewind the training's
        self.attack = attack
        self.config = dict(config or {})
        self._config_given = config is not None
        self.trackers = Trackers(lambda0=lambda0)
        self.start = 0
        self._stop_requested = False
        for group in self.opt.param_groups:  # the schedule scales each group's lr as first given
            group.setdefault("initial_lr", group["lr"])
        self.out = out  # every rank takes part in a checkpoint; self.folder: rank 0 writes it
        self.folder = None
        if out is not None:
            self.dp.from_rank0(lambda: self._open_folder(out, resume, overwrite))
        if resume:
            try:
                self._load()
            except BaseException:  # no trainer to close the folder later: let go of its lock now
                if self.folder is not None:
                    self.folder.close()
                raise

    def _open_folder(self, out, resume: bool, overwrite: bool) -> None:
        self.folder = RunFolder(out, resume=resume, overwrite=overwrite)

    # ---- the loop ----
    def run(self) -> dict:
        if self.start == 0 and self.trackers.lambda0 is None and self.measure_lambda0:
            self.trackers.lambda0 = self._lambda0()
        if self.out is not None:
            self.dp.from_rank0(self._begin_folder)
        if self._config_given and not self.quiet and self.dp.is_main:  # what runs, from now on (config.json)
            print(format_config(self.config), flush=True)
        bar = self._progress_bar()
        pending: list[torch.Tensor] = []  # the losses since the last log step, on the device
        status = "finished"
        with StopSignals() as signals:
            t0, t = time.perf_counter(), self.start
            while True:
                if self._stop_agreed(t, signals):
                    status = "interrupted"
                    break
                if t > self.start and ((self.checkpoint_every and t % self.checkpoint_every == 0) or t == self.steps):
                    self._flush(t, pending)
                    self._save(t, time.perf_counter() - t0)
                record = self._iteration(t, pending)
                if record is not None:
                    self._log(record, bar)
                    if self.trackers.diverged:
                        status = "divergent"
                        break
                if t == self.steps:
                    break
                t += 1
            self.trackers.loop_s += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        if self.out is not None and status != "finished":
            self._flush(t, pending)
            self._save(t, 0.0)  # a stop: the state at the start of step t; divergent: the last state
        return self._finish(status, t)

    def _begin_folder(self) -> None:
        self.folder.truncate_metrics(before_step=self.start)  # first: a corrupt record is refused before any write
        if self.start == 0 or self._config_given:  # a resume without a config keeps config.json as it is
            self.folder.write_json("config.json", self.config)
        if self.tensorboard:  # a resumed run's events from its first step on replace those logged before
            self.board = TensorBoardLog(self.folder.path, purge_step=self.start)

    def _stop_agreed(self, t: int, signals: StopSignals) -> bool:
        """Whether to stop before step t. Ranks stop at one step together: they agree at log
        steps (where the loop syncs anyway), so a signal stops a parallel run there."""
        asked = self._stop_requested or signals.requested
        if not self.dp.active:
            return asked
        return t % self.log_every == 0 and self.dp.any(asked)

    def _iteration(self, t: int, pending: list) -> Optional[dict]:
        sharp = self.sharpness_every and (t % self.sharpness_every == 0 or t == self.steps)
        log = sharp or t % self.log_every == 0 or t == self.steps
        record = {"step": t} if log else None
        if sharp:
            record["sharpness"] = self.trackers.sharpness_last = self._sharpness(t)
            self.trackers.sharpness_last_step = t
        if self.lr_sharpness_every and t % self.lr_sharpness_every == 0:  # theta_t, before update t reads it
            self.trackers.lr_sharpness[t] = record["sharpness"] if sharp else self._sharpness(t)
        x, y = self.batches(t)
        x, y, share = self.dp.local_part(x, y)
        self.opt.zero_grad(set_to_none=True)
        out, loss = self._forward_backward(x, y, share)
        pending.append(loss)
        if log:
            losses = self.dp.sum(torch.stack(pending)).tolist()  # the one host sync per log step
            pending.clear()
            self._track_losses(t - len(losses) + 1, losses)
            record.update(self._measure(t, out, y, losses[-1]))
        stepped = t < self.steps and not self.trackers.diverged
        clip_norm = None
        if stepped:
            self._set_lr(t)
            if self.max_grad_norm is not None:
                self.amp.unscale_(self.opt)
                clip_norm = torch.nn.utils.clip_grad_norm_(self.inner.parameters(), self.max_grad_norm)
            self.amp.step(self.opt)
            self.trackers.updates += 1
        if log:
            record["lr"] = self._base_lr(t)
            record["grad_norm"] = self._grad_norm(clip_norm, stepped)
        return record

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's outputs (detached) and loss (detached: this rank's share of the batch's mean
        loss), its grads left in .grad: over grad_accum micro-batches (grad_accum.py), each forward
        under --amp's autocast, each loss in float32."""
        outs, loss = [], None
        parts = micro_batches(x, y, self.grad_accum)
        for i, (xi, yi, part) in enumerate(parts):
            with gradient_sync(self.model, self.dp.mode, i, len(parts)):
                with self.amp.autocast():
                    out = self.model(xi)
                micro = self.loss_fn(self.amp.float32(out), yi)
                if part * share != 1.0:  # its part of the batch's mean
                    micro = micro * (part * share)
                # x world size: DDP and FSDP average the grads over the ranks, where the shares add up
                self.amp.backward(micro * self.dp.world_size if self.dp.active else micro)
            outs.append(out.detach())
            loss = micro.detach() if loss is None else loss + micro.detach()
        return (torch.cat(outs) if len(outs) > 1 else outs[0]), loss

    def _flush(self, t: int, pending: list) -> None:
        """Fold the unread losses of steps t - len(pending) .. t - 1 into the trackers."""
        if pending:
            self._track_losses(t - len(pending), self.dp.sum(torch.stack(pending)).tolist())
            pending.clear()

    def _track_losses(self, first_step: int, losses: list) -> None:
        tr = self.trackers
        for s, value in enumerate(losses, first_step):
            if s == 0:
                tr.loss0 = value
            if tr.loss0 is not None and is_runaway(value, tr.loss0):
                tr.diverged = True
            if math.isfinite(value):
                tr.peak_loss = max(tr.peak_loss, value)

    def _measure(self, t: int, out: torch.Tensor, y: torch.Tensor, batch_loss: float) -> dict:
        """Loss, accuracies and weight norm at theta_t, before update t changes the params.
        The train metrics cover the whole training set (`train_examples` says how many): on a
        full batch, the step's own forward (no second pass); else an eval-mode pass over the
        training tensors or every batch of the DataLoader."""
        record = {}
        with torch.no_grad():
            if self.batches.full_batch:  # out and y: this rank's slice of the training set
                record["loss"], train_examples = batch_loss, len(self.batches.y)
                correct = _correct(out, y)
                train_acc = None if correct is None else float(self.dp.sum(correct)) / train_examples
                if self.noisy_mask is not None:
                    record.update(self._noisy_and_clean_acc(out, y))
            elif self.noisy_mask is not None:
                record["loss"], train_acc, train_examples, split = self._evaluate_noisy_and_clean()
                record.update(split)
            else:
                record["loss"], train_acc, train_examples = self._evaluate(self.batches.training_set)
            if train_acc is not None:
                record["train_acc"] = train_acc
            record["train_examples"] = train_examples
            if self.val is not None:
                record["val_loss"], val_acc, _ = self._evaluate(self.val)
                if val_acc is not None:
                    record["val_acc"] = val_acc
                if self.attack is not None:
                    record["robust_val_acc"] = self._robust_val_acc()
            record["weight_norm"] = global_norm([p.detach() for p in self.inner.parameters()])
        tr = self.trackers
        if tr.memorize_step is None and record.get("train_acc", 0.0) >= 0.99:
            tr.memorize_step = t
        if tr.grok_step is None and record.get("val_acc", 0.0) >= self.grok_threshold:
            tr.grok_step = t
        if tr.noisy_memorize_step is None and record.get("noisy_train_acc", 0.0) >= 0.99:
            tr.noisy_memorize_step = t
        if tr.clean_memorize_step is None and record.get("clean_train_acc", 0.0) >= 0.99:
            tr.clean_memorize_step = t
        return record

    def _noisy_and_clean_acc(self, out: torch.Tensor, y: torch.Tensor) -> dict:
        """The accuracies on the corrupted and the clean examples, from the full batch's own
        forward: out and y are this rank's slice of the training set, as is `noisy` here."""
        noisy = self.dp.local_part(self.noisy_mask, self.noisy_mask)[0]
        hits = out.argmax(-1) == y
        counts = torch.stack([(hits & noisy).sum(), (hits & ~noisy).sum()]).double()
        correct_noisy, correct_clean = self.dp.sum(counts).tolist()
        n_noisy = int(self.noisy_mask.sum())
        return noise_accuracies(correct_noisy, n_noisy, correct_clean, len(self.noisy_mask) - n_noisy)

    def _evaluate_noisy_and_clean(self) -> tuple[float, float, int, dict]:
        """_evaluate of the training set, in two passes that together cost one: over the
        corrupted examples and over the others. Also returns their accuracies."""
        x, y = self.batches.training_set
        (loss_n, acc_n, n_noisy), (loss_c, acc_c, n_clean) = (
            self._evaluate((x[m], y[m])) for m in (self.noisy_mask, ~self.noisy_mask))
        n = n_noisy + n_clean
        return ((loss_n * n_noisy + loss_c * n_clean) / n, (acc_n * n_noisy + acc_c * n_clean) / n, n,
                noise_accuracies(acc_n * n_noisy, n_noisy, acc_c * n_clean, n_clean))

    def _evaluate(self, data) -> tuple[float, Optional[float], int]:
        """Mean loss, accuracy (None for regression) and example count over `data` (tensors
        or batches): every module in eval mode (Dropout off, BatchNorm on its running
        statistics, which stay as they are), no grads, the RNG unchanged, one host sync.
        In a parallel run each rank passes its slice of every batch, and the sums are summed."""
        batches = [data] if isinstance(data, (tuple, list)) and torch.is_tensor(data[0]) else data
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        total, classify_ = 0, True
        with torch.no_grad(), _modes(self.inner, lambda m: False), _unchanged_rng(data):
            for x, y, *_ in batches:
                x, y = x.to(self.device), y.to(self.device)
                for xi, yi in self.dp.pieces(x, y, 8192):  # bounded memory on large validation sets
                    with self.amp.autocast():  # on every rank, even for an empty slice: FSDP's forward is a collective
                        out = self.amp.float32(self.inner(xi))
                    if not len(yi):
                        continue
                    loss_sum += self.loss_fn(out, yi).double() * len(yi)
                    correct = _correct(out, yi)
                    classify_ = classify_ and correct is not None
                    if classify_:
                        correct_sum += correct
                    total += len(yi)
        self.dp.reshard(self.inner)
        sums = [loss_sum, correct_sum] + ([loss_sum.new_tensor(total)] if self.dp.active else [])
        loss_sum, correct_sum, *counted = self.dp.sum(torch.stack(sums)).tolist()
        total = int(counted[0]) if counted else total
        return loss_sum / max(total, 1), (correct_sum / max(total, 1) if classify_ else None), total

    def _grad_norm(self, clip_norm: Optional[torch.Tensor], stepped: bool) -> float:
        """The norm the step computed (clip_grad_norm_'s, or our optimizers' opt.grad_norm);
        a norm pass of its own only when the step computed none."""
        norm = clip_norm if clip_norm is not None else getattr(self.opt, "grad_norm", None)
        if stepped and norm is not None:
            return float(norm.full_tensor() if is_dtensor(norm) else norm)
        return self.amp.grad_norm(global_norm([p.grad for p in self.inner.parameters() if p.grad is not None]))

    def _robust_val_acc(self) -> float:
        """Measured by rank 0 on its full replica, as the sharpness is, the value broadcast;
        the RNG and a val loader's generators left as they were."""
        model = self._measured_model()

        def measure() -> float:
            with _unchanged_rng(self.val):
                return robust_accuracy(model, self.loss_fn, self.val, self.attack)
        return self.dp.from_rank0(measure)

    def _sharpness(self, t: int) -> float:
        """Measured by rank 0 on its full replica (parallel.py), the value broadcast."""
        model = self._measured_model()
        return self.dp.from_rank0(lambda: sharpness(model, self.loss_fn, self.batches.sample(self.sharpness_batch),
                                                    self.sharpness_iters, self.seed, t))

    def _measured_model(self) -> Optional[torch.nn.Module]:
        """The model with whole params: inner, or under FSDP rank 0's replica, set to the gathered
        params (every rank takes part in the gathering; the other ranks get None)."""
        if self._replica is None and self.dp.mode != "fsdp":
            return self.inner
        whole = {name: p.full_tensor() for name, p in self.inner.named_parameters()}
        if self._replica is None:
            return None
        with torch.no_grad():
            for name, p in self._replica.named_parameters():
                p.copy_(whole[name])
            for (_, b), own in zip(self._replica.named_buffers(), self.inner.buffers()):
                b.copy_(own)
        return self._replica

    def _lambda0(self) -> Optional[float]:
        """The sharpness at step 0; None, with a one-line warning, for a model autograd cannot
        differentiate twice (a custom autograd.Function, a compiled model): the training does
        not need it, and sharpness_every, which asks for it, still raises. Any other error
        (out of memory, a bug in the model) is raised, not hidden behind a null."""
        if not self._measurable:
            reason = "the model came sharded (FSDP), and the trainer has no full copy to measure"
        else:
            try:
                return self._sharpness(0)
            except NoDoubleBackward as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if self.dp.is_main:
            warnings.warn(f"lambda0 not measured, recorded as null: {reason}", RuntimeWarning)
        return None

    # ---- lr ----
    def _set_lr(self, t: int) -> None:
        if self.lr_factor is None:
            return
        factor = self._factor(t)
        for group in self.opt.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def _factor(self, t: int) -> float:
        return self.lr_factor(t, self.trackers.lr_sharpness) if self.lr_sharpness_every else self.lr_factor(t)

    def _base_lr(self, t: Optional[int] = None) -> float:
        """The lr of update t, without the first group's muP multiplier (the lr the user set)."""
        group = self.opt.param_groups[0]
        factor = self._factor(t) if self.lr_factor is not None and t is not None else 1.0
        return float(group["initial_lr"]) * factor / group.get("lr_mult", 1.0)

    # ---- output ----
    def _log(self, record: dict, bar) -> None:
        self.trackers.last_record = record
        if self.folder is not None:
            self.folder.append_metrics(record)
        if self.board is not None:
            self.board.add_record(record)
        if bar is not None:
            bar.n = record["step"]
            shown = {k: f"{record[k]:.4g}" for k in ("loss", "train_acc", "val_acc", "sharpness") if k in record}
            bar.set_postfix(shown, refresh=False)
            bar.refresh()

    def _progress_bar(self):
        if self.quiet or not self.dp.is_main:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.steps, initial=self.start, unit="step", dynamic_ncols=True, leave=True)

    def _finish(self, status: str, t: int) -> dict:
        tr, last = self.trackers, self.trackers.last_record
        final_loss = last.get("loss")
        lr = self._base_lr()
        summary = {
            "status": status,
            "steps": t,
            "lambda0": tr.lambda0,
            "lr": lr,
            "lr_times_lambda0": lr * tr.lambda0 if tr.lambda0 else None,
            "two_over_lr": 2.0 / lr if lr > 0 else None,  # lr 0: a run that only measures
            "phase": classify(tr.loss0 if tr.loss0 is not None else math.inf, tr.peak_loss, final_loss,
                              tr.diverged) if status != "interrupted" else None,
            "loss0": tr.loss0,
            "peak_loss": tr.peak_loss if math.isfinite(tr.peak_loss) else None,
            "final_step": last.get("step"),  # the step of final_loss and the other final_* values
            "final_loss": final_loss,
            "sharpness_final": tr.sharpness_last,
            "sharpness_final_step": tr.sharpness_last_step,
            "memorize_step": tr.memorize_step,
            "grok_step": tr.grok_step,
            "noisy_memorize_step": tr.noisy_memorize_step,
            "clean_memorize_step": tr.clean_memorize_step,
            "final_train_acc": last.get("train_acc"),
            "final_noisy_train_acc": last.get("noisy_train_acc"),
            "final_clean_train_acc": last.get("clean_train_acc"),
            "final_val_acc": last.get("val_acc"),
            "final_val_loss": last.get("val_loss"),
            "final_robust_val_acc": last.get("robust_val_acc"),
            "steps_per_s": tr.updates / tr.loop_s if tr.loop_s > 0 else None,
            "wall_s": tr.loop_s,
        }
        if self.folder is not None:
            self.folder.write_json("summary.json", summary)
            if self.plots:
                from .config_words import config_title
                from .plots import plot_curves
                plot_curves(self.folder.read_metrics(), self.folder.file("curves.png"),
                            title=config_title(self.config) or self.folder.path.name)
        if self.board is not None:  # the figures drawn above, at the last step
            self.board.add_figures(self.folder.path.glob("*.png"), t)
            self.board.close()
        return summary

    # ---- checkpoints ----
    def _save(self, t: int, loop_s_so_far: float) -> None:
        """A parallel run's checkpoint is a single-process one (FSDP's shards gathered: every
        rank takes part), with the RNG states of every rank; rank 0 writes it."""
        if self.out is None:
            return
        trackers = asdict(self.trackers)
        trackers["loop_s"] += loop_s_so_far
        model, optimizer = full_tensors(self.inner.state_dict()), full_tensors(self.opt.state_dict())
        torch_rng = self.dp.per_rank(torch.get_rng_state())
        cuda_rng = self.dp.per_rank(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        if self.folder is None:
            return
        self.folder.save_checkpoint({
            "step": t, "model": model, "optimizer": optimizer,
            "trackers": trackers, "torch_rng": torch_rng, "cuda_rng": cuda_rng,
            "grad_scaler": self.amp.state_dict(),
            "config": self.config,
        })

    def _read_checkpoint(self) -> dict:
        ckpt = self.folder.load_checkpoint(map_location="cpu")
        if ckpt["trackers"]["diverged"]:
            raise ValueError(f"{self.folder.path} diverged at step {ckpt['step']}; there is nothing to resume")
        if self.steps < ckpt["step"]:
            raise ValueError(f"--resume: the checkpoint is at step {ckpt['step']}; --steps {self.steps} "
                             "would shorten the run (give the same or a larger --steps)")
        return ckpt

    def _load(self) -> None:
        """Rank 0 reads the checkpoint and broadcasts it; FSDP's ranks keep their shards of it."""
        ckpt = self.dp.from_rank0(self._read_checkpoint)
        own_rng = self.dp.own(ckpt["torch_rng"], "RNG state")
        own_cuda_rng = self.dp.own(ckpt["cuda_rng"], "CUDA RNG state") if ckpt["cuda_rng"] is not None else None
        if self.dp.mode == "fsdp":
            placed = self.inner.state_dict()
            ckpt["model"] = {k: shard_like(v, placed[k]) if k in placed else v for k, v in ckpt["model"].items()}
            params = [p for group in self.opt.param_groups for p in group["params"]]
            ckpt["optimizer"]["state"] = {i: {k: shard_like(v, params[i]) for k, v in state.items()}
                                          for i, state in ckpt["optimizer"]["state"].items()}
        self.inner.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.amp.load_state_dict(ckpt.get("grad_scaler"))
        self.trackers = Trackers(**ckpt["trackers"])
        torch.set_rng_state(own_rng)
        if own_cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own_cuda_rng)
        self.start = ckpt["step"]

    # ---- Ctrl-C, SIGTERM ----
    def request_stop(self) -> None:
        """Stop at the next step boundary, writing a checkpoint, as Ctrl-C and SIGTERM do."""
        self._stop_requested = True


def check_noisy_mask(noisy_mask: Optional[torch.Tensor], train) -> None:
    """noisy_mask marks training examples whose class label was corrupted: one bool per example
    of the training tensors."""
    if noisy_mask is None:
        return
    if not isinstance(train, (tuple, list)):
        raise ValueError("noisy_mask marks examples of the training tensors: pass train as (inputs, targets), "
                         "not a DataLoader")
    if train[1].is_floating_point():
        raise ValueError("noisy_mask marks corrupted class labels; these training targets are floats (a regression)")
    if noisy_mask.dtype != torch.bool or noisy_mask.shape != (len(train[1]),):
        raise ValueError(f"noisy_mask must be a bool tensor of shape ({len(train[1])},) (one per training "
                         f"example), got {noisy_mask.dtype} of shape {tuple(noisy_mask.shape)}")


def noise_accuracies(correct_noisy: float, n_noisy: int, correct_clean: float, n_clean: int) -> dict:
    """noisy_train_acc (against the corrupted labels: the noise memorized) and clean_train_acc,
    each left out when it has no examples."""
    record = {}
    if n_noisy:
        record["noisy_train_acc"] = correct_noisy / n_noisy
    if n_clean:
        record["clean_train_acc"] = correct_clean / n_clean
    return record


def _correct(out: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
    """How many argmax predictions are the class label, on the device; None for regression."""
    if y.is_floating_point() or out.dim() != 2:
        return None
    return (out.argmax(-1) == y).sum()


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: Union[Pair, Iterable],
        val: Optional[Union[Pair, Iterable]] = None, **options) -> dict:
    """Train and return the summary dict. `train`/`val`: (inputs, targets) tensors or a
    DataLoader of (inputs, targets). Targets of an integer dtype are class labels. Options:
    loss ("ce", "mse" or a callable), steps, batch_size, lr_factor (step -> lr multiplier),
    log_every, sharpness_every, grok_threshold, out (a run folder), resume, overwrite,
    checkpoint_every, quiet, seed, parallel; see Trainer.

    amp (None, "bf16" or "fp16"): the training step's forward pass, and the evaluation's, under
    torch.autocast in that dtype, the loss computed in float32; fp16 scales the loss with a
    torch.amp.GradScaler (checkpointed). grad_accum (default 1): each batch split into that
    many micro-batches, one forward and backward each (mixed_precision.py, grad_accum.py).
    tensorboard (default False): the metrics and figures also as TensorBoard events in
    out/tensorboard (tensorboard_log.py).

    lr_sharpness_every (default 0: off): a schedule that reads the sharpness. At every step t
    that is a multiple of it, the sharpness at theta_t is measured before update t, kept in the
    checkpointed trackers (so a resumed run reads the same values), and lr_factor is called as
    lr_factor(t, measured), measured the dict step -> sharpness so far.

    noisy_mask (optional): a bool tensor marking the training examples whose class label was
    corrupted (label_noise.corrupt_labels); every record then also has noisy_train_acc (on
    those, against their corrupted labels: the noise memorized) and clean_train_acc (on the
    rest), and the summary the first step each reaches 0.99 (noisy_/clean_memorize_step).

    attack (optional): an adversarial.Attack (FGSM or PGD in an L-inf ball around each val
    input); every record then also has robust_val_acc (the val examples classified right
    both clean and attacked), and the summary final_robust_val_acc. Measured in eval mode,
    no param's .grad touched, the RNG unchanged.

    measure_lambda0 (default True): measure lambda0, the top Hessian eigenvalue at step 0, on
    the first sharpness_batch (1024) training examples with sharpness_iters (20) Lanczos
    steps, for the summary's lambda0 and lr_times_lambda0. False skips it; lambda0=<float>
    gives it instead. It needs double backward: attention runs on the math backend for it,
    and a model that has none (a custom autograd.Function, a compiled model) gets lambda0
    null and a one-line warning. Every sharpness is measured with Dropout off, BatchNorm on
    the batch's own statistics and its running statistics left unchanged.

    Each record's val metrics, and its train metrics unless full batch, come from a pass in
    eval mode without grads; every module's mode is restored after. The train metrics
    (`loss`, `train_acc`, hence `memorize_step`) cover the whole training set, every batch
    of a DataLoader; the record's `train_examples` says how many examples. Full batch reuses
    the step's own forward (train mode) instead of a second pass. No measurement changes the
    training's batches: the loaders' generators are put back after each pass, and a DataLoader
    with persistent workers is measured through one of the same batches read in this process.

    parallel ("ddp" or "fsdp"; default None): one run on the ranks of a process group, over
    the global batch; under torchrun without a group, fit makes one and ends it after. Every
    rank calls fit with the same model (rank 0's values are used), optimizer and data (a
    DataLoader must yield the same batches on every rank: each rank takes its slice); every
    rank gets the summary, rank 0 writes `out`. "ddp" wraps the model in DistributedDataParallel;
    "fsdp" applies fully_shard to the model (unless it is sharded already), which replaces its
    params, so pass optimizer as a function of the model (lambda m: AdamW(m.parameters())).
    The loss must be a mean over examples (it is weighted by each rank's share of the batch).
    Sharpness and lambda0 are measured by rank 0 on a full replica (under FSDP, a copy made
    before sharding: none for a model that comes sharded). BatchNorm normalizes each rank's slice."""
    parallel = parallel_mode(options.get("parallel"))
    device = next(model.parameters(), torch.empty(0)).device.type
    with process_group(parallel != "none", f"parallel={parallel!r}", device):
        trainer = Trainer(model, optimizer, train, val, **options)
        try:
            return trainer.run()
        finally:
            if trainer.folder is not None:
                trainer.folder.close()  # the folder's lock ends with the run, not when the trainer is collected
