"""DockerSandbox against a real daemon: isolation, limits, caps, kills (and their escalation),
container removal and the reaper."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from env.docker_image import ensure_image, host_mounts
from env.docker_sandbox import LABEL, WORKDIR_LABEL, DockerSandbox, reap
from env.sandbox import Limits, SandboxRequest

pytestmark = pytest.mark.docker

# Runs inside the container; reports what the candidate can and cannot do.
PROBE = r"""
import json, os, shutil, subprocess, sys
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return type(e).__name__
facts = {
    "uid": os.getuid(),
    "exe": sys.executable,
    "net": sorted(os.listdir("/sys/class/net")),  # interfaces: seen without sending a packet anywhere
    "write_usr": attempt(lambda: open("/usr/probe", "w")),
    "write_root": attempt(lambda: open("/probe", "w")),
    "write_data": attempt(lambda: open(os.path.join(sys.argv[1], "probe"), "w")),
    "read_data": open(os.path.join(sys.argv[1], "tokens.txt")).read(),
    "write_workdir": attempt(lambda: open("out.txt", "w").write("hi")),
    "write_tmp": attempt(lambda: open("/tmp/probe", "w")),
    "exec_tmp": shutil.copy("/bin/true", "/tmp/true") and subprocess.run(["/tmp/true"]).returncode,
    "env": dict(os.environ),
}
# One write, flushed before stderr's: a print of more than the 8 KiB buffer writes its text at once
# and keeps its newline until exit, so the merged stream would read "{...}to stderr".
sys.stdout.write(json.dumps(facts) + "\n")
sys.stdout.flush()
print("to stderr", file=sys.stderr)
sys.exit(3)
"""


@pytest.fixture(scope="module")
def sandbox(dockerd):
    return DockerSandbox(client=dockerd)


@pytest.fixture(autouse=True)
def release_workdirs(request):
    """Each run leaves its workdir's volume mounted (for its outputs): unmount them after each test."""
    yield
    if "sandbox" in request.fixturenames:
        request.getfixturevalue("sandbox").workspaces.close_all()


def request_for(tmp_path: Path, command: str, **kw) -> SandboxRequest:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return SandboxRequest(command=command, workdir=workdir, log_path=tmp_path / "run.log", **kw)


def our_containers(client, tmp_path: Path | None = None) -> list:
    """Our labelled containers; with `tmp_path`, only this test's runs (other searches may share the daemon)."""
    found = client.containers.list(all=True, filters={"label": f"{LABEL}=1"})
    if tmp_path is None:
        return found
    return [c for c in found if c.labels.get(WORKDIR_LABEL, "").startswith(str(tmp_path))]


def test_image_is_built_once(dockerd):
    assert ensure_image(dockerd) is True
    image_id = dockerd.images.get("speedsearch-runner:latest").id
    assert ensure_image(dockerd) is True
    assert dockerd.images.get("speedsearch-runner:latest").id == image_id


