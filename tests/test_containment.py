"""The hostile suite: a run attacks its sandbox, one test per class, through `speedsearch evaluate`.

Each test runs the real command line (`python -m agent evaluate --json`) on a hostile target
(tests/hostile.py) with a canary secret in the caller's environment, and checks that:
- the attack ran (its marker line is in the run's log);
- the caller survived and answered within the run's timeout + 30 s;
- the status is not `ok` and the reason names the cause;
- no process of the run survives (every one carries the target's tag in its command line);
- nothing outside the workspace changed: a canary file in /tmp, a sentinel study.db, the shared data
  folder (checksums), and a listener on this machine recorded no connection;
- the canary secret appears in no output, log or result.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from env.process_sandbox import containment_support
from tests.hostile import attack_patch, make_hostile, tree_digest

TIMEOUT_S = 15.0
SANDBOXES = ["process", pytest.param("docker", marks=pytest.mark.docker)]


class Listener:
    """A TCP server on every local address that records each connection it accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections: list[tuple[str, int]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, addr = self.sock.accept()
            except OSError:
                continue
            self.connections.append(addr)
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()


def host_address() -> str:
    """This machine's address on its default route (not loopback), where one exists."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


@dataclass
class World:
    """Everything outside the run's workspace that a test watches."""

    tmp: Path
    tag: str
    secret: str
    data: Path
    canary: Path  # a file in the machine's /tmp
    study: Path  # a sentinel study.db of "another search"
    listener: Listener
    sandbox: str

    def digests(self) -> dict[str, str]:
        return {str(p): tree_digest(p) for p in (self.data, self.canary, self.study)}

    def evaluate(self, attack: str, arg: str = "") -> tuple[dict, float]:
        target = make_hostile(self.tmp / "target", self.data, self.tag, timeout_s=TIMEOUT_S)
        patch = self.tmp / f"{attack}.patch"
        patch.write_text(attack_patch(attack, arg))
        env = {**os.environ, "SPEEDSEARCH_CANARY": self.secret, "ANTHROPIC_API_KEY": self.secret}
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "agent", "evaluate", "--target", str(target.source), "--patch", str(patch),
             "--fidelity", "short", "--sandbox", self.sandbox, "--run-root", str(self.tmp / "runs"), "--json"],
            capture_output=True, text=True, env=env, timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr[-3000:]  # the caller survived and answered
        assert self.secret not in proc.stdout + proc.stderr
        return json.loads(proc.stdout), elapsed


def survivors(tag: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if tag.encode() in cmd:
                shown = cmd.replace(b"\0", b" ")[:200].decode(errors="replace")
                found.append(f"{entry.name}: {shown}")
    return found


@pytest.fixture(params=SANDBOXES)
def world(request, tmp_path):
    if request.param == "docker":
        request.getfixturevalue("dockerd")
    else:
        # Never let an attack loose where the sandbox would run it uncontained (as root, beside
        # everything else on the machine): that is a failure to report, not a test to run.
        support = containment_support()
        if any(value.startswith("none") for value in support.values()):
            pytest.fail(f"the process sandbox is not fully contained here: {support}", pytrace=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "shard.bin").write_bytes(bytes(range(256)) * 64)
    # Writable by anyone: only the read-only mount may stop the run from writing here.
    data.chmod(0o777)
    (data / "shard.bin").chmod(0o666)
    canary = Path("/tmp") / f"speedsearch-canary-{uuid.uuid4().hex[:8]}"
    canary.write_text("canary\n")
    study = tmp_path / "other-search" / "study.db"
    study.parent.mkdir()
    study.write_bytes(b"SQLite format 3\0" + b"\1" * 4080)
    listener = Listener()
    w = World(tmp_path, f"tag{uuid.uuid4().hex[:12]}", f"CANARY-{uuid.uuid4().hex}", data, canary, study,
              listener, request.param)
    before = w.digests()
    try:
        yield w
        # Outside the workspace nothing changed, nothing connected, nothing of the run survives.
        assert w.digests() == before
        assert listener.connections == []
        deadline = time.monotonic() + 5
        while survivors(w.tag) and time.monotonic() < deadline:  # a killed process may still be exiting
            time.sleep(0.05)
        assert survivors(w.tag) == []
        for path in (tmp_path / "runs").rglob("*"):
            if path.is_file():
                assert w.secret.encode() not in path.read_bytes(), path
    finally:
        listener.close()
        canary.unlink(missing_ok=True)


def check(w: World, result: dict, elapsed: float, attack: str, *reason_words: str) -> str:
    """The checks every attack shares; returns the run's log."""
    log = Path(result["log"]).read_text(errors="replace")
    assert f"ATTACK {attack}" in log, log[-2000:]  # the attack ran
    assert elapsed < TIMEOUT_S + 30
    assert result["status"] != "ok", result
    reason = result["reason"].lower()
    assert any(word.lower() in reason for word in reason_words), result["reason"][-2000:]
    assert w.secret not in log
    return log


def test_network_to_this_machine(world):
    arg = f"127.0.0.1:{world.listener.port},{host_address()}:{world.listener.port}"
    result, elapsed = world.evaluate("network", arg)
    log = check(world, result, elapsed, "network", "exit code")
    assert "no connection to 127.0.0.1" in log


def test_secrets_from_environment_and_proc(world):
    result, elapsed = world.evaluate("secrets")
    check(world, result, elapsed, "secrets", "no secret in the environment")


@pytest.mark.parametrize("stdio", ["stdio", "nostdio"])
def test_double_fork_daemon(world, stdio):
    result, elapsed = world.evaluate(f"daemon-{stdio}")
    check(world, result, elapsed, f"daemon-{stdio}", "incomplete", "expected", "steps")


def test_kill_the_parent_and_ancestors(world):
    result, elapsed = world.evaluate("kill-ancestors")
    check(world, result, elapsed, "kill-ancestors", "exit code")


def test_writes_outside_the_workspace(world):
    result, elapsed = world.evaluate("write-outside", f"{world.canary},{world.study}")
    log = check(world, result, elapsed, "write-outside", "exit code")
    assert "blocked" in log


def test_writes_to_the_shared_data(world):
    result, elapsed = world.evaluate("write-data")
    check(world, result, elapsed, "write-data", "read-only file system")


def test_log_flood(world):
    result, elapsed = world.evaluate("log-flood")
    check(world, result, elapsed, "log-flood", "log over 4 MB")
    assert result["status"] == "invalid"
    assert Path(result["log"]).stat().st_size <= 4 << 20


def test_disk_fill(world):
    result, elapsed = world.evaluate("disk-fill")
    check(world, result, elapsed, "disk-fill", "disk quota")
    assert result["status"] == "failed"


def test_fork_bomb(world):
    result, elapsed = world.evaluate("fork-bomb")
    check(world, result, elapsed, "fork-bomb", "pids", "timeout", "time limit")


def test_memory_hog(world):
    result, elapsed = world.evaluate("memory-hog")
    check(world, result, elapsed, "memory-hog", "out of memory")
    assert result["status"] == "failed"


def test_hang_ignoring_sigterm(world):
    result, elapsed = world.evaluate("hang")
    check(world, result, elapsed, "hang", "time limit")
    assert result["status"] == "timeout"
