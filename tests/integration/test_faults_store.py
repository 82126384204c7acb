"""The audit store unreachable for 30 s: a relay whose store is a dedicated PostgreSQL
server, stopped with ``pg_ctl`` and started again on the same port and data directory
while SSH and PostgreSQL sessions run through the relay. Sessions continue; every store
write is spooled on disk and replayed; afterwards every session, event, command,
checkpoint and manifest row is in the store, once, and every cast verifies."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import psycopg
import pytest

from recorder.integrity import manifest_path
from recorder.store import Store
from tests.fix_pg_relay import APP_PASSWORD, PG_TARGETS, _prepare_app_db
from tests.fix_postgres import (
    _OWNER_FILE,
    _PREFIX,
    PostgresServer,
    _cluster_parent,
    _free_port,
    _run_as,
    _server_account,
    _server_env,
    find_postgres_bindir,
)
from tests.fix_relay import CASTGATE, TOKENS, Relay, launch, start_relay, wait_for
from tests.fix_sshd import SshTarget

OUTAGE_S = 30
PAN = "4111111111111111"
MASKED = "411111******1111"


@dataclass
class StoreServer:
    """A PostgreSQL server of its own for the relay's audit store, so that stopping it
    leaves the PostgreSQL *target* of the sessions running."""

    bindir: Path
    base: Path
    port: int
    password: str

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def url(self) -> str:
        return f"postgresql://castgate:{self.password}@127.0.0.1:{self.port}/faultstore"

    def _ctl(self, *args: str) -> None:
        done = subprocess.run(
            [str(self.bindir / "pg_ctl"), *args, "-D", str(self.datadir), "-w", "-t", "60"],
            cwd=self.base,
            env=_server_env(),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            **_run_as(_server_account()),
        )
        assert done.returncode == 0, done.stderr + done.stdout

    def stop(self) -> None:
        """Stop the server, ending every connection (the relay's pool included)."""
        self._ctl("stop", "-m", "fast")

    def start(self) -> None:
        """Start it again: same data directory, same port."""
        self._ctl("start", "-l", str(self.base / "postgres.log"))


@pytest.fixture(scope="module")
def store_server() -> Iterator[StoreServer]:
    bindir = find_postgres_bindir()
    assert bindir is not None, "PostgreSQL server binaries missing: run scripts/test"
    account = _server_account()
    base = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=_cluster_parent(account)))
    # The shared fixture's reaper removes this cluster too if the test run is killed.
    (base / _OWNER_FILE).write_text(f"{os.getpid()}\n")
    password = secrets.token_urlsafe(18)
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n")
    if account is not None:
        for path in (base, pwfile):
            os.chown(path, account.pw_uid, account.pw_gid)
    server = StoreServer(bindir, base, _free_port(), password)
    try:
        init = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(server.datadir),
                "--auth=scram-sha-256",
                "--username=castgate",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=base,
            env=_server_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **_run_as(account),
        )
        assert init.returncode == 0, init.stderr
        with (server.datadir / "postgresql.conf").open("a") as fh:
            fh.write(
                f"listen_addresses = '127.0.0.1'\nport = {server.port}\n"
                f"unix_socket_directories = '{base}'\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\n"
            )
        server.start()
        admin = (
            f"host=127.0.0.1 port={server.port} user=castgate password={password} dbname=postgres"
        )
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE faultstore")
        yield server
    finally:
        if server.datadir.is_dir():
            subprocess.run(
                [str(bindir / "pg_ctl"), "stop", "-D", str(server.datadir), "-m", "immediate"],
                cwd=base,
                env=_server_env(),
                capture_output=True,
                timeout=60,
                check=False,
                **_run_as(account),
            )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def relay(
    store_server: StoreServer,
    sshd_target: SshTarget,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Relay]:
    """A relay with its audit store on ``store_server`` and its PostgreSQL target on the
    shared test server."""
    _prepare_app_db(postgres_server)
    r = start_relay(
        tmp_path_factory.mktemp("storefault"),
        sshd_target,
        extra=PG_TARGETS.format(port=postgres_server.port)
        + f'\n[store]\nurl = "{store_server.url}"\n',
        env={"APPDB_PASSWORD": APP_PASSWORD},
    )
    try:
        yield r
    finally:
        r.stop()


