"""psql (\\copy, Ctrl-C), pgbench, TLS and hostile input against the PostgreSQL relay."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from tests.fix_pg_relay import APP_PASSWORD, PANS, PG_TARGETS, PgRelay
from tests.fix_postgres import PostgresServer
from tests.fix_relay import start_relay, wait_for
from tests.fix_sshd import SshTarget


def masked(pan: str) -> str:
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def psql(pg_relay: PgRelay, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", pg_relay.dsn(), "-X", "-v", "ON_ERROR_STOP=1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_psql_backslash_copy_both_ways(pg_relay: PgRelay, tmp_path: Path) -> None:
    out = tmp_path / "cards.csv"
    res = psql(pg_relay, "-c", f"\\copy (SELECT id, pan FROM cards ORDER BY id) TO '{out}' CSV")
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert [line.split(",")[1] for line in text.split()] == [masked(p) for p in PANS]
    src = tmp_path / "in.csv"
    src.write_text("7\n8\n9\n")
    res = psql(
        pg_relay,
        "-c",
        "CREATE TABLE IF NOT EXISTS copied (v int)",
        "-c",
        f"\\copy copied FROM '{src}' CSV",
        "-c",
        "SELECT sum(v) FROM copied",
    )
    assert res.returncode == 0, res.stderr
    assert "24" in res.stdout


def test_psql_ctrl_c_cancels_through_the_relay(pg_relay: PgRelay) -> None:
    proc = subprocess.Popen(
        ["psql", pg_relay.dsn(), "-X", "-c", "SELECT pg_sleep(30)"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Ctrl-C once the statement runs on the server (psql ignores none of it before).
    with psycopg.connect(pg_relay.direct_dsn, autocommit=True) as admin:

        def running() -> bool:
            q = "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
            return admin.execute(q).fetchone() is not None

        wait_for(running, 60)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends; psql answers with a CancelRequest
    out, err = proc.communicate(timeout=20)
    assert time.monotonic() - started < 10
    assert "canceling statement due to user request" in err, (out, err)


def test_pgbench_select_only_through_the_relay(pg_relay: PgRelay) -> None:
    env = {**os.environ, "PGPASSWORD": APP_PASSWORD}
    server = pg_relay.server
    init = subprocess.run(
        [
            "pgbench",
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            server.host,
            "-p",
            str(server.port),
            "-U",
            "app",
            "app",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    for mode in ("simple", "extended", "prepared"):
        res = subprocess.run(
            ["pgbench", "-S", "-M", mode, "-c", "2", "-t", "200", "-n", pg_relay.dsn()],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        assert "number of failed transactions: 0" in res.stdout, res.stdout


def test_tls_to_the_relay(pg_relay: PgRelay) -> None:
    dsn = pg_relay.dsn().replace("sslmode=disable", "sslmode=require")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT pan FROM cards WHERE id = 1").fetchone() == (masked(PANS[0]),)


def _raw(port: int, payload: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        if not read:
            return b""
        chunks = []
        try:
            while chunk := s.recv(4096):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_hostile_input_gets_an_error_and_the_relay_keeps_serving(pg_relay: PgRelay) -> None:
    port = pg_relay.relay.pg_port
    # A startup packet claiming a huge length.
    assert b"invalid startup packet length" in _raw(port, struct.pack("!ii", 1 << 30, 196608))
    # A startup packet cut short: the client goes away; nothing to answer.
    _raw(port, struct.pack("!i", 100) + b"\x00\x03", read=False)
    # Protocol 2.
    assert b"unsupported protocol version" in _raw(port, struct.pack("!ii", 8, 131072))
    # A typed message with a bogus length right after the password request.
    startup = b"user\0ci-agent\0database\0appdb\0\0"
    pkt = struct.pack("!ii", len(startup) + 8, 196608) + startup
    reply = _raw(port, pkt + b"p" + struct.pack("!i", 2))
    assert b"invalid length" in reply
    # An oversized message after login.
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # Everyone else is still served.
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM cards").fetchone() == (4,)


@pytest.mark.parametrize(
    ("listen", "setting"),
    [
        # The setting on a loopback listener.
        ("127.0.0.1:0", "postgres_require_tls = true"),
        # No setting: the default for a listener off loopback (here on all addresses).
        ("0.0.0.0:0", ""),
    ],
    ids=["setting", "default-off-loopback"],
)
def test_token_without_tls_refused_when_tls_is_required(
    sshd_target: SshTarget,
    postgres_server: PostgresServer,
    tmp_path: Path,
    listen: str,
    setting: str,
) -> None:
    relay = start_relay(
        tmp_path / "r",
        sshd_target,
        extra=PG_TARGETS.format(port=postgres_server.port),
        env={"APPDB_PASSWORD": APP_PASSWORD},
        listen_extra=setting,
        pg_listen=listen,
    )
    try:
        with pytest.raises(psycopg.OperationalError, match="requires TLS"):
            psycopg.connect(relay.pg_dsn())
        dsn = relay.pg_dsn().replace("sslmode=disable", "sslmode=require")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        relay.stop()


def test_error_details_and_query_literals_are_masked(pg_relay: PgRelay) -> None:
    from recorder.config import load_config
    from recorder.store import Store

    pan = PANS[1]
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE u (pan text UNIQUE)")
        conn.execute(f"INSERT INTO u VALUES ('{pan}')")
        with pytest.raises(psycopg.errors.UniqueViolation) as err:
            conn.execute(f"INSERT INTO u VALUES ('{pan}')")
        detail = err.value.diag.message_detail or ""
        assert masked(pan) in detail and pan not in detail
        assert conn.execute(f"SELECT '{pan}' AS literal").fetchone() == (masked(pan),)
    cfg = load_config(pg_relay.relay.config)
    texts: list[str] = []

    def logged() -> bool:
        # The relay writes the query log in batches, the last as the session closes.
        with Store.open(cfg.store_url()) as store:
            texts[:] = [
                c["text"]
                for s in store.list_sessions(target="appdb")
                for c in store.list_commands(s["id"])
            ]
        return any("INSERT INTO u VALUES" in t for t in texts)

    wait_for(logged, 30)
    assert any("INSERT INTO u VALUES" in t for t in texts)
    assert all(pan not in t for t in texts)
    assert any(f"'{masked(pan)}'" in t for t in texts)


def test_protocol_negotiation_and_gssenc(pg_relay: PgRelay) -> None:
    port = pg_relay.relay.pg_port
    assert _raw(port, struct.pack("!ii", 8, 80877104), read=False) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack("!ii", 8, 80877104))  # GSSENCRequest
        assert s.recv(1) == b"N"
        params = b"user\0ci-agent\0database\0appdb\0_pq_.future\0x\0\0"
        s.sendall(struct.pack("!ii", len(params) + 8, 196610) + params)  # protocol 3.2
        reply = b""
        # NegotiateProtocolVersion, then the password request (maybe in two segments).
        while len(reply) < 5 or len(reply) < 2 + struct.unpack("!i", reply[1:5])[0]:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply[:1] == b"v"  # NegotiateProtocolVersion: we speak 3.0
    (length,) = struct.unpack("!i", reply[1:5])
    assert reply[5:9] == struct.pack("!i", 0) and b"_pq_.future" in reply[: 1 + length]
    assert reply[1 + length : 2 + length] == b"R"  # then the password request


def _msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def _read_messages(s: socket.socket, until: int) -> list[tuple[bytes, bytes]]:
    """Messages until the ``until``-th ReadyForQuery."""
    buf = b""
    msgs: list[tuple[bytes, bytes]] = []
    while sum(t == b"Z" for t, _ in msgs) < until:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {msgs}"
        buf += chunk
        while len(buf) >= 5 and len(buf) >= 1 + struct.unpack("!i", buf[1:5])[0]:
            end = 1 + struct.unpack("!i", buf[1:5])[0]
            msgs.append((buf[:1], buf[5:end]))
            buf = buf[end:]
    return msgs


def _login(pg_relay: PgRelay) -> socket.socket:
    from tests.fix_relay import TOKENS

    s = socket.create_connection(("127.0.0.1", pg_relay.relay.pg_port), timeout=10)
    params = b"user\0ci-agent\0database\0appdb\0\0"
    s.sendall(struct.pack("!ii", len(params) + 8, 196608) + params)
    assert _read_messages_until_auth(s) == 3  # AuthenticationCleartextPassword
    s.sendall(_msg(b"p", TOKENS["ci-agent"].encode() + b"\0"))
    _read_messages(s, 1)
    return s


def _read_messages_until_auth(s: socket.socket) -> int:
    head = s.recv(9)
    assert head[:1] == b"R", head
    return int(struct.unpack("!i", head[5:9])[0])


def test_execute_without_describe_masks_columns_and_hides_the_relays_describe(
    pg_relay: PgRelay,
) -> None:
    """A client that runs Parse/Bind/Execute/Sync without Describe (JDBC and others do)
    gets exactly the messages it asked for: the relay's own Describe, which it needs to
    know the columns to mask, is answered to the relay alone. The pipelines go in one
    write: one that fails, a plain column, a masked one twice."""

    def pipeline(sql: bytes) -> bytes:
        return (
            _msg(b"P", b"\0" + sql + b"\0\0\0")
            + _msg(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
            + _msg(b"E", b"\0" + struct.pack("!i", 0))
            + _msg(b"S", b"")
        )

    masked_sql = b"SELECT id, code AS c FROM secrets ORDER BY id"
    with _login(pg_relay) as s:
        s.sendall(
            pipeline(b"SELECT 1/0")
            + pipeline(b"SELECT id FROM secrets")
            + pipeline(masked_sql)
            + pipeline(masked_sql)
        )
        msgs = _read_messages(s, 4)
        types = b"".join(t for t, _ in msgs)
        # 1/0 fails in Bind (constants are folded when it is planned).
        assert types == b"1EZ12DCZ12DCZ12DCZ", types
        rows = [body for t, body in msgs if t == b"D"]
        assert rows[0] == struct.pack("!hi", 1, 1) + b"1"
        for r in rows[1:]:
            assert r.startswith(struct.pack("!hi", 2, 1) + b"1")
            assert b"abc-123-xyz" not in r
        assert b"division by zero" in dict(msgs)[b"E"]
        # The session goes on.
        s.sendall(_msg(b"Q", b"SELECT 42\0"))
        assert [t for t, _ in _read_messages(s, 1)] == [b"T", b"D", b"C", b"Z"]
    # The query log has each statement, the failed one as an error.
    from recorder.config import load_config
    from recorder.store import Store

    cfg = load_config(pg_relay.relay.config)
    logged: list[tuple[str, str | None]] = []

    def seen() -> bool:
        with Store.open(cfg.store_url()) as store:
            logged[:] = [
                (c["text"], c["status"])
                for sess in store.list_sessions(target="appdb")
                for c in store.list_commands(sess["id"])
            ]
        return ("SELECT 42", "SELECT 1") in logged

    wait_for(seen, 30)
    assert ("SELECT 1/0", "error") in logged
    assert logged.count((masked_sql.decode(), "SELECT 1")) >= 2
