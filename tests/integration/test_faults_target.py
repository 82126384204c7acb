"""Faults on the target side: the target's sshd or PostgreSQL backend killed while a
session streams through the relay, the whole server stopped, the target unreachable.

The agent gets a clear one-line error naming the target and a failing status, the cast
is sealed with the reason, the store row and an audit event say so, and the relay keeps
serving other sessions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import psycopg
import pytest

from recorder.integrity import Verdict, manifest_path, verify_cast
from recorder.signing import PUBLIC_NAME, load_public
from recorder.store import Store
from tests.fix_pg_relay import APP_PASSWORD, PG_TARGETS, PgRelay
from tests.fix_postgres import PostgresServer
from tests.fix_relay import Relay, start_relay, wait_for
from tests.fix_sshd import SshTarget

# -- processes ---------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) of a process, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The name is in parentheses and may itself contain spaces or parentheses.
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    return name, int(raw[raw.rindex(")") + 2 :].split()[1])


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def session_sshd_pids(marker: str) -> list[int]:
    """The sshd processes serving the connection whose command line carries ``marker``
    (the privileged monitor and the user's network process), without the listener."""
    # The agent's ssh client carries the marker too: take the process sshd started.
    shells = [
        pid
        for pid in _pids()
        if marker.encode() in _cmdline(pid)
        and (stat := _proc_stat(pid)) is not None
        and (_proc_stat(stat[1]) or ("", 0))[0] == "sshd"
    ]
    assert shells, f"no process sshd started runs {marker!r}"
    chain: list[int] = []
    stat = _proc_stat(shells[0])
    while stat is not None:
        parent = stat[1]
        pstat = _proc_stat(parent)
        if pstat is None or pstat[0] != "sshd":
            break
        grand = _proc_stat(pstat[1])
        if grand is None or grand[0] != "sshd":
            break  # ``parent`` is the listener: it keeps serving other connections
        chain.append(parent)
        stat = pstat
    assert chain, f"no per-connection sshd above {marker!r}"
    return chain


def kill_tree(root: int) -> None:
    """SIGKILL a process and all its descendants, parents first: a parent killed after
    its child could still report the child's death (an sshd would send the exit signal
    of the command it ran)."""
    order = [root]
    for parent in order:  # grows while iterating: breadth first
        order.extend(
            pid for pid in _pids() if (stat := _proc_stat(pid)) is not None and stat[1] == parent
        )
    for pid in order:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- what a session left behind ---------------------------------------------------------


def session_row(relay: Relay, marker: str) -> dict[str, Any]:
    """The session whose cast mentions ``marker``, once it has ended (row and event)."""
    with Store.open(f"sqlite:///{relay.workdir / 'data' / 'castgate.db'}") as store:
        for row in store.list_sessions():
            cast = Path(row["cast_path"])
            if row["ended_at"] is not None and cast.exists() and marker in cast.read_text():
                row["events"] = store.list_events(session_id=row["id"])
                row["commands"] = store.list_commands(row["id"])
                if any(e["kind"] == "session.end" for e in row["events"]):
                    return row
    raise AssertionError(f"no ended session recorded {marker!r}")


def ended(relay: Relay, marker: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def check() -> bool:
        try:
            found.append(session_row(relay, marker))
        except AssertionError:
            return False
        return True

    wait_for(check, 20)
    return found[-1]


def check_sealed(relay: Relay, row: dict[str, Any], reason: str) -> dict[str, Any]:
    """The cast is sealed, verifies, and its manifest carries the reason."""
    cast = Path(row["cast_path"])
    pub = load_public(relay.workdir / "data" / "keys" / PUBLIC_NAME)
    report = verify_cast(cast, pub)
    assert report.verdict is Verdict.INTACT, report.line()
    manifest: dict[str, Any] = json.loads(manifest_path(cast).read_text())
    assert manifest["end_reason"] == reason == row["status"]
    return manifest


def second_session_works(relay: Relay) -> None:
    res = relay.ssh("web", "echo still-serving")
    assert res.returncode == 0 and res.stdout == b"still-serving\n", res.stderr


# -- SSH ------------------------------------------------------------------------------------


class Streaming:
    """``ssh web@relay CMD`` with the real OpenSSH client, streaming output until the
    target goes away."""

    def __init__(self, relay: Relay, marker: str) -> None:
        loop = f"echo start-{marker}; while :; do echo tick-{marker}; sleep 0.05; done"
        self.proc = subprocess.Popen(
            ["ssh", *relay.ssh_args(), "web@127.0.0.1", loop],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = b""
        self.err = b""
        self._pumps = [
            threading.Thread(target=self._pump, args=(which,), daemon=True)
            for which in ("out", "err")
        ]
        for t in self._pumps:
            t.start()
        wait_for(lambda: self.out.count(b"tick-") >= 3, 20)

    def _pump(self, which: str) -> None:
        stream = self.proc.stdout if which == "out" else self.proc.stderr
        assert stream is not None
        while chunk := stream.read1(4096):  # type: ignore[attr-defined]
            setattr(self, which, getattr(self, which) + chunk)

    def wait(self) -> int:
        code = self.proc.wait(30)
        for t in self._pumps:
            t.join(10)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


def test_exec_target_sshd_killed_mid_stream(relay: Relay) -> None:
    marker = secrets.token_hex(6)
    agent = Streaming(relay, marker)
    for pid in session_sshd_pids(marker):
        os.kill(pid, signal.SIGKILL)
    assert agent.wait() == 255
    lines = agent.err.decode().strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"castgate: connection to target web lost: .+", lines[0]
    ), agent.err
    row = ended(relay, marker)
    manifest = check_sealed(relay, row, "target lost")
    assert manifest["exit_status"] is None
    lost = [e for e in row["events"] if e["kind"] == "target.lost"]
    assert len(lost) == 1 and lost[0]["outcome"] == "failure"
    assert lost[0]["resource"] == "ssh:web" and lost[0]["actor"] == "ci-agent"
    end = next(e for e in row["events"] if e["kind"] == "session.end")
    assert end["outcome"] == "failure" and end["detail"]["status"] == "target lost"
    second_session_works(relay)


async def _pty_shell_killed(relay: Relay, marker: str) -> tuple[int | None, str]:
    async with asyncssh.connect(
        "127.0.0.1",
        relay.port,
        username="web",
        known_hosts=relay.known_hosts_obj(),
        client_keys=[str(relay.agent_key)],
        config=[],
        agent_path=None,
    ) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
        out = ""

        async def read_until(text: str) -> None:
            nonlocal out
            while text not in out:
                data = await asyncio.wait_for(proc.stdout.read(4096), 20)
                if not data:
                    raise AssertionError(f"{text!r} never came: {out[-300:]!r}")
                out += data

        # Type at the first prompt, not into the login banner (typed ahead, the relay
        # reads the banner as the echoed line: unparsable, so opaque and held).
        while not out.rstrip(" ").endswith(("#", "$")):
            out += await asyncio.wait_for(proc.stdout.read(4096), 20)
        proc.stdin.write(f"exec sh -c 'while :; do echo tick-{marker}; sleep 0.05; done'\r")
        await read_until(f"tick-{marker}\r\ntick-{marker}")
        for pid in session_sshd_pids(marker):
            os.kill(pid, signal.SIGKILL)
        rest = await asyncio.wait_for(proc.stdout.read(), 20)
        await asyncio.wait_for(proc.wait_closed(), 20)
        return proc.exit_status, out + rest


def test_pty_shell_target_sshd_killed_mid_stream(relay: Relay) -> None:
    marker = secrets.token_hex(6)
    status, out = asyncio.run(_pty_shell_killed(relay, marker))
    assert status == 255
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(r"castgate: connection to target web lost: .+", last), out[-300:]
    row = ended(relay, marker)
    check_sealed(relay, row, "target lost")
    assert any(e["kind"] == "target.lost" for e in row["events"])
    # What the agent saw is what the cast keeps: the message is its last output.
    cast_text = Path(row["cast_path"]).read_text()
    assert "castgate: connection to target web lost" in cast_text
    second_session_works(relay)


@pytest.fixture
def own_sshd(sshd_target: SshTarget) -> Iterator[tuple[SshTarget, subprocess.Popen[bytes]]]:
    """A second sshd of our own (same keys as the shared one) that a test may kill whole."""
    from tests.fix_sshd import _start, _stop, _write_config

    base = Path(tempfile.mkdtemp(prefix="castgate-sshd-own-"))
    key_dir = sshd_target.client_key.parent
    port = free_port()
    config = _write_config(
        base, port, key_dir / "ssh_host_ed25519_key", key_dir / "authorized_keys"
    )
    proc = _start(config, port, base / "sshd.log")
    assert proc is not None, (base / "sshd.log").read_text()
    try:
        yield (
            SshTarget(
                host=sshd_target.host,
                port=port,
                user=sshd_target.user,
                client_key=sshd_target.client_key,
                host_key_line=sshd_target.host_key_line,
                known_hosts=sshd_target.known_hosts,
            ),
            proc,
        )
    finally:
        kill_tree(proc.pid)
        _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def test_whole_target_sshd_killed_and_unreachable_targets(
    own_sshd: tuple[SshTarget, subprocess.Popen[bytes]],
    sshd_target: SshTarget,
    tmp_path: Path,
) -> None:
    target, sshd = own_sshd
    refused_port = free_port()  # nothing listens there
    silent = socket.socket()  # accepts TCP connections but never speaks SSH
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    extra = "".join(
        f"""
[[targets]]
name = "{name}"
kind = "ssh"
address = "127.0.0.1:{port}"
user = "{target.user}"
key_file = "{target.client_key}"
host_key = "{target.host_key_line}"
groups = ["agents"]
"""
        for name, port in (
            ("web2", target.port),
            ("refusing", refused_port),
            ("silent", silent.getsockname()[1]),
        )
    )
    relay = start_relay(tmp_path / "r", sshd_target, extra=extra)
    try:
        marker = secrets.token_hex(6)
        loop = f"echo start-{marker}; while :; do echo tick-{marker}; sleep 0.05; done"
        agent = subprocess.Popen(
            ["ssh", *relay.ssh_args(), "web2@127.0.0.1", loop],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert agent.stdout is not None
        assert agent.stdout.readline() == f"start-{marker}\n".encode()
        kill_tree(sshd.pid)
        _out, err = agent.communicate(timeout=30)
        assert agent.returncode == 255
        assert re.fullmatch(rb"castgate: connection to target web2 lost: .+\r\n", err), err
        row = ended(relay, marker)
        check_sealed(relay, row, "target lost")

        # Unreachable at connect time: refused at once, and a silent one timed out.
        res = relay.ssh("refusing", "echo never")
        assert res.returncode == 255 and b"never" not in res.stdout
        assert re.fullmatch(
            rb"castgate: cannot reach target refusing: Connection refused\r\n", res.stderr
        ), res.stderr
        res = relay.ssh("silent", "echo never", timeout=60)  # the relay gives up after 15 s
        assert res.returncode == 255 and b"never" not in res.stdout
        assert (
            res.stderr == b"castgate: cannot reach target silent: no SSH handshake within 15 s\r\n"
        )
        second_session_works(relay)
    finally:
        relay.stop()
        silent.close()


# -- PostgreSQL -------------------------------------------------------------------------


class Sleeper:
    """A client through the relay, in the middle of a long query or idle after one."""

    def __init__(self, dsn: str, marker: str, *, busy: bool = False) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute(f"SELECT 'before-{marker}'")
        self.error: psycopg.Error | None = None
        self.thread: threading.Thread | None = None
        if busy:
            self.thread = threading.Thread(
                target=self._run, args=(f"SELECT 'busy-{marker}', pg_sleep(60)",), daemon=True
            )
            self.thread.start()

    def __enter__(self) -> Sleeper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def _run(self, sql: str) -> None:
        try:
            self.conn.execute(sql)
        except psycopg.Error as exc:
            self.error = exc

    def outcome(self) -> psycopg.Error:
        """The error the client got: from the query in flight, or from the next one."""
        if self.thread is not None:
            self.thread.join(30)
            assert not self.thread.is_alive()
        else:
            self._run("SELECT 1")
        assert self.error is not None and self.conn.closed
        return self.error


def backend_pid(direct_dsn: str, marker: str) -> int:
    """The target's backend of the relayed session whose (last) query selected the
    literal ``marker``."""
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        found: list[int] = []

        def seen() -> bool:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
                (f"%'{marker}'%",),
            ).fetchall()
            found[:] = [r[0] for r in rows]
            return len(found) == 1

        wait_for(seen, 20)
        return found[0]


def check_pg_lost(
    relay: Relay, marker: str, error: psycopg.Error, target: str, in_flight: str
) -> dict[str, Any]:
    assert error.sqlstate in ("57P01", "08006"), (error.sqlstate, str(error))
    assert error.diag.severity == "FATAL"
    assert f"target {target}" in str(error), str(error)
    row = ended(relay, marker)
    check_sealed(relay, row, "target lost")
    lost = [e for e in row["events"] if e["kind"] == "target.lost"]
    assert len(lost) == 1 and f"target {target}" in lost[0]["detail"]["reason"]
    # The query log is complete up to the loss: the statement before it, and the one in
    # flight (if any) as failed: "error" when the target said why (its FATAL), "target
    # lost" when it just went away.
    log = [(c["text"], c["status"]) for c in row["commands"]]
    assert log[0] == (f"SELECT 'before-{marker}'", "SELECT 1")
    assert len(log) == (2 if in_flight else 1), log
    if in_flight:
        assert log[1][0] == in_flight and log[1][1] in ("error", "target lost"), log
    transcript = Path(row["cast_path"]).read_text()
    assert f"FATAL:  target {target}" in transcript or f"castgate: target {target}" in transcript
    return row


def relayed_query_works(relay: Relay) -> None:
    with psycopg.connect(relay.pg_dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)


def test_pg_backend_terminated_mid_query_and_between_queries(
    pg_relay: PgRelay, postgres_server: PostgresServer
) -> None:
    relay = pg_relay.relay
    busy, idle = secrets.token_hex(6), secrets.token_hex(6)
    with Sleeper(relay.pg_dsn(), busy, busy=True) as b, Sleeper(relay.pg_dsn(), idle) as i:
        with psycopg.connect(postgres_server.dsn(), autocommit=True) as su:
            for literal in (f"busy-{busy}", f"before-{idle}"):
                pid = backend_pid(postgres_server.dsn(), literal)
                assert su.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        check_pg_lost(relay, busy, b.outcome(), "appdb", f"SELECT 'busy-{busy}', pg_sleep(60)")
        check_pg_lost(relay, idle, i.outcome(), "appdb", "")
    relayed_query_works(relay)


@pytest.fixture
def own_postgres() -> Iterator[tuple[int, Path]]:
    """A PostgreSQL cluster of our own (trust authentication on 127.0.0.1) that a test
    may stop; (port, pg_ctl) and the data directory."""
    from tests.fix_postgres import (
        _cluster_parent,
        _pg_ctl_stop,
        _run_as,
        _server_account,
        _server_env,
        find_postgres_bindir,
    )

    bindir = find_postgres_bindir()
    assert bindir is not None, "PostgreSQL binaries missing: run scripts/setup"
    account = _server_account()
    base = Path(tempfile.mkdtemp(prefix="castgate-pg-own-", dir=_cluster_parent(account)))
    if account is not None:
        os.chown(base, account.pw_uid, account.pw_gid)
    datadir = base / "data"
    port = free_port()
    try:
        subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "--auth=trust",
                "--username=owner",
                "--no-locale",
                "--encoding=UTF8",
                "--no-sync",
            ],
            cwd=base,
            env=_server_env(),
            capture_output=True,
            check=True,
            timeout=120,
            **_run_as(account),
        )
        with (datadir / "postgresql.conf").open("a") as fh:
            fh.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\n"
                f"unix_socket_directories = '{base}'\nfsync = off\n"
            )
        subprocess.run(
            [str(bindir / "pg_ctl"), "start", "-D", str(datadir), "-l", str(base / "log"), "-w"],
            cwd=base,
            env=_server_env(),
            capture_output=True,
            check=True,
            timeout=120,
            **_run_as(account),
        )
        yield port, datadir
    finally:
        if datadir.is_dir():
            _pg_ctl_stop(bindir, datadir, account, base)
        shutil.rmtree(base, ignore_errors=True)


