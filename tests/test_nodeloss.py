"""Node loss is never a candidate's failure, and a run dies with its worker (issue #10, sections 2-3).

Real Ray clusters started here (`ray start`, a head and a second node), searches driven through the
CLI in their own processes (a driver whose cluster is killed is ended by Ray itself a minute later),
and the toy trainer hanging silently. Only processes started here are killed, by pid: never `ray stop`
(it would end every Ray cluster on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from agent.faults import SICK_AFTER, NodeHealth, summary_line
from env.volume import mounted_under
from env.volume import reap_orphans as reap_volumes
from runs_db.db import RunsDB
from tests.toy import make_toy

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}  # plain local clusters
HANG = 'train.py\n<<<<<<< SEARCH\nMODE = "ok"\n=======\nMODE = "hang-child"\n>>>>>>> REPLACE\n'  # silent, a child


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what, timeout: float, step: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if got := what():
            return got
        time.sleep(step)
    return what()


class Cluster:
    """A head (and later nodes) started with `ray start`, all under one temp dir that names them."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        # short: Ray's sockets live under it, and a socket's path has at most 107 bytes
        self.temp = Path(tempfile.mkdtemp(prefix="ssray-", dir="/tmp"))
        self.port = port or _free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start_head(self, cpus: int) -> None:
        self._ray("--head", f"--port={self.port}", f"--temp-dir={self.temp}", f"--num-cpus={cpus}",
                  "--num-gpus=0", "--include-dashboard=false", "--resources={\"head\": 1}")

    def add_node(self, cpus: int, tag: str) -> None:
        self._ray(f"--address={self.address}", f"--num-cpus={cpus}", "--num-gpus=0", f"--resources={{\"{tag}\": 1}}")

    def _ray(self, *args: str) -> None:
        proc = subprocess.run(["ray", "start", "--disable-usage-stats", *args], env=ENV, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those whose command line names its temp dir, and theirs."""
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            if str(self.temp) in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        return list(found.values())

    def raylet(self, tag: str) -> psutil.Process | None:
        """The raylet of the node started with the custom resource `tag`."""
        for p in self.processes():
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "raylet" in p.name() and f"{tag}," in cmd:
                return p
        return None

    def kill(self, procs: list[psutil.Process]) -> None:
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=20)

    def kill_all(self) -> None:
        self.kill(self.processes())

    def close(self) -> None:
        self.kill_all()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def trainers(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "train.py" in cmd and "--seed" in cmd:
            try:
                if marker in p.cwd() or marker in cmd:
                    out.append(p)
            except psutil.Error:
                continue
    return out


def running_on(raylet: psutil.Process) -> list[psutil.Process]:
    """The node's Ray workers running a run's task now (Ray titles a busy worker with its task)."""
    out = []
    for p in raylet.children():
        try:
            if p.name() == "ray::_run":
                out.append(p)
        except psutil.Error:
            continue
    return out


class Output:
    """A process's output, read as it comes (so a failed assertion can show it)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.thread.start()

    def whole(self) -> str:
        if self.proc.poll() is not None:
            self.thread.join(10)  # all of it, once the process has ended
        return "".join(self.lines)

    def text(self) -> str:  # what a failed assertion shows
        return self.whole()[-6000:]


def launch(tmp_path: Path, toy, address: str, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "agent", "launch", "--dir", str(tmp_path / "search"), "--ray-address", address,
            *extra]
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_node_that_fails_every_run_is_quarantined_while_others_succeed():
    h = NodeHealth()
    for _ in range(SICK_AFTER):
        assert not h.bad("b")  # nothing has succeeded anywhere else: no quarantine (a bad candidate?)
    h.ok("a")  # another node succeeds while the streak goes on
    assert h.bad("b")
    h.ok("b")  # one good run clears the streak
    assert not h.bad("b")


def test_a_retry_prefers_another_node_and_a_quarantined_node_gets_no_run(ray_cluster, tmp_path: Path):
    from env.evaluate import RunSpec
    from env.pool import Pool

    toy = make_toy(tmp_path / "toy")
    pool = Pool(run_root=tmp_path / "runs")
    (only,) = pool.view(1, 0).nodes
    # soft: with no other node, the retry runs where it was lost
    done = pool.get(pool.submit(RunSpec(toy, seed=0, fidelity="smoke", run_id="retry"), avoid=only))
    assert done.result.status.value == "ok" and done.node == only
    pool.quarantined.add(only)
    assert pool.view(1, 0).fits == 0 and pool.capacity(1, 0) == 1
    ref = pool.submit(RunSpec(toy, seed=1, fidelity="smoke", run_id="nowhere"))
    assert pool.wait([ref], timeout=5) == []  # hard: no node may take it
    pool.stop([ref], timeout=5)


def test_the_summary_counts_lost_runs_apart_from_failures():
    assert summary_line(None) == "" and summary_line({"runs": 0, "quarantined": []}) == ""
    line = summary_line({"runs": 3, "worker_s": 7200.0, "retried": 2, "given_up": 1, "quarantined": ["ab" * 20]})
    assert line.startswith("3 run(s) lost with their worker or node (2.00 worker-hours), 2 sent again")
    assert "never counted as a candidate's failure" in line and "1 given up" in line
    assert line.endswith("quarantined: " + ("ab" * 20)[:12])


DRIVER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import ray
    from env.evaluate import RunSpec
    from env.pool import Pool, RunLost
    from search_space.target import load_target
    toy, root, address, patch = sys.argv[1:5]
    pool = Pool(address, run_root=Path(root))
    ref = pool.submit(RunSpec(load_target(Path(toy)), seed=0, fidelity="full", patch=patch, run_id="orphan-me"))
    print("submitted", flush=True)
    try:
        pool.get(ref)
        print(json.dumps({"lost": False}), flush=True)
    except RunLost as lost:
        print(json.dumps({"lost": True, "node": lost.node, "worker_s": lost.worker_s, "error": str(lost)}), flush=True)
''')


def test_a_run_dies_with_its_worker(cluster: Cluster, tmp_path: Path):
    """kill -9 the Ray worker running a silent trainer: the trainer and its tree die within seconds,
    the run comes back as lost (not failed), and its workspace's loop mount is gone after the reap."""
    toy = make_toy(tmp_path / "toy", timeout_s=300)
    cluster.start_head(cpus=2)
    root = tmp_path / "runs"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(toy.source), str(root), cluster.address, HANG],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        found = _wait(lambda: trainers("orphan-me"), 120)
        assert found, "the trainer never started"
        trainer = found[0]
        workers = [a for a in trainer.parents() if "default_worker" in " ".join(a.cmdline())
                   or a.name().startswith("ray::")]
        assert workers, [a.cmdline() for a in trainer.parents()]
        kids = _wait(lambda: trainer.children(recursive=True), 30)
        assert kids, "the trainer's child never started"
        tree = [trainer, *kids]
        workers[0].send_signal(signal.SIGKILL)
        gone = _wait(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 15)
        assert gone, "the trainer outlived its worker"
        out, _ = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["lost"] and report["node"], out[-2000:]  # a lost run, with the node it was lost on
    assert not trainers("orphan-me")
    if os.geteuid() == 0:  # the workspace's volume: freed by the guardian, else by the next reap
        _wait(lambda: (reap_volumes(), not mounted_under(root))[1], 40)
        assert not mounted_under(root)


PLAIN = textwrap.dedent('''
    import sys
    from pathlib import Path
    import env.namespaces as namespaces
    namespaces._SUPPORT = "none (forced by the test: the path without bwrap)"
    from env.evaluate import RunSpec, evaluate, make_sandbox
    from search_space.target import load_target
    toy, root, patch = sys.argv[1:4]
    spec = RunSpec(load_target(Path(toy)), seed=0, fidelity="full", patch=patch, run_id="plain-orphan")
    evaluate(spec, make_sandbox("process", warm=False), Path(root))
''')


def test_a_run_dies_with_its_caller_on_the_path_without_bwrap(tmp_path: Path):
    """No bwrap (no --die-with-parent): the parent-death signal, the guardian and the run's cgroup
    still end the trainer and the child it started when the process running it is killed with -9."""
    toy = make_toy(tmp_path / "toy", timeout_s=300)
    root = tmp_path / "runs"
    caller = subprocess.Popen([sys.executable, "-c", PLAIN, str(toy.source), str(root), HANG], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        found = _wait(lambda: trainers("plain-orphan"), 120)
        assert found, "the trainer never started"
        trainer = found[0]
        assert not any("bwrap" in a.name() for a in trainer.parents())  # the path under test
        kids = _wait(lambda: trainer.children(recursive=True), 30)
        assert kids, "the trainer's child never started"
        tree = [trainer, *kids]
        caller.kill()
        caller.wait(timeout=30)
        gone = _wait(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 15)
        assert gone, "the run outlived its caller"
    finally:
        if caller.poll() is None:
            caller.kill()
    if os.geteuid() == 0:
        _wait(lambda: (reap_volumes(), not mounted_under(root))[1], 40)
        assert not mounted_under(root)


def containers(root: Path) -> list[str]:
    """The ids of running containers whose workdir lies under `root`."""
    out = subprocess.run(["docker", "ps", "--filter", "label=speedsearch=1", "--format",
                          '{{.ID}} {{.Label "speedsearch.workdir"}}'], capture_output=True, text=True, timeout=60)
    return [line.split()[0] for line in out.stdout.splitlines() if str(root) in line]


def test_a_container_run_dies_with_its_caller(tmp_path: Path):
    """The docker path: the guardian removes the run's container when its caller is killed with -9."""
    toy = make_toy(tmp_path / "toy", timeout_s=300)
    root = tmp_path / "runs"
    code = PLAIN.replace('make_sandbox("process", warm=False)', 'make_sandbox("docker")')
    caller = subprocess.Popen([sys.executable, "-c", code, str(toy.source), str(root), HANG], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(caller)
    try:
        assert _wait(lambda: containers(root), 180, 1.0), "the container never started:\n" + out.text()
        time.sleep(2)  # the trainer is past its first lines, silent
        caller.kill()
        caller.wait(timeout=30)
        assert _wait(lambda: not containers(root), 30, 1.0), "the container outlived its caller"
    finally:
        if caller.poll() is None:
            caller.kill()
        for ct in containers(root):
            subprocess.run(["docker", "rm", "-f", ct], capture_output=True, timeout=60)


def _state(folder: Path) -> tuple[list, dict]:
    with RunsDB.open(folder) as db:
        return db.trials(), db.get_state("lost", None) or {}


def test_a_lost_node_is_not_a_candidates_failure_and_capacity_follows(cluster: Cluster, tmp_path: Path):
    toy = make_toy(tmp_path / "toy", sleep=0.8, short=10, full=12, timeout_s=120)
    cluster.start_head(cpus=1)
    proc = launch(tmp_path, toy, cluster.address, "--target", str(toy.source), "--proposers", "ideas,knobs",
                  "--max-fidelity", "short", "--seeds", "2", "--allow-untrusted", "--budget-trials", "12")
    out = Output(proc)
    try:
        assert _wait(lambda: running_on(cluster.raylet("head")), 120, 0.1), out.text()
        cluster.add_node(cpus=1, tag="second")  # joins the search under way: it gets work
        second = _wait(lambda: cluster.raylet("second"), 60)
        assert second is not None
        assert _wait(lambda: running_on(second), 120, 0.1), "no run ever went to the node that joined:\n" + out.text()
        # the search's cluster watch polls: on a loaded machine a run can reach the new node before the
        # watch has counted it, so the node is lost only once the search has said it grew
        assert _wait(lambda: "fits 2 run(s) at once now (was 1)" in out.whole(), 60, 0.1), out.text()
        cluster.kill([second, *second.children(recursive=True)])  # the second node is lost mid-run
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.whole()  # the capacity lines come early; a long run's tail may not hold them
    assert proc.returncode == 0, text[-6000:]
    assert "the cluster fits 2 run(s) at once now (was 1)" in text, text[-6000:]
    assert "the cluster fits 1 run(s) at once now (was 2)" in text, text[-6000:]
    trials, lost = _state(tmp_path / "search")
    assert lost.get("runs", 0) >= 1 and lost.get("retried", 0) >= 1, lost
    assert all(a["worker_s"] >= 0 and a["node"] for a in lost["attempts"]), lost
    reasons = " ".join(str(t.attrs.get("reason") or "") for t in trials)
    assert not any(w in reasons for w in ("Died", "Crashed", "lost", "Raylet")), reasons  # never a candidate's
    assert "run(s) lost with their worker or node" in text


def test_a_lost_cluster_pauses_the_search_and_resume_goes_on(cluster: Cluster, tmp_path: Path):
    toy = make_toy(tmp_path / "toy", sleep=0.5, short=8, full=10, timeout_s=120)
    cluster.start_head(cpus=2)
    args = ("--target", str(toy.source), "--proposers", "ideas", "--max-fidelity", "short", "--seeds", "2",
            "--allow-untrusted", "--budget-trials", "6")
    proc = launch(tmp_path, toy, cluster.address, *args)
    out = Output(proc)
    try:
        head = cluster.raylet("head")
        assert _wait(lambda: running_on(head), 120, 0.1), "no run started:\n" + out.text()
        cluster.kill_all()
        proc.wait(timeout=120)  # paused well before Ray ends a driver whose GCS is gone (a minute)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = out.text()
    assert "paused: the Ray cluster was lost" in out and "resume with --resume" in out, out[-4000:]
    assert proc.returncode == 75, (proc.returncode, out[-4000:])  # paused, not done: a script can tell
    assert out.strip().splitlines()[-1].startswith("paused: the Ray cluster was lost"), out[-1000:]
    trials, _ = _state(tmp_path / "search")
    assert all(t.state != "running" for t in trials)  # open trials were marked interrupted
    lost_words = ("Died", "Crashed", "lost", "Raylet", "Unavailable")
    assert not [t for t in trials if any(w in str(t.attrs.get("reason") or "") for w in lost_words)], \
        [(t.number, t.attrs.get("reason")) for t in trials]
    assert any(t.attrs.get("reason") == "interrupted" for t in trials)
    again = Cluster(tmp_path / "second", port=cluster.port)  # the saved address answers again
    try:
        again.start_head(cpus=2)
        resumed = subprocess.run([sys.executable, "-m", "agent", "launch", "--dir", str(tmp_path / "search"),
                                  "--resume"], env=ENV, capture_output=True, text=True, timeout=400)
    finally:
        again.close()
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials, _ = _state(tmp_path / "search")
    assert all(t.state != "running" for t in trials)
    done = [t for t in trials if t.proposer != "baseline" and t.state == "complete"]
    assert done, [(t.number, t.fidelity, t.state, t.attrs.get("reason")) for t in trials]
