"""ProcessSandbox with real processes: capture, environment, limits, and kills that leave nothing.

The run lives in its own pid namespace, so a pid it writes down means nothing on the host: the
tests find the run's processes by a unique marker in their command lines instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from env.process_sandbox import ProcessSandbox, _Lines, cpu_time_limit_s
from env.sandbox import Limits, SandboxRequest


@pytest.fixture
def sandbox():
    box = ProcessSandbox(grace_s=0.3)
    yield box
    box.workspaces.close_all()  # evaluate releases each workdir; these tests call run directly


def marker() -> str:
    return f"mark{uuid.uuid4().hex[:12]}"


def survivors(mark: str) -> list[int]:
    """Live processes whose command line holds `mark` (a zombie's command line is empty)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def request_for(tmp_path: Path, command: str, **kw) -> SandboxRequest:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return SandboxRequest(command=command, workdir=workdir, log_path=tmp_path / "run.log", **kw)


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
    assert out.wall_s > 0


def test_containment_is_reported(sandbox, tmp_path):
    # Its cost per run is measured in bench/evaluate_overhead.py, not asserted here.
    out = sandbox.run(request_for(tmp_path, "id -u; cat /proc/self/cgroup"))
    log = (tmp_path / "run.log").read_text()
    assert out.exit_code == 0, log
    assert out.containment["cgroup"].startswith(("v1", "v2")), out.containment
    assert out.containment["namespaces"].startswith("bwrap"), out.containment
    assert out.containment["disk"] == "loop ext4 4096 MB"
    assert log.splitlines()[0] == "65534"


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
    mark = marker()
    orphan = ("import os, signal, sys, time\n"
              "if os.fork() == 0:\n"
              "    os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "    open('g2.ok', 'w').write('up'); time.sleep(100)\n"
              "time.sleep(0.5)\n")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "orphan.py").write_text(orphan)
    command = (
        f"sh -c 'trap \"\" TERM; echo up > g1.ok; while true; do sleep 0.05; done' {mark} & "
        f"python orphan.py {mark} & sleep 100 # {mark}"
    )
    req = request_for(tmp_path, command, limits=Limits(timeout_s=1.5))
    t0 = time.monotonic()
    out = sandbox.run(req)
    assert out.killed == "timeout" and out.exit_code is None
    assert "1.5 s" in out.detail
    assert time.monotonic() - t0 < 30  # the sleeps (100 s) were killed, not waited for (a busy machine is slow)
    assert wait_for_file(req.workdir / "g1.ok", 0.1) == wait_for_file(req.workdir / "g2.ok", 0.1) == "up"
    assert survivors(mark) == []


def test_normal_exit_kills_leftovers(sandbox, tmp_path):
    mark = marker()
    req = request_for(tmp_path, f"sh -c 'echo up > bg.ok; sleep 100' {mark} & sleep 0.2; echo done")
    out = sandbox.run(req)
    assert out.exit_code == 0 and out.killed is None
    assert out.wall_s < 30  # the background sleep (100 s) held the pipe; it was killed, not waited for
    assert (req.workdir / "bg.ok").read_text() == "up\n"
    assert survivors(mark) == []


@pytest.mark.parametrize("stdio", ["kept", "closed"])
def test_double_forked_daemon_dies(sandbox, tmp_path, stdio):
    # setsid + double fork: the daemon leaves the session and the tree; with its stdio kept it holds
    # the pipe open (the caller must not wait for it), closed it is invisible to the pipe.
    mark = marker()
    redirect = "" if stdio == "kept" else " </dev/null >/dev/null 2>&1"
    daemon = f"setsid sh -c 'echo up > d.ok; while true; do sleep 0.05; done' {mark}{redirect}"
    command = f"({daemon} &) ; sleep 0.3; echo done"
    req = request_for(tmp_path, command, limits=Limits(timeout_s=30))
    out = sandbox.run(req)
    assert out.exit_code == 0 and out.killed is None
    assert out.wall_s < 30  # the daemon was killed, not waited for
    assert (req.workdir / "d.ok").read_text() == "up\n"
    assert survivors(mark) == []


def test_memory_limit(sandbox, tmp_path):
    command = "python -c 'import time; b = b\"x\" * (400 * 2**20); time.sleep(100)'"
    out = sandbox.run(request_for(tmp_path, command, limits=Limits(memory_mb=200, timeout_s=100)))
    assert out.killed == "memory" and out.exit_code is None
    assert "memory limit 200 MB" in out.detail
    assert out.peak_rss_mb > 150  # the kernel stops it at the limit; sampling may see a little less
    assert out.wall_s < 30  # stopped, not left to sleep its 100 s


def test_on_line_stops_the_run(sandbox, tmp_path):
    seen = []

    def on_line(line: str) -> bool:
        seen.append(line)
        return line == "3"

    command = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"
    out = sandbox.run(request_for(tmp_path, command, limits=Limits(timeout_s=20)), on_line=on_line)
    assert out.killed == "stopped" and out.exit_code is None
    assert seen[:4] == ["0", "1", "2", "3"] and len(seen) <= 6


