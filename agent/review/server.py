"""The review page's HTTP server: static files, a JSON API over the runs database, and reviews.

Security. It binds 127.0.0.1 unless told otherwise. Every /api/ request needs the token printed at
start-up in an `X-Review-Token` header: a header, not a cookie, so another site open in the same
browser cannot make the browser send it (no CSRF), and a page cannot read the API without it. The
token reaches the page in the URL's fragment (`#token=...`), which browsers never send to a server.
Requests whose Host is not this server's own name are refused too (DNS rebinding).

Writes. A POST asks for a review with `runs_db.reviews.request` and, when no search holds the
folder's writer lock, applies the queue itself; while a search runs, the search applies it.
"""

from __future__ import annotations

import hmac
import json
import mimetypes
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from runs_db import reviews as rv
from runs_db.db import RunsDB
from runs_db.study import jsonable
from search_space.errors import UserError

STATIC = Path(__file__).with_name("static")
TOKEN_HEADER = "X-Review-Token"
MAX_BODY = 64 * 1024


def plotly_js() -> Path:
    """plotly.js as the `plotly` package bundles it: served from here, never from a CDN."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise UserError(f"plotly.min.js is missing from the plotly package ({path}); reinstall plotly")
    return path


class ReviewServer:
    """Serve the review page for the search in `dir`; `start()` runs it in a thread, `stop()` ends it."""

    def __init__(self, dir: Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self.db = RunsDB.open(dir)  # raises FileNotFoundError for a folder without a search
        self.token = token or secrets.token_urlsafe(24)
        self.lock = threading.Lock()  # one request at a time touches the database (GitPython is not thread-safe)
        self.plotly = plotly_js()
        self.host = host
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{shown}:{self.port}/#token={self.token}"

    def start(self) -> ReviewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.2,), name="review", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever(0.2)

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()
        self.db.close()

    def __enter__(self) -> ReviewServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the API -----------------------------------------------------------------------------

    def get(self, path: str, query: dict[str, list[str]]) -> Any:
        from agent.review import views

        if path == "/api/trials":
            return views.table(self.db)
        if path.startswith("/api/candidate/"):
            against = (query.get("against") or ["parent"])[0]
            return views.candidate(self.db, path.rsplit("/", 1)[1], against)
        return None

    def post(self, path: str, body: dict[str, Any]) -> Any:
        if path != "/api/review":
            return None
        if not isinstance(body, dict) or not isinstance(body.get("commit"), str):
            raise UserError("commit: required")
        commit, decision, note = rv.check(self.db, body["commit"], body.get("decision", rv.KEEP),
                                          body.get("note", rv.KEEP))
        rv.request(self.db.dir, commit, decision, note)
        with rv.writer(self.db.dir) as held:
            if held:
                rv.apply_queued(self.db)
        review = rv.reviews(self.db).get(commit)
        return {"applied": held, "review": review.to_dict() if review else None,
                "message": "recorded" if held else "queued: the process holding this search's writer lock "
                                                   "(the running search) records it within a second"}


def _handler(server: ReviewServer) -> type[BaseHTTPRequestHandler]:
    # Bound to loopback, only loopback names may be asked for; bound wider, the token alone guards.
    loopback = server.host in ("127.0.0.1", "localhost", "::1")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: the terminal shows the URL, not every poll
            pass

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            url = urlparse(self.path)
            if not self._host_ok():
                return
            if url.path.startswith("/api/"):
                if self._authorised():
                    self._api(lambda: server.get(url.path, parse_qs(url.query)))
                return
            self._static(url.path)

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            if not self._host_ok() or not self._authorised():
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._json(413, {"error": f"request body over {MAX_BODY} bytes"})
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self._json(400, {"error": "the body is not JSON"})
            self._api(lambda: server.post(url.path, body))

        # -- helpers
        def _host_ok(self) -> bool:
            if not loopback or self.headers.get("Host") in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
                return True
            self._json(403, {"error": "unknown Host header"})
            return False

        def _authorised(self) -> bool:
            given = self.headers.get(TOKEN_HEADER) or ""
            if hmac.compare_digest(given.encode(), server.token.encode()):
                return True
            self._json(403, {"error": f"missing or wrong {TOKEN_HEADER} header: open the URL printed at start-up"})
            return False

        def _api(self, fn) -> None:
            try:
                with server.lock:
                    data = fn()
            except UserError as e:
                return self._json(400, {"error": str(e)})
            except Exception as e:  # a bad commit in the URL, mostly; the page shows the line
                from runs_db.history import HistoryError

                if isinstance(e, HistoryError):
                    return self._json(404, {"error": str(e)})
                raise
            if data is None:
                return self._json(404, {"error": f"no such endpoint: {self.path}"})
            self._json(200, data)

        def _static(self, path: str) -> None:
            if path == "/favicon.ico":
                return self._send(204, b"", "image/x-icon", cache="max-age=86400")
            if path == "/pygments.css":
                from agent.review.diffview import css

                return self._send(200, css().encode(), "text/css", cache="max-age=3600")
            if path in ("/", "/index.html"):
                file = STATIC / "index.html"
            elif path == "/plotly.min.js":
                file = server.plotly
            else:
                name = path.lstrip("/")
                file = STATIC / name
                if "/" in name or not file.is_file():
                    return self._json(404, {"error": f"not found: {path}"})
            data = file.read_bytes()
            self._send(200, data, mimetypes.guess_type(file.name)[0] or "application/octet-stream",
                       cache="max-age=3600" if file == server.plotly else "no-cache")

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(jsonable(data)).encode(), "application/json", cache="no-store")

        def _send(self, status: int, data: bytes, ctype: str, cache: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype + ("; charset=utf-8" if ctype.startswith(("text/", "application/j"))
                                                      else ""))
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", cache)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                             "img-src 'self' data:; frame-ancestors 'none'")
            self.end_headers()
            self.wfile.write(data)

    return Handler
