"""A Target: a trainer repository plus the rules for changing it and reading its runs.

Loaded from a `target.toml`; every field problem raises `TargetError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_space.budget import KEYS as BUDGET_KEYS
from search_space.budget import BudgetError, Objective, parse_budget
from search_space.cache import cache_dir as cache_dir  # re-exported: callers import it from here
from search_space.cache import resolve_data_path
from search_space.errors import UserError, typed
from search_space.guard import Guard, GuardError, parse_guards
from search_space.knobs import Knob, parse_knob
from search_space.readout import KEYS as READOUT_KEYS
from search_space.readout import SPEEDRUN_LINE, Readout, ReadoutError, parse_readout
from search_space.track_rules import RulesError, TrackRules, check_against, parse_rules

__all__ = ["SPEEDRUN_LINE", "Readout"]  # also here: where targets were always read from

OBJECTIVES = ("time_to_target", "steps_to_target", "loss_at_budget")
FIDELITY_ORDER = ("smoke", "short", "full")
# {data_rel}: the data folder as a path relative to the run's working folder (data.link)
# {resume}: the state folder a continued run starts from, "" when it starts fresh ([checkpoint])
TEMPLATE_VARS = ("seed", "steps", "nproc", "data", "data_rel", "resume")


class TargetError(UserError):
    """A target file that cannot be used; the message names the field and why."""


# Every key a target.toml may hold, by table ("" is the top level). A key outside these is refused,
# with the nearest valid name: a misspelt `target_los` silently ignored would change what is searched.
KEYS: dict[str, tuple[str, ...]] = {
    "": ("name", "description", "ideas", "repo", "run", "files", "readout", "objective", "fidelities",
         "resources", "data", "trust", "knobs", "rules", "guard", "checkpoint"),
    "repo": ("path", "base_ref"),
    "run": ("command", "env", "passthrough_env", "docker_image", "warm_imports"),
    "files": ("editable", "frozen", "markers"),
    "readout": READOUT_KEYS,
    "objective": ("kind", "target_loss", *BUDGET_KEYS),
    "resources": ("gpus", "cpus", "memory_mb", "timeout_s", "startup_s", "pids", "log_mb", "disk_mb", "pack"),
    "data": ("path", "prepare", "mount", "link"),
    "knobs": ("name", "type", "low", "high", "log", "step", "choices", "via", "key", "file"),
    "fidelity": ("steps", "fraction"),
    "checkpoint": ("every", "path", "max_mb"),
}


def nearest(word: str, names: list[str] | tuple[str, ...]) -> str | None:
    """The valid name closest to a misspelt one, or None when none is close."""
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
    return close[0] if close else None


def check_keys(table: Any, where: str, known: tuple[str, ...] | list[str]) -> None:
    """Refuse a key `table` does not know, naming it and the nearest valid one (in this table, or
    the table it probably belongs in)."""
    if not isinstance(table, dict):
        return
    for key in table:
        if key in known:
            continue
        field_name = f"{where}.{key}" if where else key
        hint = nearest(key, known)
        if hint:
            raise TargetError(f"{field_name}: unknown key; did you mean {hint}?")
        elsewhere = {f"{t}.{k}" if t else k: k for t, ks in KEYS.items() if t != "fidelity" for k in ks}
        other = nearest(key, list(set(elsewhere.values())))
        if other:
            spots = sorted(p for p, k in elsewhere.items() if k == other)
            raise TargetError(f"{field_name}: unknown key; did you mean {spots[0]}?")
        raise TargetError(f"{field_name}: unknown key (valid here: {', '.join(known)})")


def _check_all_keys(raw: dict) -> None:
    check_keys(raw, "", KEYS[""])
    for table in ("repo", "run", "files", "readout", "objective", "resources", "data", "checkpoint"):
        check_keys(raw.get(table), table, KEYS[table])
    for name, spec in (raw.get("fidelities") or {}).items() if isinstance(raw.get("fidelities"), dict) else ():
        check_keys(spec, f"fidelities.{name}", KEYS["fidelity"])
    for i, knob in enumerate(raw.get("knobs") or []) if isinstance(raw.get("knobs"), list) else ():
        check_keys(knob, f"knobs[{i}]", KEYS["knobs"])


@dataclass(frozen=True)
class Fidelity:
    """How long a run of one rung of the ladder is: absolute steps or a fraction of `full`."""

    name: str
    steps: int


TRUST_VARS = ("ckpts", "inputs", "out", "go")
PAUSE_LINE = r"step:(?P<step>\d+)/\d+ val_start"  # printed when the timed region pauses for validation


@dataclass(frozen=True)
class Trust:
    """How the target's runs are measured instead of believed (the `[trust]` section).

    After a run, `model_command` (a frozen script of the target, run in the same sandbox) loads the
    candidate's model from each checkpoint and writes logits for held-out input windows; the host
    computes the loss. Claimed losses and train times are checked against the measured ones.
    """

    # {ckpts}: a file listing checkpoints; {inputs}: int64 .npy windows; {out}: a folder for the logits;
    # optional {go}: a file that appears when all of those are ready (the command then starts with the
    # training run and waits for it, so its start-up overlaps training)
    model_command: str
    seq_len: int  # tokens a held-out window feeds the model
    windows: int  # held-out windows evaluated at every checkpoint
    vocab: int
    every: int  # the validation cadence the log must show (step 0, every `every` steps, the last)
    loss_tolerance: float  # |claimed val_loss - measured held-out loss|, absolute
    checkpoints: str = "ckpt/step_{step:06d}.pt"  # relative to the workdir
    heldout: str = "heldout/val_000.bin"  # relative to the data folder; never visible to a run
    clock_tolerance: float = 0.10  # |claimed - observed| training interval, as a fraction of observed
    clock_slack_ms: float = 50.0  # plus this much (pipe and scheduling latency)
    startup_allowance_s: float = 60.0  # from the start of the run to its step-0 line
    probe_rows: int = 8  # held-out windows perturbed after a cut to test for look-ahead
    probe_tolerance: float = 1e-3  # max |logit change| allowed before the cut
    # Step 0 is an untrained model: its measured held-out loss must be at least this fraction of
    # ln(vocab), a uniform guess's. Training inside the start-up allowance is off the clock and off
    # the step count; 0 turns the check off (a trainer whose initial model is informed on purpose).
    fresh_start: float = 0.9
    pause_regex: str | None = PAUSE_LINE  # "": none; the observed interval then runs line to line
    timeout_s: float = 300.0  # for each evaluator process


@dataclass(frozen=True)
class RunCheckpoint:
    """The `[checkpoint]` section: the trainer saves resumable state so a run lost with its node, or
    cut off by a stop, continues instead of starting again (env/run_state.py). Not the trusted
    evaluator's weight checkpoints (`[trust] checkpoints`)."""

    every: int  # steps (or epochs) between the states the worker sends back to the controller
    path: str  # a folder inside the workdir the trainer writes its state to, its STEP file last
    max_mb: int = 1024  # a state larger than this is not kept (it travels by value)