def test_cancel_from_another_thread(sandbox, tmp_path):
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    mark = marker()
    req = request_for(tmp_path, f"sleep 100 # {mark}", limits=Limits(timeout_s=30))
    out = sandbox.run(req, cancel=cancel)
    assert out.killed == "cancelled" and out.exit_code is None
    assert out.wall_s < 30
    assert survivors(mark) == []


def test_on_line_exception_kills_and_propagates(sandbox, tmp_path):
    def on_line(line: str) -> bool:
        raise RuntimeError("boom")

    mark = marker()
    req = request_for(tmp_path, f"echo go; sleep 100 # {mark}", limits=Limits(timeout_s=30))
    with pytest.raises(RuntimeError, match="boom"):
        sandbox.run(req, on_line=on_line)
    assert survivors(mark) == []


def test_the_run_sees_only_what_it_is_given(sandbox, tmp_path):
    data = tmp_path / "data" / "run"
    data.mkdir(parents=True)
    (data / "train.bin").write_text("tokens")
    data.chmod(0o777)  # writable by anyone on the host: only the read-only mount protects it
    heldout = tmp_path / "data" / "heldout"
    heldout.mkdir()
    (heldout / "val.bin").write_text("the held-out split")
    outside = Path("/tmp") / f"speedsearch-outside-{uuid.uuid4().hex[:8]}"
    command = (f"id -u; cat {data}/train.bin; echo; ls -A {heldout} | wc -l; "
               f"cat {heldout}/val.bin 2>/dev/null || echo no-heldout; "
               f"touch {data}/new 2>/dev/null || echo data-read-only; "
               f"touch {outside} && echo tmp-private; touch out.txt && echo workdir-writable; "
               f"ls /proc | grep -c '^[0-9]'")
    command += "; echo forged >> frozen.py || echo frozen-kept; rm -f frozen.py 2>/dev/null || echo frozen-stays"
    req = request_for(tmp_path, command, data=data, hide=(heldout,))
    (req.workdir / "frozen.py").write_text("# given to the run\n")
    out = sandbox.run(req)
    lines = [line for line in (tmp_path / "run.log").read_text().splitlines() if not line.startswith("/bin/sh")]
    assert out.exit_code == 0, lines
    assert lines[:7] == ["65534", "tokens", "0", "no-heldout", "data-read-only", "tmp-private", "workdir-writable"]
    assert int(lines[7]) < 10  # its own pid namespace: a handful of processes, none of the caller's
    assert lines[8:] == ["frozen-kept", "frozen-stays"]
    assert not outside.exists() and not (data / "new").exists()
    assert (req.workdir / "out.txt").exists()
    assert (req.workdir / "frozen.py").read_text() == "# given to the run\n"


def test_log_cap(sandbox, tmp_path):
    command = "python -c 'import sys\nwhile True: sys.stdout.write(\"y\" * 1023 + \"\\n\")'"
    out = sandbox.run(request_for(tmp_path, command, limits=Limits(log_mb=1, timeout_s=30)))
    assert out.killed == "log" and out.detail == "log over 1 MB"
    assert (tmp_path / "run.log").stat().st_size == 1 << 20


@pytest.mark.parametrize("chunks", [[1 << 20, 1], [1 << 19, 1 << 19, 4096], [(1 << 20) + 7]])
def test_a_log_past_its_cap_is_stopped_whatever_the_chunks(tmp_path, chunks):
    """The pipe hands over full 64 KiB chunks on a loaded machine: a log that reaches its cap exactly
    at a chunk's end must still be stopped by the next byte (CI saw a run go on to its timeout)."""
    class Watch:
        killed = None

        def stop(self, reason, detail, grace_s=None):
            self.killed, self.detail = reason, detail

    watch = Watch()
    with open(tmp_path / "run.log", "wb") as log:
        lines = _Lines(log, 1 << 20, None, watch)
        for n in chunks:
            lines.feed(b"y" * n)
    assert (watch.killed, watch.detail) == ("log", "log over 1 MB")
    assert (tmp_path / "run.log").stat().st_size == 1 << 20
    with open(tmp_path / "exact.log", "wb") as log:  # exactly the cap, and nothing more: not over it
        quiet = Watch()
        _Lines(log, 1 << 20, None, quiet).feed(b"y" * (1 << 20))
    assert quiet.killed is None


def test_disk_cap(sandbox, tmp_path):
    command = "dd if=/dev/zero of=big bs=1M count=200 2>&1; sleep 30"
    req = request_for(tmp_path, command, limits=Limits(disk_mb=32, timeout_s=30))
    out = sandbox.run(req)
    assert out.killed == "disk" and out.detail == "disk quota (32 MB)"
    assert out.containment["disk"] == "loop ext4 32 MB"
    assert 24 << 20 < (req.workdir / "big").stat().st_size <= 32 << 20  # it wrote up to the cap, no further


