# ==== with pytest-xdist (`-n 2 --dist loadfile`: the README's test command and CI) =================
# A plain `ray.init()` joins the cluster named in <ray temp dir>/ray_current_cluster, which a test's own
# `ray start` writes: each xdist worker gets its own Ray temp dir, so no worker joins another's cluster.
# xdist's workers ignore SIGINT, and a child inherits an ignored signal, so a CLI started by a test
# would never see its Ctrl-C: the worker takes Python's own handler back (a child then starts with
# the default, and Python turns it into KeyboardInterrupt).
import os as _px_os  # noqa: E402
import signal as _px_signal  # noqa: E402

if _px_os.environ.get("PYTEST_XDIST_WORKER"):
    _px_os.environ["RAY_TMPDIR"] = f"/tmp/ray-{_px_os.environ['PYTEST_XDIST_WORKER']}"
    _px_os.makedirs(_px_os.environ["RAY_TMPDIR"], exist_ok=True)
    _px_signal.signal(_px_signal.SIGINT, _px_signal.default_int_handler)
# ==== end of the parallel section ===============================================================


# ==== runs_db: PostgreSQL server and storage parametrisation (owner: runs_db) =================
# A throwaway PostgreSQL server for the whole session (tests/pg.py), or SPEEDSEARCH_TEST_PG_URL.
# Tests that take the `storage_url` fixture run once on SQLite and once on PostgreSQL.
import os as _rdb_os  # noqa: E402
import uuid as _rdb_uuid  # noqa: E402

import pytest as _rdb_pytest  # noqa: E402

from tests.pg import ENV_URL as _PG_ENV_URL
from tests.pg import PgServer as _PgServer
from tests.pg import PgUnavailable as _PgUnavailable


@_rdb_pytest.fixture(scope="session")
def pg_url():
    """A PostgreSQL URL for the session; fails (never skips) when no server can be had."""
    given = _rdb_os.environ.get(_PG_ENV_URL)
    if given:
        yield given
        return
    problem = None
    try:
        server = _PgServer()
        url = server.start()
    except _PgUnavailable as e:
        problem = str(e)
    if problem:
        _rdb_pytest.fail(problem, pytrace=False)
    try:
        yield url
    finally:
        server.stop()


@_rdb_pytest.fixture(params=["sqlite", _rdb_pytest.param("postgres", marks=_rdb_pytest.mark.postgres)])
def storage_url(request):
    """None (the search's own SQLite file) or a PostgreSQL URL shared by the session's tests."""
    return request.getfixturevalue("pg_url") if request.param == "postgres" else None


@_rdb_pytest.fixture
def study_name():
    """A fresh study name, so tests sharing one PostgreSQL database never collide."""
    return f"test-{_rdb_uuid.uuid4().hex[:12]}"
# ==== end of runs_db section ==================================================================


# ==== env: a docker daemon for the Docker sandbox's tests (owner: env sandboxes) ==============
# Uses the running daemon, or starts `dockerd` for the session (and stops it after). Fails, never
# skips, when no daemon can be had, unless SPEEDSEARCH_SKIP_DOCKER=1.
import os as _dk_os  # noqa: E402
import shutil as _dk_shutil  # noqa: E402
import subprocess as _dk_subprocess  # noqa: E402
import time as _dk_time  # noqa: E402

import pytest as _dk_pytest  # noqa: E402


def _dk_ping():
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except Exception:
        return None


@_dk_pytest.fixture(scope="session")
def dockerd(tmp_path_factory):
    """A docker client connected to a live daemon."""
    if _dk_os.environ.get("SPEEDSEARCH_SKIP_DOCKER") == "1":
        _dk_pytest.skip("SPEEDSEARCH_SKIP_DOCKER=1")
    client, proc = _dk_ping(), None
    if client is None:
        binary = _dk_shutil.which("dockerd")
        if binary is None:
            _dk_pytest.fail("no docker daemon and no dockerd binary (SPEEDSEARCH_SKIP_DOCKER=1 to skip)",
                             pytrace=False)
        log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with open(log_path, "wb") as log:
            proc = _dk_subprocess.Popen([binary], stdout=log, stderr=_dk_subprocess.STDOUT, start_new_session=True)
        deadline = _dk_time.monotonic() + 60
        # under xdist the other worker may be starting one at the same moment: this one then exits
        # (the pid file is taken) and the other's answers, so wait for an answer, not for this process
        while client is None and _dk_time.monotonic() < deadline:
            _dk_time.sleep(0.5)
            client = _dk_ping()
        if client is None:
            proc.terminate()
            _dk_pytest.fail(f"dockerd did not start; its log:\n{log_path.read_text()[-3000:]}", pytrace=False)
    try:
        yield client
    finally:
        client.close()
        # under xdist the daemon serves both workers, and this one cannot know when the other is done
        # with it: it is left running (CI's .ci/run starts it before the suite in any case)
        if proc is not None and not _dk_os.environ.get("PYTEST_XDIST_WORKER"):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except _dk_subprocess.TimeoutExpired:
                proc.kill()
# ==== end of env docker section ===============================================================


# ==== env/agent: a local Ray cluster with logical GPUs, shared by the pool and loop tests ============
@_rdb_pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster: 4 CPUs and 4 logical GPUs (there is no real GPU here)."""
    import ray

    ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