@dataclass(frozen=True)
class Resources:
    """What one run may use. `memory_mb` is enforced by the sandbox; `timeout_s` kills the run."""

    gpus: int = 0
    cpus: int = 1
    memory_mb: int | None = None  # None: a share of the machine that runs it (env/machine.py)
    timeout_s: float = 600.0
    # Compile and warm-up before step 0 (a record's torch.compile takes minutes): added to the
    # timeout, and the trusted clock check's start-up allowance (env/trusted_log.py).
    startup_s: float = 0.0
    pids: int = 512  # processes and threads at once
    log_mb: int = 64  # log bytes kept; past it the run is invalid
    disk_mb: int = 4096  # the workspace's size; past it the run fails ("disk quota")
    # Runs that share one GPU at once (gpus = 1 only): each asks Ray for 1/pack of it. Its start-up,
    # compile and validation leave the GPU idle; packed runs fill those gaps with each other's steps.
    pack: int = 1

    @property
    def run_timeout_s(self) -> float:
        return self.timeout_s + self.startup_s

    @property
    def ray_gpus(self) -> float:
        """The GPUs one run asks Ray for: a fraction when runs are packed (Ray counts in 1e-4)."""
        return self.gpus if self.pack == 1 else round(self.gpus / self.pack, 4)


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
    # Modules a warm slot (env/warm.py) imports before its run is known, e.g. torch: never GPU or
    # thread-pool set-up, only what `import` does.
    warm_imports: tuple[str, ...] = ()
    data_path: Path | None = None  # read-only data folder, `{data}` in the command
    data_template: str | None = None  # data.path as written: each node resolves `{cache}` (env/data.py)
    data_prepare: str | None = None  # command that writes the data folder when it is missing
    data_mount: str | None = None  # the subfolder of data_path a run sees as `{data}` (None: all of it)
    # A path inside the workdir made a symlink to `{data}`, for loaders that take only relative
    # globs (the speedrun's); `{data_rel}` renders as it.
    data_link: str | None = None
    trust: Trust | None = None  # None: results are `untrusted` (claimed losses, observed times)
    rules: TrackRules | None = None  # the track's evaluation rules ([rules]); held to by the trusted evaluator
    guards: tuple[Guard, ...] = ()  # [[guard]]: scores that must not drop (search_space/guard.py)
    knobs: tuple[Knob, ...] = ()
    ideas_file: Path | None = None
    description: str = ""
    docker_image: str = "speedsearch-runner:latest"
    source: Path | None = None  # the target.toml it came from
    checkpoint: RunCheckpoint | None = None  # None: a lost run starts again from zero

    @property
    def checked_trust(self) -> Trust | None:
        """The [trust] section a run is held to: only a speedrun-format log is checked against it."""
        return self.trust if self.readout.format == "speedrun" else None

    def steps(self, fidelity: str) -> int:
        try:
            return self.fidelities[fidelity].steps
        except KeyError:
            raise TargetError(f"fidelity {fidelity!r}: target {self.name} has {sorted(self.fidelities)}") from None

    def render_command(self, *, seed: int, steps: int, data: str | Path, nproc: int | None = None,
                       resume: str = "") -> str:
        return self.command.format(**self._fills(seed, steps, data, nproc, resume))

    def render_env(self, *, seed: int, steps: int, data: str | Path, nproc: int | None = None,
                   resume: str = "") -> dict[str, str]:
        """`run.env` with its placeholders filled, like the command's."""
        fills = self._fills(seed, steps, data, nproc, resume)
        return {k: v.format(**fills) for k, v in self.env.items()}

    def _fills(self, seed: int, steps: int, data: str | Path, nproc: int | None, resume: str = "") -> dict[str, object]:
        nproc = nproc if nproc is not None else max(1, self.resources.gpus)
        return {"seed": seed, "steps": steps, "nproc": nproc, "data": str(data), "data_rel": self.data_link or "",
                "resume": resume}


