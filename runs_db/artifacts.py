"""Artifacts: what each run left behind, under D/artifacts/trial-<n>/.

    seed-<s>-<fidelity>.log    the run's full log (a copy; the run folder is temporary)
    seed-<s>-<fidelity>.json   RunResult.to_dict(), its `log` pointing at the copy above
    loss-<fidelity>.png        the trial's loss curves against the baseline's

and per candidate that reached `full`, under D/artifacts/candidates/:

    <commit12>.png             its full and confirm runs, one line per seed, against the base's band
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from runs_db.study import jsonable
from search_space.records import RunResult

MAX_PATH_CHARS = 4096


def _log_source(log: str) -> Path | None:
    """`RunResult.log` is either the log's text or the path of a log file; the path if it is one."""
    if not log or "\n" in log or len(log) > MAX_PATH_CHARS:
        return None
    try:
        path = Path(log)
        return path if path.is_file() else None
    except (OSError, ValueError):
        return None


class Artifacts:
    def __init__(self, root: Path):
        self.root = Path(root)

    def trial_dir(self, number: int) -> Path:
        return self.root / f"trial-{number}"

    def run_stem(self, number: int, seed: int, fidelity: str) -> Path:
        return self.trial_dir(number) / f"seed-{seed}-{fidelity or 'run'}"

    def plot_path(self, number: int, fidelity: str) -> Path:
        return self.trial_dir(number) / f"loss-{fidelity or 'run'}.png"

    def candidate_plot_path(self, commit: str) -> Path:
        """A candidate's own plot (all its full-length runs), named by commit: the review page,
        `show` and the dashboard view find it from the commit alone."""
        return self.root / "candidates" / f"{commit[:12]}.png"

    def has_run(self, number: int, result: RunResult) -> bool:
        return self.run_stem(number, result.seed, result.fidelity).with_suffix(".json").is_file()

    def save_run(self, number: int, result: RunResult, log_text: str | None = None) -> Path:
        """Copy the run's log (`log_text`, else `result.log`) and write its JSON; returns the
        JSON's path. Saving again replaces."""
        stem = self.run_stem(number, result.seed, result.fidelity)
        stem.parent.mkdir(parents=True, exist_ok=True)
        log_dst = stem.with_suffix(".log")
        src = None if log_text is not None else _log_source(result.log)
        if log_text is not None:
            log_dst.write_text(log_text, encoding="utf-8", errors="replace")
        elif src is not None:
            if src.resolve() != log_dst.resolve():
                shutil.copyfile(src, log_dst)
        elif result.log or not log_dst.exists():
            log_dst.write_text(result.log, encoding="utf-8", errors="replace")
        data = jsonable(result.to_dict())
        data["log"] = log_dst.name  # relative: the search folder may move
        json_path = stem.with_suffix(".json")
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, json_path)  # readers never see half a file
        return json_path

    def runs(self, number: int) -> list[RunResult]:
        """The saved runs of trial `number`, by seed; each `log` is the absolute path of its copy
        and `provenance["trial"]` the trial number."""
        out = []
        for path in sorted(self.trial_dir(number).glob("seed-*.json")):
            data = json.loads(path.read_text())
            data["curve"] = [p for p in data.get("curve", []) if p[1] is not None]
            result = RunResult.from_dict(data)
            result.log = str(path.parent / data.get("log", path.with_suffix(".log").name))
            result.provenance.setdefault("trial", number)
            out.append(result)
        return sorted(out, key=lambda r: (r.fidelity, r.seed))
