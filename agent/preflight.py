"""What a search needs from outside, checked before anything is made: an API key for the llm
proposer, a Docker daemon for `--sandbox docker`, a Ray cluster at `--ray-address` that lets this
controller in, the GPUs a run needs, and a database that answers and takes writes.

Light on imports on purpose: the CLI runs these checks before it loads Ray, so a refusal comes
back in a moment.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.settings import SearchSettings
from search_space.errors import UserError

AUTH_HINT = ("set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or a file named by "
             "RAY_AUTH_TOKEN_PATH) on every node and on this controller, the same token everywhere")


def check_access(settings: SearchSettings, dir: Path | None = None, new: bool = False) -> None:
    """What the search will need from outside, checked before anything is made: the API key for
    the llm proposer, a Docker daemon for --sandbox docker, a Ray cluster at --ray-address, the
    database (`new`: a search about to be made in `dir`, whose study name must be free).
    Raises UserError naming the option."""
    if "llm" in settings.proposers and not os.environ.get("ANTHROPIC_API_KEY"):
        raise UserError("--proposers llm: needs an Anthropic API key; set ANTHROPIC_API_KEY "
                        "(or leave llm out of --proposers)")
    if settings.sandbox == "docker":
        try:
            from env.docker_sandbox import docker_client

            client = docker_client(timeout=5)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as e:  # the docker SDK raises several types for one cause: no daemon
            raise UserError(f"--sandbox docker: no Docker daemon answers ({first_line(e)}); start dockerd "
                            "or use --sandbox process") from None
    if settings.ray_address:
        check_cluster(settings.ray_address)
    check_database(settings, dir, new)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def check_cluster(address: str, option: str = "--ray-address", timeout_s: float = 3.0) -> None:
    """A Ray address (`host:port` or `ray://host:port`) must answer on its port; `auto` must find a
    cluster started on this machine; a cluster with token auth must accept this controller. Ray
    itself would retry for a minute or more first, and name no cause."""
    if address == "auto":
        found = STARTED_CLUSTER
        if not found.exists():
            raise UserError(f"{option} auto: no Ray cluster runs on this machine (start one with "
                            "`ray start --head`, or leave it out for a local one)")
        address = found.read_text().strip() or address
        if address == "auto":
            return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"{option} {address}: expected host:port or ray://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(f"{option} {address}: unreachable ({e.strerror or e})") from None
    if "://" not in address:  # a Ray Client address (ray://) speaks another protocol: ray.init says
        _ask_cluster(address, option)


def _ask_cluster(address: str, option: str) -> None:
    """One request to the cluster's control store (GCS), so a refused token or a port that is
    not Ray's shows now, in a few seconds, with its cause."""
    try:
        from ray._raylet import InnerGcsClient  # Ray's own client; ray.init would retry for ~20 s
        from ray.exceptions import AuthenticationError, RpcError
    except ImportError:  # another Ray: ray.init will tell
        return
    try:
        with _quiet_stderr():  # Ray's C++ side warns on fd 2 at each failed attempt
            client = InnerGcsClient.standalone(address, None, 3000)
            client.internal_kv_get(b"session_name", b"session", timeout=3)
            del client
    except AuthenticationError:
        raise UserError(f"{option} {address}: the cluster refused this controller (token authentication); "
                        + AUTH_HINT) from None
    except (RpcError, TimeoutError, ConnectionError) as e:
        raise UserError(f"{option} {address}: no Ray cluster answers there ({first_line(e)})") from None