def _get(d: dict, key: str, kind: type | tuple, where: str, default: Any = ...) -> Any:
    return typed(d, key, kind, where, default, TargetError)


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


def _positive(value: float, where: str) -> None:
    if value <= 0:
        raise TargetError(f"{where}: must be positive, got {value}")


def _trust(raw: Any, readout: Readout) -> Trust:
    if not isinstance(raw, dict):
        raise TargetError(f"trust: expected a table, got {type(raw).__name__}")
    check_keys(raw, "trust", sorted(Trust.__dataclass_fields__))
    if readout.format != "speedrun":
        raise TargetError("trust: needs readout.format = \"speedrun\" (the clock is observed from log lines)")
    d = Trust.__dataclass_fields__
    got: dict[str, Any] = {}
    for name, f in d.items():
        kind = {"str": str, "int": int, "float": float, "str | None": str}[str(f.type)]
        got[name] = _get(raw, name, kind, "trust", ... if f.default is dataclasses.MISSING else f.default)
    for var in re.findall(r"{(\w*)}", got["model_command"]):
        if var not in TRUST_VARS:
            raise TargetError(f"trust.model_command: unknown placeholder {{{var}}} (use {', '.join(TRUST_VARS)})")
    try:
        got["checkpoints"].format(step=0)
    except (KeyError, IndexError, ValueError) as e:
        raise TargetError(f"trust.checkpoints: a path with {{step}}, e.g. ckpt/step_{{step:06d}}.pt ({e})") from None
    for name in ("checkpoints", "heldout"):
        if Path(got[name]).is_absolute() or ".." in Path(got[name]).parts:
            raise TargetError(f"trust.{name}: a relative path inside its folder, got {got[name]!r}")
    for name in ("seq_len", "windows", "vocab", "every", "loss_tolerance", "probe_tolerance", "timeout_s"):
        _positive(got[name], f"trust.{name}")
    for name in ("clock_tolerance", "clock_slack_ms", "startup_allowance_s", "probe_rows"):
        if got[name] < 0:
            raise TargetError(f"trust.{name}: must not be negative, got {got[name]}")
    if not 0 <= got["fresh_start"] <= 1:
        raise TargetError(f"trust.fresh_start: a fraction of ln(vocab) from 0 to 1, got {got['fresh_start']}")
    got["pause_regex"] = got["pause_regex"] or None  # "" (TOML has no null): no pause marker
    if got["pause_regex"] is not None:
        try:
            groups = set(re.compile(got["pause_regex"]).groupindex)
        except re.error as e:
            raise TargetError(f"trust.pause_regex: does not compile: {e}") from None
        if "step" not in groups:
            raise TargetError("trust.pause_regex: needs the named group step")
    return Trust(**got)


