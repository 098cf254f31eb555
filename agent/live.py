"""The live table of a search: trial, title, proposer, status, loss, speed-up, best confirmed so far.

The speed-up column is the one speed-up's own words (`Speedup.text()`, e.g. "time to loss 2.466:
1.98x [1.85, 2.10] vs base, 6 pairs"); single-seed rungs say so. Only a confirmed candidate is
ever called "best".
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any

from rich.console import Console, Group
from rich.live import Live as RichLive
from rich.table import Table
from rich.text import Text

from env.run_progress import progress_line, progress_rows

ROWS = 18
STYLE = {"ok pass": "bold green", "ok": "green", "failed": "red", "invalid": "magenta", "timeout": "red",
         "pruned": "yellow", "running": "cyan"}


def fmt_speedup(text: str | None) -> str:
    return text or "-"


class Live:
    def __init__(self, enabled: bool = True, console: Console | None = None, title: str = "speedsearch"):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.title = title
        self.rows: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.notes: list[str] = []
        self.best_text = "nothing confirmed yet"
        self.header = ""
        self.progress: list[str] = []
        self._live: RichLive | None = None
        self._last = 0.0

    def __enter__(self) -> Live:
        if self.enabled and self.console.is_terminal:
            self._live = RichLive(self.render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(*exc)
            self._live = None

    def _line(self, text: str) -> None:
        if self.enabled and self._live is None:
            self.console.print(text, highlight=False, soft_wrap=True)

    def started(self, number: int, t) -> None:
        """`t` is an agent.trial.Trial at the rung it starts."""
        self.rows[number] = {"title": t.title, "proposer": str(t.who), "rung": str(t.rung), "status": "running",
                             "loss": None, "speedup": None}

    def finished(self, number: int, t, status: str, loss: float | None, speedup: str) -> None:
        row = self.rows.setdefault(number, {"title": t.title, "proposer": str(t.who), "rung": str(t.rung)})
        if t.verdict and t.verdict != "more":
            status = f"{status} {t.verdict}" if status == "ok" else status
        row.update(status=status, loss=loss, speedup=speedup or None)
        self._line(f"trial {number:>4} {row['rung']:<7} {status:<8} {row['proposer']:<8} "
                   f"loss {loss if loss is not None else float('nan'):.4f}  {fmt_speedup(row['speedup'])}  "
                   f"{t.title[:70]}")

    def best(self, summary) -> None:
        self.best_text = f"{summary.best_title[:60]}: {summary.best_text} (confirmed)"
        self._line(f"best confirmed so far: {self.best_text}")

    def note(self, text: str) -> None:
        self.notes = (self.notes + [text])[-3:]
        self._line(text)

    def tick(self, search) -> None:
        now = time.time()
        if self._live is None or now - self._last < 0.25:
            return
        self._last = now
        s = search.summary
        self.header = (f"{(now - search.started) / 60:5.1f} min | trials {s.trials} | running "
                       f"{len(search.inflight)}/{search.capacity} | proposing {len(search.ahead.futures)} | "
                       f"queued {len(search.queue)} | LLM ${s.dollars:.2f}")
        db = getattr(search, "db", None)  # long runs: epoch k of n and an ETA (env/run_progress.py)
        self.progress = [progress_line(r) for r in progress_rows(db.dir)] if db is not None else []
        lost = getattr(search, "faults", None)
        if lost is not None and lost.state["runs"]:  # runs lost with their node: sent again, not failures
            self.header += f" | lost runs {lost.state['runs']} (sent again)"
        self._live.update(self.render())

    def render(self) -> Group:
        table = Table(title=self.title, expand=False)
        for col in ("trial", "rung", "title", "proposer", "status", "loss", "speed-up"):
            table.add_column(col, overflow="ellipsis", no_wrap=True, max_width={"title": 48, "speed-up": 60}.get(col))
        for number, row in list(self.rows.items())[-ROWS:]:
            loss = row.get("loss")
            table.add_row(str(number), row["rung"], row["title"], row["proposer"],
                          Text(row["status"], style=STYLE.get(row["status"], STYLE.get(row["status"].split()[0], ""))),
                          f"{loss:.4f}" if loss is not None and math.isfinite(loss) else "-",
                          fmt_speedup(row.get("speedup")))
        return Group(Text(self.header), table, *[Text(p) for p in self.progress],
                     Text(f"best confirmed: {self.best_text}", style="bold"),
                     *[Text(n, style="dim") for n in self.notes])
