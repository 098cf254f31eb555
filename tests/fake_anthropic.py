"""A scripted stand-in for the Anthropic Messages API, for tests that use the real SDK.

    with FakeAnthropic() as api:
        api.tool_use({"title": "t", "rationale": "r", "edits": "..."})
        api.overloaded()
        client = anthropic.Anthropic(api_key="k", base_url=api.base_url)

Each POST /v1/messages takes the next scripted response from a queue (or calls `responder` when the
queue is empty; without one it answers 500 "nothing scripted"). Every request is recorded (`requests`:
path, lower-cased headers, parsed JSON body; `api_key` reads the key from whichever header the SDK
version uses) so tests can read the prompts and headers that arrived.
Responses have the real shape: a message with id, type, role, model, content blocks, stop_reason and
usage (including the cache token counts); errors are `{"type": "error", "error": {...}}` with the
status the API uses (429 rate_limit_error, 529 overloaded_error, 500 api_error) and a short
`retry-after-ms`, so the SDK's retries take milliseconds.

With `strict=True` (default) a request that the real API would refuse as malformed (a tool_use
without its tool_result in the next turn, a tool_result for an unknown id, a forced tool that is not
in `tools`) gets a 400 invalid_request_error, so conversation bugs show up in tests.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_USAGE = {"input_tokens": 1200, "output_tokens": 300, "cache_creation_input_tokens": 2000,
                 "cache_read_input_tokens": 0}


@dataclass
class Reply:
    """One scripted HTTP answer."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (to overlap concurrent requests)


@dataclass
class Request:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any

    @property
    def api_key(self) -> str | None:
        """The key as sent: `x-api-key` (SDK 0.x) or `authorization: Bearer` (newer SDKs)."""
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        auth = self.headers.get("authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None


class FakeAnthropic:
    """The scripted server; start it with `start()` or as a context manager."""

    def __init__(self, *, strict: bool = True, responder: Callable[[Request], Reply] | None = None):
        self.strict = strict
        self.responder = responder
        self.requests: list[Request] = []
        self.max_in_flight = 0
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeAnthropic:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed ACK

            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                fake._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="fake-anthropic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the server first"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- scripting -------------------------------------------------------------------------------

    def push(self, reply: Reply) -> FakeAnthropic:
        with self._lock:
            self._queue.append(reply)
        return self

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def message(self, content: list[dict], *, stop_reason: str = "end_turn", usage: dict | None = None,
                model: str | None = None, delay: float = 0.0) -> FakeAnthropic:
        """A 200 answer with these content blocks; `model` defaults to the requested one."""
        body = {"id": None, "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": None, "usage": dict(usage or DEFAULT_USAGE)}
        return self.push(Reply(200, body, delay=delay))

    def tool_use(self, input: Any, *, name: str = "submit_patch", text: str | None = None,
                 **kw: Any) -> FakeAnthropic:
        """An answer calling tool `name` with `input` (any JSON value: malformed inputs too)."""
        content = ([{"type": "text", "text": text}] if text else []) + [
            {"type": "tool_use", "id": None, "name": name, "input": input}]
        kw.setdefault("stop_reason", "tool_use")
        return self.message(content, **kw)

    def text(self, text: str, **kw: Any) -> FakeAnthropic:
        """An answer without any tool call."""
        return self.message([{"type": "text", "text": text}], **kw)

    def error(self, status: int, kind: str, message: str, *, headers: dict[str, str] | None = None,
              delay: float = 0.0) -> FakeAnthropic:
        body = {"type": "error", "error": {"type": kind, "message": message}}
        return self.push(Reply(status, body, dict(headers or {}), delay))

    def rate_limit(self, retry_after_ms: int = 10) -> FakeAnthropic:
        return self.error(429, "rate_limit_error", "Number of requests has exceeded your rate limit",
                          headers=_retry_after(retry_after_ms))

    def overloaded(self, retry_after_ms: int = 10) -> FakeAnthropic:
        return self.error(529, "overloaded_error", "Overloaded", headers=_retry_after(retry_after_ms))

    def server_error(self, status: int = 500, retry_after_ms: int = 10) -> FakeAnthropic:
        return self.error(status, "api_error", "Internal server error", headers=_retry_after(retry_after_ms))

    # -- inspection ------------------------------------------------------------------------------

    def bodies(self) -> list[dict]:
        with self._lock:
            return [r.body for r in self.requests]

    # -- serving ---------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("content-length") or 0))
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = raw.decode("utf-8", "replace")
        req = Request(h.path, {k.lower(): v for k, v in h.headers.items()}, body)
        with self._lock:
            self.requests.append(req)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            reply = self._reply(req)
            if reply.delay:
                time.sleep(reply.delay)
            data = json.dumps(reply.body).encode()
            h.send_response(reply.status)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.send_header("request-id", f"req_fake_{next(self._ids):04d}")
            for k, v in reply.headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _reply(self, req: Request) -> Reply:
        if req.path.split("?")[0] != "/v1/messages":
            return _err(404, "not_found_error", f"fake server: no route {req.path}")
        if self.strict:
            problem = _invalid(req.body)
            if problem:
                return _err(400, "invalid_request_error", problem)
        with self._lock:
            reply = self._queue.popleft() if self._queue else None
        if reply is None:
            if self.responder is None:
                return _err(500, "api_error", "fake server: nothing scripted for this request",
                            {"x-should-retry": "false"})
            reply = self.responder(req)
        if reply.status == 200 and isinstance(reply.body, dict) and reply.body.get("type") == "message":
            body = json.loads(json.dumps(reply.body))
            body["id"] = body["id"] or f"msg_fake_{next(self._ids):04d}"
            body["model"] = body["model"] or req.body.get("model")
            for block in body["content"]:
                if block.get("type") == "tool_use" and not block.get("id"):
                    block["id"] = f"toolu_fake_{next(self._ids):04d}"
            reply = Reply(200, body, reply.headers, reply.delay)
        return reply


def _retry_after(ms: int) -> dict[str, str]:
    return {"retry-after-ms": str(ms), "retry-after": f"{ms / 1000:g}"}


def _err(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"type": "error", "error": {"type": kind, "message": message}}, dict(headers or {}))


