"""A run's configuration in words: the title of its figures (task, model, optimizer, lr, weight
decay and every other option it sets away from the default), and the labels that tell runs
apart in `compare` (the options in which they differ). Reads config dicts (config.json), so
that runs stored by an older or newer trainer are described too."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from .config import BEFORE_OPTION, LearningRate, TrainConfig
from .optimizers import RUN_DEFAULTS, with_optimizer_defaults

DEFAULTS = TrainConfig().to_dict()
# How often a run logs and saves, where it runs: not what it computes, so never in a title or a label.
UNSAID = ("log_every", "checkpoint_every", "plots", "tensorboard", "device", "world_size", "sharpness_every",
          "sharpness_iters", "sharpness_batch", "grok_threshold")
# Options that mean something only in some runs (a modular modulus in a digits run does not).
APPLIES: dict[str, Callable[[dict], bool]] = {
    **{k: (lambda c: c.get("task") == "modular") for k in ("p", "op", "train_frac")},
    "n_train": lambda c: c.get("task") != "modular",
    **{k: (lambda c: c.get("task") == "teacher-student") for k in ("n_val", "input_dim")},
    **{k: (lambda c: c.get("model") == "mlp") for k in ("depth", "width", "activation", "parametrization", "bias")},
    "base_width": lambda c: c.get("model") == "mlp" and c.get("parametrization") == "mup",
    "ntk_bias_scale": lambda c: c.get("model") == "mlp" and c.get("parametrization") == "ntk" and bool(c.get("bias")),
    **{k: (lambda c: c.get("model") == "transformer") for k in ("layers", "d_model", "heads", "transformer")},
    **{k: (lambda c: c.get("grokfast") != "none") for k in ("grokfast_alpha", "grokfast_lamb")},
    **{k: (lambda c: c.get("schedule") == "cosine") for k in ("decay_steps", "min_lr_ratio")},
    **{k: (lambda c: c.get("schedule") == "cyclic") for k in ("cycle_peak", "cycle_trough", "cycle_period",
                                                             "cycle_unit")},
    "lr": lambda c: c.get("schedule") != "cyclic",  # the cycle's levels set it
    "adv_eps": lambda c: c.get("adv_eval", "none") != "none",
    **{k: (lambda c: c.get("adv_eval") == "pgd") for k in ("adv_steps", "adv_step_size")},
}
MODULAR_EXPRESSIONS = {"add": "a + b", "sub": "a - b", "mul": "a * b", "div": "a / b"}


def complete(config: dict) -> dict:
    """Every option, as the run computed with it: a stored config's own values, and for an
    option it lacks (stored before the option existed) the value runs then used."""
    return {**DEFAULTS, **BEFORE_OPTION, **config}


def applies(name: str, config: dict) -> bool:
    if name in UNSAID or not APPLIES.get(name, lambda c: True)(config):
        return False
    # betas, eps, momentum: only where the run's optimizer takes them (it has a default for them)
    return name not in RUN_DEFAULTS or name == "decay_steps" or default_of(name, config) is not None


def same(name: str, a, b) -> bool:
    """Values, not spellings: --lr 1e-2 is --lr 0.01."""
    if name == "lr" and a is not None and b is not None:
        try:
            return LearningRate.parse(a) == LearningRate.parse(b)
        except ValueError:
            pass
    return a == b


def value_text(name: str, v) -> str:
    if name == "lr" and v is not None:
        try:
            return str(LearningRate.parse(v))
        except ValueError:  # a value this trainer cannot read: as stored
            return str(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def default_of(name: str, config: dict):
    """What the option is when a run leaves it out: the trainer's default, the optimizer's own
    (betas, eps, momentum: recorded in config.json when the run began), the cosine horizon --steps."""
    if name == "decay_steps":
        return config.get("steps")
    if name in RUN_DEFAULTS:
        try:
            base = TrainConfig(optimizer=config["optimizer"], impl=config["impl"])
            return getattr(with_optimizer_defaults(base), name)
        except (KeyError, ValueError):  # an optimizer this trainer does not know: no default to compare with
            return None
    return DEFAULTS.get(name)


def is_default(name: str, v, config: dict) -> bool:
    # None, for the options whose None means the optimizer's (or the cosine's) default, is that default
    return (v is None and name in RUN_DEFAULTS) or same(name, v, default_of(name, config))


def config_title(config: dict, omit: Iterable[str] = ()) -> Optional[str]:
    """The run's configuration in one line, as a figure's title: task, model, optimizer, lr,
    weight decay, loss, batch, steps, seed, then every other option (name=value) that applies
    to the run and differs from its default. `omit`: options the figure itself varies (a
    sweep's widths). None for a config that is no TrainConfig's (a fit() caller's own dict)."""
    if "task" not in config or not set(config) <= set(DEFAULTS):
        return None
    c, omit = complete(config), set(omit)
    said = {"task", "p", "op", "train_frac", "n_train", "n_val", "input_dim", "model", "depth", "width",
            "activation", "parametrization", "bias", "layers", "d_model", "heads", "optimizer", "lr", "weight_decay",
            "loss", "batch_size", "steps", "seed"}
    keep = lambda name: name not in omit and applies(name, c)  # noqa: E731
    parts = [_task_words(c, keep), _model_words(c, keep), _optimizer_words(c, keep)]
    schedule = [w for w in ("full batch" if c["batch_size"] is None else f"batch {c['batch_size']}",
                            f"{c['steps']} steps" if keep("steps") else "",
                            f"seed {c['seed']}" if keep("seed") else "") if w]
    parts.append(", ".join(schedule))
    parts += [f"{k}={value_text(k, v)}" for k, v in c.items()
              if k not in said and keep(k) and not is_default(k, v, c)]
    return " · ".join(p for p in parts if p)


def _task_words(c: dict, keep) -> str:
    if c["task"] == "modular":
        expression = f"({MODULAR_EXPRESSIONS.get(c['op'], c['op'])}) mod {c['p']}"
        return f"{expression}, {c['train_frac']:.0%} train"
    if c["task"] == "teacher-student":
        return f"teacher-student, {c['n_train']} x {c['input_dim']}, {c['n_val']} val"
    return f"{c['task']}, {c['n_train']} train" if keep("n_train") else c["task"]


def _model_words(c: dict, keep) -> str:
    if c["model"] == "transformer":
        return f"transformer, {c['layers']} blocks, d_model {c['d_model']}, {c['heads']} heads"
    words = [f"MLP depth {c['depth']}"] + ([f"width {c['width']}"] if keep("width") else []) + [c["activation"]]
    if keep("parametrization"):
        words.append(c["parametrization"])
    if not c["bias"]:
        words.append("no bias")
    return ", ".join(words)


def _optimizer_words(c: dict, keep) -> str:
    words = [c["optimizer"] + (f" lr {value_text('lr', c['lr'])}" if keep("lr") else "")]
    if c["weight_decay"]:
        words.append(f"wd {c['weight_decay']:g}")
    words.append({"ce": "cross-entropy", "mse": "MSE"}.get(c["loss"], c["loss"]))
    return ", ".join(words)


def differing_options(configs: list[dict]) -> list[str]:
    """The options whose value differs between the runs, among the runs to which each applies,
    in the config's order."""
    full = [complete(c) for c in configs]
    names = list(dict.fromkeys(k for c in full for k in c))
    differ = []
    for name in names:
        values = [c.get(name) for c in full if applies(name, c)]
        if any(not same(name, v, values[0]) for v in values[1:]):
            differ.append(name)
    return differ


def run_labels(configs: list[dict]) -> list[str]:
    """Each run as the options in which it differs from the others ("grokfast=ema,
    weight_decay=0.005"), each where it applies to the run; "" where the runs are alike."""
    differ, full = differing_options(configs), [complete(c) for c in configs]
    return [", ".join(f"{k}={value_text(k, c.get(k))}" for k in differ if applies(k, c)) for c in full]

