"""The PostgreSQL relay with real clients (psycopg, psql) in front of a real server."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import pq

from relay.pg import protocol as proto
from tests.fix_pg_relay import PANS, PgRelay, casts
from tests.fix_relay import TOKENS, wait_for


def masked(pan: str) -> str:
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def test_simple_query_masks_card_numbers(pg_relay: PgRelay) -> None:
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT id, pan, note FROM cards ORDER BY id").fetchall()
    assert [r[1] for r in rows] == [masked(p) for p in PANS]
    assert rows[0][2] == f"paid with {masked(PANS[0])}"


def test_extended_prepared_binary_and_pipeline(pg_relay: PgRelay) -> None:
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        # Extended protocol with parameters.
        row = conn.execute("SELECT pan FROM cards WHERE id = %s", (1,)).fetchone()
        assert row == (masked(PANS[0]),)
        # Prepared (server-side named statement reused).
        for i in range(1, 5):
            r = conn.execute("SELECT pan FROM cards WHERE id = %s", (i,), prepare=True).fetchone()
            assert r == (masked(PANS[i - 1]),)
        # Binary results: text column values masked, a masked text column starred in place.
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT pan, id FROM cards WHERE id = 2")
            assert cur.fetchone() == (masked(PANS[1]), 2)
            cur.execute("SELECT code AS c FROM secrets")
            assert cur.fetchone() == ("***-***-***",)
        # Pipeline mode.
        with conn.pipeline():
            c1 = conn.execute("SELECT pan FROM cards WHERE id = %s", (3,))
            c2 = conn.execute("SELECT count(*) FROM cards")
        assert c1.fetchone() == (masked(PANS[2]),)
        assert c2.fetchone() == (4,)


def test_mask_columns_escape_neither_alias_nor_expression(pg_relay: PgRelay) -> None:
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT code AS totally_not_code FROM secrets").fetchone() == (
            "***-***-***",
        )
        assert conn.execute("SELECT s.code FROM secrets s").fetchone() == ("***-***-***",)


def test_copy_out_and_in(pg_relay: PgRelay) -> None:
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT pan FROM cards ORDER BY id) TO STDOUT") as copy:
                data = b"".join(bytes(chunk) for chunk in copy)
            assert data.decode().split() == [masked(p) for p in PANS]
            conn.execute("CREATE TEMP TABLE t_in (v text)")
            with cur.copy("COPY t_in FROM STDIN") as copy:
                copy.write_row(("hello",))
                copy.write_row(("world",))
        assert conn.execute("SELECT count(*) FROM t_in").fetchone() == (2,)


def test_blocked_statement_keeps_session_usable(pg_relay: PgRelay) -> None:
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drop-database"):
            conn.execute("DROP DATABASE app")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-truncate"):
            conn.execute("WITH x AS (SELECT 1) SELECT 1; TRUNCATE victims")
        assert conn.execute("SELECT count(*) FROM victims").fetchone() == (5,)
    # Inside an explicit transaction the refusal fails the transaction, as a real error.
    with psycopg.connect(pg_relay.dsn()) as conn:
        conn.execute("INSERT INTO victims VALUES (100)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("TRUNCATE victims")
        assert conn.info.transaction_status == pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM victims WHERE id = 100").fetchone() == (0,)


def test_blocked_statement_in_a_pipeline(pg_relay: PgRelay) -> None:
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("TRUNCATE victims")
            conn.execute("SELECT 2")
        assert conn.execute("SELECT count(*) FROM victims").fetchone() == (5,)
        assert conn.execute("SELECT 3").fetchone() == (3,)


def _approve_next(pg_relay: PgRelay, approver: str, deny: bool = False) -> threading.Thread:
    relay = pg_relay.relay

    def run() -> None:
        def pending() -> list[dict[str, object]]:
            out = relay.castgate("approvals", "--json", "--token", TOKENS["alice"]).stdout
            return json.loads(out) if out.strip() else []

        wait_for(lambda: bool(pending()), 20)
        aid = str(pending()[0]["id"])
        args = ["deny", aid, "--reason", "no"] if deny else ["approve", aid]
        relay.castgate(*args, "--token", TOKENS[approver])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_unbounded_delete_waits_for_approval_even_in_a_cte(pg_relay: PgRelay) -> None:
    notices: list[str] = []
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        t = _approve_next(pg_relay, "bob", deny=True)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied by bob"):
            conn.execute("WITH gone AS (DELETE FROM victims RETURNING *) SELECT count(*) FROM gone")
        t.join(30)
        assert any("approval #" in n and "unbounded-writes" in n for n in notices)
        assert conn.execute("SELECT count(*) FROM victims").fetchone() == (5,)
        t = _approve_next(pg_relay, "alice")
        conn.execute("UPDATE victims SET id = id")
        t.join(30)
        # With a WHERE clause no approval is needed.
        conn.execute("DELETE FROM victims WHERE id = -1")


def test_a_held_statement_in_a_pipeline_releases_the_rest_in_order(pg_relay: PgRelay) -> None:
    # Statements after the held one arrive with it and while it waits: the relay keeps
    # them (reading paused) and runs them in order once the approval is given.
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        t = _approve_next(pg_relay, "alice")
        a, b, c = conn.cursor(), conn.cursor(), conn.cursor()
        with conn.pipeline():
            a.execute("SELECT 'before'")
            b.execute("UPDATE victims SET id = id RETURNING 'held'")
            c.execute("SELECT 'after'")
        t.join(30)
        assert a.fetchone() == ("before",)
        assert b.fetchall() == [("held",)] * 5
        assert c.fetchone() == ("after",)
        assert conn.execute("SELECT 'then'").fetchone() == ("then",)


def test_psql_transcript_and_query_log(pg_relay: PgRelay) -> None:
    res = subprocess.run(
        ["psql", pg_relay.dsn(), "-X", "-c", "SELECT holder, pan FROM cards ORDER BY id"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert masked(PANS[0]) in res.stdout and PANS[0] not in res.stdout
    wait_for(
        lambda: any(
            "SELECT holder, pan FROM cards" in c.read_text()
            and c.with_name(c.name + ".manifest.json").exists()
            for c in casts(pg_relay.relay)
        ),
        15,
    )
    for cast in casts(pg_relay.relay):
        text = cast.read_text()
        for pan in PANS:
            assert pan not in text
    cast = next(
        c for c in casts(pg_relay.relay) if "SELECT holder, pan FROM cards" in c.read_text()
    )
    out = "".join(
        json.loads(x)[2] for x in cast.read_text().splitlines()[1:] if json.loads(x)[1] == "o"
    )
    assert "appdb=> SELECT holder, pan FROM cards ORDER BY id" in out
    assert masked(PANS[0]) in out and "(4 rows)" in out


def test_transcript_keeps_statements_answers_and_markers_in_order(pg_relay: PgRelay) -> None:
    # The relay draws an answer after the client's next statement has gone on, and
    # writes the transcript in batches: the cast must still read in session order.
    script = (
        "SELECT 'first' AS one;\n"
        "SELECT 'second' AS two;\n"
        "DROP DATABASE app_order_check;\n"
        "SELECT 'third' AS three;\n"
    )
    res = subprocess.run(
        ["psql", pg_relay.dsn(), "-X", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "third" in res.stdout and "no-drop-database" in res.stderr, res.stderr

    def the_cast() -> Path | None:
        for c in casts(pg_relay.relay):
            if (
                "app_order_check" in c.read_text()
                and c.with_name(c.name + ".manifest.json").exists()
            ):
                return c
        return None

    wait_for(lambda: the_cast() is not None, 15)
    cast = the_cast()
    assert cast is not None
    events = [json.loads(x) for x in cast.read_text().splitlines()[1:]]
    # Output text and markers, in file order, as one line each.
    seq = "".join(e[2] if e[1] == "o" else f"[marker {e[2]}]" for e in events if e[1] in "om")
    order = [
        "appdb=> SELECT 'first' AS one;",
        " first",
        "(1 row)",
        "appdb=> SELECT 'second' AS two;",
        " second",
        "(1 row)",
        "[marker blocked: no-drop-database]",
        "appdb=> DROP DATABASE app_order_check;",
        "ERROR:  castgate: blocked by rule no-drop-database",
        "appdb=> SELECT 'third' AS three;",
        " third",
        "(1 row)",
    ]
    pos = 0
    for s in order:
        found = seq.find(s, pos)
        assert found >= 0, f"{s!r} missing or out of order in {seq[pos:]!r}"
        pos = found + len(s)


def test_an_idle_sessions_last_answer_reaches_the_cast_while_it_is_open(
    pg_relay: PgRelay,
) -> None:
    """The transcript is drawn in batches when the cast is written: a session that runs
    a statement and then waits still has statement and answer in its cast soon after,
    not only when it ends."""
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 'idle-check' AS waiting").fetchone() == ("idle-check",)

        def drawn() -> bool:
            return any(
                "idle-check" in text and "(1 row)" in text.split("idle-check", 1)[1]
                for text in (c.read_text() for c in casts(pg_relay.relay))
                if "SELECT 'idle-check'" in text
            )

        wait_for(drawn, 5)
        # Still open: the batch was written by its timer, not by the session's end.
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_bad_token_and_wrong_target_are_refused(pg_relay: PgRelay) -> None:
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(pg_relay.dsn(token="wrong"))
    with pytest.raises(psycopg.OperationalError, match="not in any group"):
        psycopg.connect(pg_relay.dsn(user="outsider"))
    with pytest.raises(psycopg.OperationalError, match="no PostgreSQL target"):
        psycopg.connect(pg_relay.dsn(target="nope"))
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cancel_reaches_the_right_backend(pg_relay: PgRelay) -> None:
    with psycopg.connect(pg_relay.dsn(), autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - started < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_tls_target_relays_masked_results_both_ways(pg_relay: PgRelay) -> None:
    """Target ``appdb-tls`` (tls = "require"): the relay's connection to the server is
    TLS, and queries, a large masked result and COPY pass through it as through plain."""
    with psycopg.connect(pg_relay.dsn(target="appdb-tls"), autocommit=True) as conn:
        assert conn.execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone() == (True,)
        rows = conn.execute("SELECT holder, pan FROM cards ORDER BY id").fetchall()
        assert rows[0][1] == masked(PANS[0])
        assert conn.execute("SELECT code FROM secrets").fetchone() == ("***-***-***",)
        big = conn.execute(
            f"SELECT g, '{PANS[0]}' || '' FROM generate_series(1, 50000) g"
        ).fetchall()
        assert len(big) == 50000 and {r[1] for r in big} == {masked(PANS[0])}
        with (
            conn.cursor() as cur,
            cur.copy("COPY (SELECT pan FROM cards ORDER BY id) TO STDOUT") as cp,
        ):
            out = b"".join(bytes(b) for b in cp)
        assert PANS[0].encode() not in out and masked(PANS[0]).encode() in out
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_holds_the_target_back(pg_relay: PgRelay) -> None:
    """A raw protocol client asks for ~300 MB of rows and reads nothing: the relay stops
    reading the server (its memory stays flat and the backend waits on ClientWrite);
    once the client reads again, every row arrives."""
    relay = pg_relay.relay
    sock = socket.create_connection(("127.0.0.1", relay.pg_port), timeout=30)
    with sock:
        sock.sendall(proto.startup_message({"user": "ci-agent", "database": "appdb"}))
        dec = proto.MessageDecoder()

        def until(kind: bytes) -> list[proto.Message]:
            seen: list[proto.Message] = []
            while not any(m.type == kind for m in seen):
                data = sock.recv(65536)
                assert data, "the relay closed the connection"
                seen += list(dec.feed(data))
            return seen

        assert until(b"R")[-1].body[:4] == struct.pack("!i", 3)  # cleartext password
        sock.sendall(proto.password_message(TOKENS["ci-agent"].encode() + b"\0"))
        until(b"Z")
        start = _rss_mb(relay.proc.pid)
        sock.sendall(proto.query("SELECT repeat('x', 1000) FROM generate_series(1, 300000)"))
        # The server ends up waiting to write (the relay stopped reading): wait for it
        # to get there rather than for a fixed time.
        with psycopg.connect(pg_relay.direct_dsn, autocommit=True) as admin:

            def waiting() -> bool:
                rows = admin.execute(
                    "SELECT wait_event FROM pg_stat_activity WHERE query LIKE 'SELECT repeat%'"
                ).fetchall()
                return rows == [("ClientWrite",)]

            wait_for(waiting, 60)
        held = _rss_mb(relay.proc.pid)
        assert held - start < 64, (start, held)
        rows = 0
        done = False
        while not done:
            data = sock.recv(1 << 20)
            assert data, "the relay closed the connection"
            for m in dec.feed(data):
                rows += m.type == b"D"
                done = done or m.type == b"Z"
        assert rows == 300000
