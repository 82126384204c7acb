"""Recording failures: the relay's recordings directory is a small tmpfs that the tests
fill up (disk full) or remount read-only, under both ``recording.on_failure`` policies,
with real OpenSSH and psycopg clients through a real relay process.

``terminate`` ends the affected session at once with a one-line reason and refuses new
ones while the directory cannot be written; ``continue`` keeps them going, masked but
unrecorded. Either way the failure is an alert (ERROR log line, ``recording.failed``
audit event, Prometheus counter), the failed cast verifies as unsealed or truncated (never
as tampered), and the rest of the relay carries on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from recorder.config import load_config
from recorder.integrity import manifest_path
from recorder.store import Store
from replay.seekindex import index_path
from tests.fix_pg_relay import APP_PASSWORD, PG_TARGETS, _prepare_app_db
from tests.fix_postgres import PostgresServer
from tests.fix_relay import CASTGATE, TOKENS, Relay, launch, start_relay, wait_for
from tests.fix_sshd import SshTarget

FILLER = "filler.bin"
TMPFS_SIZE = 4 << 20
BURST = 300_000  # output bytes: far more than the space left
PAN = "4111111111111111"
MASKED = "411111******1111"


def _mount(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )


def _umount(path: Path) -> None:
    done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _remount(path: Path, mode: str) -> None:
    """remount ro fails while a file is open for writing (a cast being sealed, a seek
    index being built): retry until the relay has let go."""
    last = ""

    def done() -> bool:
        nonlocal last
        r = subprocess.run(
            ["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True
        )
        last = r.stderr
        return r.returncode == 0

    wait_for(done, timeout=30, interval=0.2)


class Faulty:
    """A relay whose recordings directory is a tmpfs the test can fill."""

    def __init__(self, relay: Relay, mode: str, recordings: Path) -> None:
        self.relay, self.mode, self.recordings = relay, mode, recordings
        self.store_url = load_config(relay.config).store_url()

    def fill(self, leave: int) -> None:
        """Leave ``leave`` bytes free in the recordings directory."""
        self._settle()
        fd = os.open(self.recordings / FILLER, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            # The relay may still take a block or two between statvfs and fallocate
            # (an fsync of a live cast): measure again and retry rather than fail.
            for _ in range(20):
                st = os.statvfs(self.recordings)
                size = os.fstat(fd).st_size + st.f_bavail * st.f_frsize - leave
                try:
                    os.posix_fallocate(fd, 0, max(size, 1))
                    return
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    time.sleep(0.05)
            raise AssertionError("could not fill the recordings tmpfs")
        finally:
            os.close(fd)

    def _settle(self) -> None:
        """Wait for the seek indexes the relay builds after a session: one failing on
        the full disk would delete its temporary file and free space again."""

        def quiet() -> bool:
            sealed = [c for c in self.recordings.glob("*.cast") if manifest_path(c).exists()]
            return all(index_path(c).exists() for c in sealed) and not any(
                self.recordings.glob(".*.tmp")
            )

        wait_for(quiet, timeout=30)

    def unfill(self) -> None:
        (self.recordings / FILLER).unlink(missing_ok=True)

    def session(self, sid: str) -> dict[str, Any]:
        with Store.open(self.store_url) as store:
            row = store.get_session(sid)
            assert row is not None, f"no session row for {sid}"
            row["events"] = store.list_events(session_id=sid)
            row["manifest"] = store.get_manifest(sid)
            return row

    def ended(self, since: set[str]) -> dict[str, Any]:
        """The one session that started after ``since`` was taken, once ended."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            with Store.open(self.store_url) as store:
                rows = [r for r in store.list_sessions() if r["id"] not in since]
            found[:] = rows
            return len(rows) == 1 and rows[0]["ended_at"] is not None

        try:
            wait_for(check, timeout=30)
        except BaseException:
            print("sessions:", found, "logs:", self.relay.logs[-30:])
            raise
        return self.session(found[0]["id"])

    def ids(self) -> set[str]:
        with Store.open(self.store_url) as store:
            return {r["id"] for r in store.list_sessions()}

    def metrics(self) -> str:
        req = urllib.request.Request(
            f"{self.relay.api}/metrics", headers={"Authorization": f"Bearer {TOKENS['alice']}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return str(resp.read().decode())

    def verify(self, sid: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                CASTGATE,
                "verify",
                str(self.recordings / f"{sid}.cast"),
                "-c",
                str(self.relay.config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module", params=["terminate", "continue"])
def faulty(
    request: pytest.FixtureRequest,
    sshd_target: SshTarget,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Faulty]:
    mode: str = request.param
    workdir = tmp_path_factory.mktemp(f"recfault-{mode}")
    recordings = workdir / "data" / "recordings"
    _prepare_app_db(postgres_server)
    env = {"APPDB_PASSWORD": APP_PASSWORD}
    _mount(recordings)
    relay: Relay | None = None
    try:
        relay = start_relay(
            workdir, sshd_target, extra=PG_TARGETS.format(port=postgres_server.port), env=env
        )
        if mode == "continue":
            relay.stop()
            text = relay.config.read_text()
            relay.config.write_text(
                text.replace("[recording]\n", '[recording]\non_failure = "continue"\n', 1)
            )
            launch(relay, env)
        yield Faulty(relay, mode, recordings)
    finally:
        if relay is not None:
            relay.stop()
        _umount(recordings)


@pytest.fixture
def clean(faulty: Faulty) -> Iterator[Faulty]:
    """Each test starts with space and leaves the relay working normally."""
    faulty.unfill()
    yield faulty
    faulty.unfill()
    _assert_healthy(faulty)


def _assert_healthy(f: Faulty) -> None:
    """Space again: new SSH and PostgreSQL sessions are recorded and verify intact,
    the API answers, the relay process is still the same one."""
    r = f.relay
    before = f.ids()
    done = r.ssh("web", f"echo healthy {PAN}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"healthy {MASKED}\n".encode()
    row = f.ended(before)
    assert row["status"] == "closed"
    wait_for(lambda: f.session(row["id"])["manifest"] is not None, timeout=30)
    check = f.verify(row["id"])
    assert check.returncode == 0, check.stdout + check.stderr
    with psycopg.connect(r.pg_dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with urllib.request.urlopen(f"{r.api}/healthz", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"
    assert r.proc.poll() is None


def _failed_events(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in row["events"] if e["kind"] == "recording.failed"]


def _assert_alerted(f: Faulty, row: dict[str, Any], action: str, errno_text: str) -> None:
    # The audit event is written in the background: the session row may end first.
    wait_for(lambda: bool(_failed_events(f.session(row["id"]))), timeout=30)
    (event,) = _failed_events(f.session(row["id"]))
    assert event["outcome"] == "failure"
    assert event["detail"]["action"] == action
    assert event["detail"]["on_failure"] == f.mode
    assert errno_text in event["detail"]["error"]
    errors = [
        e
        for e in f.relay.logs
        if e.get("level") == "error"
        and e.get("msg") == "recording.failed"
        and e.get("session") == row["id"]
    ]
    assert errors and errno_text in str(errors[0]["error"])
    m = re.search(rf'castgate_recording_failures_total{{action="{action}"}} (\d+)', f.metrics())
    assert m is not None and int(m.group(1)) >= 1


def _assert_unsealed(f: Faulty, sid: str) -> None:
    """The failed cast is not sealed, but what it holds verifies line by line."""
    assert not manifest_path(f.recordings / f"{sid}.cast").exists()
    check = f.verify(sid)
    assert check.returncode == 1, check.stdout + check.stderr
    assert re.search(r"\b(UNSEALED|TRUNCATED)\b", check.stdout), check.stdout
    assert "TAMPERED" not in check.stdout


def test_disk_full_during_an_ssh_session(clean: Faulty, tmp_path: Path) -> None:
    f = clean
    r = f.relay
    before = f.ids()
    # A session that does not write while the disk is full is not affected.
    bystander = subprocess.Popen(
        ["ssh", *r.ssh_args(), "web@127.0.0.1", "read line; echo got $line"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: len(f.ids() - before) == 1, timeout=30)
    bystander_id = (f.ids() - before).pop()
    f.fill(leave=64 << 10)
    before = f.ids()
    # Far more output than fits, then quiet: with terminate the relay must end the
    # session when the write fails, not at its next write (which never comes: the ssh
    # call would hit its hang guard).
    pidfile = tmp_path / "quiet.pid"
    quiet = f"echo $$ > {pidfile}; exec sleep 600" if f.mode == "terminate" else "sleep 1"
    burst = f"yes abcdefghijklmnopqrstuvwxyz | head -c {BURST}"
    try:
        done = r.ssh("web", f"{burst}; {quiet}; echo after", timeout=120)
    finally:
        if pidfile.exists():  # the target's process outlives the closed channel
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
    row = f.ended(before)
    if f.mode == "terminate":
        assert done.returncode == 255
        assert b"after" not in done.stdout
        assert (
            b"castgate: this session cannot be recorded (No space left on device); "
            b"session terminated" in done.stderr
        ), done.stderr
        assert row["status"] == "recording failed"
        _assert_alerted(f, row, "terminated", "No space left on device")
    else:
        assert done.returncode == 0, done.stderr
        assert len(done.stdout) == BURST + len(b"after\n")
        assert done.stdout.endswith(b"after\n")
        assert (
            b"castgate: this session cannot be recorded (No space left on device); it "
            b"continues unrecorded" in done.stderr
        )
        assert row["status"] == "closed" and row["exit_status"] == 0
        _assert_alerted(f, row, "continued", "No space left on device")
    assert row["manifest"] is None
    _assert_unsealed(f, row["id"])
    f.unfill()
    out, err = bystander.communicate(b"hello\n", timeout=30)
    assert bystander.returncode == 0, err
    assert out == b"got hello\n"
    wait_for(lambda: f.session(bystander_id)["ended_at"] is not None, timeout=30)
    check = f.verify(bystander_id)
    assert check.returncode == 0, check.stdout


def test_disk_full_during_a_postgres_session(clean: Faulty) -> None:
    f = clean
    r = f.relay
    before = f.ids()
    notices: list[str] = []
    conn = psycopg.connect(r.pg_dsn(), autocommit=True)
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    try:
        wait_for(lambda: len(f.ids() - before) == 1, timeout=30)
        sid = (f.ids() - before).pop()
        f.fill(leave=64 << 10)
        # The transcript draws 100 rows of cells cut at 60 characters: 20 columns make
        # one result far larger than the space left.
        wide = ", ".join(f"repeat('x', 60) AS c{i}" for i in range(20))
        rows = conn.execute(f"SELECT {wide} FROM generate_series(1, 100)").fetchall()
        assert len(rows) == 100
        if f.mode == "terminate":
            # Ended by the relay while the client sits idle.
            wait_for(lambda: f.session(sid)["ended_at"] is not None, timeout=30)
            with pytest.raises(psycopg.OperationalError) as err:
                conn.execute("SELECT 1")
            assert (
                "castgate: this session cannot be recorded (No space left on device); "
                "session terminated" in str(err.value)
            ), str(err.value)
        else:
            wait_for(lambda: _failed_events(f.session(sid)) != [], timeout=30)
            got = conn.execute("SELECT pan FROM cards ORDER BY id LIMIT 1").fetchone()
            assert got == (MASKED,)
            assert any("continues unrecorded" in n for n in notices), notices
    finally:
        conn.close()
    wait_for(lambda: f.session(sid)["ended_at"] is not None, timeout=30)
    row = f.session(sid)
    if f.mode == "terminate":
        assert row["status"] == "recording failed"
        _assert_alerted(f, row, "terminated", "No space left on device")
    else:
        assert row["status"] == "closed"
        _assert_alerted(f, row, "continued", "No space left on device")
    assert row["manifest"] is None
    _assert_unsealed(f, sid)


def _new_sessions_cannot_be_recorded(f: Faulty, errno_text: str) -> None:
    r = f.relay
    before = f.ids()
    done = r.ssh("web", f"echo card {PAN}")
    row = f.ended(before)
    assert not (f.recordings / f"{row['id']}.cast").exists()  # nothing half-made left
    if f.mode == "terminate":
        assert done.returncode == 255
        assert done.stdout == b""
        assert (
            f"castgate: this session cannot be recorded ({errno_text}); session refused".encode()
            in done.stderr
        ), done.stderr
        assert row["status"] == "recording failed"
        _assert_alerted(f, row, "refused", errno_text)
    else:
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"card {MASKED}\n".encode()  # unrecorded, still masked
        assert f"cannot be recorded ({errno_text}); it continues unrecorded".encode() in (
            done.stderr
        )
        assert row["status"] == "closed"
        _assert_alerted(f, row, "continued", errno_text)

    before = f.ids()
    notices: list[str] = []
    if f.mode == "terminate":
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(r.pg_dsn())
        assert f"castgate: this session cannot be recorded ({errno_text}); connection refused" in (
            str(err.value)
        )
        row = f.ended(before)
        assert row["status"] == "recording failed"
        _assert_alerted(f, row, "refused", errno_text)
    else:
        with psycopg.connect(r.pg_dsn()) as conn:
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            got = conn.execute("SELECT pan FROM cards ORDER BY id LIMIT 1").fetchone()
            assert got == (MASKED,)
        row = f.ended(before)
        assert row["status"] == "closed"
        _assert_alerted(f, row, "continued", errno_text)
    # The API keeps answering meanwhile.
    with urllib.request.urlopen(f"{r.api}/healthz", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"


def test_new_sessions_while_the_disk_is_full(clean: Faulty) -> None:
    clean.fill(leave=0)
    _new_sessions_cannot_be_recorded(clean, "No space left on device")


def test_new_sessions_while_the_directory_is_read_only(clean: Faulty) -> None:
    _remount(clean.recordings, "ro")
    try:
        _new_sessions_cannot_be_recorded(clean, "Read-only file system")
    finally:
        _remount(clean.recordings, "rw")
