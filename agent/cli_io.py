"""What every `speedsearch` command shares: the Typer app, error handling and `--json` output.

A command body runs inside `guard(as_json)`: a user's mistake (UserError and the typed errors of
the layers below) becomes one line on stderr, or `{"error": ...}` on stdout with `--json`, and exit
code 2; Ctrl-C exits 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from search_space.errors import UserError


class App(typer.Typer):
    """The Typer app, whose usage errors (a missing option, `--seed x`) are one line too: Click's
    own are a boxed usage text. Run as a program (`speedsearch`, `python -m agent`) it exits with
    2 for a usage error, 130 for Ctrl-C. Typer's CliRunner calls the command itself and keeps
    Click's format."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "standalone_mode" in kwargs:
            return super().__call__(*args, **kwargs)
        # Typer carries its own copy of Click: its exception classes, not the `click` package's.
        from typer._click.exceptions import ClickException, NoArgsIsHelpError

        as_json = "--json" in sys.argv[1:]
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as e:
            e.show()
            code = 2
        except ClickException as e:
            try:
                fail(e.format_message(), as_json, e.exit_code)
            except typer.Exit as done:
                code = done.exit_code
        except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a command's guard
            console.print("interrupted")
            code = 130
        sys.exit(code if isinstance(code, int) else 0)


app = App(add_completion=False, no_args_is_help=True, help="An autonomous search for faster training runs.")
console = Console(stderr=True)  # progress, messages, errors
out = Console()  # results


# The typed errors of the layers below that mean "the user asked for something wrong", by module.
# Only modules already imported are looked at: an exception of a module never loaded was never
# raised, and loading one (the anthropic SDK takes seconds) to print an error would be slow.
USER_ERRORS = (
    ("agent.proposers.llm", "LLMConfigError"), ("env.data", "DataError"), ("runs_db.db", "SearchExistsError"),
    ("runs_db.export", "ExportError"), ("runs_db.history", "HistoryError"), ("runs_db.study", "SchemaError"),
    ("runs_db.study", "StudyError"), ("search_space.edits", "EditError"), ("search_space.target", "TargetError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean 'the user asked for something wrong'."""
    found = [getattr(sys.modules[m], name, None) for m, name in USER_ERRORS if m in sys.modules]
    return (UserError, FileExistsError, FileNotFoundError, NotADirectoryError,
            *(e for e in found if isinstance(e, type) and issubclass(e, BaseException)))


def fail(message: str, as_json: bool = False, code: int = 2) -> None:
    """Print one line (or one JSON object) and exit with `code`."""
    line = " ".join(str(message).split())  # one line, whatever the exception held
    if as_json:
        json.dump({"error": line, "exit_code": code}, sys.stdout)
        sys.stdout.write("\n")
    else:
        console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True, emoji=False)
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


class Caught:
    """The first SIGINT or SIGTERM that arrived inside `signals_cancel`, if any."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextmanager
def signals_cancel(cancel: threading.Event) -> Iterator[Caught]:
    """SIGINT and SIGTERM set `cancel` instead of ending the process, so the command can end its
    run (the sandbox kills it), print what happened and exit 128 + the signal. A second signal
    raises KeyboardInterrupt (an impatient user is not kept waiting). Main thread only; the
    previous handlers come back after."""
    caught = Caught()

    def on_signal(signum: int, _frame: object) -> None:
        if caught.signum is not None:  # a second one: stop waiting for the run's end (exit 130)
            raise KeyboardInterrupt
        caught.signum = signum
        cancel.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
