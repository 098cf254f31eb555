"""A container's output, read through an attach socket, cut into lines, capped in bytes.

Why attach and not `docker logs --follow`: the log driver then is "none", so Docker keeps no copy of
its own (a json-file log of a flooding run grew to 5 GB beside ours), and the socket can be polled
with a timeout, so the reader never blocks past a kill: once the run is stopped, nothing more is read.
Attaching before the container starts (as `docker run` does) loses no early line.
"""

from __future__ import annotations

import select
import socket
import struct
from typing import BinaryIO

from env.sandbox import LineCallback

ATTACH_PARAMS = {"stdout": 1, "stderr": 1, "stream": 1, "logs": 0}
_HEADER = struct.Struct(">BxxxL")  # stream id (1 stdout, 2 stderr), 3 pad bytes, payload size


class AttachStream:
    """The multiplexed stdout/stderr stream of one container (not a tty), as raw payload bytes."""

    def __init__(self, client, container_id: str):
        # A socket.SocketIO over the daemon's hijacked connection; keep it referenced (it owns the fd).
        self._raw = client.api.attach_socket(container_id, params=ATTACH_PARAMS)
        self.sock: socket.socket = getattr(self._raw, "_sock", self._raw)
        self._buf = bytearray()
        self.eof = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[bytes]:
        """One recv (call it when poll says readable): the whole payloads it completed."""
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return []
        self._buf += data
        out, at = [], 0
        while len(self._buf) - at >= _HEADER.size:
            _, size = _HEADER.unpack_from(self._buf, at)
            if len(self._buf) - at - _HEADER.size < size:
                break
            out.append(bytes(self._buf[at + _HEADER.size:at + _HEADER.size + size]))
            at += _HEADER.size + size
        del self._buf[:at]
        return out

    def readable(self, timeout_s: float) -> bool:
        if self.eof:
            return False
        return bool(select.select([self.sock], [], [], timeout_s)[0])

    def close(self) -> None:
        """Stop reading for good; the daemon sees the attach go and drops what the run writes next."""
        self.eof = True
        for step in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close, self._raw.close):
            try:
                step()
            except OSError:
                pass


class LineSink:
    """Writes payloads to the log and hands whole lines to `on_line` (Docker hands out chunks, not
    lines; a line longer than `max_line` reaches it in pieces). Keeps at most `cap_bytes` of log:
    `feed` returns "log" once the cap is passed and "stopped" when on_line asks to stop. The log gets
    each payload in one write (a flooding run costs a few syscalls per 64 KB, not per line)."""

    def __init__(self, log: BinaryIO, on_line: LineCallback | None, cap_bytes: int, max_line: int):
        self.log, self.on_line = log, on_line
        self.cap_bytes, self.max_line = cap_bytes, max_line
        self.written = 0
        self._pending = b""
        self.stop = on_line is None  # set by the caller once the run is being killed: no more on_line calls

    def feed(self, payload: bytes) -> str | None:
        room = self.cap_bytes - self.written
        over = len(payload) > room
        if over:
            payload = payload[:max(room, 0)]
        self.written += len(payload)
        self.log.write(payload)
        self.log.flush()
        verdict = self._lines(payload)
        return "log" if over else verdict

    def _lines(self, payload: bytes) -> str | None:
        if self.stop:
            return None
        data, start = self._pending + payload, 0
        while not self.stop:
            cut = data.find(b"\n", start, start + self.max_line)
            if cut >= 0:
                end = cut + 1
            elif len(data) - start >= self.max_line:
                end = start + self.max_line
            else:
                break
            self._call(data[start:end])
            start = end
        self._pending = data[start:] if not self.stop else b""
        return "stopped" if self.stop else None

    def flush(self) -> str | None:
        """The last, unterminated line (at the end of the run)."""
        pending, self._pending = self._pending, b""
        if pending and not self.stop:
            self._call(pending)
            return "stopped" if self.stop else None
        return None

    def _call(self, raw: bytes) -> None:
        assert self.on_line is not None
        if self.on_line(raw.decode("utf-8", "replace").rstrip("\r\n")):
            self.stop = True
