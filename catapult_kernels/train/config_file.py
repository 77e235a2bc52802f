"""--config FILE: a run's options from a TOML file (read with the standard library's
tomllib), and the resolved config printed as a run begins.

A key is an option's name as config.json spells it (weight_decay, p) or as the command line
does (weight-decay, modulus): in a key `-` and `_` are the same. Values are TOML's own types:
integers, floats (an integer is a float too), booleans, strings, and for a command's grid
(sweep's widths, lrs and seeds) arrays; lr and lrs take numbers or strings ("2.5/lambda0");
sweep's and probe's jobs an integer. TOML has no null: an option whose default is None is
left out to keep it. Options given on the command line override the file's; with --resume
the file's are checked against the run as the command line's are (only the resumable ones
may differ). An unknown key, a key given twice or a value of the wrong type is refused in
one line naming the key and the file, before any work."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from typing import Optional, Union

from .config import TrainConfig

NOT_OPTIONS = ("world_size",)  # recorded by run(), never set
ALIASES = {"modulus": "p"}  # the command line's names that are not the config's
COMMAND_OPTIONS = {"jobs": int}  # how a command runs, not what: the file sets them too, where the command has them
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="a TOML file of options, named as in config.json "
                        "(weight_decay = 0.1; weight-decay too); options on the command line override it")


def parse_args(parser: argparse.ArgumentParser, argv: list[str], grid: Optional[dict] = None) -> argparse.Namespace:
    """parser.parse_args(argv) on top of the --config file's options: an option takes the
    command line's value, else the file's, else its default. grid: the command's own options
    that the file may set too, name -> type (e.g. {"widths": list[int]}); so may the
    COMMAND_OPTIONS that the parser defines (sweep's and probe's --jobs)."""
    first = argparse.ArgumentParser(prog=parser.prog, add_help=False)
    first.add_argument("--config")
    path = first.parse_known_args(argv)[0].config
    own = {a.dest for a in parser._actions}  # the options this command's parser defines
    grid = {**(grid or {}), **{name: kind for name, kind in COMMAND_OPTIONS.items() if name in own}}
    from_file = read_config_file(path, grid) if path is not None else {}
    return parser.parse_args(argv, namespace=argparse.Namespace(**from_file))  # argparse keeps what it holds


def read_config_file(path, grid: dict) -> dict:
    """The options in the TOML file at `path`, as option name -> value of the option's type."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ValueError("--config needs Python 3.11 or later (the standard library's tomllib)") from None
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not valid TOML ({e})") from None
    types = {**_option_types(), **grid}
    values, spelled = {}, {}
    for key, value in table.items():
        name = key.replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (keys are the options' names, as in config.json)"
            raise ValueError(f"--config {path}: unknown key {key!r}{hint}")
        if name in values:
            raise ValueError(f"--config {path}: {key!r} and {spelled[name]!r} are the same option: give it once")
        values[name], spelled[name] = _typed(value, types[name], f"--config {path}: {key!r}"), key
    return values


def _option_types() -> dict:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name not in NOT_OPTIONS}


def _typed(value, kind, where: str):
    """value as an option of type `kind` takes it, or a ValueError naming `where`."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is Union:  # Optional[X]: None never comes from TOML
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if typing.get_origin(kind) is list:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where} must be a non-empty array, got {value!r}")
        return [_typed(v, args[0], where) for v in value]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool) or kind is int and number and isinstance(value, int):
        return value
    if kind is float and number:
        return float(value)
    if kind is str and (isinstance(value, str) or number):  # lr = 0.01: the command line's text, "0.01"
        return str(value)
    if kind not in TYPE_NAMES:  # an option of another type: its own check judges the value
        return value
    raise ValueError(f"{where} must be {TYPE_NAMES[kind]}, got {value!r}")


def format_config(config: dict, title: str = "config", width: int = 100) -> str:
    """The resolved config as a compact block: `title:`, then every option that is set (not
    None) as name=value, as many to a line as fit in `width`."""
    lines, line = [], ""
    for item in (f"{k}={v}" for k, v in config.items() if v is not None):
        if line and len(line) + 2 + len(item) > width - 2:
            lines.append(line)
            line = item
        else:
            line = f"{line}  {item}" if line else item
    return "\n".join([f"{title}:"] + [f"  {line}" for line in lines + [line] if line])