def _rules(raw: Any, trust: Trust | None, data_path: str | None, mount: str | None) -> TrackRules:
    """The `[rules]` section (search_space/track_rules.py), checked against `[trust]` and `[data]`."""
    try:
        return check_against(parse_rules(raw), seq_len=trust.seq_len if trust else None,
                             probe_rows=trust.probe_rows if trust else None,
                             probe_tolerance=trust.probe_tolerance if trust else None,
                             heldout=trust.heldout if trust else None, mount=mount, has_data=bool(data_path))
    except RulesError as e:
        raise TargetError(str(e)) from None


def parse_target(raw: dict, root: Path, source: Path | None = None) -> Target:
    _check_all_keys(raw)
    name = _get(raw, "name", str, "target")
    repo_raw = _get(raw, "repo", dict, "target", {})
    repo = (root / _get(repo_raw, "path", str, "repo", ".")).resolve()
    if not repo.is_dir():
        raise TargetError(f"repo.path: {repo} is not a folder")
    run = _get(raw, "run", dict, "target")
    command = _get(run, "command", str, "run")
    env = _get(run, "env", dict, "run", {})
    if not all(isinstance(v, str) for v in env.values()):
        raise TargetError(f"run.env: values must be strings, got {env!r}")
    data = _get(raw, "data", dict, "target", {})
    link = _get(data, "link", str, "data", None)
    for where, text in [("run.command", command), *((f"run.env.{k}", v) for k, v in env.items())]:
        for var in re.findall(r"{(\w*)}", text):
            if var not in TEMPLATE_VARS:
                raise TargetError(f"{where}: unknown placeholder {{{var}}} (use {', '.join(TEMPLATE_VARS)})")
            if var == "data_rel" and not link:
                raise TargetError(f"{where}: {{data_rel}} needs data.link (where the run finds the data)")
            if var == "resume" and "checkpoint" not in raw:
                raise TargetError(f"{where}: {{resume}} needs a [checkpoint] section (where the state is saved)")

    files = _get(raw, "files", dict, "target")
    editable = _str_list(files, "editable", "files")
    if not editable:
        raise TargetError("files.editable: empty; the search would have nothing to change")

    try:
        readout = parse_readout(_get(raw, "readout", dict, "target", {}))
    except ReadoutError as e:
        raise TargetError(str(e)) from None

    obj = _get(raw, "objective", dict, "target", {})
    kind = _get(obj, "kind", str, "objective", "time_to_target")
    if kind not in OBJECTIVES:
        raise TargetError(f"objective.kind: {kind!r} is not one of {', '.join(OBJECTIVES)}")
    try:
        kind = Objective(kind, parse_budget(obj, kind, readout.counts, readout.unit))
    except BudgetError as e:
        raise TargetError(str(e)) from None
    target_loss = _get(obj, "target_loss", (float, int, str), "objective", "baseline")
    if isinstance(target_loss, str) and target_loss != "baseline":
        raise TargetError(f"objective.target_loss: a number or \"baseline\", got {target_loss!r}")
    if isinstance(target_loss, int):
        target_loss = float(target_loss)

    res = _get(raw, "resources", dict, "target", {})
    resources = Resources(
        gpus=_get(res, "gpus", int, "resources", 0),
        cpus=_get(res, "cpus", int, "resources", 1),
        memory_mb=_get(res, "memory_mb", int, "resources", None),
        timeout_s=_get(res, "timeout_s", float, "resources", 600.0),
        startup_s=_get(res, "startup_s", float, "resources", 0.0),
        pids=_get(res, "pids", int, "resources", 512),
        log_mb=_get(res, "log_mb", int, "resources", 64),
        disk_mb=_get(res, "disk_mb", int, "resources", 4096),
        pack=_get(res, "pack", int, "resources", 1),
    )
    if resources.gpus < 0 or resources.cpus < 1 or (resources.memory_mb or 64) < 64 or resources.timeout_s <= 0 \
            or resources.startup_s < 0 or resources.pids < 16 or resources.log_mb < 1 or resources.disk_mb < 0:
        raise TargetError(f"resources: out of range: {resources}")
    if not 1 <= resources.pack <= 16 or (resources.pack > 1 and resources.gpus != 1):
        raise TargetError(f"resources.pack: 1 to 16 runs on one GPU (with gpus = 1), got pack = {resources.pack} "
                          f"with gpus = {resources.gpus}")

    data_path = _get(data, "path", str, "data", None)
    if link is not None and (not data_path or not link.strip("/.") or Path(link).is_absolute()
                             or ".." in Path(link).parts):
        raise TargetError(f"data.link: a relative path inside the workdir (with data.path), got {link!r}")
    mount = _get(data, "mount", str, "data", None)
    if mount is not None and (Path(mount).is_absolute() or ".." in Path(mount).parts or not data_path):
        raise TargetError(f"data.mount: a subfolder of data.path, got {mount!r}")
    trust = _trust(raw["trust"], readout) if "trust" in raw else None
    checkpoint = _checkpoint(raw["checkpoint"], readout) if "checkpoint" in raw else None
    rules = _rules(raw["rules"], trust, data_path, mount) if "rules" in raw else None
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
        warm_imports=_str_list(run, "warm_imports", "run", ()),
        data_path=(root / resolve_data_path(data_path)).resolve() if data_path else None,
        data_template=data_path,
        data_prepare=_get(data, "prepare", str, "data", None),
        data_mount=mount,
        data_link=link,
        trust=trust,
        rules=rules,
        guards=_guards(raw["guard"], trust, mount) if "guard" in raw else (),
        knobs=knobs,
        ideas_file=(root / ideas).resolve() if ideas else None,
        description=_get(raw, "description", str, "target", ""),
        docker_image=_get(run, "docker_image", str, "run", "speedsearch-runner:latest"),
        source=source,
        checkpoint=checkpoint,
    )


