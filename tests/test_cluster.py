"""Two Ray nodes that share no files (issue 10, "No shared filesystem").

A real two-node cluster on this machine: a head node, and a second node started in its own mount
namespace with a tmpfs over the search folder and the target folder, so that neither exists for it
(the installed package stays visible, as it would on a node where speedsearch is installed). Each
node has its own SPEEDSEARCH_CACHE. A short search launched against the cluster must complete runs
on both nodes: the candidate's source travels with the task, data is prepared on each node from the
shipped base, the passthrough environment is the controller's, and logs come back by value.

Token auth is on (RAY_AUTH_MODE=token, one token for both nodes and the controller). Only the
processes this test starts are ended, by their ids (never `ray stop`: it would end every Ray of
the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import git
import psutil
import pytest

from env.evaluate import RunSpec, evaluate, make_sandbox
from env.source import commit_source, ship, unship
from search_space.records import Status
from search_space.target import load_target
from tests.toy import make_toy

DATA_PY = '''
import os, sys
out = sys.argv[sys.argv.index("--out") + 1]
tmp = out + ".tmp"
os.makedirs(tmp, exist_ok=True)
with open(os.path.join(tmp, "tokens.txt"), "w") as f:
    f.write("prepared-on-this-node\\n")
os.rename(tmp, out)  # whole or not at all
'''

# Printed by every run: what it saw of the environment and its data.
SHOW = ('args = p.parse_args()\n'
        'print("FLAVOUR=" + os.environ.get("TOY_FLAVOUR", "unset"), flush=True)\n'
        'print("DATA=" + open(os.path.join(args.data, "tokens.txt")).read().strip(), flush=True)\n')


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ports() -> list[str]:
    """A node's own ports, free ones: two nodes on one machine must not both take Ray's defaults."""
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [x for name, port in zip(names, _free_ports(len(names)), strict=True) for x in (name, str(port))]


def _toy_with_data(root: Path) -> Path:
    """The toy target with a data step (a frozen data.py, run per node) and a passthrough variable."""
    toy = make_toy(root, sleep=0.01)
    (root / "data.py").write_text(DATA_PY)
    toml = (root / "target.toml").read_text()
    toml = toml.replace('command = "python train.py --seed {seed} --steps {steps}"',
                        'command = "python train.py --seed {seed} --steps {steps} --data {data}"\n'
                        'passthrough_env = ["TOY_FLAVOUR"]')
    toml += '\n[data]\npath = "{cache}/toy-data"\nprepare = "python data.py --out {data}"\n'
    (root / "target.toml").write_text(toml)
    train = (root / "train.py").read_text()
    assert "args = p.parse_args()\n" in train
    (root / "train.py").write_text(train.replace("args = p.parse_args()\n", SHOW, 1))
    return toy.source


class Cluster:
    """`ray start --head` and a second node in its own mount namespace, both `--block`ing children of
    this test, so that ending them (and everything they started) needs no name-based kill."""

    def __init__(self, tmp: Path, hide: list[Path], head_cache: Path, node2_cache: Path):
        self.tmp, self.hide = tmp, hide
        self.token = secrets.token_hex(32)
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a limit
        self.port = _free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        base = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "RAY_USAGE_STATS_ENABLED": "0"}
        base.pop("RAY_ADDRESS", None)
        self.env = {**base, "SPEEDSEARCH_CACHE": str(head_cache), "TOY_FLAVOUR": "controller"}
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        try:
            self._start(hide, head_cache, node2_cache, base)
        except BaseException:
            self.stop()  # a node that came up before the failure is not left behind
            raise

    def _start(self, hide: list[Path], head_cache: Path, node2_cache: Path, base: dict) -> None:
        common = ["--block", "--num-cpus", "1", "--object-store-memory", str(150 * 1024 ** 2),
                  "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        self._spawn("head", ["ray", "start", "--head", "--port", str(self.port), "--include-dashboard", "false",
                             "--temp-dir", self.temp_dir,
                             *common, *_node_ports()],
                    {**base, "SPEEDSEARCH_CACHE": str(head_cache), "TOY_FLAVOUR": "head"})
        self._wait_port()
        ray2 = ["ray", "start", "--address", self.address, "--resources", '{"node2": 1}', *common, *_node_ports()]
        mounts = [f"mount -t tmpfs none {shlex.quote(str(p))}" for p in hide]  # only this namespace sees them
        script = " && ".join([*mounts, "exec " + shlex.join(ray2)])
        self._spawn("node2", ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                    {**base, "SPEEDSEARCH_CACHE": str(node2_cache), "TOY_FLAVOUR": "node2"})
        self.nodes = self._wait_nodes(2)

    def _spawn(self, name: str, argv: list[str], env: dict) -> None:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        with open(log, "w") as out:
            self.procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def _tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs if p.exists())

    def _wait_port(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError("a Ray node exited at start:\n" + self._tail())
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise AssertionError("the head never listened:\n" + self._tail())

    def _wait_nodes(self, n: int, timeout: float = 120) -> dict[str, dict]:
        """{node id: resources} once `n` nodes are alive (asked through a driver of its own)."""
        code = (f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False, "
                "configure_logging=False); "
                "print(json.dumps({x['NodeID']: x['Resources'] for x in ray.nodes() if x['Alive']}))")
        deadline = time.time() + timeout
        nodes: dict = {}
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError("a Ray node exited at start:\n" + self._tail())
            out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                 timeout=120)
            if out.returncode == 0:
                nodes = json.loads(out.stdout.strip().splitlines()[-1])
                if len(nodes) >= n:
                    return nodes
            time.sleep(1)
        raise AssertionError(f"{len(nodes)} of {n} nodes came up:\n" + self._tail())

    def stop(self) -> list[int]:
        """End both nodes and everything they started; returns the pids still alive after (none)."""
        tree: list[psutil.Process] = []
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                tree += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in self.procs:  # `ray start --block` ends the node's processes on SIGTERM
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=20)
        for proc in alive:
            try:
                tree += proc.children(recursive=True)
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=10)
        for p in self.procs:
            p.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return [p.pid for p in alive]


def _runs(search: Path) -> list[tuple[dict, str]]:
    """Every recorded run: its JSON and its log, as the controller saved them."""
    out = []
    for path in sorted((search / "artifacts").glob("trial-*/seed-*.json")):
        data = json.loads(path.read_text())
        out.append((data, (path.parent / data["log"]).read_text()))
    return out


@pytest.mark.timeout(900)
def test_a_search_runs_on_a_node_that_shares_no_files(tmp_path: Path):
    target_dir, search = tmp_path / "toy", tmp_path / "search"
    toml = _toy_with_data(target_dir)
    search.mkdir()  # the mount point for node 2's tmpfs; launch accepts an empty folder
    head_cache, node2_cache = tmp_path / "cache-head", tmp_path / "cache-node2"
    cluster = Cluster(tmp_path, [search, target_dir], head_cache, node2_cache)
    try:
        node2 = next(n for n, res in cluster.nodes.items() if res.get("node2"))
        head = next(n for n in cluster.nodes if n != node2)
        out = subprocess.run(
            [sys.executable, "-m", "agent", "launch", "--dir", str(search), "--target", str(toml),
             "--ray-address", cluster.address, "--proposers", "ideas", "--seeds", "2", "--workers", "2",
             "--budget-trials", "3", "--max-fidelity", "short", "--json"],
            env=cluster.env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:] + cluster._tail()
        runs = _runs(search)
        assert runs, "no run was recorded"
        where = {r["provenance"].get("node_id") for r, _ in runs}
        print(f"runs: {len(runs)}, on node 2: {sum(r['provenance'].get('node_id') == node2 for r, _ in runs)}, "
              f"statuses: {sorted({r['status'] for r, _ in runs})}")
        assert {head, node2} <= where, f"runs landed on {where}, nodes {head} (head) and {node2}"
        for r, log in runs:
            assert "NoSuchPath" not in r["reason"] and "No such file" not in r["reason"], r["reason"]
            if r["status"] == "ok":  # logs came back by value; the environment was the controller's
                assert "FLAVOUR=controller" in log and "DATA=prepared-on-this-node" in log, log[-2000:]
            assert r["provenance"]["code_version"] and r["provenance"]["host"]
        launched = json.loads(out.stdout)
        assert set(launched["status"]["baseline"]) == {"short"}, launched["status"]
        root = subprocess.run(["git", "-C", str(search / "repo"), "rev-list", "--max-parents=0", "--all"],
                              capture_output=True, text=True, check=True).stdout.split()
        base = [r for r, _ in runs if r["commit"] in root]
        assert len(base) >= 2 and all(r["status"] == "ok" for r in base), [(r["status"], r["reason"]) for r in base]
        on_node2 = [r for r, _ in runs if r["provenance"]["node_id"] == node2]
        assert any(r["status"] == "ok" for r in on_node2), [r["reason"] for r in on_node2]
        # Data and sources were made in each node's own cache, the data from the shipped base.
        for cache in (head_cache, node2_cache):
            assert (cache / "toy-data" / "tokens.txt").is_file(), cache
            assert list((cache / "sources").glob("*.tar")), cache
        # Node 2 ran its runs in its own cache, not the search's folder, and removed each run's folder
        # once its log had gone back by value.
        assert (node2_cache / "runs").is_dir()
        kept = [p.name for p in (node2_cache / "runs").iterdir() if p.name != ".warm"]  # .warm: its warm slots
        assert not kept, kept
    finally:
        left = cluster.stop()
    assert not left, f"processes left behind: {left}"


def test_a_shipped_run_opens_no_controller_path(ray_cluster, tmp_path: Path, monkeypatch):
    """In one process: ship a spec, take away the target folder and change the environment, then
    run it; the node cache serves the source again without the object store."""
    target_dir = tmp_path / "toy"
    toy = load_target(_toy_with_data(target_dir))
    monkeypatch.setenv("SPEEDSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TOY_FLAVOUR", "controller")
    spec = RunSpec(toy, seed=0, fidelity="smoke", run_id="shipped")
    shipped = ship(spec)
    assert shipped.repo is None and shipped.source[0].startswith("dir-") and shipped.target.passthrough_env == ()
    assert ("TOY_FLAVOUR", "controller") in shipped.env and shipped.code_version
    assert ship(spec).source == shipped.source  # put once per tree id
    shutil.rmtree(target_dir)  # what a node without the controller's files sees
    monkeypatch.setenv("TOY_FLAVOUR", "worker")
    result = evaluate(shipped, make_sandbox("process"), tmp_path / "runs", keep_workdir=False)
    assert result.status == Status.OK, result.reason
    log = Path(result.log).read_text()
    assert "FLAVOUR=controller" in log and "DATA=prepared-on-this-node" in log
    assert result.provenance["code_version"] == shipped.code_version
    cached = tmp_path / "cache" / "sources" / f"{shipped.source[0]}.tar"
    assert cached.is_file()
    unship((shipped.source[0], None), tmp_path / "again")  # no ref: only the node's copy can serve it
    assert (tmp_path / "again" / "train.py").read_text().count("FLAVOUR=") == 1

    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    (repo_dir / "a.txt").write_text("one\n")
    with git.Repo.init(repo_dir) as repo:
        repo.index.add(["a.txt"])
        commit = repo.index.commit("one")
        tree_id, _ = commit_source(repo_dir, commit.hexsha)
        assert tree_id == commit.tree.hexsha
