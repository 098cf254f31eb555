"""What every `speedsearch` command shares: the Typer app, error handling and `--json` output.

A command body runs inside `guard(as_json)`: a user's mistake (UserError and the typed errors of
the layers below) becomes one line on stderr, or `{"error": ...}` on stdout with `--json`, and exit
code 2; Ctrl-C exits 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from search_space.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="An autonomous search for faster training runs.")
console = Console(stderr=True)  # progress, messages, errors
out = Console()  # results


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean 'the user asked for something wrong', imported late (they live below)."""
    from agent.proposers.llm import LLMConfigError
    from env.data import DataError
    from runs_db.db import SearchExistsError
    from runs_db.export import ExportError
    from runs_db.history import HistoryError
    from runs_db.study import SchemaError, StudyError
    from search_space.edits import EditError
    from search_space.target import TargetError

    return (UserError, TargetError, ExportError, SchemaError, StudyError, SearchExistsError, LLMConfigError,
            HistoryError, EditError, DataError, FileExistsError, FileNotFoundError, NotADirectoryError)


def fail(message: str, as_json: bool = False, code: int = 2) -> None:
    """Print one line (or one JSON object) and exit with `code`."""
    line = " ".join(str(message).split())  # one line, whatever the exception held
    if as_json:
        json.dump({"error": line, "exit_code": code}, sys.stdout)
        sys.stdout.write("\n")
    else:
        console.print(f"[red]error:[/red] {line}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def guard(as_json: bool = False) -> Iterator[None]:
    """Run a command body: user errors become one line and exit 2, Ctrl-C exits 130."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        if as_json:
            json.dump({"error": "interrupted", "exit_code": 130}, sys.stdout)
            sys.stdout.write("\n")
        else:
            console.print("interrupted")
        raise typer.Exit(130) from None
    except user_errors() as e:
        fail(str(e), as_json)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """A command's result: one JSON object on stdout with `--json`, else `render(data)` for people."""
    if as_json:
        from runs_db.study import jsonable

        json.dump(jsonable(data), sys.stdout)
        sys.stdout.write("\n")
    else:
        render(data)
