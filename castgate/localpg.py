"""A throwaway PostgreSQL server for ``castgate demo``: initdb in a directory of the
demo, SCRAM password authentication on 127.0.0.1, a free port, and stop plus removal
of the cluster at the end. Only used when the server binaries are installed.

The server is the demo's direct child (``postgres``, not daemonised by ``pg_ctl``) with
a parent-death signal, so it stops whatever ends the demo: Ctrl-C, SIGTERM, a closed
terminal, SIGKILL. The cluster holds the demo's card table, so a small reaper process
(castgate/pg_reaper.py) removes it once both the demo and the server are gone, also when
the demo was SIGKILLed and none of its own clean-up ran.

Running as root, the server runs as the ``postgres`` (or ``nobody``) account, since
initdb and postgres refuse root; the cluster then needs a directory that account can
reach, which a private demo directory may not be.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recorder.errors import CastgateError

BINDIR_ENV = "CASTGATE_PG_BINDIR"
_BINARIES = ("initdb", "postgres")
_SUPERUSER = "castgate"
_TIMEOUT_S = 60
_START_ATTEMPTS = 3
_PREFIX = "castgate-demo-pg-"
_PR_SET_PDEATHSIG = 1


class LocalPgError(CastgateError):
    """The local PostgreSQL server could not be set up."""


def find_bindir() -> Path | None:
    """The directory holding initdb and postgres, or None.

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
    """initdb and postgres from the PATH, else Debian's
    ``/usr/lib/postgresql/<major>/bin`` (newest first), or None."""
    found = [shutil.which(name) for name in _BINARIES]
    if all(found):
        # The binaries of one installation: those beside the resolved postgres.
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


def die_with_parent(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` for a child that must not outlive this process: in the forked
    child, before exec, it asks the kernel to send ``sig`` when the parent dies (however
    it dies, SIGKILL included). Linux only; elsewhere the parent's own clean-up has to
    do (Ctrl-C, SIGTERM and SIGHUP still reach it). Set after the child changed its user
    (``subprocess`` runs ``preexec_fn`` after that), since a change of credentials
    clears the setting. The signal comes when the thread that forked exits: start such
    children from a thread that lives as long as the process (the main one)."""
    parent = os.getpid()

    def preexec() -> None:
        if not sys.platform.startswith("linux"):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


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
    _proc: subprocess.Popen[bytes] | None = None
    _reaper: subprocess.Popen[bytes] | None = None

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

    def _as_account(self) -> dict[str, Any]:
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        extra = self._as_account()
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
        base = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))
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
        log_path = self.base / "postgres.log"
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = _free_port()
            # The conf file rather than command-line options; on a retry the later
            # lines win.
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(self.port),
                "unix_socket_directories": f"'{self.base}'",
                "fsync": "off",  # a throwaway demo database
                "max_connections": "20",
            }
            with (self.datadir / "postgresql.conf").open("a") as fh:
                fh.writelines(f"{k} = {v}\n" for k, v in settings.items())
            with log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(self.datadir)],
                    cwd=self.base,
                    env=_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    # Its own process group: a Ctrl-C at the terminal reaches the demo,
                    # which stops the server in order, not the server behind its back.
                    process_group=0,
                    # SIGINT: PostgreSQL's fast shutdown.
                    preexec_fn=die_with_parent(signal.SIGINT),
                    **self._as_account(),
                )
            if self._wait_ready():
                self._start_reaper(self._proc.pid)
                return
            self._halt()
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            # Another process may have taken the port between probing and binding.
            if attempt == _START_ATTEMPTS or "could not bind" not in text:
                last = text.strip().splitlines()[-1:] or ["no output"]
                raise LocalPgError(f"PostgreSQL did not start: {last[0]}")

    def _wait_ready(self) -> bool:
        """True once the server accepts connections; False if it exited or did not
        get there within the start timeout."""
        assert self._proc is not None
        deadline = time.monotonic() + _TIMEOUT_S
        pidfile = self.datadir / "postmaster.pid"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            # postmaster.pid's eighth line is the server's status ("ready" once it
            # accepts connections; PostgreSQL 10 and later).
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return True
            time.sleep(0.05)
        return False

    def _start_reaper(self, server_pid: int) -> None:
        # Its own session: a signal to the demo's process group does not end it early.
        # It holds the read end of a pipe whose write end only this process has.
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "castgate.pg_reaper", str(server_pid), str(self.base)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _halt(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # fast shutdown: roll back, disconnect, stop
        try:
            proc.wait(_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        """Stop the server and remove its cluster (it holds the demo's card table)."""
        self._halt()
        shutil.rmtree(self.base, ignore_errors=True)
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            assert reaper.stdin is not None
            reaper.stdin.close()  # nothing left to reap: it ends at once
            reaper.wait(30)