def stop_immediately(datadir: Path) -> None:
    """``pg_ctl stop -m immediate``: every backend is killed at once, no checkpoint."""
    from tests.fix_postgres import _pg_ctl_stop, _server_account, find_postgres_bindir

    bindir = find_postgres_bindir()
    assert bindir is not None
    _pg_ctl_stop(bindir, datadir, _server_account(), datadir.parent)
    assert not (datadir / "postmaster.pid").exists()


def test_pg_server_stopped_mid_query_and_between_queries(
    pg_relay: PgRelay,
    own_postgres: tuple[int, Path],
    sshd_target: SshTarget,
    tmp_path: Path,
) -> None:
    port, datadir = own_postgres
    extra = (
        PG_TARGETS.format(port=pg_relay.server.port)
        + f"""
[[targets]]
name = "owndb"
kind = "postgres"
address = "127.0.0.1:{port}"
database = "postgres"
user = "owner"
groups = ["agents"]
tls = "disable"
"""
    )
    relay = start_relay(
        tmp_path / "r", sshd_target, extra=extra, env={"APPDB_PASSWORD": APP_PASSWORD}
    )
    try:
        dsn = relay.pg_dsn(target="owndb")
        busy, idle = secrets.token_hex(6), secrets.token_hex(6)
        with Sleeper(dsn, busy, busy=True) as b, Sleeper(dsn, idle) as i:
            backend_pid(f"host=127.0.0.1 port={port} dbname=postgres user=owner", f"busy-{busy}")
            stop_immediately(datadir)
            check_pg_lost(relay, busy, b.outcome(), "owndb", f"SELECT 'busy-{busy}', pg_sleep(60)")
            check_pg_lost(relay, idle, i.outcome(), "owndb", "")
        relayed_query_works(relay)  # appdb, on the other server
        with pytest.raises(psycopg.OperationalError, match="cannot reach target owndb"):
            psycopg.connect(dsn, autocommit=True)
    finally:
        relay.stop()
