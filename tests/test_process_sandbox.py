"""ProcessSandbox with real processes: capture, environment, limits, and kills that leave nothing."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from env.process_sandbox import ProcessSandbox, cpu_time_limit_s
from env.sandbox import Limits, SandboxRequest


@pytest.fixture
def sandbox():
    return ProcessSandbox(grace_s=0.3)


def request_for(tmp_path: Path, command: str, **kw) -> SandboxRequest:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return SandboxRequest(command=command, workdir=workdir, log_path=tmp_path / "run.log", **kw)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting for its parent
    except psutil.NoSuchProcess:
        return True


def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def test_exit_code_log_and_lines(sandbox, tmp_path):
    lines = []
    out = sandbox.run(request_for(tmp_path, "echo out; echo err >&2; printf 'no newline'; exit 3"),
                      on_line=lines.append)
    assert out.exit_code == 3 and out.killed is None
    assert lines == ["out", "err", "no newline"]
    assert (tmp_path / "run.log").read_text() == "out\nerr\nno newline"
    assert 0 < out.wall_s < 5


def test_trivial_command_is_cheap(sandbox, tmp_path):
    sandbox.run(request_for(tmp_path, "true"))
    walls = sorted(sandbox.run(request_for(tmp_path, "true")).wall_s for _ in range(5))
    assert walls[2] < 0.1


def test_environment_is_an_allow_list(sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret-123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-456")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    cache = tmp_path / "cache"
    req = request_for(tmp_path, "env; python -c 'import sys; print(\"EXE=\" + sys.executable)'",
                      env={"MY_KNOB": "7"}, cache_dir=cache, limits=Limits(cpus=3, gpu_ids=("1", "3")))
    out = sandbox.run(req)
    log = (tmp_path / "run.log").read_text()
    assert out.exit_code == 0, log
    assert "secret" not in log
    env = dict(line.split("=", 1) for line in log.splitlines() if "=" in line)
    assert Path(env["EXE"]).parent == Path(sys.executable).parent  # python or python3: the same interpreter folder
    assert env["PATH"].split(":")[0] == os.path.dirname(sys.executable)
    assert env["HOME"].startswith(str(req.workdir)) and env["TMPDIR"].startswith(str(req.workdir))
    assert env["MY_KNOB"] == "7" and env["NCCL_NVLS_ENABLE"] == "0"
    assert env["OMP_NUM_THREADS"] == "3" and env["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor")
    assert env["TORCHINDUCTOR_COMPILE_THREADS"] == "3"
    allowed = {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "TORCHINDUCTOR_COMPILE_THREADS",
               "CUDA_VISIBLE_DEVICES", "PYTHONUNBUFFERED", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
               "NCCL_NVLS_ENABLE", "MY_KNOB", "EXE", "PWD", "SHLVL", "_"}
    assert set(env) <= allowed


def test_no_gpu_ids_means_no_gpu(sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    sandbox.run(request_for(tmp_path, 'echo "[$CUDA_VISIBLE_DEVICES]"'))
    assert (tmp_path / "run.log").read_text() == "[]\n"


def test_rlimits(sandbox, tmp_path):
    limits = Limits(timeout_s=100, cpus=2)
    sandbox.run(request_for(tmp_path, "cat /proc/self/limits", limits=limits))
    rows = {line[:26].strip(): line[26:].split() for line in (tmp_path / "run.log").read_text().splitlines()}
    assert rows["Max core file size"][:2] == ["0", "0"]
    assert rows["Max cpu time"][:2] == [str(cpu_time_limit_s(limits))] * 2
    assert rows["Max address space"][0] == "unlimited"  # an address-space limit breaks CUDA


def test_timeout_kills_the_whole_tree(sandbox, tmp_path):
    # A grandchild that ignores SIGTERM, and one that left the session (setsid), ignores SIGTERM and
    # was orphaned when its parent exited (so it is neither in the group nor below the leader).
    orphan = ("import os, signal, time\n"
              "if os.fork() == 0:\n"
              "    os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "    open('g2.pid', 'w').write(str(os.getpid())); time.sleep(100)\n"
              "time.sleep(0.5)\n")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "orphan.py").write_text(orphan)
    command = (
        "sh -c 'trap \"\" TERM; echo $$ > g1.pid; while true; do sleep 0.05; done' & "
        "python orphan.py & echo $$ > leader.pid; sleep 100"
    )
    req = request_for(tmp_path, command, limits=Limits(timeout_s=1.5))
    t0 = time.monotonic()
    out = sandbox.run(req)
    assert out.killed == "timeout" and out.exit_code is None
    assert "1.5 s" in out.detail
    assert time.monotonic() - t0 < 5
    pids = [int(wait_for_file(req.workdir / name, 0.1)) for name in ("g1.pid", "g2.pid", "leader.pid")]
    assert all(gone(pid) for pid in pids), [(p, gone(p)) for p in pids]


def test_normal_exit_kills_leftovers(sandbox, tmp_path):
    req = request_for(tmp_path, "sleep 100 & echo $! > bg.pid; echo done")
    out = sandbox.run(req)
    assert out.exit_code == 0 and out.killed is None
    assert out.wall_s < 2  # the background sleep held the pipe; it was killed, not waited for
    assert gone(int((req.workdir / "bg.pid").read_text()))


def test_memory_limit(sandbox, tmp_path):
    command = "python -c 'import time; b = b\"x\" * (400 * 2**20); time.sleep(30)'"
    out = sandbox.run(request_for(tmp_path, command, limits=Limits(memory_mb=200, timeout_s=30)))
    assert out.killed == "memory" and out.exit_code is None
    assert "memory limit 200 MB" in out.detail
    assert out.peak_rss_mb > 200
    assert out.wall_s < 10


def test_on_line_stops_the_run(sandbox, tmp_path):
    seen = []

    def on_line(line: str) -> bool:
        seen.append(line)
        return line == "3"

    command = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"
    out = sandbox.run(request_for(tmp_path, command, limits=Limits(timeout_s=20)), on_line=on_line)
    assert out.killed == "stopped" and out.exit_code is None
    assert seen[:4] == ["0", "1", "2", "3"] and len(seen) <= 6
    assert out.wall_s < 5


def test_cancel_from_another_thread(sandbox, tmp_path):
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    req = request_for(tmp_path, "echo $$ > leader.pid; sleep 100", limits=Limits(timeout_s=30))
    out = sandbox.run(req, cancel=cancel)
    assert out.killed == "cancelled" and out.exit_code is None
    assert out.wall_s < 3
    assert gone(int((req.workdir / "leader.pid").read_text()))


def test_on_line_exception_kills_and_propagates(sandbox, tmp_path):
    def on_line(line: str) -> bool:
        raise RuntimeError("boom")

    req = request_for(tmp_path, "echo $$ > leader.pid; echo go; sleep 100", limits=Limits(timeout_s=30))
    with pytest.raises(RuntimeError, match="boom"):
        sandbox.run(req, on_line=on_line)
    assert gone(int((req.workdir / "leader.pid").read_text()))
