"""A throwaway PostgreSQL server for the runs_db tests.

`PgServer` runs initdb + pg_ctl in a temp folder, listening on 127.0.0.1 on a free port with
trust auth, and creates one database. As root it runs them as the `postgres` OS user (initdb
refuses root). Set SPEEDSEARCH_TEST_PG_URL to use an existing server instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ENV_URL = "SPEEDSEARCH_TEST_PG_URL"
ENV_BIN = "SPEEDSEARCH_PG_BIN"  # folder holding initdb and pg_ctl, when not found by itself
DB_NAME = "speedsearch_test"
INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql "
                "(e.g. `apt-get install postgresql`), set SPEEDSEARCH_PG_BIN to their folder, "
                "or set SPEEDSEARCH_TEST_PG_URL to a server's URL")


class PgUnavailable(RuntimeError):
    """No PostgreSQL to test against; the message says how to get one."""


def find_bin() -> Path | None:
    candidates = [os.environ.get(ENV_BIN, "")]
    which = shutil.which("initdb")
    candidates += [str(Path(which).resolve().parent) if which else ""]  # the real folder, not a link
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    candidates += sorted(glob.glob("/usr/pgsql-*/bin"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """Start with `start()`, stop with `stop()`; `url` names the test database."""

    def __init__(self, bindir: Path | None = None):
        found = bindir or find_bin()
        if found is None:
            raise PgUnavailable(INSTALL_HINT)
        self.bindir = found
        self.root: Path | None = None
        self.port = 0
        self.url = ""
        self._as_postgres = os.geteuid() == 0

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self._as_postgres else list(args)

    def _run(self, *args: str, timeout: float = 60) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise PgUnavailable(f"{' '.join(args[:2])} failed ({proc.returncode}): "
                                f"{(proc.stderr or proc.stdout)[-2000:]}")

    def start(self) -> str:
        self.root = Path(tempfile.mkdtemp(prefix="speedsearch-pg-"))
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> str:
        assert self.root is not None
        if self._as_postgres:
            shutil.chown(self.root, user="postgres")
        data, sock = self.root / "data", self.root / "sock"
        self._run("mkdir", str(sock))  # made by the server's own user
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-locale", "--no-sync")
        for attempt in range(3):
            self.port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {sock} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"),
                          "-o", opts, "-w", "-t", "60", "start", timeout=90)
                break
            except PgUnavailable:
                if attempt == 2:
                    log = (self.root / "server.log").read_text(errors="replace")[-2000:]
                    raise PgUnavailable(f"pg_ctl start failed; server log:\n{log}") from None
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._create_database(admin, DB_NAME)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/{DB_NAME}"
        return self.url

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
            except (PgUnavailable, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    @staticmethod
    def _create_database(admin_url: str, name: str) -> None:
        import psycopg2

        deadline = time.monotonic() + 20
        while True:
            try:
                conn = psycopg2.connect(admin_url)
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
