"""Small helpers shared by the benches: order statistics, timing and a rich table of figures."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics (numpy's default); nan if empty."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float) -> str:
    """Seconds as milliseconds for a table cell."""
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def verdict(value: float, goal: float) -> str:
    """PASS when `value` is below `goal` (both in seconds)."""
    if math.isnan(value):
        return "[yellow]n/a[/]"
    return "[bold green]PASS[/]" if value < goal else "[bold red]FAIL[/]"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "",
                console: Console | None = None) -> None:
    """A rich table; the first column left-aligned, the others right-aligned. A row of None is a separator."""
    table = Table(title=title, caption=caption or None, caption_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        if row is None:
            table.add_section()
        else:
            table.add_row(*row)
    if console is None:
        console = Console()
        if console.width < 120:  # piped or a narrow terminal: keep the figures readable, not elided
            console = Console(width=120)
    console.print(table)