def is_auth_refusal(e: BaseException) -> bool:
    """Whether a failure to join a cluster was its token authentication refusing us."""
    text = f"{type(e).__name__} {e}"
    return any(w in text for w in ("AuthenticationError", "InvalidAuthToken", "Unauthenticated", "auth token"))


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for a moment (native code writes there, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


# -- GPUs -------------------------------------------------------------------------------------


# Where `ray start` records the cluster it started; a plain `ray.init()` joins that one.
STARTED_CLUSTER = Path("/tmp/ray/ray_current_cluster")


def joins_started_cluster() -> bool:
    """Whether a pool without an address joins a cluster started here by `ray start` (Ray's own
    rule), rather than starting one of its own."""
    return bool(os.environ.get("RAY_ADDRESS")) or STARTED_CLUSTER.exists()


def check_local_gpus(gpus: int, name: str) -> None:
    """Without a cluster the pool has this machine's GPUs: refuse a target that needs more per run
    than that (it would wait forever, saying nothing)."""
    if gpus <= 0:
        return  # nvidia-smi can take seconds; a CPU target need not ask
    from env.gpus import visible_gpus

    have = len(visible_gpus())
    if gpus > have:
        raise UserError(f"target {name} needs {gpus} GPU(s) per run; this machine shows {have} (nvidia-smi, "
                        "CUDA_VISIBLE_DEVICES) and no --ray-address names a cluster with more")


def check_node_gpus(gpus: int, name: str, where: str) -> None:
    """In a running Ray cluster (local or joined), refuse a target needing more GPUs per run than
    the largest live node has: a run never spans nodes."""
    if gpus <= 0:
        return
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    most = max((n.get("Resources", {}).get("GPU", 0) for n in nodes), default=0)
    if gpus > most:
        raise UserError(f"target {name} needs {gpus} GPU(s) per run; the largest node of {where} has "
                        f"{most:g} ({len(nodes)} node(s); a run never spans nodes)")


# -- the database -----------------------------------------------------------------------------


def check_database(settings: SearchSettings, dir: Path | None, new: bool) -> None:
    """The runs database answers and takes writes; for a new search its study names are free.
    With no --storage the database is a SQLite file in the search folder: the folder must be
    writable."""
    if new and dir is not None:
        _no_search_in(Path(dir))
    if not settings.storage:
        if new and dir is not None:
            _writable_folder(Path(dir), "--dir")
        return
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    from sqlalchemy.pool import NullPool

    from runs_db.study import COMPANIONS, driver_url, redact

    shown = redact(settings.storage)
    try:
        url = make_url(driver_url(settings.storage))
    except ArgumentError:
        raise UserError(f"--storage {shown}: not a database URL (e.g. postgresql://user@host/db)") from None
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        if not url.database or url.database == ":memory:":
            raise UserError(f"--storage {shown}: give a file (sqlite:///path/to/study.db)")
        _writable_folder(path.parent, "--storage")
        if not path.exists():
            return  # made with the search
    elif url.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = 5
    try:
        engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    except Exception as e:  # a driver that is not installed, a bad option
        raise UserError(f"--storage {shown}: cannot use it ({first_line(e)})") from None
    try:
        try:
            conn = engine.connect()
        except Exception as e:
            raise UserError(f"--storage {shown}: the database does not answer ({_reason(e)})") from None
        with conn:
            names = [settings.study_name, *(settings.study_name + suffix for suffix in COMPANIONS)]
            has_studies = inspect(conn).has_table("studies")
            if new and has_studies:
                rows = conn.execute(text("SELECT study_name FROM studies")).scalars().all()
                taken = [n for n in names if n in rows]
                if taken:
                    raise UserError(f"--study-name {settings.study_name}: {shown} already holds a study named "
                                    f"{taken[0]!r}; give each search sharing the database its own --study-name "
                                    "(or --resume that search from its folder)")
            _probe_write(conn, has_studies, shown, text)
    finally:
        engine.dispose()


def _probe_write(conn, has_studies: bool, shown: str, text) -> None:
    """A write inside a transaction that is rolled back: a read-only server, a role without
    rights, or a full disk shows now rather than at the first trial."""
    conn.rollback()  # the reads above began a transaction of their own
    trans = conn.begin()
    try:
        if has_studies:
            conn.execute(text("INSERT INTO studies (study_name) VALUES (:n)"), {"n": "speedsearch-write-probe"})
        else:
            conn.execute(text("CREATE TABLE speedsearch_write_probe (x INTEGER)"))
    except Exception as e:
        raise UserError(f"--storage {shown}: the database refuses writes ({_reason(e)})") from None
    finally:
        trans.rollback()


def _reason(e: BaseException) -> str:
    """A driver's error without SQLAlchemy's wrapping: its first line."""
    return first_line(getattr(e, "orig", None) or e)


def _no_search_in(dir: Path) -> None:
    """A new search's folder must not hold one already (RunsDB.create checks the same, later)."""
    for name in ("search.toml", "study.db", "repo"):
        if (dir / name).exists():
            raise UserError(f"{dir.resolve()} already holds a search ({name} exists); resume it instead")


def _writable_folder(path: Path, option: str) -> None:
    """`path`, or the nearest folder above it that exists, must be a folder this user can write."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{option} {path}: {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: cannot write in {p}")
