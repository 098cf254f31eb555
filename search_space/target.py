"""A Target: a trainer repository plus the rules for changing it and reading its runs.

Loaded from a `target.toml`; every field problem raises `TargetError` naming the field.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_space.knobs import Knob, parse_knob

OBJECTIVES = ("time_to_target", "steps_to_target", "loss_at_budget")
FIDELITY_ORDER = ("smoke", "short", "full")
# modded-nanogpt's validation line: step:N/M val_loss:X train_time:Yms step_avg:Zms
SPEEDRUN_LINE = (
    r"step:(?P<step>\d+)/(?P<total>\d+) val_loss:(?P<val_loss>[-+\w.]+) "
    r"train_time:(?P<train_ms>[\d.]+)ms"
)
TEMPLATE_VARS = ("seed", "steps", "nproc", "data")


def cache_dir() -> Path:
    """Where prepared data and compile caches live: $SPEEDSEARCH_CACHE or ~/.cache/speedsearch."""
    return Path(os.environ.get("SPEEDSEARCH_CACHE", Path.home() / ".cache" / "speedsearch"))


class TargetError(ValueError):
    """A target file that cannot be used; the message names the field and why."""


@dataclass(frozen=True)
class Fidelity:
    """How long a run of one rung of the ladder is: absolute steps or a fraction of `full`."""

    name: str
    steps: int


@dataclass(frozen=True)
class Readout:
    """How to read a run: a regex over the log, or a JSON-lines metrics file the trainer writes."""

    format: str = "speedrun"  # "speedrun" (log regex) or "jsonl"
    line_regex: str = SPEEDRUN_LINE
    metrics_file: str = "metrics.jsonl"
    min_timed_fraction: float = 0.3  # claimed train time / wall time between validations, at least


@dataclass(frozen=True)
class Resources:
    """What one run may use. `memory_mb` is enforced by the sandbox; `timeout_s` kills the run."""

    gpus: int = 0
    cpus: int = 1
    memory_mb: int = 4096
    timeout_s: float = 600.0


@dataclass(frozen=True)
class Target:
    """Everything speedsearch needs to know about one trainer."""

    name: str
    root: Path  # folder of target.toml
    repo: Path  # trainer source tree (a git repo, or a plain folder that gets snapshotted)
    base_ref: str
    command: str
    editable: tuple[str, ...]
    frozen: tuple[str, ...]
    markers: bool
    readout: Readout
    objective: str
    target_loss: float | str  # a number, or "baseline"
    fidelities: dict[str, Fidelity]
    resources: Resources
    env: dict[str, str] = field(default_factory=dict)
    passthrough_env: tuple[str, ...] = ()
    data_path: Path | None = None  # read-only data folder, `{data}` in the command
    data_prepare: str | None = None  # command that writes the data folder when it is missing
    knobs: tuple[Knob, ...] = ()
    ideas_file: Path | None = None
    description: str = ""
    docker_image: str = "speedsearch-runner:latest"
    source: Path | None = None  # the target.toml it came from

    def steps(self, fidelity: str) -> int:
        try:
            return self.fidelities[fidelity].steps
        except KeyError:
            raise TargetError(f"fidelity {fidelity!r}: target {self.name} has {sorted(self.fidelities)}") from None

    def render_command(self, *, seed: int, steps: int, data: str | Path, nproc: int | None = None) -> str:
        nproc = nproc if nproc is not None else max(1, self.resources.gpus)
        return self.command.format(seed=seed, steps=steps, nproc=nproc, data=str(data))


def _get(d: dict, key: str, kind: type | tuple, where: str, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise TargetError(f"{where}.{key}: missing (required)")
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise TargetError(f"{where}.{key}: expected {names}, got {type(value).__name__} {value!r}")
    return value


def _str_list(d: dict, key: str, where: str, default: Any = ...) -> tuple[str, ...]:
    value = _get(d, key, list, where, default)
    if not all(isinstance(v, str) for v in value):
        raise TargetError(f"{where}.{key}: expected a list of strings, got {value!r}")
    return tuple(value)


def _fidelities(raw: dict) -> dict[str, Fidelity]:
    if "full" not in raw:
        raise TargetError("fidelities.full: missing (required; it sets the run's total steps)")
    full = _get(raw["full"], "steps", int, "fidelities.full")
    if full <= 0:
        raise TargetError(f"fidelities.full.steps: must be positive, got {full}")
    out = {}
    for name, spec in raw.items():
        if name not in FIDELITY_ORDER:
            raise TargetError(f"fidelities.{name}: unknown fidelity (use {', '.join(FIDELITY_ORDER)})")
        where = f"fidelities.{name}"
        if not isinstance(spec, dict) or ("steps" in spec) == ("fraction" in spec):
            raise TargetError(f"{where}: give exactly one of steps or fraction")
        if "steps" in spec:
            steps = _get(spec, "steps", int, where)
        else:
            frac = _get(spec, "fraction", float, where)
            if not 0 < frac <= 1:
                raise TargetError(f"{where}.fraction: must be in (0, 1], got {frac}")
            steps = max(1, round(full * frac))
        if steps <= 0:
            raise TargetError(f"{where}.steps: must be positive, got {steps}")
        out[name] = Fidelity(name, steps)
    return out


def parse_target(raw: dict, root: Path, source: Path | None = None) -> Target:
    name = _get(raw, "name", str, "target")
    repo_raw = _get(raw, "repo", dict, "target", {})
    repo = (root / _get(repo_raw, "path", str, "repo", ".")).resolve()
    if not repo.is_dir():
        raise TargetError(f"repo.path: {repo} is not a folder")
    run = _get(raw, "run", dict, "target")
    command = _get(run, "command", str, "run")
    for var in re.findall(r"{(\w*)}", command):
        if var not in TEMPLATE_VARS:
            raise TargetError(f"run.command: unknown placeholder {{{var}}} (use {', '.join(TEMPLATE_VARS)})")
    env = _get(run, "env", dict, "run", {})
    if not all(isinstance(v, str) for v in env.values()):
        raise TargetError(f"run.env: values must be strings, got {env!r}")

    files = _get(raw, "files", dict, "target")
    editable = _str_list(files, "editable", "files")
    if not editable:
        raise TargetError("files.editable: empty; the search would have nothing to change")

    ro = _get(raw, "readout", dict, "target", {})
    fmt = _get(ro, "format", str, "readout", "speedrun")
    if fmt not in ("speedrun", "jsonl"):
        raise TargetError(f"readout.format: {fmt!r} is not one of speedrun, jsonl")
    line_regex = _get(ro, "line_regex", str, "readout", SPEEDRUN_LINE)
    try:
        groups = set(re.compile(line_regex).groupindex)
    except re.error as e:
        raise TargetError(f"readout.line_regex: does not compile: {e}") from None
    if fmt == "speedrun" and not {"step", "val_loss", "train_ms"} <= groups:
        raise TargetError("readout.line_regex: needs named groups step, val_loss and train_ms")
    readout = Readout(fmt, line_regex, _get(ro, "metrics_file", str, "readout", "metrics.jsonl"),
                      _get(ro, "min_timed_fraction", float, "readout", 0.3))

    obj = _get(raw, "objective", dict, "target", {})
    kind = _get(obj, "kind", str, "objective", "time_to_target")
    if kind not in OBJECTIVES:
        raise TargetError(f"objective.kind: {kind!r} is not one of {', '.join(OBJECTIVES)}")
    target_loss = _get(obj, "target_loss", (float, int, str), "objective", "baseline")
    if isinstance(target_loss, str) and target_loss != "baseline":
        raise TargetError(f"objective.target_loss: a number or \"baseline\", got {target_loss!r}")
    if isinstance(target_loss, int):
        target_loss = float(target_loss)

    res = _get(raw, "resources", dict, "target", {})
    resources = Resources(
        gpus=_get(res, "gpus", int, "resources", 0),
        cpus=_get(res, "cpus", int, "resources", 1),
        memory_mb=_get(res, "memory_mb", int, "resources", 4096),
        timeout_s=_get(res, "timeout_s", float, "resources", 600.0),
    )
    if resources.gpus < 0 or resources.cpus < 1 or resources.memory_mb < 64 or resources.timeout_s <= 0:
        raise TargetError(f"resources: out of range: {resources}")

    data = _get(raw, "data", dict, "target", {})
    data_path = _get(data, "path", str, "data", None)
    knobs_raw = _get(raw, "knobs", list, "target", [])
    knobs = tuple(parse_knob(k, f"knobs[{i}]", TargetError) for i, k in enumerate(knobs_raw))
    ideas = _get(raw, "ideas", str, "target", None)

    return Target(
        name=name,
        root=root,
        repo=repo,
        base_ref=_get(repo_raw, "base_ref", str, "repo", "HEAD"),
        command=command,
        editable=editable,
        frozen=_str_list(files, "frozen", "files", ()),
        markers=_get(files, "markers", bool, "files", False),
        readout=readout,
        objective=kind,
        target_loss=target_loss,
        fidelities=_fidelities(_get(raw, "fidelities", dict, "target")),
        resources=resources,
        env=dict(env),
        passthrough_env=_str_list(run, "passthrough_env", "run", ()),
        data_path=(root / data_path.replace("{cache}", str(cache_dir()))).resolve() if data_path else None,
        data_prepare=_get(data, "prepare", str, "data", None),
        knobs=knobs,
        ideas_file=(root / ideas).resolve() if ideas else None,
        description=_get(raw, "description", str, "target", ""),
        docker_image=_get(run, "docker_image", str, "run", "speedsearch-runner:latest"),
        source=source,
    )


def load_target(spec: str | Path) -> Target:
    """A built-in target's name (`tinygpt`), a target.toml, or a folder holding one."""
    from search_space.targets import builtin_path

    path = builtin_path(str(spec)) or Path(spec)
    if path.is_dir():
        path = path / "target.toml"
    if not path.is_file():
        raise TargetError(f"target: {spec!r} is neither a built-in target nor a target.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: not valid TOML: {e}") from None
    return parse_target(raw, path.parent.resolve(), source=path.resolve())
