"""`speedsearch review`: the review page for a search, served locally until Ctrl-C."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from agent.cli_io import app, console, emit, guard
from search_space.errors import UserError


@app.command()
def review(
    dir: Path = typer.Option(Path("searches/default"), "--dir", help="the search's folder"),
    port: int = typer.Option(8765, help="the port to serve on (0: any free port)"),
    host: str = typer.Option("127.0.0.1", help="the address to bind (default: this machine only)"),
    as_json: bool = typer.Option(False, "--json", help="print the URL and token as one JSON object"),
) -> None:
    """Serve the review page: trials, diffs, curves, and approve / reject / notes (needs the printed token)."""
    with guard(as_json):
        if not (dir / "search.toml").is_file():
            raise UserError(f"--dir {dir}: holds no search (no search.toml)")
        if not 0 <= port <= 65535:
            raise UserError(f"--port {port}: use 0 to 65535")
        from agent.review.server import ReviewServer

        try:
            server = ReviewServer(dir, host=host, port=port)
        except OSError as e:  # the port is taken, or the address is not this machine's
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
        info = {"url": server.url, "token": server.token, "host": server.host, "port": server.port,
                "dir": str(server.db.dir)}

        def render(d: dict) -> None:
            console.print(f"review page for {d['dir']}:\n  {d['url']}\n"
                          "approve, reject and notes need the token in that URL; Ctrl-C stops the server",
                          highlight=False, soft_wrap=True)
            if host not in ("127.0.0.1", "localhost", "::1"):
                console.print(f"[yellow]note:[/yellow] bound to {host}: anyone who can reach it and holds the token "
                              "can read the search and review it", soft_wrap=True)

        emit(info, as_json, render)
        sys.stdout.flush()  # a caller reading the URL from a pipe gets it now, not at exit
        try:
            server.serve_forever()
        finally:
            server.stop()
