"""A real PostgreSQL server for the tests, started from the installed server binaries.

``postgres_server`` (session scope) initialises a throwaway cluster in a temporary
directory and runs it on 127.0.0.1 with password (SCRAM) authentication, the way a
production store is reached; ``pg_url`` gives each test a database of its own on it.
The binaries are required, never optional: scripts/test installs them, and a missing
server fails the run rather than skipping the tests that would have caught a bug.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from castgate.localpg import installed_bindir
from relay.selfsigned import generate as self_signed

__all__ = ["PostgresServer", "find_postgres_bindir", "pg_url", "postgres_server"]

_PREFIX = "castgate-pg-"
_OWNER_FILE = "owner.pid"
_SHM = Path("/dev/shm")
_SHM_MIN_FREE = 2 * 1024**3
_SUPERUSER = "castgate"
_START_ATTEMPTS = 3
_START_TIMEOUT_S = 60


@dataclass(frozen=True)
class PostgresServer:
    """Where the test server listens and how to log in to it as its superuser."""

    host: str
    port: int
    user: str
    password: str
    datadir: Path

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq ``key=value`` connection string for ``dbname``."""
        return make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname,
        )

    def url(self, dbname: str = "postgres") -> str:
        """Return a ``postgresql://user:password@host:port/dbname`` URL."""
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(dbname, safe='')}"
        )

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if conn.info.server_version >= 150000:
                # Copying the template's files is three times faster than WAL-logging
                # them block by block, given wal_level=minimal (see postgres_server).
                query += sql.SQL(" STRATEGY FILE_COPY")
            conn.execute(query)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, ending any connections still open to it."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def find_postgres_bindir() -> Path | None:
    """Return the directory of initdb, pg_ctl and postgres, or None if not installed
    (the search ``castgate demo`` uses, without its environment override)."""
    return installed_bindir()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _server_account() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as, or None to run it as ourselves."""
    if os.geteuid() != 0:
        return None
    # initdb and postgres refuse to run as root.
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.fail("running as root, and neither a 'postgres' nor a 'nobody' user exists")


def _run_as(account: pwd.struct_passwd | None) -> dict[str, Any]:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _reachable(path: Path, account: pwd.struct_passwd | None) -> bool:
    # Running as ourselves, anything we can write to will do; the server account
    # additionally needs to traverse every parent (a TMPDIR in /root would not do).
    if not (path.is_dir() and os.access(path, os.W_OK | os.X_OK)):
        return False
    return account is None or all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def _cluster_parents() -> list[Path]:
    default = Path(tempfile.gettempdir()).resolve()
    return [_SHM, default, Path("/tmp")]


def _cluster_parent(account: pwd.struct_passwd | None) -> Path:
    """Return the directory to make the cluster directory in."""
    for parent in _cluster_parents():
        if not _reachable(parent, account):
            continue
        # A RAM disk is faster (CREATE DATABASE per test writes megabytes),
        # but container defaults make /dev/shm as small as 64 MB.
        if parent == _SHM and shutil.disk_usage(parent).free < _SHM_MIN_FREE:
            continue
        return parent
    pytest.fail("no temporary directory the PostgreSQL server account can use")


def _server_env() -> dict[str, str]:
    # PG* variables of the developer's shell (PGDATA, PGPORT, ...) must not redirect the
    # test server or its tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _log_tail(logfile: Path, lines: int = 20) -> str:
    try:
        return "\n".join(logfile.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def _pg_ctl_stop(bindir: Path, datadir: Path, account: pwd.struct_passwd | None, cwd: Path) -> None:
    subprocess.run(
        [str(bindir / "pg_ctl"), "stop", "-D", str(datadir), "-m", "immediate", "-w"],
        cwd=cwd,
        env=_server_env(),
        capture_output=True,
        check=False,
        timeout=_START_TIMEOUT_S,
        **_run_as(account),
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_stale_clusters(bindir: Path, account: pwd.struct_passwd | None) -> None:
    """Stop and remove clusters of earlier test sessions that died before teardown."""
    # A session killed from outside (SIGKILL, a CI job timeout) never reaches its
    # finally block; without this its server would keep running and piling up.
    stale = {base for parent in _cluster_parents() for base in parent.glob(f"{_PREFIX}*")}
    for base in sorted(stale):
        try:
            owner = int((base / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        if (base / "data").is_dir():
            _pg_ctl_stop(bindir, base / "data", account, base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Start a fresh PostgreSQL cluster for the test session; stop it at the end."""
    bindir = find_postgres_bindir()
    if bindir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
            "/usr/lib/postgresql/*/bin; run scripts/test, which installs them"
        )
    account = _server_account()
    _reap_stale_clusters(bindir, account)
    base = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=_cluster_parent(account)))
    (base / _OWNER_FILE).write_text(f"{os.getpid()}\n")
    datadir = base / "data"
    logfile = base / "postgres.log"
    password = secrets.token_urlsafe(24)
    try:
        pwfile = base / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if account is not None:
            for path in (base, pwfile):
                os.chown(path, account.pw_uid, account.pw_gid)
        initdb = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "--auth=scram-sha-256",
                f"--username={_SUPERUSER}",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=base,
            env=_server_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=_START_TIMEOUT_S,
            **_run_as(account),
        )
        pwfile.unlink()
        if initdb.returncode != 0:
            pytest.fail(f"initdb failed ({initdb.returncode}):\n{initdb.stderr}{initdb.stdout}")

        # TLS on, with a throwaway self-signed certificate: clients and the relay's
        # target connections (tls = "prefer" / "require") then run over TLS as they
        # would against a production server.
        self_signed(datadir / "server.crt", datadir / "server.key", "castgate test server", [])
        if account is not None:
            for name in ("server.crt", "server.key"):
                os.chown(datadir / name, account.pw_uid, account.pw_gid)

        for attempt in range(1, _START_ATTEMPTS + 1):
            port = _free_port()
            # Settings go to the conf file rather than through pg_ctl -o, which hands
            # them to a shell; on a retry the later lines win.
            conf = datadir / "postgresql.conf"
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(port),
                "unix_socket_directories": f"'{base}'",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                # Nothing replicates from a test server; minimal WAL makes CREATE
                # DATABASE (one per test) much cheaper.
                "wal_level": "minimal",
                "max_wal_senders": "0",
                "ssl": "on",
            }
            with conf.open("a") as fh:
                fh.writelines(f"{key} = {value}\n" for key, value in settings.items())
            start = subprocess.run(
                [
                    str(bindir / "pg_ctl"),
                    "start",
                    "-D",
                    str(datadir),
                    "-l",
                    str(logfile),
                    "-w",
                    "-t",
                    str(_START_TIMEOUT_S),
                ],
                cwd=base,
                env=_server_env(),
                capture_output=True,
                text=True,
                check=False,
                timeout=_START_TIMEOUT_S + 10,
                **_run_as(account),
            )
            if start.returncode == 0:
                break
            # Another process may have taken the port between probing and binding.
            if attempt == _START_ATTEMPTS or "could not bind" not in _log_tail(logfile):
                pytest.fail(
                    f"pg_ctl start failed ({start.returncode}):\n{start.stderr}{start.stdout}\n"
                    f"server log:\n{_log_tail(logfile)}"
                )
        yield PostgresServer(
            host="127.0.0.1", port=port, user=_SUPERUSER, password=password, datadir=datadir
        )
    finally:
        # Always, even when the server seems not to have started: pg_ctl -w may have
        # timed out on a server that is still coming up.
        if datadir.is_dir():
            _pg_ctl_stop(bindir, datadir, account, base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """Create an empty database for this test on the shared server; return its URL."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    yield postgres_server.create_database(name)
    # Keeps the cluster's size flat however many tests use it (it may live on a RAM
    # disk); FORCE ends connections a test left open.
    postgres_server.drop_database(name)
