"""The CLI against what lives outside a search, as a user meets it: signals to `evaluate`, a real
Ray cluster (`ray start --head`) with token authentication, GPUs a target needs and the pool lacks,
PostgreSQL databases shared by searches, and a database server that dies in the middle.

Everything is real: subprocesses of the `speedsearch` command, a Ray head started for this module
(in its own temp folder, so no other test's `ray.init()` finds it), PostgreSQL servers from
tests/pg.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.pg import PgServer
from tests.test_cli_input import refused
from tests.toy import make_toy, mode_patch

TOKEN = "speedsearch-test-token-" + uuid.uuid4().hex
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def environ(**extra: str) -> dict[str, str]:
    """This process's environment without Ray's auth and address variables, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in AUTH_VARS}, **extra}


def with_token(**extra: str) -> dict[str, str]:
    return environ(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, **extra)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else environ())


def left_under(folder: Path) -> list[tuple[int, list[str]]]:
    """Processes whose working directory is inside `folder` (a trainer runs in its run's folder)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.cwd().startswith(str(folder)):
                found.append((p.pid, p.cmdline()))
        except (psutil.Error, OSError):
            pass
    return found


def wait_for(what, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} first: {proc.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# -- evaluate: SIGINT and SIGTERM end the run and print its result ------------------------------


def signal_evaluate(tmp_path: Path, sig: signal.Signals, *args: str, env: dict[str, str] | None = None) -> None:
    """Run `evaluate` on a trainer that goes silent, send `sig` once it runs, check what follows:
    exit 128 + sig, one JSON result saying so, and no process of the run left."""
    toy = make_toy(tmp_path / "toy")
    patch = tmp_path / "hang.patch"
    patch.write_text(mode_patch("hang"))  # prints step 0, then silent for 600 s
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "agent", "evaluate", "--target", str(toy.source), "--patch",
                             str(patch), "--json", "--run-root", str(runs), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env if env is not None else environ())
    try:
        logs = lambda: [p.read_text() for p in runs.glob("*/run.log")]  # noqa: E731
        wait_for(lambda: any("step:0/" in t for t in logs()) and left_under(runs), proc=proc)
        trainer = [pid for pid, cmd in left_under(runs) if "train.py" in " ".join(cmd)]
        assert trainer, left_under(runs)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, stdout + stderr
    assert "Traceback" not in stderr, stderr
    result = json.loads(stdout)
    assert result["status"] == "failed" and result["reason"] == f"cancelled by {sig.name}"
    assert result["curve"] and result["curve"][0][0] == 0  # what the run printed before the signal is kept
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in trainer)
    assert left_under(runs) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_evaluate_its_trainer_and_prints_a_result(tmp_path: Path, sig: signal.Signals):
    signal_evaluate(tmp_path, sig)


# -- GPUs: a target needing more per run than the pool has is refused in one line --------------


def test_a_gpu_target_without_gpus_is_refused_before_anything_is_made(tmp_path: Path):
    toy = make_toy(tmp_path / "toy", gpus=1)
    d = tmp_path / "new" / "search"
    refused(cli("launch", "--dir", str(d), "--target", str(toy.source), env=environ(CUDA_VISIBLE_DEVICES="")),
            "target toy needs 1 GPU(s)", "this machine shows 0")
    assert not d.parent.exists()


def test_a_local_pool_has_the_machines_gpus(tmp_path: Path):
    """Without a cluster the pool gets the GPUs this machine shows (here one logical GPU named by
    CUDA_VISIBLE_DEVICES): a `gpus = 1` target runs."""
    toy = make_toy(tmp_path / "toy", gpus=1)
    d = tmp_path / "search"
    out = cli("launch", "--dir", str(d), "--target", str(toy.source), "--proposers", "ideas", "--seeds", "2",
              "--max-fidelity", "smoke", "--budget-trials", "1", "--json", env=environ(CUDA_VISIBLE_DEVICES="0"))
    assert out.returncode == 0, out.stdout + out.stderr
    runs = [json.loads(p.read_text()) for p in (d / "artifacts").glob("trial-*/seed-*.json")]
    assert runs and all(r["status"] == "ok" and r["provenance"]["gpu_ids"] == ["0"] for r in runs), runs


# -- a real Ray cluster with token authentication -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A Ray head with token auth, 2 CPUs and no GPU; its address. Its own temp folder (short:
    Ray's sockets live there), so no `ray.init()` elsewhere on this machine joins it. Ended by
    its process group, never by `ray stop` (which would end every cluster on the machine)."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    port = _free_port()
    start = subprocess.Popen(["ray", "start", "--head", "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
                              "--include-dashboard", "false", "--temp-dir", str(temp), "--disable-usage-stats"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=with_token(), start_new_session=True)
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out
        yield f"127.0.0.1:{port}"
    finally:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(start.pid, sig)  # the head's daemons and workers share the group `ray start` made
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(start.pid):
                time.sleep(0.2)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _group_alive(pgid: int) -> bool:
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            pass
    return False


def test_evaluate_on_the_cluster_with_its_token(cluster: str, tmp_path: Path):
    toy = make_toy(tmp_path / "toy")
    runs = tmp_path / "runs"
    out = cli("evaluate", "--target", str(toy.source), "--fidelity", "short", "--json", "--run-root", str(runs),
              "--ray-address", cluster, env=with_token())
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert data["status"] == "ok" and data["final"]["steps"] == 10
    assert "step:10/10" in Path(data["log"]).read_text()


def test_a_signal_ends_evaluate_on_the_cluster_and_its_run(cluster: str, tmp_path: Path):
    signal_evaluate(tmp_path, signal.SIGTERM, "--ray-address", cluster, env=with_token())


def test_a_refused_token_says_how_to_set_it(cluster: str, tmp_path: Path):
    toy = make_toy(tmp_path / "toy")
    # RAY_ADDRESS stands for --ray-address, as Ray's own tools read it
    line = refused(cli("evaluate", "--target", str(toy.source), "--run-root", str(tmp_path / "runs"),
                       env=environ(RAY_ADDRESS=cluster), timeout=60),
                   f"--ray-address {cluster}", "token", "RAY_AUTH_MODE=token", "every node")
    assert "same token" in line
    d = tmp_path / "new" / "search"
    refused(cli("launch", "--dir", str(d), "--target", str(toy.source), "--ray-address", cluster, timeout=60),
            "RAY_AUTH_MODE=token")
    wrong = environ(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-" + TOKEN)
    refused(cli("launch", "--dir", str(d), "--target", str(toy.source), "--ray-address", cluster, env=wrong,
                timeout=60), "RAY_AUTH_MODE=token")
    assert not d.parent.exists() and not (tmp_path / "runs").exists()


def test_a_cluster_without_the_gpus_a_run_needs_is_refused_before_the_folder(cluster: str, tmp_path: Path):
    toy = make_toy(tmp_path / "toy", gpus=1)
    d = tmp_path / "new" / "search"
    refused(cli("launch", "--dir", str(d), "--target", str(toy.source), "--ray-address", cluster, env=with_token()),
            "target toy needs 1 GPU(s)", f"the largest node of the cluster at {cluster} has 0")
    assert not d.parent.exists()


# -- PostgreSQL: searches sharing one database, and a server that dies ---------------------------


def test_two_searches_share_one_database(pg_url: str, tmp_path: Path):
    toy = make_toy(tmp_path / "toy")
    names = {"a": f"a-{uuid.uuid4().hex[:8]}", "b": f"b-{uuid.uuid4().hex[:8]}"}
    small = ("--proposers", "ideas", "--seeds", "2", "--workers", "2", "--max-fidelity", "smoke",
             "--budget-trials", "1", "--storage", pg_url, "--target", str(toy.source))
    for key, name in names.items():
        out = cli("launch", "--dir", str(tmp_path / key), "--study-name", name, *small)
        assert out.returncode == 0, out.stdout + out.stderr
    # a third search under a name in use is refused before anything is made
    refused(cli("launch", "--dir", str(tmp_path / "c"), "--study-name", names["a"], *small),
            f"--study-name {names['a']}", "already holds")
    assert not (tmp_path / "c").exists()
    assert f'study_name = "{names["a"]}"' in (tmp_path / "a" / "search.toml").read_text()
    seen = {}
    for key in names:
        data = json.loads(cli("status", "--dir", str(tmp_path / key), "--json", "--all").stdout)
        seen[key] = data
        assert data["study"] == names[key] and data["storage"].startswith("postgresql")
        assert sum(t["proposer"] == "ideas" for t in data["trials"]) == 1
    # resume goes on in its own study: the other search is untouched
    out = cli("launch", "--dir", str(tmp_path / "a"), "--resume", "--budget-trials", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    refused(cli("launch", "--dir", str(tmp_path / "a"), "--resume", "--study-name", names["b"]),
            "--study-name", "cannot change on --resume")
    a = json.loads(cli("status", "--dir", str(tmp_path / "a"), "--json", "--all").stdout)
    b = json.loads(cli("status", "--dir", str(tmp_path / "b"), "--json", "--all").stdout)
    assert sum(t["proposer"] == "ideas" for t in a["trials"]) == 2
    assert b["trials"] == seen["b"]["trials"]


def test_a_database_that_dies_during_a_search_ends_it_in_one_line(tmp_path: Path):
    server = PgServer()
    url = server.start()
    try:
        toy = make_toy(tmp_path / "toy", sleep=0.3)  # runs of seconds: the search is busy when the server goes
        d = tmp_path / "search"
        proc = subprocess.Popen([sys.executable, "-m", "agent", "launch", "--dir", str(d), "--target",
                                 str(toy.source), "--seeds", "2", "--workers", "2", "--storage", url,
                                 "--study-name", "dies"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=environ())
        try:
            wait_for(lambda: any((d / "artifacts").glob("trial-*/seed-*.json")), proc=proc)
            server.stop()  # immediate shutdown: every connection drops
            stdout, stderr = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        server.stop()
    assert proc.returncode == 2, stdout + stderr
    assert "Traceback" not in stdout + stderr, stderr
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error: the runs database postgresql://postgres@127.0.0.1:"), last
    assert "--resume" in last
    assert (d / "search.toml").is_file()  # runs were recorded: the search stays, to resume
    assert left_under(d) == []
    # with the server still gone, reading or resuming the search says so in one line
    refused(cli("status", "--dir", str(d)), "storage postgresql://postgres@127.0.0.1:", "cannot open")
    refused(cli("launch", "--dir", str(d), "--resume"), "storage postgresql://postgres@127.0.0.1:", "cannot open")


def test_a_discarded_search_leaves_its_study_names_free(pg_url: str, tmp_path: Path):
    """A new search that ends before recording anything is removed, its studies in a shared
    database too (the knobs sampler's beside its own), so the same --study-name can start again."""
    import optuna

    from agent.preflight import check_access
    from agent.runner import discard_new_search, open_search
    from agent.settings import SearchSettings
    from runs_db.study import driver_url
    from search_space.errors import UserError

    toy = make_toy(tmp_path / "toy")
    name = f"gone-{uuid.uuid4().hex[:8]}"
    settings = SearchSettings(target=str(toy.source), storage=pg_url, study_name=name)
    db, _ = open_search(tmp_path / "s", settings)
    optuna.create_study(study_name=f"{name}-knobs", storage=db.storage_url)  # as the knobs proposer does
    with pytest.raises(UserError, match=f"--study-name {name}: .* already holds a study named '{name}'"):
        check_access(settings, tmp_path / "t", new=True)
    assert discard_new_search(db, existed=False)
    check_access(settings, tmp_path / "t", new=True)  # free again: no error
    assert name not in optuna.get_all_study_names(driver_url(pg_url))