def _api(relay: Relay, path: str) -> tuple[int, str]:
    req = urllib.request.Request(
        relay.api + path, headers={"Authorization": f"Bearer {TOKENS['alice']}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(relay: Relay, name: str) -> float:
    status, text = _api(relay, "/metrics")
    assert status == 200, text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m is not None, text
    return float(m.group(1))


class Shell:
    """An interactive PTY shell through the relay (asyncssh client)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.out = ""

    async def open(self) -> None:
        self.conn = await asyncssh.connect(
            "127.0.0.1",
            self.relay.port,
            username="web",
            known_hosts=self.relay.known_hosts_obj(),
            client_keys=[str(self.relay.agent_key)],
            config=[],
            agent_path=None,
        )
        self.proc = await self.conn.create_process(term_type="xterm", term_size=(80, 24))
        self._reader = asyncio.ensure_future(self._read())
        # Type at the first prompt, not into the login banner (typed ahead, the relay
        # reads the banner as the echoed line: unparsable, so opaque and held).
        deadline = time.monotonic() + 20
        while not self.out.rstrip(" ").endswith(("#", "$")) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.run("export PS1='c''g> ' HISTFILE=/dev/null", "cg> ")

    async def _read(self) -> None:
        while data := await self.proc.stdout.read(4096):
            self.out += data

    async def run(self, line: str, expect: str, timeout: float = 60) -> None:
        """Type a line, press Enter, wait for ``expect`` in what comes back after it."""
        mark = len(self.out)
        self.proc.stdin.write(line + "\r")
        deadline = time.monotonic() + timeout
        while expect not in self.out[mark:]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{expect!r} not in {self.out[mark:][-300:]!r}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self.proc.stdin.write("exit\r")
        await asyncio.wait_for(self.proc.wait(), 30)
        self._reader.cancel()
        self.conn.close()


def _ssh(relay: Relay, command: str) -> subprocess.CompletedProcess[bytes]:
    return relay.ssh("web", command, timeout=60)


async def _pg_session(relay: Relay, i: int) -> None:
    async with await psycopg.AsyncConnection.connect(relay.pg_dsn(), autocommit=True) as conn:
        cur = await conn.execute(f"SELECT pan, {i} FROM cards ORDER BY id LIMIT 1")
        assert await cur.fetchone() == (MASKED, i)


def test_store_outage_of_30_seconds_loses_nothing(relay: Relay, store_server: StoreServer) -> None:
    """Live sessions across the outage and new ones during it; the approval that needs
    the store is refused (fail closed); reads answer 503; then everything is replayed."""
    shell_lines: list[str] = []
    pg_statements: list[str] = []
    exec_commands: list[str] = []

    async def main() -> None:
        shell = Shell(relay)
        await shell.open()
        live_pg = await psycopg.AsyncConnection.connect(relay.pg_dsn(), autocommit=True)

        async def shell_line(text: str) -> None:
            await shell.run(f"echo {text} {PAN}", f"{text} {MASKED}")
            shell_lines.append(f"echo {text} {MASKED}")

        async def query(i: int) -> None:
            sql = f"SELECT pan, {i} FROM cards ORDER BY id LIMIT 1"
            cur = await live_pg.execute(sql)
            assert await cur.fetchone() == (MASKED, i)
            pg_statements.append(sql)

        async def exec_session(text: str) -> None:
            done = await asyncio.to_thread(_ssh, relay, f"echo {text}")
            assert done.returncode == 0, done.stderr
            assert done.stdout == f"{text}\n".encode()
            exec_commands.append(f"echo {text}")

        await shell_line("before")
        await query(0)
        assert relay.proc.poll() is None

        await asyncio.to_thread(store_server.stop)
        stopped = time.monotonic()
        # Reads need the store: a clear 503. Health says so too.
        status, body = await asyncio.to_thread(_api, relay, "/api/v1/sessions")
        assert status == 503 and "audit store unavailable" in body, body
        status, body = await asyncio.to_thread(_api, relay, "/healthz")
        assert status == 503, body
        # Approvals need the store: fail closed, with the reason.
        held = await asyncio.to_thread(_ssh, relay, "systemctl restart nginx")
        assert held.returncode == 126
        assert b"approval store unavailable" in held.stderr, held.stderr
        blocked = await asyncio.to_thread(_ssh, relay, "rm -rf /tmp/nothing-here")
        assert blocked.returncode == 126 and b"blocked by rule no-rm-rf" in blocked.stderr
        i = 0
        while time.monotonic() - stopped < OUTAGE_S:
            i += 1
            await shell_line(f"during-{i}")
            await query(i)
            await exec_session(f"exec-{i}")
            await _pg_session(relay, 100 + i)
            await asyncio.sleep(1)
        assert i >= 3
        assert await asyncio.to_thread(_metric, relay, "castgate_store_available") == 0
        assert await asyncio.to_thread(_metric, relay, "castgate_store_spool_pending") > 0

        await asyncio.to_thread(store_server.start)

        def replayed() -> bool:
            return _metric(relay, "castgate_store_spool_pending") == 0

        await asyncio.to_thread(wait_for, replayed, 120, 0.5)
        assert await asyncio.to_thread(_metric, relay, "castgate_store_available") == 1
        await shell_line("after")
        await query(999)
        await exec_session("after")
        await live_pg.close()
        await shell.close()

    asyncio.run(main())
    _check_everything_stored(relay, store_server, shell_lines, pg_statements, exec_commands)


def _check_everything_stored(
    relay: Relay,
    server: StoreServer,
    shell_lines: list[str],
    pg_statements: list[str],
    exec_commands: list[str],
) -> None:
    casts = sorted(relay.recordings().glob("*.cast"))
    ids = [c.name.removesuffix(".cast") for c in casts]
    with Store.open(server.url) as store:

        def all_ended() -> bool:
            rows = [store.get_session(i) for i in ids]
            return all(r is not None and r["ended_at"] is not None for r in rows) and all(
                store.get_manifest(i) is not None for i in ids
            )

        wait_for(all_ended, timeout=60, interval=0.5)
        commands: list[dict[str, Any]] = []
        for sid, cast in zip(ids, casts, strict=True):
            session = store.get_session(sid)
            assert session is not None
            manifest = json.loads(manifest_path(cast).read_text())
            assert store.get_manifest(sid) == manifest, sid
            checkpoint = store.latest_checkpoint(sid)
            assert checkpoint is not None and checkpoint["lines"] == manifest["lines"], sid
            assert checkpoint["chain_hash"] == manifest["final_hash"]
            assert session["lines"] == manifest["lines"]
            kinds = Counter(e["kind"] for e in store.list_events(session_id=sid))
            assert kinds["session.start"] == 1 and kinds["session.end"] == 1, (sid, kinds)
            commands += store.list_commands(sid)
        texts = Counter(c["text"] for c in commands)
        for line in shell_lines:
            assert texts[line] == 1, (line, texts[line])
        for sql in pg_statements:
            assert texts[sql] == 1, (sql, texts[sql])
        for cmd in exec_commands:
            assert texts[cmd] == 1, (cmd, texts[cmd])
        assert all(c["finished_at"] is not None for c in commands if c["kind"] == "exec")
        refused = [c for c in commands if c["text"] == "systemctl restart nginx"]
        assert [c["status"] for c in refused] == ["store unavailable"]
        approvals = store.list_approvals(status=None)
        assert not [a for a in approvals if a["command"] == "systemctl restart nginx"]
        assert len(store.list_events(kind="command.blocked")) == 1
    spool = relay.workdir / "data" / "spool"
    assert not (spool / "ops.jsonl").exists()
    assert not (spool / "rejected.jsonl").exists()
    verify = subprocess.run(
        [CASTGATE, "verify", str(relay.recordings()), "-c", str(relay.config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    msgs = [e.get("msg") for e in relay.logs]
    assert "store.unavailable" in msgs and "store.available" in msgs
    # No write was dropped or set aside on the way.
    lost = [e for e in relay.logs if str(e.get("msg", "")).startswith(("store.", "spool."))]
    assert {e["msg"] for e in lost} <= {"store.unavailable", "store.available"}, lost


def test_spooled_writes_survive_a_relay_restart(relay: Relay, store_server: StoreServer) -> None:
    store_server.stop()
    try:
        done = relay.ssh("web", f"echo spooled {PAN}")
        assert done.returncode == 0 and done.stdout == f"spooled {MASKED}\n".encode()
        ops = relay.workdir / "data" / "spool" / "ops.jsonl"
        wait_for(lambda: ops.exists() and b"session.end" in ops.read_bytes(), timeout=30)
    finally:
        assert relay.stop() == 0  # SIGTERM: the spool stays on disk
    assert stat.S_IMODE(ops.stat().st_mode) == 0o600
    assert stat.S_IMODE(ops.parent.stat().st_mode) == 0o700
    assert PAN.encode() not in ops.read_bytes()  # what is kept is masked
    spooled = [json.loads(line) for line in ops.read_text().splitlines()]
    (sid,) = {e["args"]["id"] for e in spooled if e["op"] == "create_session"}
    store_server.start()
    launch(relay, {"APPDB_PASSWORD": APP_PASSWORD})  # replays before it listens
    assert not ops.exists()
    assert any(e.get("msg") == "relay.spool_replayed" for e in relay.logs)
    with Store.open(store_server.url) as store:
        session = store.get_session(sid)
        assert session is not None and session["status"] == "closed"
        assert store.get_manifest(sid) == json.loads(
            manifest_path(relay.recordings() / f"{sid}.cast").read_text()
        )
        assert [c["text"] for c in store.list_commands(sid)] == [f"echo spooled {MASKED}"]