def test_isolation_exit_code_and_log(sandbox, dockerd, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret-123")
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokens.txt").write_text("tokens")
    req = request_for(tmp_path, f"python probe.py {data}", data=data, env={"MY_KNOB": "7"},
                      limits=Limits(timeout_s=60))
    (req.workdir / "probe.py").write_text(PROBE)
    lines = []
    out = sandbox.run(req, on_line=lines.append)
    log = (tmp_path / "run.log").read_text()
    assert out.exit_code == 3 and out.killed is None, log
    assert "to stderr" in lines
    facts = json.loads(next(line for line in lines if line.startswith("{")))  # stderr may come first
    assert facts["uid"] != 0
    assert Path(facts["exe"]).parent == Path(sys.executable).parent  # the host's interpreter, at the same path
    assert facts["net"] == ["lo"]  # no network: loopback only
    assert facts["write_usr"] != "ok" and facts["write_root"] != "ok"
    assert facts["write_data"] != "ok" and facts["read_data"] == "tokens"
    assert facts["write_workdir"] == "ok" and (req.workdir / "out.txt").read_text() == "hi"
    assert facts["write_tmp"] == "ok" and facts["exec_tmp"] == 0  # compiled kernels load from /tmp
    assert "secret" not in log
    assert facts["env"]["MY_KNOB"] == "7" and facts["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert facts["env"]["HOME"] == "/tmp"
    assert our_containers(dockerd, tmp_path) == []


def test_the_command_begins_after_the_container_is_made(sandbox, tmp_path):
    """outcome.began, the start-up allowance's zero, lies between the call and the command's own first
    instant (one monotonic clock: no time namespace): making the container is not the run's time."""
    t0 = time.monotonic()
    out = sandbox.run(request_for(tmp_path, "python -c 'import time; print(time.monotonic())'",
                                  limits=Limits(timeout_s=60)))
    assert out.exit_code == 0, out.detail
    own = float((tmp_path / "run.log").read_text().split()[-1])
    assert out.began is not None and t0 < out.began <= own, (t0, out.began, own)


def test_hardening_flags(sandbox, tmp_path):
    """What the probe cannot show from inside: the container's own configuration."""
    config = sandbox._config(request_for(tmp_path, "true", limits=Limits(memory_mb=300, cpus=2)), "x")
    assert config["network_mode"] == "none" and config["read_only"] is True
    assert config["security_opt"] == ["no-new-privileges"] and config["cap_drop"] == ["ALL"]
    assert config["mem_limit"] == config["memswap_limit"] == "300m"
    assert config["nano_cpus"] == 2 * 10**9 and config["pids_limit"] == 512  # Limits.pids
    assert config["log_config"]["Type"] == "none"  # Docker keeps no log of its own: we read the attach stream
    assert "device_requests" not in config
    assert all(v["mode"] == "ro" for k, v in config["volumes"].items() if k in host_mounts())
    gpu = sandbox._config(request_for(tmp_path, "true", limits=Limits(gpu_ids=("2", "5"))), "y")
    assert gpu["device_requests"][0]["DeviceIDs"] == ["2", "5"]
    assert gpu["environment"]["CUDA_VISIBLE_DEVICES"] == "2,5"


def test_memory_limit(sandbox, dockerd, tmp_path):
    command = "python -c 'import time; b = b\"x\" * (400 * 2**20); time.sleep(30)'"
    out = sandbox.run(request_for(tmp_path, command, limits=Limits(memory_mb=200, timeout_s=30)))
    assert out.killed == "memory" and out.exit_code is None
    assert "memory limit 200 MB" in out.detail
    assert out.wall_s < 30  # killed, not waited out (the run would sleep 30 s); a bound, not a speed goal
    assert our_containers(dockerd, tmp_path) == []


def test_timeout_kills_and_removes(sandbox, dockerd, tmp_path):
    out = sandbox.run(request_for(tmp_path, "echo started; sleep 100", limits=Limits(timeout_s=1.5)))
    assert out.killed == "timeout" and out.exit_code is None
    assert out.wall_s < 1.5 + 30  # the bound (timeout + 30 s); the run would sleep 100 s
    assert (tmp_path / "run.log").read_text() == "started\n"
    assert our_containers(dockerd, tmp_path) == []


def test_on_line_stop_and_cancel(sandbox, dockerd, tmp_path):
    command = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"
    seen: list[str] = []
    out = sandbox.run(request_for(tmp_path, command, limits=Limits(timeout_s=30)),
                      on_line=lambda line: seen.append(line) or line == "3")
    assert out.killed == "stopped" and out.exit_code is None
    assert seen == ["0", "1", "2", "3"]  # nothing reaches on_line after it asked to stop
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    out = sandbox.run(request_for(tmp_path, "sleep 100", limits=Limits(timeout_s=30)), cancel=cancel)
    assert out.killed == "cancelled" and out.wall_s < 30  # the run would sleep 100 s
    assert our_containers(dockerd, tmp_path) == []


def test_torch_imports_inside(sandbox, tmp_path):
    out = sandbox.run(request_for(tmp_path, "python -c 'import torch; print(torch.__version__)'",
                                  limits=Limits(timeout_s=120)))
    log = (tmp_path / "run.log").read_text()
    assert out.exit_code == 0, log
    import torch

    assert log.strip() == torch.__version__


def test_reap_removes_only_old_labelled_containers(sandbox, dockerd, tmp_path):
    ensure_image(dockerd)
    volumes = {p: {"bind": p, "mode": "ro"} for p in host_mounts()}
    mine = {LABEL: "1", WORKDIR_LABEL: str(tmp_path)}
    leftover = dockerd.containers.run("speedsearch-runner:latest", ["sleep", "100"], detach=True, volumes=volumes,
                                      network_mode="none", labels=mine)
    # Another search's run on the same daemon, and a container that is not ours at all.
    other = dockerd.containers.create("speedsearch-runner:latest", ["true"], volumes=volumes,
                                      labels={LABEL: "1", WORKDIR_LABEL: str(tmp_path.parent / "elsewhere")})
    stranger = dockerd.containers.create("speedsearch-runner:latest", ["true"], volumes=volumes)
    try:
        assert reap(dockerd, older_than_s=3600, labels={WORKDIR_LABEL: str(tmp_path)}) == []
        assert leftover.id in {c.id for c in our_containers(dockerd, tmp_path)}
        assert reap(dockerd, older_than_s=0, labels={WORKDIR_LABEL: str(tmp_path)}) == [leftover.id]
        assert our_containers(dockerd, tmp_path) == []
        other.reload()  # still there: not this search's
        stranger.reload()  # still there: not ours
    finally:
        for c in (leftover, other, stranger):
            try:
                c.remove(force=True)
            except Exception:
                pass


FORKER = r"""
import os, time
n = 0
try:
    while n < 200:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    print("forked", n)
except OSError as e:
    print("refused after", n, type(e).__name__, flush=True)
    time.sleep(1)  # the sandbox samples the cgroup's counters every 0.1 s while the run lives
"""


def test_pids_limit_refuses_forks(sandbox, tmp_path):
    req = request_for(tmp_path, "python forker.py", limits=Limits(pids=20, timeout_s=60))
    (req.workdir / "forker.py").write_text(FORKER)
    lines: list[str] = []
    out = sandbox.run(req, on_line=lines.append)
    assert out.exit_code == 0, lines
    refused = [line for line in lines if line.startswith("refused after")]
    assert refused and int(refused[0].split()[2]) < 20, lines
    assert "process limit 20 reached" in out.detail


def test_fork_bomb_is_contained(sandbox, dockerd, tmp_path):
    timeout = 3.0
    bomb = "import os\nprint('bomb', flush=True)\nwhile True:\n    try:\n        os.fork()\n" \
           "    except OSError:\n        pass\n"
    req = request_for(tmp_path, "python bomb.py", limits=Limits(pids=64, timeout_s=timeout))
    (req.workdir / "bomb.py").write_text(bomb)
    out = sandbox.run(req)
    assert (tmp_path / "run.log").read_text().startswith("bomb\n")  # the attack ran
    assert out.killed == "timeout" and "process limit 64 reached" in out.detail
    assert out.wall_s < timeout + 30  # the bound, not a speed goal
    assert our_containers(dockerd, tmp_path) == []


def test_log_cap_stops_the_run_and_reads_nothing_after(sandbox, dockerd, tmp_path):
    lines: list[str] = []
    out = sandbox.run(request_for(tmp_path, "yes 0123456789abcdef", limits=Limits(log_mb=1, timeout_s=60)),
                      on_line=lines.append)
    assert out.killed == "log" and out.detail.startswith("log over 1 MB"), out
    size = (tmp_path / "run.log").stat().st_size
    assert 2**20 - 64 <= size <= 2**20  # exactly the cap, nothing past it
    assert len(lines) <= size // 17 + 1 and lines[0] == "0123456789abcdef"
    assert "attach socket" in out.containment["log"]
    assert our_containers(dockerd, tmp_path) == []


def test_disk_cap_on_the_workdir(sandbox, tmp_path):
    command = "echo start; sleep 0.5; dd if=/dev/zero of=big bs=1M count=64 2>&1; echo dd exit $?; sleep 60"
    req = request_for(tmp_path, command, limits=Limits(disk_mb=16, timeout_s=60))
    (req.workdir / "train.py").write_text("# the candidate\n")
    out = sandbox.run(req)
    log = (tmp_path / "run.log").read_text()
    assert log.startswith("start\n")
    assert out.killed == "disk" and "disk quota (16 MB)" in out.detail, (out, log)
    assert out.containment["disk"] == "loop ext4 16 MB"
    # The run's outputs stay readable until release; the host got at most the cap.
    assert os.path.ismount(req.workdir) and (req.workdir / "train.py").read_text() == "# the candidate\n"
    assert (req.workdir / "big").stat().st_size <= 16 * 2**20
    sandbox.release(req.workdir)
    assert not os.path.ismount(req.workdir)


HIDE_PROBE = r"""
import json, os, sys
data = sys.argv[1]
def read(path):
    try:
        return open(path).read()
    except OSError as e:
        return type(e).__name__
print(json.dumps({"data": sorted(os.listdir(data)), "val": sorted(os.listdir(os.path.join(data, "val"))),
                  "val_file": read(os.path.join(data, "val", "shard.bin")), "key": read(os.path.join(data, "key.txt")),
                  "heldout": os.path.exists(sys.argv[2]), "tokens": read(os.path.join(data, "tokens.txt"))}))
"""


def test_hidden_paths_are_not_visible(sandbox, tmp_path):
    data, heldout = tmp_path / "data", tmp_path / "heldout"
    (data / "val").mkdir(parents=True)
    heldout.mkdir()
    (data / "tokens.txt").write_text("tokens")
    (data / "val" / "shard.bin").write_text("VALIDATION")
    (data / "key.txt").write_text("KEY")
    (heldout / "shard.bin").write_text("HELDOUT")
    req = request_for(tmp_path, f"python probe.py {data} {heldout}", data=data, limits=Limits(timeout_s=60),
                      hide=(data / "val", data / "key.txt", heldout))
    (req.workdir / "probe.py").write_text(HIDE_PROBE)
    lines: list[str] = []
    out = sandbox.run(req, on_line=lines.append)
    assert out.exit_code == 0, lines
    facts = json.loads(lines[-1])
    assert facts["tokens"] == "tokens"  # the data itself is there
    assert facts["val"] == [] and facts["val_file"] == "FileNotFoundError"
    assert facts["key"] == "" and facts["heldout"] is False
    assert "VALIDATION" not in lines[-1] and "KEY" not in lines[-1] and "HELDOUT" not in lines[-1]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_kill_escalates_when_the_runtime_is_wedged(sandbox, dockerd, tmp_path):
    """A real failure of `docker kill`: the container's runtime shim is stopped (SIGSTOP), so the
    daemon cannot reach the container. The sandbox must still kill every process of the run,
    through the container's cgroups, and say so."""
    wedged: list[tuple[int, int, str]] = []

    def wedge(line: str) -> None:
        if line.startswith("ready ") and not wedged:
            container = dockerd.containers.get(line.split()[1])  # the hostname is the container's id
            pid = container.attrs["State"]["Pid"]
            shim = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            os.kill(shim, signal.SIGSTOP)
            wedged.append((shim, pid, container.id))

    timeout = 2.0
    command = "sleep 1000 & echo ready $(cat /etc/hostname); sleep 1000"
    try:
        out = sandbox.run(request_for(tmp_path, command, limits=Limits(timeout_s=timeout)), on_line=wedge)
        assert wedged, (tmp_path / "run.log").read_text()
        shim, pid, container_id = wedged[0]
        assert out.killed == "timeout" and out.exit_code is None
        assert "docker kill failed" in out.detail and "escalated" in out.detail, out.detail
        assert "v1 freezer" in out.containment["kill"] or "v2 cgroup.kill" in out.containment["kill"]
        assert _state(pid) in ("Z", "gone")  # dead (a zombie until the stopped shim reaps it)
        for d in Path("/sys/fs/cgroup").glob(f"*/docker/{container_id}"):
            assert (d / "cgroup.procs").read_text().split() == [], d
        assert out.wall_s < timeout + 30
    finally:
        for shim, _, container_id in wedged:
            os.kill(shim, signal.SIGCONT)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(c.id == container_id for c in our_containers(dockerd)):
                try:
                    dockerd.api.remove_container(container_id, force=True)
                except Exception:
                    time.sleep(0.5)
    assert our_containers(dockerd, tmp_path) == []


def test_containment_is_recorded(sandbox, tmp_path):
    out = sandbox.run(request_for(tmp_path, "true", limits=Limits(timeout_s=60)))
    assert out.exit_code == 0
    assert set(out.containment) >= {"cgroup", "namespaces", "disk", "log"}
    assert "pids 512" in out.containment["cgroup"] and "network none" in out.containment["namespaces"]
    assert out.containment["disk"].startswith("loop ext4")
    assert "kill" not in out.containment  # no escalation was needed


def test_line_sink_cuts_chunks_into_lines_and_caps(tmp_path):
    """The re-cutting of Docker's chunks, without a daemon: lines split across chunks, a line longer
    than max_line, the byte cap, and no on_line call once it asked to stop."""
    from env.docker_attach import LineSink

    seen: list[str] = []
    with open(tmp_path / "log", "wb") as log:
        sink = LineSink(log, lambda line: seen.append(line) or line == "stop", cap_bytes=40, max_line=8)
        assert sink.feed(b"ab\ncd") is None and seen == ["ab"]
        assert sink.feed(b"e\n0123456789\n") is None
        assert seen == ["ab", "cde", "01234567", "89"]
        assert sink.feed(b"stop\nafter\n") == "stopped" and seen[-1] == "stop"
        assert sink.feed(b"more\n") is None and seen[-1] == "stop"
        assert sink.feed(b"x" * 100) == "log"
    assert (tmp_path / "log").read_bytes() == b"ab\ncde\n0123456789\nstop\nafter\nmore\n" + b"x" * 6
