"""A run's configuration: one flat dataclass, validated before anything is built, saved
as the run folder's config.json and read back on --resume."""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass
from typing import Optional, Union

from .. import optim

TASKS = ("modular", "teacher-student", "digits", "mnist1d")
MODELS = ("mlp", "transformer")
# pre-ln: our own decoder on [a, b, =]; power: the Grokfast paper's decoder on [a, op, b, =] (models.Transformer)
TRANSFORMERS = ("pre-ln", "power")
ACTIVATIONS = ("relu", "tanh", "quadratic", "linear")
PARAMETRIZATIONS = ("standard", "ntk", "mup")
# Every optimizer of catapult_kernels.optim, by its lowercase name.
OPTIMIZERS = tuple(name.lower() for name in optim.__all__)
IMPLS = ("catapult", "torch")  # torch: torch.optim's own class (sgd, adam, adamw only)
# The optimizers with --momentum and --nesterov, and what a run takes where they are left out:
# none for sgd and lars (the trainer's plain SGD), Muon's own (0.95, Nesterov) for muon.
MOMENTUM_DEFAULTS = {"sgd": (0.0, False), "lars": (0.0, False),
                     "muon": tuple(inspect.signature(optim.Muon).parameters[k].default for k in ("momentum", "nesterov"))}
ADJUST_LRS = ("original", "match_rms_adamw", "spectral_unclamped")  # Muon's adjust_lr_fn (None: original)
LOSSES = ("ce", "mse")
SCHEDULES = ("constant", "cosine", "cyclic")
CYCLE_UNITS = ("lambda0", "sharpness")  # cyclic: levels in units of 2/lambda0, or of 2/(sharpness at cycle start)
MODULAR_OPS = ("add", "sub", "mul", "div")
GROKFAST = ("none", "ema")
PARALLEL = ("none", "ddp", "fsdp")  # data parallel under torchrun (parallel.py)
AMPS = ("none", "bf16", "fp16")  # autocast of the forward pass (mixed_precision.py)
PARAM_DTYPES = ("fp32", "bf16")  # the params' dtype (param_dtype.py)
STATE_DTYPES = ("fp32", "bf16", "int8")  # the optimizer state's storage (int8: blocks of 128 with a float32 scale)
MASTER_WEIGHTS = ("fp32", "ecc", "stochastic")  # how catapult's optimizers update 16-bit params (master_weights.py)
ADV_EVALS = ("none", "fgsm", "pgd")  # robust val accuracy under an L-inf attack (adversarial.py)

_K_OVER_LAMBDA0 = re.compile(r"^\s*([^/\s]+)\s*/\s*lambda0\s*$")


@dataclass(frozen=True)
class LearningRate:
    """A number, or K/lambda0: K over the top Hessian eigenvalue at initialization."""
    value: float
    per_lambda0: bool = False

    @classmethod
    def parse(cls, text: Union[str, float, "LearningRate"]) -> "LearningRate":
        if isinstance(text, LearningRate):
            return text
        if isinstance(text, (int, float)):
            lr = cls(float(text))
        else:
            m = _K_OVER_LAMBDA0.match(str(text))
            try:
                lr = cls(float(m.group(1)), True) if m else cls(float(text))
            except ValueError:
                raise ValueError(f"--lr {text!r}: expected a number (3e-3) or K/lambda0 (2.5/lambda0)") from None
        if not (math.isfinite(lr.value) and lr.value > 0):
            what = "K in K/lambda0" if lr.per_lambda0 else "--lr"
            raise ValueError(f"{what} must be a finite number > 0, got {lr.value}")
        return lr

    def resolve(self, lambda0: Optional[float]) -> float:
        if not self.per_lambda0:
            return self.value
        if lambda0 is None or not (lambda0 > 0 and math.isfinite(lambda0)):
            raise ValueError(f"--lr {self}: lambda0 is {lambda0}, so K/lambda0 has no meaning "
                             "(the loss is flat along every direction at initialization)")
        return self.value / lambda0

    def __str__(self) -> str:
        return f"{self.value:g}/lambda0" if self.per_lambda0 else f"{self.value:g}"


