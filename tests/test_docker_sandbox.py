"""DockerSandbox against a real daemon: isolation, limits, kills, container removal and the reaper."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from env.docker_image import ensure_image, host_mounts
from env.docker_sandbox import LABEL, DockerSandbox, reap
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
print(json.dumps(facts))
print("to stderr", file=sys.stderr)
sys.exit(3)
"""


@pytest.fixture(scope="module")
def sandbox(dockerd):
    return DockerSandbox(client=dockerd)


def request_for(tmp_path: Path, command: str, **kw) -> SandboxRequest:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return SandboxRequest(command=command, workdir=workdir, log_path=tmp_path / "run.log", **kw)


def our_containers(client) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL}=1"})


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
    assert our_containers(dockerd) == []


def test_hardening_flags(sandbox, tmp_path):
    """What the probe cannot show from inside: the container's own configuration."""
    config = sandbox._config(request_for(tmp_path, "true", limits=Limits(memory_mb=300, cpus=2)), "x")
    assert config["network_mode"] == "none" and config["read_only"] is True
    assert config["security_opt"] == ["no-new-privileges"] and config["cap_drop"] == ["ALL"]
    assert config["mem_limit"] == config["memswap_limit"] == "300m"
    assert config["nano_cpus"] == 2 * 10**9 and config["pids_limit"] > 0
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
    assert out.wall_s < 15
    assert our_containers(dockerd) == []


def test_timeout_kills_and_removes(sandbox, dockerd, tmp_path):
    out = sandbox.run(request_for(tmp_path, "echo started; sleep 100", limits=Limits(timeout_s=1.5)))
    assert out.killed == "timeout" and out.exit_code is None
    assert out.wall_s < 6
    assert (tmp_path / "run.log").read_text() == "started\n"
    assert our_containers(dockerd) == []


def test_on_line_stop_and_cancel(sandbox, dockerd, tmp_path):
    command = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"
    out = sandbox.run(request_for(tmp_path, command, limits=Limits(timeout_s=30)), on_line=lambda line: line == "3")
    assert out.killed == "stopped" and out.exit_code is None
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    out = sandbox.run(request_for(tmp_path, "sleep 100", limits=Limits(timeout_s=30)), cancel=cancel)
    assert out.killed == "cancelled" and out.wall_s < 6
    assert our_containers(dockerd) == []


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
    leftover = dockerd.containers.run("speedsearch-runner:latest", ["sleep", "100"], detach=True, volumes=volumes,
                                      network_mode="none", labels={LABEL: "1"})
    stranger = dockerd.containers.create("speedsearch-runner:latest", ["true"], volumes=volumes)
    try:
        assert reap(dockerd, older_than_s=3600) == []
        assert leftover.id in {c.id for c in our_containers(dockerd)}
        assert reap(dockerd, older_than_s=0) == [leftover.id]
        assert our_containers(dockerd) == []
        stranger.reload()  # still there: not ours
    finally:
        for c in (leftover, stranger):
            try:
                c.remove(force=True)
            except Exception:
                pass
