"""Start-up of a run in the process sandbox, cold and from a warm slot (env/warm.py), side by side.

    python -m bench.warm_start [--runs 12] [--sleep 0.25]

Each run is `python probe.py`, a script that prints the time, sleeps, prints again. Cold and warm runs
alternate, one sandbox each, with a pause between runs long enough for the next warm slot to be ready
(as it is when the run before trains for longer than a start-up). Reported per mode, medians:
- start: from `run()` being called to the script's first line (its own clock);
- end: from the script's last line to `run()` returning, plus `release` (unmount, delete);
- overhead: everything but the sleep.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from env.process_sandbox import ProcessSandbox
from env.sandbox import Limits, SandboxRequest

PROBE = ("import sys, time\nprint('t0', time.time(), flush=True)\ntime.sleep({sleep})\n"
         "print('t1', time.time(), flush=True)\n")


def one(box: ProcessSandbox, root: Path, name: str, sleep: float) -> dict[str, float]:
    work = root / name / "work"
    work.mkdir(parents=True)
    (work / "probe.py").write_text(PROBE.format(sleep=sleep))
    seen: dict[str, float] = {}

    def on_line(line: str) -> bool:
        if line.startswith(("t0 ", "t1 ")):
            seen[line[:2]] = float(line.split()[1])
        return False

    t0 = time.time()
    out = box.run(SandboxRequest("python3 probe.py", work, root / name / "run.log", limits=Limits(timeout_s=60),
                                 warm=True), on_line)
    t_ret = time.time()
    box.release(work)
    t_rel = time.time()
    assert out.exit_code == 0 and "t1" in seen, (out, (root / name / "run.log").read_text())
    return {"start": seen["t0"] - t0, "end": t_rel - seen["t1"], "overhead": t_rel - t0 - sleep,
            "warm": float(out.containment.get("start") == "warm slot"), "return": t_ret - seen["t1"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--sleep", type=float, default=0.25)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-warm-", dir=Path.home() / ".cache"))
    boxes = {"cold": ProcessSandbox(warm=False), "warm": ProcessSandbox(warm=True)}
    got: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for i in range(args.runs + 1):  # the first warm-mode run starts cold: it is left out
        for mode, box in boxes.items():
            r = one(box, root / mode, f"r{i}", args.sleep)
            if i:
                got[mode].append(r)
            time.sleep(0.5)
    boxes["warm"].close()
    table = Table(title=f"run start-up in the process sandbox, {args.runs} runs each, alternating (medians)")
    for col in ("mode", "served warm", "start ms", "end + release ms", "overhead ms"):
        table.add_column(col, justify="right")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in got.items()}
    for mode, rs in got.items():
        table.add_row(mode, f"{sum(r['warm'] for r in rs):.0f}/{len(rs)}", f"{1000 * med[mode]['start']:.1f}",
                      f"{1000 * med[mode]['end']:.1f}", f"{1000 * med[mode]['overhead']:.1f}")
    Console().print(table)
    ratio = med["warm"]["overhead"] / med["cold"]["overhead"]
    Console().print(f"warm overhead / cold overhead: {ratio:.2f} (goal <= 0.5: {'PASS' if ratio <= 0.5 else 'FAIL'})")


if __name__ == "__main__":
    main()
