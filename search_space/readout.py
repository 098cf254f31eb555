"""How a run's curve is read from what its trainer prints: the `[readout]` table of a target.

Three formats:
- `speedrun`: the NanoGPT speedrun's validation line (`step:N/M val_loss:X train_time:Yms`), or
  `line_regex` with the named groups step, val_loss and train_ms;
- `jsonl`: {"step", "val_loss", "train_ms"} per line of a metrics file the trainer writes;
- `regex`: any log, through `pattern`, a regex whose named groups say what each number is:
  `step` or `epoch` (without either, the k-th matching line is point k), exactly one of `loss`,
  `ppl` (perplexity: loss = ln ppl) or `bpb` (bits per byte), and optionally `ms` (the trainer's
  own clock; without it, the sandbox's arrival time of the line, since the run started, is used).

`unit` says what the curve holds: "loss" (nats per token, the default) or "bpb", which needs
`tokens_per_byte` to convert a loss or a perplexity (bpb = loss x tokens_per_byte / ln 2). With the
`speedrun` and `jsonl` formats the line's val_loss is a loss in nats; `unit = "bpb"` converts it
(and the trusted evaluator's measured loss) the same way.
Every problem is refused when the target loads, with the reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from search_space.errors import UserError

# modded-nanogpt's validation line: step:N/M val_loss:X train_time:Yms step_avg:Zms
SPEEDRUN_LINE = (
    r"step:(?P<step>\d+)/(?P<total>\d+) val_loss:(?P<val_loss>[-+\w.]+) "
    r"train_time:(?P<train_ms>[\d.]+)ms"
)
FORMATS = ("speedrun", "jsonl", "regex")
KEYS = ("format", "line_regex", "metrics_file", "pattern", "unit", "tokens_per_byte")
VALUES = ("loss", "ppl", "bpb")  # the regex format's groups for the curve's value: exactly one
UNITS = ("loss", "bpb")


@dataclass(frozen=True)
class Readout:
    """How to read a run (see the module's docstring)."""

    format: str = "speedrun"
    line_regex: str = SPEEDRUN_LINE
    metrics_file: str = "metrics.jsonl"
    pattern: str = ""  # format "regex"
    unit: str = "loss"
    tokens_per_byte: float | None = None

    @property
    def counts(self) -> str:
        """What a point's step counts: "epoch" where the pattern reads epochs, else "step"."""
        return "epoch" if self.format == "regex" and "epoch" in re.compile(self.pattern).groupindex else "step"

    @property
    def scale(self) -> float:
        """The factor from a loss in nats per token to the curve's unit (1 for "loss")."""
        if self.unit == "bpb" and self.tokens_per_byte is not None:
            return self.tokens_per_byte / math.log(2)
        return 1.0

    def value(self, groups: dict[str, str | None]) -> float:
        """The curve's value from a regex match's groups, in `unit`; ValueError when unreadable."""
        if groups.get("bpb") is not None:
            return float(groups["bpb"])  # type: ignore[arg-type]
        loss = math.log(float(groups["ppl"])) if groups.get("ppl") is not None else float(groups["loss"])  # type: ignore[arg-type]
        if self.unit == "bpb":
            assert self.tokens_per_byte is not None
            return loss * self.tokens_per_byte / math.log(2)
        return loss


class ReadoutError(UserError):
    """A `[readout]` table that cannot be used; the message names the field and why."""


def parse_readout(ro: dict[str, Any]) -> Readout:
    fmt = _str(ro, "format", "speedrun")
    if fmt not in FORMATS:
        raise ReadoutError(f"readout.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    line_regex = _str(ro, "line_regex", SPEEDRUN_LINE)
    groups = _groups("line_regex", line_regex)
    if fmt == "speedrun" and not {"step", "val_loss", "train_ms"} <= groups:
        raise ReadoutError("readout.line_regex: needs named groups step, val_loss and train_ms")
    pattern = _str(ro, "pattern", "")
    unit = _str(ro, "unit", "loss")
    if unit not in UNITS:
        raise ReadoutError(f"readout.unit: {unit!r} is not one of {', '.join(UNITS)}")
    tpb = ro.get("tokens_per_byte")
    if tpb is not None and (isinstance(tpb, bool) or not isinstance(tpb, (int, float)) or not tpb > 0):
        raise ReadoutError(f"readout.tokens_per_byte: {tpb!r} is not a positive number")
    if fmt == "regex":
        _check_pattern(pattern, unit, tpb)
    elif pattern:
        raise ReadoutError("readout.pattern: only with format = \"regex\"")
    elif unit == "bpb" and tpb is None:
        raise ReadoutError("readout.unit = \"bpb\" from a loss needs readout.tokens_per_byte")
    return Readout(fmt, line_regex, _str(ro, "metrics_file", "metrics.jsonl"), pattern, unit,
                   None if tpb is None else float(tpb))


def _check_pattern(pattern: str, unit: str, tpb: Any) -> None:
    if not pattern:
        raise ReadoutError("readout.pattern: format = \"regex\" needs a pattern (named groups: step or epoch, "
                           "loss or ppl or bpb, optionally ms)")
    groups = _groups("pattern", pattern)
    values = [g for g in VALUES if g in groups]
    if len(values) != 1:
        raise ReadoutError(f"readout.pattern: needs exactly one of the named groups {', '.join(VALUES)} "
                           f"(has {', '.join(values) or 'none'})")
    if {"step", "epoch"} <= groups:
        raise ReadoutError("readout.pattern: step and epoch both named; a curve counts one of them")
    unknown = groups - {"step", "epoch", "ms", *VALUES}
    if unknown:
        raise ReadoutError(f"readout.pattern: unknown named group(s) {', '.join(sorted(unknown))} "
                           "(known: step, epoch, loss, ppl, bpb, ms)")
    if values == ["bpb"] and unit != "bpb":
        raise ReadoutError("readout.pattern: reads bpb; set readout.unit = \"bpb\"")
    if unit == "bpb" and values != ["bpb"] and tpb is None:
        raise ReadoutError("readout.unit = \"bpb\" from a loss or a perplexity needs readout.tokens_per_byte")


def _str(ro: dict[str, Any], key: str, default: str) -> str:
    value = ro.get(key, default)
    if not isinstance(value, str):
        raise ReadoutError(f"readout.{key}: expected a string, got {type(value).__name__}")
    return value


def _groups(key: str, regex: str) -> set[str]:
    try:
        return set(re.compile(regex).groupindex)
    except re.error as e:
        raise ReadoutError(f"readout.{key}: does not compile: {e}") from None