def test_process_limit(sandbox, tmp_path):
    mark = marker()
    command = f"for i in $(seq 40); do sleep 30 & done 2>/dev/null; echo spawned; wait # {mark}"
    out = sandbox.run(request_for(tmp_path, command, limits=Limits(pids=16, timeout_s=5)))
    assert out.exit_code != 0 or out.killed == "timeout"  # the shell gives up on a refused fork
    assert "process limit (pids 16) reached" in out.detail
    assert survivors(mark) == []


def test_release_keeps_or_drops_the_outputs(sandbox, tmp_path):
    req = request_for(tmp_path, "mkdir -p ckpt && echo weights > ckpt/step_000010.pt")
    assert sandbox.run(req).exit_code == 0
    assert os.path.ismount(req.workdir)  # still mounted: the caller reads the outputs
    sandbox.release(req.workdir, keep=True)
    assert not os.path.ismount(req.workdir)
    assert (req.workdir / "ckpt" / "step_000010.pt").read_text() == "weights\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".img")] == []
    sandbox.release(req.workdir)  # idempotent


def test_a_killed_caller_leaves_nothing_behind(tmp_path):
    # A caller killed with -9 (a Ray worker lost mid-run) cannot clean up: its run dies with it
    # (bwrap --die-with-parent, or the next sandbox's reaper), and the next sandbox made on the
    # machine unmounts its workspace and removes its cgroups.
    mark = marker()
    workdir = tmp_path / "work"
    workdir.mkdir()
    caller = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from env.process_sandbox import ProcessSandbox; "
        "from env.sandbox import SandboxRequest; w = Path(sys.argv[1]); "
        f"ProcessSandbox().run(SandboxRequest('echo up > up.ok; sleep 100 # {mark}', w, w.parent / 'log'))"),
        str(workdir)], cwd=Path(__file__).resolve().parents[1])
    wait_for_file(workdir / "up.ok")
    cgroups = [d for d in Path("/sys/fs/cgroup/pids").glob(f"speedsearch-{caller.pid}-*")]
    assert os.path.ismount(workdir) and cgroups
    caller.kill()
    caller.wait()
    subprocess.run([sys.executable, "-c", "from env.process_sandbox import ProcessSandbox; ProcessSandbox()"],
                   cwd=Path(__file__).resolve().parents[1], check=True)
    assert not os.path.ismount(workdir)
    assert not any(d.exists() for d in cgroups)
    assert survivors(mark) == []
    assert list(tmp_path.glob("*.img")) == [] and list(tmp_path.glob(".*.img")) == []


def test_freeze_kill_empties_a_v1_freezer_cgroup_and_refuses_roots():
    # The escalation the Docker sandbox uses on a container's cgroup: here on a v1 freezer cgroup
    # holding a process that keeps forking daemons.
    from env.cgroup import freeze_kill, procs

    mark = marker()
    d = Path("/sys/fs/cgroup/freezer") / f"speedsearch-test-{mark}"
    d.mkdir()
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {d}/cgroup.procs && "
                                 f"while true; do setsid sleep 100 & sleep 0.01; done # {mark}"])
        deadline = time.monotonic() + 10
        while len(procs([d])) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(procs([d])) >= 5
        freeze_kill([d])
        assert procs([d]) == []
        proc.wait(timeout=10)
        assert survivors(mark) == []
        with pytest.raises(ValueError):
            freeze_kill([Path("/sys/fs/cgroup/freezer")])  # a hierarchy's root: every process
    finally:
        d.rmdir()


def test_cpu_seconds_are_the_kernels_count_of_every_process(sandbox, tmp_path):
    """outcome.cpu_s is the run cgroup's CPU count: work done in a child that has exited is in it (a
    run cannot hide compute from the cpu guard, search_space/guard.py, in a short-lived process)."""
    burn = f"{sys.executable} -c 'sum(range(4 * 10**7))'"
    busy = sandbox.run(request_for(tmp_path, f"{burn} && {burn}", limits=Limits(timeout_s=120)))
    idle = sandbox.run(request_for(tmp_path, "sleep 1", limits=Limits(timeout_s=60)))
    assert busy.exit_code == 0 and idle.exit_code == 0
    assert busy.cpu_s is not None and idle.cpu_s is not None, busy.containment  # root, with cgroups: counted
    assert busy.cpu_s > 0.3 and idle.cpu_s < 0.2 < busy.cpu_s, (busy.cpu_s, idle.cpu_s)


def test_the_command_begins_after_the_sandbox_is_built(sandbox, tmp_path):
    """outcome.began (the start-up allowance's zero, env/evaluate.py) lies between the call and the
    command's own first instant: the sandbox's set-up (a workspace volume here) is not the run's."""
    t0 = time.monotonic()
    out = sandbox.run(request_for(tmp_path, f"{sys.executable} -c 'import time; print(time.monotonic())'",
                                  limits=Limits(timeout_s=60, disk_mb=64)))
    assert out.exit_code == 0, out.detail
    own = float((tmp_path / "run.log").read_text().split()[-1])
    assert out.began is not None and t0 < out.began <= own, (t0, out.began, own)
