"""A throwaway PostgreSQL server for ``castgate demo``: initdb in a directory of the
demo, SCRAM password authentication on 127.0.0.1, a free port, and stop plus removal
of the cluster at the end. Only used when the server binaries are installed.

Running as root, the server runs as the ``postgres`` (or ``nobody``) account, since
initdb and postgres refuse root; the cluster then needs a directory that account can
reach, which a private demo directory may not be.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recorder.errors import CastgateError

BINDIR_ENV = "CASTGATE_PG_BINDIR"
_BINARIES = ("initdb", "pg_ctl", "postgres")
_SUPERUSER = "castgate"
_TIMEOUT_S = 60
_START_ATTEMPTS = 3


class LocalPgError(CastgateError):
    """The local PostgreSQL server could not be set up."""


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None.

    ``$CASTGATE_PG_BINDIR`` when set (an empty or wrong value means: none), else the
    PATH, else Debian's ``/usr/lib/postgresql/<major>/bin``, newest first.
    """
    override = os.environ.get(BINDIR_ENV)
    if override is not None:
        path = Path(override)
        ok = bool(override) and all((path / name).is_file() for name in _BINARIES)
        return path if ok else None
    return installed_bindir()


def installed_bindir() -> Path | None:
    """initdb, pg_ctl and postgres from the PATH, else Debian's
    ``/usr/lib/postgresql/<major>/bin`` (newest first), or None."""
    found = [shutil.which(name) for name in _BINARIES]
    if all(found):
        # pg_ctl runs the postgres next to its own resolved path.
        bindir = Path(str(found[1])).resolve().parent
        if all((bindir / name).is_file() for name in _BINARIES):
            return bindir
    candidates = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        version = re.match(r"\d+(?:\.\d+)?", path.parent.name)
        if version and all((path / name).is_file() for name in _BINARIES):
            candidates.append((float(version.group()), path))
    return max(candidates)[1] if candidates else None


def _account() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise LocalPgError("running as root, and no 'postgres' or 'nobody' account to run PostgreSQL")


def _reachable(path: Path, account: pwd.struct_passwd | None) -> bool:
    if account is None:
        return True
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def _env() -> dict[str, str]:
    # The caller's PG* variables (PGDATA, PGPORT, ...) must not redirect the tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class LocalPostgres:
    """A running throwaway server and how to log in to it as its superuser."""

    bindir: Path
    base: Path
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    _account: pwd.struct_passwd | None = None
    _started: bool = False

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self.base / "data"

    def dsn(self, dbname: str = "postgres", user: str = _SUPERUSER, password: str = "") -> str:
        """A libpq connection string (the superuser's by default)."""
        secret = password or self.password
        return (
            f"host=127.0.0.1 port={self.port} dbname={dbname} user={user} "
            f"password={secret} sslmode=disable connect_timeout=10"
        )

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        extra: dict[str, Any] = {}
        if self._account is not None:
            extra = {
                "user": self._account.pw_uid,
                "group": self._account.pw_gid,
                "extra_groups": [],
            }
        return subprocess.run(
            args,
            cwd=self.base,
            env=_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=_TIMEOUT_S + 10,
            stdin=subprocess.DEVNULL,
            **extra,
        )

    @classmethod
    def start(cls, bindir: Path, parent: Path) -> LocalPostgres:
        """initdb a cluster under ``parent`` (or, if the server account cannot reach
        it, under the system temporary directory) and start it on a free port."""
        account = _account()
        if not _reachable(parent, account):
            parent = Path(tempfile.gettempdir())
        base = Path(tempfile.mkdtemp(prefix="castgate-demo-pg-", dir=parent))
        server = cls(bindir, base, _account=account)
        try:
            server._init()
            server._boot()
        except BaseException:
            server.stop()
            raise
        return server

    def _init(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._account is not None:
            for path in (self.base, pwfile):
                os.chown(path, self._account.pw_uid, self._account.pw_gid)
        res = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "--auth=scram-sha-256",
            f"--username={_SUPERUSER}",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        pwfile.unlink()
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LocalPgError(f"initdb failed ({res.returncode}): {tail[0]}")

    def _boot(self) -> None:
        log = self.base / "postgres.log"
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = _free_port()
            # The conf file rather than pg_ctl -o (which goes through a shell); on a
            # retry the later lines win.
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(self.port),
                "unix_socket_directories": f"'{self.base}'",
                "fsync": "off",  # a throwaway demo database
                "max_connections": "20",
            }
            with (self.datadir / "postgresql.conf").open("a") as fh:
                fh.writelines(f"{k} = {v}\n" for k, v in settings.items())
            res = self._run(
                str(self.bindir / "pg_ctl"),
                "start",
                "-D",
                str(self.datadir),
                "-l",
                str(log),
                "-w",
                "-t",
                str(_TIMEOUT_S),
            )
            self._started = True  # pg_ctl -w may time out on a server still starting
            if res.returncode == 0:
                return
            text = log.read_text(errors="replace") if log.exists() else ""
            # Another process may have taken the port between probing and binding.
            if attempt == _START_ATTEMPTS or "could not bind" not in text:
                last = text.strip().splitlines()[-1:] or [res.stderr.strip()]
                raise LocalPgError(f"PostgreSQL did not start: {last[0]}")

    def stop(self) -> None:
        """Stop the server and remove its cluster (it holds the demo's card table)."""
        if self._started and self.datadir.is_dir():
            res = self._run(
                str(self.bindir / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", "fast", "-w"
            )
            if res.returncode != 0:
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.datadir),
                    "-m",
                    "immediate",
                    "-w",
                )
            self._started = False
        shutil.rmtree(self.base, ignore_errors=True)
