"""`speedsearch init --from path/to/train_gpt.py`: a target.toml for a speedrun-style trainer.

What it reads from the trainer's source (parsed, never run): the validation line's format (an
f-string with `step:`, `val_loss:` and `train_time:`), the step count and the data globs (fields
of its `Hyperparameters` class), whether it runs under torchrun, uses a GPU or compiles, and its
numeric hyperparameters (the class's fields and the optimizers' keyword arguments) as knobs with
ranges around their values. What it could not infer it prints, one line each, so the user knows
what to check; the written file is loaded back (and every knob applied once) before it is kept.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import typer

from agent.cli_io import app, emit, guard, out
from search_space.errors import UserError
from search_space.knobs import knob_changes, read_constant
from search_space.locate import locate
from search_space.target import load_target

STEP_FIELDS = ("num_iterations", "train_steps", "num_steps", "iterations", "max_steps", "steps")
# Fields that are not hyperparameters to tune: evaluation, sizes that fix the data or the model's
# shape, bookkeeping. Listed in the report as left out.
NOT_KNOBS = re.compile(r"iteration|step|every|vocab|val|token|seq_len|seed|save|log|batch|world|rank|"
                       r"device|dim|layer|head|size|rows|cols", re.I)
UNIT_RANGE = re.compile(r"momentum|beta|frac|ratio|decay|dropout", re.I)
SPEEDRUN_PARTS = ("step:", "/", " val_loss:", " train_time:", "ms")


@dataclass
class Inferred:
    """What the trainer's source says, and what it did not."""

    name: str
    toml: str = ""
    knobs: list[dict] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # what could not be inferred, one line each
    left_out: list[str] = field(default_factory=list)  # numbers that did not become knobs


def _number(node: ast.expr | None) -> float | int | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _number(node.operand)
        return -inner if inner is not None else None
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    return None


def _fields(tree: ast.Module) -> tuple[str, dict[str, ast.expr]]:
    """The hyperparameter class (named Hyperparameters, else the first dataclass) and its fields."""
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    cls = next((c for c in classes if c.name == "Hyperparameters"), None) or next(
        (c for c in classes if any("dataclass" in ast.unparse(d) for d in c.decorator_list)), None)
    if cls is None:
        return "", {}
    got: dict[str, ast.expr] = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            got[stmt.target.id] = stmt.value
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            got[stmt.targets[0].id] = stmt.value
    return cls.name, got


def _speedrun_line(tree: ast.Module) -> bool | None:
    """True: a validation f-string in the speedrun's format; False: one in another; None: none."""
    seen = None
    for node in ast.walk(tree):
        if not isinstance(node, ast.JoinedStr):
            continue
        literal = [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
        text = "\x00".join(literal)
        if "val_loss:" not in text:
            continue
        pos, ok = 0, True
        for part in SPEEDRUN_PARTS:  # in this order, each in a literal piece after the previous
            i = text.find(part, pos)
            ok, pos = ok and i >= 0, max(pos, i + len(part))
        if ok and literal and literal[0].startswith("step:"):
            return True
        seen = False
    return seen


def _range(name: str, value: float | int) -> dict | None:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            return None
        return {"type": "int", "low": max(1, value // 2), "high": max(2, value * 2)}
    if value <= 0:
        return None
    if value < 1 and UNIT_RANGE.search(name):
        return {"type": "float", "low": round(value / 2, 6), "high": round((1 + value) / 2, 6)}
    return {"type": "float", "low": float(f"{value / 4:.4g}"), "high": float(f"{value * 4:.4g}"), "log": True}


def _call_knobs(tree: ast.Module, text: str, left_out: list[str]) -> list[tuple[str, str, float | int]]:
    """(knob name, key, value) for every numeric keyword of a call that sets a learning rate."""
    calls = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call) and any(k.arg == "lr" for k in n.keywords)),
                   key=lambda n: (n.lineno, n.col_offset))
    seen: dict[tuple[str, str], int] = {}  # (callee, keyword): calls that have it
    for node in calls:
        for kw in node.keywords:
            pair = (ast.unparse(node.func).split(".")[-1], kw.arg or "")
            seen[pair] = seen.get(pair, 0) + 1
    assigned = {id(n.value): n.targets[0].id for n in ast.walk(tree)
                if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)}
    found: list[tuple[str, str, float | int]] = []
    for node in calls:
        callee = ast.unparse(node.func).split(".")[-1]
        tag = next((ast.unparse(kw.value) for kw in node.keywords if kw.arg == "params"), None) \
            or (ast.unparse(node.args[0]) if node.args else "")
        if not re.fullmatch(r"[\w.]+", tag or ""):  # else the name it is assigned to
            tag = assigned.get(id(node), "")
        for kw in node.keywords:
            value = _number(kw.value)
            if kw.arg is None or value is None:
                continue
            # one such call: its name says enough; several: the parameters' name tells them apart
            key = f"{callee}({kw.arg})" if seen[callee, kw.arg] == 1 else f"{callee}({tag}, {kw.arg})" if tag else ""
            span = locate(text, key) if key else None
            if span is None or _position(text, span[0]) != (kw.value.lineno, kw.value.col_offset):
                left_out.append(f"{ast.unparse(node)[:60]}: {kw.arg}={value} (no key tells this call apart)")
                continue
            # named after the parameters (or the variable) where the call alone says little
            stem = tag.split(".")[-1].lower() if tag and ("," in key or callee == "dict") else callee.lower()
            stem = stem.removesuffix("_params").removesuffix("_defaults")
            found.append((f"{stem}_{kw.arg}", key, value))
    return found