@dataclass
class TrainConfig:
    # task
    task: str = "modular"
    p: int = 97
    op: str = "add"
    train_frac: float = 0.4
    n_train: int = 256
    n_val: int = 512
    input_dim: int = 16
    label_noise: float = 0.0  # the fraction of training labels replaced by another class
    # model
    model: str = "mlp"
    depth: int = 2
    width: int = 512
    activation: str = "relu"
    parametrization: str = "standard"
    bias: bool = True
    base_width: int = 128  # muP: the width at which muP equals standard
    ntk_bias_scale: float = 0.1  # NTK: the bias multiplier beta (Jacot et al.)
    layers: int = 1
    d_model: int = 128
    heads: int = 4
    transformer: str = "pre-ln"
    # optimization
    optimizer: str = "adamw"
    impl: str = "catapult"
    lr: str = "1e-3"
    weight_decay: float = 0.0
    momentum: Optional[float] = None  # momentum, nesterov, adjust_lr: None = the optimizer's default
    nesterov: Optional[bool] = None  # (MOMENTUM_DEFAULTS; Muon's original), recorded as beta1 is
    adjust_lr: Optional[str] = None  # muon: Muon's adjust_lr_fn
    beta1: Optional[float] = None  # betas and eps: None = the optimizer's default,
    beta2: Optional[float] = None  # recorded in config.json when the run begins
    beta3: Optional[float] = None  # (Adan's third beta)
    eps: Optional[float] = None
    max_grad_norm: Optional[float] = None
    agc: Optional[float] = None
    grokfast: str = "none"
    grokfast_alpha: float = 0.98
    grokfast_lamb: float = 2.0
    state_dtype: Optional[str] = None  # catapult's optimizers: how they store their state; None: as the params
    schedule: str = "constant"
    warmup: int = 0
    decay_steps: Optional[int] = None  # cosine horizon; None: --steps of the first run
    min_lr_ratio: float = 0.0
    cycle_peak: Optional[float] = None  # cyclic (cyclic.py): the lr levels in units of 2/cycle_unit,
    cycle_trough: Optional[float] = None  # and the steps of one cycle (half at the peak, then the trough)
    cycle_period: Optional[int] = None
    cycle_unit: str = "lambda0"
    loss: str = "ce"
    batch_size: Optional[int] = None  # None: full batch
    steps: int = 1000
    seed: int = 0
    device: str = "cpu"
    parallel: str = "none"
    amp: str = "none"
    dtype: str = "fp32"  # the params'
    master_weights: Optional[str] = None  # --dtype bf16: a float32 copy, an int8 correction or stochastic rounding
    grad_accum: int = 1  # micro-batches per optimizer step, splitting each batch
    world_size: int = 1  # the processes the run trains on: recorded by run(), not an option
    # diagnostics and output
    log_every: int = 10
    sharpness_every: int = 0  # 0: only lambda0 at step 0 when needed
    sharpness_iters: int = 20
    sharpness_batch: int = 1024
    grok_threshold: float = 0.95
    adv_eval: str = "none"
    adv_eps: float = 0.0  # the L-inf radius, in the units of the inputs as the model sees them
    adv_steps: int = 10  # pgd
    adv_step_size: Optional[float] = None  # pgd; None: 2.5 * adv_eps / adv_steps
    checkpoint_every: int = 0  # 0: only at the end (and on Ctrl-C)
    plots: bool = True
    tensorboard: bool = False

    def validate(self) -> "TrainConfig":
        _choice("task", self.task, TASKS)
        _choice("model", self.model, MODELS)
        _choice("transformer", self.transformer, TRANSFORMERS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("parametrization", self.parametrization, PARAMETRIZATIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("impl", self.impl, IMPLS)
        _choice("loss", self.loss, LOSSES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("op", self.op, MODULAR_OPS)
        _choice("grokfast", self.grokfast, GROKFAST)
        _choice("parallel", self.parallel, PARALLEL)
        _choice("amp", self.amp, AMPS)
        _choice("dtype", self.dtype, PARAM_DTYPES)
        LearningRate.parse(self.lr)
        self._check_dtypes()
        self._check_cyclic()
        for name in ("p", "n_train", "n_val", "input_dim", "depth", "width", "base_width", "layers",
                     "d_model", "heads", "steps", "log_every", "sharpness_iters", "sharpness_batch", "world_size",
                     "grad_accum"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup", "sharpness_every", "checkpoint_every", "seed"):
            _nonnegative_int(name, getattr(self, name))
        if self.batch_size is not None:
            _positive_int("batch_size", self.batch_size)
        if self.decay_steps is not None:
            _positive_int("decay_steps", self.decay_steps)
        if self.p < 2 or any(self.p % d == 0 for d in range(2, int(self.p ** 0.5) + 1)):
            raise ValueError(f"--modulus must be a prime (so that every b != 0 has an inverse), got {self.p}")
        if not 0.0 < self.train_frac < 1.0:
            raise ValueError(f"--train-frac must lie in (0, 1), got {self.train_frac}")
        if self.d_model % self.heads:
            raise ValueError(f"--d-model {self.d_model} is not divisible by --heads {self.heads}")
        if self.model == "transformer" and self.task != "modular":
            raise ValueError(f"the transformer reads modular-arithmetic tokens; task {self.task!r} needs --model mlp")
        if self.transformer != "pre-ln" and self.model != "transformer":
            raise ValueError(f"--transformer {self.transformer} applies to --model transformer, not {self.model}")
        if self.task == "teacher-student" and self.loss != "mse":
            raise ValueError("task 'teacher-student' is a regression: use --loss mse")
        if not (isinstance(self.label_noise, (int, float)) and 0.0 <= self.label_noise < 1.0):
            raise ValueError(f"--label-noise must be a fraction in [0, 1), got {self.label_noise!r}")
        if self.label_noise and not self.classification:
            raise ValueError(f"--label-noise replaces class labels; task {self.task!r} is a regression")
        for name in ("weight_decay", "momentum", "min_lr_ratio"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.momentum and self.optimizer not in MOMENTUM_DEFAULTS:
            raise ValueError(f"--momentum applies to sgd, lars and muon, not {self.optimizer}")
        momentum = MOMENTUM_DEFAULTS.get(self.optimizer, (0.0,))[0] if self.momentum is None else self.momentum
        if self.nesterov and not momentum > 0:
            raise ValueError("--nesterov needs --momentum > 0")
        if self.optimizer == "muon" and not momentum < 1.0:
            raise ValueError(f"--momentum must lie in [0, 1) for muon, got {momentum}")
        if self.adjust_lr is not None:
            _choice("adjust_lr", self.adjust_lr, ADJUST_LRS)
            if self.optimizer != "muon":
                raise ValueError(f"--adjust-lr applies to muon, not {self.optimizer}")
        for name in ("beta1", "beta2", "beta3", "grokfast_alpha"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1), got {v}")
        if not (self.ntk_bias_scale > 0 and math.isfinite(self.ntk_bias_scale)):
            raise ValueError(f"--ntk-bias-scale must be a finite number > 0 (--no-bias: no biases), "
                             f"got {self.ntk_bias_scale}")
        if self.eps is not None and not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"--eps must be > 0, got {self.eps}")
        for name in ("max_grad_norm", "agc"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
        if not math.isfinite(self.grokfast_lamb):
            raise ValueError(f"--grokfast-lamb must be finite, got {self.grokfast_lamb}")
        if self.impl == "torch":
            if self.optimizer not in ("sgd", "adam", "adamw"):
                why = (" (torch.optim.Muon takes only matrices; catapult's Muon also steps the rest, with AdamW)"
                       if self.optimizer == "muon" else "")
                raise ValueError(f"--impl torch has sgd, adam and adamw; {self.optimizer} exists only as catapult{why}")
            if self.grokfast != "none" or self.agc is not None:
                raise ValueError("--grokfast and --agc are fused into catapult's optimizers: use --impl catapult")
        if self.parallel != "none" and self.device.startswith("cuda:"):
            raise ValueError(f"--parallel runs each rank on its own GPU (cuda:LOCAL_RANK): pass --device cuda, "
                             f"not {self.device}")
        if not 0.0 < self.grok_threshold <= 1.0:
            raise ValueError(f"--grok-threshold must lie in (0, 1], got {self.grok_threshold}")
        self._validate_adv_eval()
        return self

    def _check_dtypes(self) -> None:
        if self.dtype != "fp32" and self.amp != "none":
            raise ValueError(f"--amp autocasts a float32 model; with --dtype {self.dtype} the forward already runs in "
                             f"{self.dtype}: leave --amp out")
        self._check_master_weights()
        if self.state_dtype is None:
            return
        _choice("state_dtype", self.state_dtype, STATE_DTYPES)
        if self.impl == "torch":
            raise ValueError("--state-dtype sets how catapult's optimizers store their state; torch.optim keeps it in "
                             "the params' dtype: use --impl catapult")
        if self.state_dtype == "int8" and self.parallel == "fsdp":
            raise ValueError("--state-dtype int8 blocks span a whole param, not FSDP's shards: use --parallel ddp, "
                             "or --state-dtype fp32 or bf16")

    def _check_master_weights(self) -> None:
        if self.master_weights is None:
            return
        _choice("master_weights", self.master_weights, MASTER_WEIGHTS)
        if self.dtype == "fp32":
            raise ValueError("--master-weights keeps the value of 16-bit params beyond their bits: use it with "
                             "--dtype bf16")
        if self.impl == "torch":
            raise ValueError("--master-weights is an option of catapult's optimizers: use --impl catapult")
        if self.parallel == "fsdp":
            raise ValueError("--master-weights is not built for FSDP's sharded params (DTensor): use --parallel ddp")

    def _check_cyclic(self) -> None:
        """--schedule cyclic sets the lr itself: level x 2/lambda0, so --lr must be that unit."""
        _choice("cycle_unit", self.cycle_unit, CYCLE_UNITS)
        given = [n for n in ("cycle_peak", "cycle_trough", "cycle_period") if getattr(self, n) is not None]
        if self.schedule != "cyclic":
            if given or self.cycle_unit != "lambda0":
                flag = f"--{(given or ['cycle_unit'])[0].replace('_', '-')}"
                raise ValueError(f"{flag} applies to --schedule cyclic, not {self.schedule}")
            return
        if len(given) < 3:
            raise ValueError("--schedule cyclic needs --cycle-peak, --cycle-trough (the lr levels in units of "
                             "2/lambda0) and --cycle-period (steps per cycle)")
        _positive_int("cycle_period", self.cycle_period)
        for name in ("cycle_peak", "cycle_trough"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v!r}")
        if self.cycle_peak < self.cycle_trough:
            raise ValueError(f"--cycle-peak {self.cycle_peak} is below --cycle-trough {self.cycle_trough}")
        if LearningRate.parse(self.lr) != LearningRate(2.0, True):
            raise ValueError(f"--schedule cyclic sets the lr to --cycle-peak/--cycle-trough x 2/lambda0: "
                             f"leave --lr out or give it as 2/lambda0 (a sweep: --lrs 2/lambda0), not --lr {self.lr}")
        if self.warmup:
            raise ValueError("--warmup does not apply to --schedule cyclic (each cycle starts at its peak)")

    def _validate_adv_eval(self) -> None:
        _choice("adv_eval", self.adv_eval, ADV_EVALS)
        _positive_int("adv_steps", self.adv_steps)
        if self.adv_eval == "none":
            if self.adv_eps or self.adv_step_size is not None:
                raise ValueError("--adv-eps and --adv-step-size apply with --adv-eval fgsm or pgd")
            return
        if not (math.isfinite(self.adv_eps) and self.adv_eps > 0):
            raise ValueError(f"--adv-eval {self.adv_eval} needs --adv-eps > 0 (the L-inf radius), got {self.adv_eps}")
        if self.adv_step_size is not None and not (self.adv_eval == "pgd" and math.isfinite(self.adv_step_size)
                                                   and self.adv_step_size > 0):
            raise ValueError(f"--adv-step-size is pgd's and must be a finite number > 0, got {self.adv_step_size} "
                             f"with --adv-eval {self.adv_eval}")
        if not self.classification:
            raise ValueError(f"--adv-eval measures robust accuracy; task {self.task!r} is a regression (no accuracy)")
        if self.model == "transformer":
            raise ValueError("--adv-eval perturbs float inputs in an L-inf ball; the transformer reads tokens, which "
                             "have none (and a changed token changes the answer): use --model mlp (one-hot operands)")
        if self.task == "modular" and not self.adv_eps < 0.5:
            raise ValueError(f"--adv-eps must be < 0.5 on one-hot operands (a larger ball holds inputs no nearer "
                             f"their operand's code than another's, whose answer differs), got {self.adv_eps}")

    @property
    def learning_rate(self) -> LearningRate:
        return LearningRate.parse(self.lr)

    @property
    def classification(self) -> bool:
        return self.task != "teacher-student"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A stored config (a checkpoint's, config.json). An option it lacks, having been written
        before the option existed, takes the value that run computed with (BEFORE_OPTION), not
        today's default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**{**BEFORE_OPTION, **d})


# Options added after runs were first stored, and what those runs computed with: the NTK bias
# multiplier was 1 before --ntk-bias-scale.
BEFORE_OPTION = {"ntk_bias_scale": 1.0}

# What a resumed run may change: how long it runs and how often it logs and writes, never
# what it computes.
RESUMABLE = ("steps", "log_every", "checkpoint_every", "plots", "tensorboard")


def computation_changes(cfg: TrainConfig, values: dict) -> list[str]:
    """The options in `values` (option name -> value) whose value differs from cfg's and is
    not RESUMABLE, as '--name old -> new'. Values, not spellings: --lr 1e-2 is --lr 0.01."""
    return [f"--{k.replace('_', '-')} {getattr(cfg, k)!r} -> {v!r}" for k, v in sorted(values.items())
            if k not in RESUMABLE and not _same_value(k, getattr(cfg, k), v)]


def _same_value(name: str, a, b) -> bool:
    return LearningRate.parse(a) == LearningRate.parse(b) if name == "lr" else a == b


def _choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")


def _nonnegative_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
