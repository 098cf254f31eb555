"""The progress of checkpointed (long) runs, as `status`, the live table and the review page read it.

env/run_state.py's store (an actor on the controller's node) writes `run_state/progress.json` in
the search folder each time a running run reports a new point; this module reads it, without Ray.
The ETA is the run's own observed rate so far (seconds per step or epoch, the gap of a break not
counted), less the time since its last point was heard.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.json"
QUIET_S = 120.0  # a run not heard from this long says so (a long epoch, or a controller that died)
RUN_ID = re.compile(r"^t(\d+)-([a-z])-s(\d+)-")  # agent/loop.py's run ids: t<trial>-<role>-s<seed>-<commit>


def read_progress(search_dir: Path | str) -> dict[str, dict]:
    """Run key -> {run, step, total, counts, elapsed_s, at, resumed_from}: the runs under way."""
    try:
        data = json.loads((Path(search_dir) / "run_state" / PROGRESS_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def eta_s(info: dict, now: float | None = None) -> float | None:
    step, total, elapsed = info.get("step") or 0, info.get("total") or 0, info.get("elapsed_s") or 0.0
    if step <= 0 or total <= 0 or elapsed <= 0:
        return None
    since = max(0.0, (time.time() if now is None else now) - float(info.get("at") or 0.0))
    return max(0.0, (total - step) * elapsed / step - since)


def progress_rows(search_dir: Path | str, now: float | None = None) -> list[dict[str, Any]]:
    """One row per running checkpointed run, its trial and seed where its run id names them."""
    now = time.time() if now is None else now
    rows = []
    for info in read_progress(search_dir).values():
        m = RUN_ID.match(str(info.get("run", "")))
        eta = eta_s(info, now)
        rows.append({"run": info.get("run", ""), "trial": int(m.group(1)) if m else None,
                     # "base": the baseline's run paired with a candidate's at confirm (its own trial's: "")
                     "role": "base" if m and m.group(2) == "b" else "",
                     "seed": int(m.group(3)) if m else None, "counts": info.get("counts", "step"),
                     "step": info.get("step", 0), "total": info.get("total", 0),
                     "elapsed_s": info.get("elapsed_s"), "eta_s": None if eta is None else round(eta, 1),
                     "heard_s_ago": round(max(0.0, now - float(info.get("at") or now)), 1),
                     "resumed_from": info.get("resumed_from")})
    return sorted(rows, key=lambda r: (r["trial"] is None, r["trial"] or 0, r["run"]))


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(r: dict[str, Any]) -> str:
    who = (f"trial {r['trial']}{' ' + r['role'] if r['role'] else ''} seed {r['seed']}" if r["trial"] is not None
           else r["run"])
    resumed = f", continued after {r['counts']} {r['resumed_from']}" if r.get("resumed_from") is not None else ""
    quiet = f", last heard {_duration(r['heard_s_ago'])} ago" if r.get("heard_s_ago", 0) > QUIET_S else ""
    return (f"{who}: {r['counts']} {r['step']} of {r['total']}, {_duration(r['elapsed_s'])} so far, "
            f"ETA {_duration(r['eta_s'])}{resumed}{quiet}")