def _blocks(message: dict) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def _invalid(body: Any) -> str | None:
    """Why the real API would refuse this request body, or None (a subset of its checks)."""
    if not isinstance(body, dict):
        return "body: expected a JSON object"
    if not isinstance(body.get("model"), str) or not isinstance(body.get("max_tokens"), int):
        return "model (string) and max_tokens (integer) are required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    if messages[0].get("role") != "user":
        return "messages.0.role: the first message must use the user role"
    for i, m in enumerate(messages):
        if m.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: must be user or assistant"
        if not _blocks(m):
            return f"messages.{i}: all messages must have non-empty content"
        if i and m["role"] == messages[i - 1]["role"]:
            return f"messages.{i}: roles must alternate between user and assistant"
        uses = [b.get("id") for b in _blocks(m) if b.get("type") == "tool_use"]
        if uses:
            nxt = messages[i + 1] if i + 1 < len(messages) else None
            answered = {b.get("tool_use_id") for b in _blocks(nxt)} if nxt and nxt["role"] == "user" else set()
            missing = [str(u) for u in uses if u not in answered]
            if missing:
                return (f"messages.{i + 1}: tool_use ids were found without tool_result blocks immediately "
                        f"after: {', '.join(missing)}")
        results = [b.get("tool_use_id") for b in _blocks(m) if b.get("type") == "tool_result"]
        if results:
            prev = {b.get("id") for b in _blocks(messages[i - 1])} if i else set()
            unknown = [r for r in results if r not in prev]
            if unknown:
                return f"messages.{i}: unexpected tool_use_id in tool_result blocks: {', '.join(map(str, unknown))}"
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool":
        names = {t.get("name") for t in body.get("tools") or []}
        if choice.get("name") not in names:
            return f"tool_choice: tool {choice.get('name')!r} is not in tools"
    return None