def _position(text: str, index: int) -> tuple[int, int]:
    """(line, UTF-8 byte column) of a character index, as the parser counts them."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, len(text[line_start:index].encode())


def infer(trainer: Path, target_dir: Path, name: str) -> Inferred:
    """The target.toml text for `trainer`, written to live in `target_dir`."""
    text = trainer.read_text()
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise UserError(f"--from {trainer}: not Python ({e.msg}, line {e.lineno})") from None
    got = Inferred(name)
    top = subprocess.run(["git", "-C", str(trainer.parent), "rev-parse", "--show-toplevel"],
                         capture_output=True, text=True)
    repo = Path(top.stdout.strip()).resolve() if top.returncode == 0 else trainer.parent
    rel_file = trainer.relative_to(repo).as_posix()
    if top.returncode == 0 and subprocess.run(["git", "-C", str(repo), "ls-files", "--error-unmatch", rel_file],
                                              capture_output=True).returncode != 0:
        got.unknown.append(f"{rel_file} is not committed: a run gets the repository's HEAD (repo.base_ref); "
                           "commit it first")
    cls, fields = _fields(tree)

    distributed = bool(re.search(r"init_process_group|\bLOCAL_RANK\b|\bWORLD_SIZE\b", text))
    gpus = 1 if re.search(r"\bcuda\b", text) else 0
    command = (f"torchrun --standalone --nproc_per_node={{nproc}} {rel_file}" if distributed
               else f"python {rel_file}")
    env: dict[str, str] = {}
    steps_fields, steps = _steps(fields, cls, got)
    steps_field = steps_fields[0] if len(steps_fields) == 1 else None
    reads = set(re.findall(r"os\.environ(?:\.get)?\s*[\[(]\s*[\"'](\w+)[\"']", text))
    flags = set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)[\"']", text))
    step_env = next((v for v in sorted(reads) if re.search(r"STEP|ITER", v, re.I)), None)
    step_flag = next((f for f in sorted(flags) if re.search(r"step|iter", f, re.I)), None)
    if step_flag:
        command += f" {step_flag} {{steps}}"
    elif step_env:
        env[step_env] = "{steps}"
    else:
        where = f" ({cls}.{steps_field})" if steps_field else ""
        got.unknown.append(f"{{steps}}: the trainer fixes its step count in the source{where}; "
                           "only the full fidelity is written. Let it read an environment variable (e.g. "
                           "int(os.environ.get(\"NUM_ITERATIONS\", ...))) and run init again for shorter rungs")
    seed_flag = next((f for f in sorted(flags) if "seed" in f.lower()), None)
    seed_env = next((v for v in sorted(reads) if "SEED" in v.upper()), None)
    if seed_flag:
        command += f" {seed_flag} {{seed}}"
    elif seed_env:
        env[seed_env] = "{seed}"
    else:
        got.unknown.append("{seed}: the trainer takes no seed from a flag or the environment; seeds will not vary")

    fmt = _speedrun_line(tree)
    if fmt is not True:
        got.unknown.append("readout: " + ("no validation line with val_loss: found" if fmt is None else
                                          "its validation line is not `step:N/M val_loss:X train_time:Yms`")
                           + "; set readout.line_regex (named groups step, val_loss, train_ms)")

    data_lines = _data(fields, cls, repo, target_dir, got)
    startup = 600 if "torch.compile" in text else 0
    if startup:
        got.unknown.append("resources.startup_s = 600: the trainer calls torch.compile; set it to the "
                           "measured compile time")
    got.unknown.append("no [trust] section: results stay untrusted until one is written")

    full = steps or 1000
    fid = [f"full = {{ steps = {full} }}"]
    if (step_flag or step_env) and full >= 8:
        fid = [f"smoke = {{ steps = {max(1, full // 100)} }}", "short = { fraction = 0.25 }", *fid]
    lines = [
        f"# Written by `speedsearch init --from {trainer.name}`: check what it printed it could not infer.",
        f"name = {json.dumps(name)}", "",
        "[repo]", f"path = {json.dumps(_rel(repo, target_dir))}", "",
        "[run]", f"command = {json.dumps(command)}",
        *([f"env = {{ {', '.join(f'{k} = {json.dumps(v)}' for k, v in env.items())} }}"] if env else []), "",
        "[files]", f"editable = [{json.dumps(rel_file)}]", "",
        "[readout]", 'format = "speedrun"', "",
        "[objective]", 'kind = "time_to_target"', 'target_loss = "baseline"', "",
        "[fidelities]", *fid, "",
        "[resources]", f"gpus = {gpus}", f"cpus = {4 if gpus else 1}",
        "# memory_mb unset: a share of the machine's memory (env/machine.py)",
        "timeout_s = 3600", f"startup_s = {startup}", "",
        *data_lines,
    ]
    lines += _knobs(tree, text, fields, cls, rel_file, steps_fields, got)
    got.toml = "\n".join(lines) + "\n"
    return got


def _env_default(node: ast.expr | None) -> float | int | None:
    """The number in `int(os.environ.get("X", 1770))` (or its string "1770")."""
    for call in ast.walk(node) if node is not None else ():
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("environ.get") and len(call.args) == 2:
            default = call.args[1]
            if isinstance(default, ast.Constant) and isinstance(default.value, str) and default.value.isdigit():
                return int(default.value)
            return _number(default)
    return None


def _steps(fields: dict[str, ast.expr], cls: str, got: Inferred) -> tuple[list[str], int | None]:
    """The field(s) that hold the step count: a usual name, else every integer field named like
    one (a schedule plus an extension: their sum, which the trainer's log line counts to). A
    field read from the environment counts with its default."""
    def count(f: str) -> int | None:
        value = _number(fields.get(f))
        value = value if value is not None else _env_default(fields.get(f))
        return value if isinstance(value, int) else None

    exact = next((f for f in STEP_FIELDS if count(f) is not None), None)
    if exact:
        return [exact], count(exact)
    like = [f for f in fields if count(f) is not None and re.search(r"iteration|steps$", f) and "every" not in f]
    if not like:
        got.unknown.append(f"steps: no step count among {cls or 'the'} fields {', '.join(STEP_FIELDS)}; "
                           "fidelities.full.steps = 1000 is a placeholder")
        return [], None
    total = sum(count(f) or 0 for f in like)
    if len(like) > 1:
        got.unknown.append(f"steps: {' + '.join(f'{cls}.{f}' for f in like)} = {total} taken as the run's "
                           "steps; check against the log's step:N/M")
    return like, total


def _data(fields: dict[str, ast.expr], cls: str, repo: Path, target_dir: Path, got: Inferred) -> list[str]:
    # also a glob inside an expression, e.g. os.path.join(data_path, "data/fineweb10B/fineweb_train_*.bin")
    globs = {k: c.value for k, v in fields.items() for c in ast.walk(v)
             if isinstance(c, ast.Constant) and isinstance(c.value, str) and "*" in c.value}
    if not globs:
        got.unknown.append(f"data: no glob among the {cls or 'hyperparameter'} fields; no [data] section written")
        return []
    parents = {Path(g).parent.as_posix() for g in globs.values()}
    if len(parents) != 1 or Path(next(iter(parents))).is_absolute() or next(iter(parents)) == ".":
        got.unknown.append(f"data: the globs {sorted(globs.values())} share no relative folder; set [data] by hand")
        return []
    link = next(iter(parents))
    found = repo / link
    if found.is_dir():
        path = _rel(found, target_dir)
        ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", link], capture_output=True)
        if ignored.returncode != 0:  # a run's tree is the git tree (or the whole folder): it would hold the data
            got.unknown.append(f"data.path = {path}: the data lies in the trainer's tree; move it out (or let "
                               "git ignore it), or every run copies it and its link cannot be made")
    else:
        path = "{cache}/data/" + got.name
        got.unknown.append(f"data.path = {path}: put the files matching {', '.join(sorted(globs.values()))} "
                           "there (with the folders of the globs stripped), or give data.prepare")
    return ["[data]", f"path = {json.dumps(path)}",
            f"link = {json.dumps(link)}  # the run finds the data at {link}, as the trainer's globs expect", ""]


def _knobs(tree: ast.Module, text: str, fields: dict[str, ast.expr], cls: str, rel_file: str,
           steps_fields: list[str], got: Inferred) -> list[str]:
    chosen: list[tuple[str, str, float | int]] = []
    for name, node in fields.items():
        value = _number(node)
        if value is None or name in steps_fields:
            continue
        if NOT_KNOBS.search(name) and not isinstance(value, float):
            got.left_out.append(f"{cls}.{name} = {value}")
            continue
        chosen.append((name, f"{cls}.{name}", value))
    chosen += _call_knobs(tree, text, got.left_out)
    lines, names = [], set()
    for name, key, value in chosen:
        spec = _range(name, value)
        if spec is None:
            got.left_out.append(f"{key} = {value} (no range around it)")
            continue
        while name in names:
            name += "_2"
        names.add(name)
        knob = {"name": name, **spec, "via": "constant", "file": rel_file, "key": key}
        got.knobs.append(knob)
        lines += ["[[knobs]]", *(f"{k} = {_toml(v)}" for k, v in knob.items()), f"# in the source: {value}", ""]
    if not got.knobs:
        got.unknown.append("knobs: no numeric hyperparameter found")
    return lines


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value) if isinstance(value, str) else str(value)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def check_written(path: Path) -> None:
    """Load the written target and apply each knob once (to its high end): a knob that does not
    reach its value is a bug here, not the user's."""
    target = load_target(path)
    for knob in target.knobs:
        source = {knob.file: (target.repo / knob.file).read_text()}
        changed = knob_changes(source, target.knobs, {knob.name: knob.high})
        if changed[knob.file] == source[knob.file] or read_constant(changed[knob.file], knob.target_key) is None:
            raise RuntimeError(f"init: knob {knob.name} ({knob.target_key}) does not apply")


@app.command()
def init(
    from_: Path = typer.Option(..., "--from", help="the trainer's script, e.g. train_gpt.py"),
    dir: Path | None = typer.Option(None, "--dir", help="where target.toml goes (default: the script's folder)"),
    name: str | None = typer.Option(None, help="the target's name (default: the folder's)"),
    force: bool = typer.Option(False, help="replace an existing target.toml"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Write a target.toml for a speedrun-style trainer, and say what could not be inferred."""
    with guard(as_json):
        trainer = from_.resolve()
        if not trainer.is_file():
            raise UserError(f"--from {from_}: no such file")
        target_dir = (dir or trainer.parent).resolve()
        dest = target_dir / "target.toml"
        if dest.exists() and not force:
            raise UserError(f"--dir {target_dir}: already holds a target.toml (--force replaces it)")
        stem = re.sub(r"[^\w-]+", "-", name or trainer.parent.name).strip("-") or "target"
        got = infer(trainer, target_dir, stem)
        target_dir.mkdir(parents=True, exist_ok=True)
        dest.write_text(got.toml)
        try:
            check_written(dest)
        except Exception:
            dest.unlink()
            raise
        data = {"target": str(dest), "knobs": [k["name"] for k in got.knobs], "not_inferred": got.unknown,
                "left_out": got.left_out}

        def render(d: dict) -> None:
            out.print(f"wrote {d['target']} ({len(d['knobs'])} knobs: {', '.join(d['knobs']) or 'none'})",
                      highlight=False, soft_wrap=True)
            for line in d["not_inferred"]:
                out.print(f"  check: {line}", highlight=False, soft_wrap=True, markup=False)
            if d["left_out"]:
                out.print(f"  not knobs: {', '.join(d['left_out'])}", highlight=False, soft_wrap=True, markup=False)
        emit(data, as_json, render)
