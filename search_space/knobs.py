"""Knobs: numeric hyperparameters the search may set, and how a value reaches the trainer.

A knob is an Optuna distribution plus a route: an environment variable (`env`), a command-line
flag appended to the run command (`flag`), or a rewrite of a value in an editable file
(`constant`). Env and flag values travel inside the candidate's tree, in KNOBS_FILE, so that a
candidate is always exactly one git tree.

A `constant` knob's key finds its value in one of three ways (search_space/locate.py):
- `NAME`: the first `NAME = value` (or `name: type = value`) line;
- `Class.field`: the field's assignment inside `class Class` (a `@dataclass` Hyperparameters);
- `call(kw)`: the keyword argument `kw=` of the first call to `call` (`Muon(lr)`); words before the
  keyword must appear in that call's text or before it on its line, to tell calls apart
  (`dict(embed_params, lr)`, `dict(adam_defaults, lr)` for `adam_defaults = dict(lr=...)`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from search_space.locate import locate, structured

KNOBS_FILE = ".speedsearch-knobs.json"
ROUTES = ("env", "flag", "constant")


@dataclass(frozen=True)
class Knob:
    """One numeric hyperparameter: its range and its route into the trainer."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    via: str = "constant"
    key: str = ""  # env var name, flag ("--lr"), or constant name; defaults to `name`
    file: str = ""  # for `constant`: the file that defines it

    @property
    def target_key(self) -> str:
        return self.key or self.name

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return optuna.distributions.CategoricalDistribution(list(self.choices))


def parse_knob(raw: Any, where: str, error: type[Exception] = ValueError) -> Knob:
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a table, got {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise error(f"{where}.name: missing or not a string")
    kind = raw.get("type", "float")
    via = raw.get("via", "constant")
    if kind not in ("float", "int", "categorical"):
        raise error(f"{where}.type: {kind!r} is not one of float, int, categorical")
    if via not in ROUTES:
        raise error(f"{where}.via: {via!r} is not one of {', '.join(ROUTES)}")
    if via == "constant" and not raw.get("file"):
        raise error(f"{where}.file: required when via = \"constant\"")
    if kind == "categorical":
        if not raw.get("choices"):
            raise error(f"{where}.choices: required for a categorical knob")
    else:
        low, high = raw.get("low"), raw.get("high")
        if not isinstance(low, int | float) or not isinstance(high, int | float) or not low < high:
            raise error(f"{where}: needs numeric low < high, got low={low!r} high={high!r}")
        if raw.get("log") and low <= 0:
            raise error(f"{where}.low: must be positive for a log-scale knob, got {low}")
    return Knob(
        name=name,
        kind=kind,
        low=raw.get("low"),
        high=raw.get("high"),
        log=bool(raw.get("log", False)),
        step=raw.get("step"),
        choices=tuple(raw.get("choices", ())),
        via=via,
        key=raw.get("key", ""),
        file=raw.get("file", ""),
    )


def _literal(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if "e" not in f"{value:.6g}" else repr(value)
    return repr(value)


def constant_pattern(name: str) -> re.Pattern:
    # `NAME = value` or `name: type = value` at any indentation, value up to a comment or line end
    return re.compile(rf"^(?P<head>[ \t]*{re.escape(name)}\s*(?::[^=\n]+)?=\s*)(?P<value>[^#\n]*?)(?P<tail>\s*(#.*)?)$",
                      re.M)


def value_span(text: str, key: str) -> tuple[int, int] | None:
    """Where the value a knob's key names lies in `text` (start, end), or None."""
    if structured(key):
        span = locate(text, key)
        if span is not None or "(" in key:
            return span
    match = constant_pattern(key).search(text)  # also `args.lr = 0.1`, a dotted name that is no class
    return (match.start("value"), match.end("value")) if match else None


def set_raw(text: str, key: str, raw: str) -> str:
    """`text` with the value of `key` replaced by the source `raw`; KeyError when there is none."""
    span = value_span(text, key)
    if span is None:
        raise KeyError(f"constant {key} not found")
    return text[: span[0]] + raw + text[span[1]:]


def rewrite_constant(text: str, name: str, value: Any) -> str:
    """Set the value `name` (a knob's key) names in `text` to `value`; KeyError when there is none."""
    return set_raw(text, name, _literal(value))


def read_constant(text: str, name: str) -> str | None:
    span = value_span(text, name)
    return text[span[0]:span[1]].strip() if span else None


def knob_changes(files: dict[str, str], knobs: tuple[Knob, ...], values: dict[str, Any]) -> dict[str, str]:
    """The files that setting `values` changes: path -> new text. `files` is path -> current text."""
    by_name = {k.name: k for k in knobs}
    out: dict[str, str] = {}
    routed: dict[str, Any] = {}
    for name, value in values.items():
        knob = by_name.get(name)
        if knob is None:
            raise KeyError(f"unknown knob {name}; knobs: {', '.join(by_name)}")
        if knob.via == "constant":
            text = out.get(knob.file, files.get(knob.file))
            if text is None:
                raise KeyError(f"knob {name}: file {knob.file} does not exist")
            out[knob.file] = rewrite_constant(text, knob.target_key, value)
        else:
            routed[name] = value
    if routed:
        old = json.loads(files[KNOBS_FILE]) if KNOBS_FILE in files else {}
        out[KNOBS_FILE] = json.dumps({**old, **routed}, sort_keys=True, indent=1) + "\n"
    return out


def routed_values(root: Path, knobs: tuple[Knob, ...]) -> tuple[dict[str, str], list[str]]:
    """The environment variables and extra flags a materialised candidate asks for."""
    path = root / KNOBS_FILE
    if not path.exists():
        return {}, []
    values = json.loads(path.read_text())
    env: dict[str, str] = {}
    flags: list[str] = []
    for knob in knobs:
        if knob.name not in values:
            continue
        value = values[knob.name]
        if knob.via == "env":
            env[knob.target_key] = str(value)
        elif knob.via == "flag":
            flags += [knob.target_key, str(value)]
    return env, flags