def _checkpoint(raw: Any, readout: Readout) -> RunCheckpoint:
    """`[checkpoint]`: every (a positive count of the readout's steps or epochs) and path (a plain
    relative folder inside the workdir: what is in it is packed and restored, nothing else)."""
    if not isinstance(raw, dict):
        raise TargetError(f"checkpoint: expected a table, got {type(raw).__name__}")
    every = _get(raw, "every", int, "checkpoint")
    if isinstance(every, bool) or every < 1:
        raise TargetError(f"checkpoint.every: a positive number of {readout.counts}s, got {every!r}")
    path = _get(raw, "path", str, "checkpoint")
    parts = Path(path).parts
    # not the sandbox's scratch, git's folder, or `.resume` (where a saved state is restored: env/run_state.py)
    if not path.strip("/. ") or Path(path).is_absolute() or ".." in parts or parts[0] in (".sandbox", ".git",
                                                                                           ".resume"):
        raise TargetError(f"checkpoint.path: a relative folder inside the workdir, got {path!r}")
    max_mb = _get(raw, "max_mb", int, "checkpoint", 1024)
    if max_mb < 1:
        raise TargetError(f"checkpoint.max_mb: must be positive, got {max_mb}")
    return RunCheckpoint(every=every, path=str(Path(path)), max_mb=max_mb)


def _guards(raw: Any, trust: Trust | None, mount: str | None) -> tuple[Guard, ...]:
    """`[[guard]]` (search_space/guard.py): scored from the trusted evaluator's logits, so `[trust]` is needed."""
    try:
        return parse_guards(raw, trust.seq_len if trust else None, mount)
    except GuardError as e:
        raise TargetError(str(e)) from None


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
    try:
        return parse_target(raw, path.parent.resolve(), source=path.resolve())
    except TargetError as e:  # which file, then which field
        raise TargetError(f"{path}: {e}") from None
