"""A throw-away PostgreSQL server on loopback for tests and benchmarks,
started from Debian's server binaries (``apt-get install postgresql``).

``postgres_missing()`` says why none can be started (None when one can);
``PostgresCluster()`` is a context manager that runs ``initdb`` in a fresh
folder, starts the server on a free 127.0.0.1 port with password
authentication, creates a role and a database for the app, and yields itself
(``.url`` is the libpq URL the app takes in ``CTAPP_DATABASE_URL``); the
server and its folder are removed on exit. PostgreSQL refuses to run as root,
so under root it runs as the ``postgres`` system user the package creates.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SYSTEM_USER = "postgres"


def postgres_bin() -> Path | None:
    found = sorted(glob.glob(PG_BIN_GLOB), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for folder in reversed(found):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def postgres_missing() -> str | None:
    """Why no throw-away server can be started here, or None."""
    if postgres_bin() is None:
        return f"the PostgreSQL server binaries ({PG_BIN_GLOB}/initdb) are not installed: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"running as root and there is no '{SYSTEM_USER}' user to run PostgreSQL as"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowAwayServer:
    """A server a test starts in a folder of its own: ``with Server(...) as s:`` starts it, and stops it
    and removes its folder however the block ends, a failed start included."""

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class PostgresCluster(ThrowAwayServer):
    def __init__(self, database: str = "ctapp", user: str = "ctapp"):
        reason = postgres_missing()
        if reason:
            raise RuntimeError(reason)
        self.bin = postgres_bin()
        self.database, self.user = database, user
        self.password = secrets.token_urlsafe(12)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ctapp-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, stdin: str | None = None) -> str:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SYSTEM_USER, "--", *command]
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done.stdout

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._run("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.root), "-p", str(self.port),
                         "-d", database, "-U", SYSTEM_USER, "-At", "-c", sql)

    def start(self) -> PostgresCluster:
        if os.geteuid() == 0:
            shutil.chown(self.root, SYSTEM_USER)
        self._run("initdb", "-D", str(self.data), "-U", SYSTEM_USER, "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=100", "start")
        self.psql(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'")
        self.psql(f"CREATE DATABASE {self.database} OWNER {self.user}")
        return self

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
