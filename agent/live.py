"""The live table of a search: trial, title, proposer, status, loss, speed-up, best so far."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any

from rich.console import Console, Group
from rich.live import Live as RichLive
from rich.table import Table
from rich.text import Text

ROWS = 18
STYLE = {"ok": "green", "failed": "red", "invalid": "magenta", "timeout": "red", "pruned": "yellow",
         "running": "cyan"}


def fmt_speedup(x: float | None) -> str:
    return f"{x:.3f}x" if x else "-"


class Live:
    def __init__(self, enabled: bool = True, console: Console | None = None, title: str = "speedsearch"):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.title = title
        self.rows: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.notes: list[str] = []
        self.best_text = "-"
        self.header = ""
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

    def started(self, number: int, p) -> None:
        self.rows[number] = {"title": p.title, "proposer": p.proposer, "rung": p.rung, "status": "running",
                             "loss": None, "speedup": None}

    def finished(self, number: int, p, status: str, value: float | None, speedup: float, loss: float | None) -> None:
        row = self.rows.setdefault(number, {"title": p.title, "proposer": p.proposer, "rung": p.rung})
        row.update(status=status, loss=loss, speedup=speedup if p.rung != "smoke" else None)
        self._line(f"trial {number:>4} {p.rung:<7} {status:<8} {p.proposer:<8} "
                   f"loss {loss if loss is not None else float('nan'):.4f} speedup {fmt_speedup(row['speedup'])}  "
                   f"{p.title[:70]}")

    def best(self, summary) -> None:
        self.best_text = f"{summary.best_speedup:.3f}x at {summary.best_rung}: {summary.best_title[:60]}"
        self._line(f"best so far: {self.best_text}")

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
                       f"{len(search.inflight)}/{search.capacity} | proposing {len(search.futures)} | "
                       f"queued {len(search.queue)} | LLM ${s.dollars:.2f}")
        self._live.update(self.render())

    def render(self) -> Group:
        table = Table(title=self.title, expand=False)
        for col in ("trial", "rung", "title", "proposer", "status", "loss", "speed-up"):
            table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=56 if col == "title" else None)
        for number, row in list(self.rows.items())[-ROWS:]:
            loss = row.get("loss")
            table.add_row(str(number), row["rung"], row["title"], row["proposer"],
                          Text(row["status"], style=STYLE.get(row["status"], "")),
                          f"{loss:.4f}" if loss is not None and math.isfinite(loss) else "-",
                          fmt_speedup(row.get("speedup")))
        return Group(Text(self.header), table, Text(f"best so far: {self.best_text}", style="bold"),
                     *[Text(n, style="dim") for n in self.notes])
