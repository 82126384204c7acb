"""The PostgreSQL relay fails closed, against the real server with real clients (psql,
psycopg, pg_dump, a raw-protocol client for FunctionCall):

1. a statement pglast cannot parse is refused (or held where ``unparsed = "approve"``),
2. the session is pinned to UTF8 and standard-conforming strings,
3. FunctionCall is refused by default and policed by function name where allowed,
4. every backend message that carries text is masked (notifications, ParameterStatus,
   every error field, column names),
5. a statement past ``recording.max_statement_bytes`` is kept truncated with its length
   and SHA-256, and forwarded whole.

Each refusal has its positive control beside it (the legitimate thing still works).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from recorder.config import load_config, mask_policy
from recorder.masking import Masker
from recorder.store import Store
from relay.pg import protocol as proto
from tests.fix_pg_relay import APP_PASSWORD, PANS, PG_TARGETS, PgRelay, _prepare_app_db
from tests.fix_postgres import PostgresServer
from tests.fix_relay import TOKENS, Relay, start_relay, wait_for
from tests.fix_sshd import SshTarget

PAN = PANS[0]  # 4111111111111111

STRICT = """
[[targets]]
name = "{name}"
kind = "postgres"
address = "127.0.0.1:{port}"
database = "app"
user = "app"
password_env = "APPDB_PASSWORD"
groups = ["agents", "sre"]
mask_columns = ["secrets.code"]
tls = "disable"
{extra}
"""

RULES = """
[[rules]]
name = "reads-only"
sql = ["SelectStmt"]
targets = ["allowlistdb"]
action = "allow"
[[rules]]
name = "no-drop-table"
sql = ["DropStmt"]
targets = ["strictdb", "helddb"]
action = "block"
[[rules]]
name = "no-terminate"
command = 'pg_terminate_backend'
targets = ["appdb", "fndb"]
action = "block"
"""


def masked(pan: str) -> str:
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


@pytest.fixture(scope="module")
def fc_relay(
    sshd_target: SshTarget,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PgRelay]:
    """The fixture relay's targets plus ``strictdb`` (DROP blocked), ``helddb`` (the same,
    unparsed statements held for approval) and ``fndb`` (FunctionCall allowed)."""
    direct = _prepare_app_db(postgres_server)
    port = postgres_server.port
    extra = PG_TARGETS.format(port=port)
    extra += STRICT.format(name="strictdb", port=port, extra="")
    extra += STRICT.format(name="helddb", port=port, extra='unparsed = "approve"')
    extra += STRICT.format(name="fndb", port=port, extra="allow_function_call = true")
    extra += STRICT.format(name="allowlistdb", port=port, extra='default = "block"')
    extra += RULES
    relay = start_relay(
        tmp_path_factory.mktemp("pgfail"),
        sshd_target,
        extra=extra,
        env={"APPDB_PASSWORD": APP_PASSWORD},
    )
    try:
        yield PgRelay(relay, postgres_server, direct)
    finally:
        relay.stop()


def victims(fc: PgRelay) -> int:
    """Rows of the victims table, read directly (-1: the table is gone)."""
    with psycopg.connect(fc.direct_dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('public.victims')").fetchone() == (None,):
            return -1
        row = conn.execute("SELECT count(*) FROM victims").fetchone()
        assert row is not None
        return int(row[0])


def commands(relay: Relay, target: str) -> list[dict[str, object]]:
    cfg = load_config(relay.config)
    with Store.open(cfg.store_url()) as store:
        return [c for s in store.list_sessions(target=target) for c in store.list_commands(s["id"])]


def cast_texts(relay: Relay) -> str:
    return "".join(c.read_text(errors="replace") for c in relay.recordings().glob("*.cast"))


# -- raw protocol --------------------------------------------------------------------


def _read(s: socket.socket, until: int) -> list[tuple[bytes, bytes]]:
    """Messages until the ``until``-th ReadyForQuery, or until the relay closes."""
    buf = b""
    msgs: list[tuple[bytes, bytes]] = []
    while sum(t == b"Z" for t, _ in msgs) < until:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 5 and len(buf) >= 1 + struct.unpack("!i", buf[1:5])[0]:
            end = 1 + struct.unpack("!i", buf[1:5])[0]
            msgs.append((buf[:1], buf[5:end]))
            buf = buf[end:]
    return msgs


def _login(fc: PgRelay, target: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", fc.relay.pg_port), timeout=30)
    params = f"user\0ci-agent\0database\0{target}\0\0".encode()
    s.sendall(struct.pack("!ii", len(params) + 8, 196608) + params)
    head = s.recv(9)
    assert head[:1] == b"R" and struct.unpack("!i", head[5:9])[0] == 3, head
    s.sendall(proto.password_message(TOKENS["ci-agent"].encode() + b"\0"))
    assert _read(s, 1)[-1][0] == b"Z"
    return s


def _fields(body: bytes) -> dict[str, str]:
    return dict(proto.parse_fields(body))


# -- 1. fail closed --------------------------------------------------------------------

# PostgreSQL 15 accepts ``system_user`` as a table name; pglast's grammar (PostgreSQL
# 17, where SYSTEM_USER is a reserved word) does not.
UNPARSEABLE = "CREATE TEMP TABLE system_user (x int)"


def test_a_statement_the_parser_rejects_is_refused_and_the_session_goes_on(
    fc_relay: PgRelay,
) -> None:
    assert victims(fc_relay) == 5
    with psycopg.connect(fc_relay.dsn(target="strictdb"), autocommit=True) as conn:
        # The DROP the rules never saw: the whole text is refused, nothing of it runs.
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute(f"DROP TABLE victims; {UNPARSEABLE}")
        msg = err.value.diag.message_primary or ""
        assert "castgate:unparsed" in msg and "cannot parse" in msg and "system_user" in msg
        assert victims(fc_relay) == 5
        # The extended protocol (Parse) the same way.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="cannot parse"):
            conn.execute("SELECT %s::int FROM (SELECT 1) AS system_user", (7,))
        # Positive controls: the session is usable, what parses is decided by the rules.
        assert conn.execute("SELECT %s::int FROM (SELECT 1) AS s", (7,)).fetchone() == (7,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drop-table"):
            conn.execute("DROP TABLE victims")
        assert conn.execute("SELECT count(*) FROM victims").fetchone() == (5,)
        # Several statements: each is decided, and a harmless one does not carry a DROP.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drop-table"):
            conn.execute("SELECT 1; DROP TABLE victims")
    assert victims(fc_relay) == 5
    relay = fc_relay.relay
    wait_for(
        lambda: any(
            e.get("msg") == "command.blocked"
            and e.get("rule") == "castgate:unparsed"
            and "cannot parse" in str(e.get("reason"))
            for e in relay.logs
        ),
        30,
    )
    wait_for(lambda: "blocked: castgate:unparsed" in cast_texts(relay), 30)
    wait_for(
        lambda: any(
            c["rule"] == "castgate:unparsed" and c["action"] == "block"
            for c in commands(relay, "strictdb")
        ),
        30,
    )


def test_in_allowlist_mode_each_statement_of_a_text_needs_its_allow(fc_relay: PgRelay) -> None:
    with psycopg.connect(fc_relay.dsn(target="allowlistdb"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM victims").fetchone() == (5,)
        for text in (
            "SELECT 1; DROP TABLE victims",
            "DROP TABLE victims",
            f"SELECT 1; {UNPARSEABLE}",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="castgate:"):
                conn.execute(text)
        assert conn.execute("SELECT 1; SELECT 2").fetchone() == (1,)
    assert victims(fc_relay) == 5


def test_an_unparsed_statement_is_held_where_the_target_says_approve(fc_relay: PgRelay) -> None:
    relay = fc_relay.relay
    notices: list[str] = []

    def approve() -> None:
        def pending() -> list[dict[str, object]]:
            out = relay.castgate("approvals", "--json", "--token", TOKENS["alice"]).stdout
            return json.loads(out) if out.strip() else []

        wait_for(lambda: bool(pending()), 30)
        relay.castgate("approve", str(pending()[0]["id"]), "--token", TOKENS["alice"])

    with psycopg.connect(fc_relay.dsn(target="helddb"), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        t = threading.Thread(target=approve, daemon=True)
        t.start()
        conn.execute(UNPARSEABLE)  # runs once approved
        t.join(60)
        assert any("approval #" in n and "castgate:unparsed" in n for n in notices), notices
        assert conn.execute("SELECT count(*) FROM pg_temp.system_user").fetchone() == (0,)


# -- 2. one encoding ---------------------------------------------------------------------


def test_other_client_encodings_are_refused_at_startup(fc_relay: PgRelay) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PGCLIENTENCODING"}
    for enc in ("GBK", "SJIS"):
        res = subprocess.run(
            ["psql", fc_relay.dsn(target="strictdb"), "-X", "-c", "SELECT 1"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**env, "PGCLIENTENCODING": enc},
            stdin=subprocess.DEVNULL,
        )
        assert res.returncode != 0
        assert f"client_encoding '{enc}' is not supported" in res.stderr, res.stderr
    with pytest.raises(psycopg.OperationalError, match="is not supported"):
        psycopg.connect(fc_relay.dsn(target="strictdb") + " client_encoding=GBK")
    # Positive controls: psql in whatever locale it runs (C: SQL_ASCII), UTF8 asked for.
    for extra in ({}, {"PGCLIENTENCODING": "UTF8"}):
        res = subprocess.run(
            ["psql", fc_relay.dsn(target="strictdb"), "-X", "-At", "-c", "SHOW client_encoding"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**env, **extra},
            stdin=subprocess.DEVNULL,
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "UTF8"


# With client_encoding SJIS, 0x83 0x5C is one character and the quote after it ends the
# string; read as UTF-8 (0x83 invalid) the backslash escapes that quote and the DROP is
# inside the string.
SJIS_DROP = b"SELECT E'\x83\\' ; DROP TABLE victims; -- '"


def test_setting_another_encoding_is_refused_and_the_session_stays_utf8(
    fc_relay: PgRelay,
) -> None:
    with psycopg.connect(fc_relay.dsn(target="strictdb"), autocommit=True) as conn:
        for stmt in (
            "SET client_encoding = 'SJIS'",
            "SET NAMES 'GBK'",
            "SET SESSION client_encoding TO sjis",
            "SET U&\"client_encodin\\0067\" TO 'SJIS'",
            "SELECT set_config('client_encoding', 'SJIS', false)",
            "SELECT pg_catalog.set_config(E'client\\x5fencoding', 'GBK', false)",
            "SET standard_conforming_strings = off",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is pinned to"):
                conn.execute(stmt)
            assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        # The attack bytes are now just invalid UTF-8, refused by the server itself.
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
            conn.execute(SJIS_DROP)  # type: ignore[call-overload]
        # Positive controls: UTF8 itself, RESET (back to the pinned start value).
        conn.execute("SET client_encoding = 'UTF8'")
        conn.execute("RESET client_encoding")
        conn.execute("RESET ALL")
        conn.execute("SET standard_conforming_strings = on")
        assert conn.execute("SELECT set_config('application_name', 'ok', false)").fetchone() == (
            "ok",
        )
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
    assert victims(fc_relay) == 5


ENC_FUNCTION = (
    "CREATE FUNCTION pg_temp.enc() RETURNS text LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM set_config('client_' || 'encoding', 'SJIS', false); "
    "RETURN 'x'; END $$"
)


def test_a_setting_changed_where_no_parser_sees_it_ends_the_session(fc_relay: PgRelay) -> None:
    """A function changes client_encoding; the attack statement is pipelined behind it
    in the same write. The relay holds the non-ASCII statement until the target has
    answered, sees the ParameterStatus, and ends the session before forwarding it."""
    with _login(fc_relay, "strictdb") as s:
        s.sendall(proto.query(ENC_FUNCTION))
        assert [t for t, _ in _read(s, 1)] == [b"C", b"Z"]
        s.sendall(proto.query("SELECT pg_temp.enc()") + proto.message(b"Q", SJIS_DROP + b"\0"))
        msgs = _read(s, 2)
    errors = [_fields(b) for t, b in msgs if t == b"E"]
    assert errors and errors[-1]["S"] == "FATAL"
    assert "client_encoding changed" in errors[-1]["M"], errors
    assert victims(fc_relay) == 5
    # Positive control: the same function is harmless where it leaves UTF8 alone.
    with psycopg.connect(fc_relay.dsn(target="strictdb"), autocommit=True) as conn:
        conn.execute(ENC_FUNCTION.replace("'SJIS'", "'UTF8'"))
        assert conn.execute("SELECT pg_temp.enc()").fetchone() == ("x",)
        assert conn.execute("SELECT 'é' || %s", ("ü",)).fetchone() == ("éü",)


def test_a_statement_another_encoding_reads_otherwise_behind_a_running_one_is_refused(
    fc_relay: PgRelay,
) -> None:
    # '€' is E2 82 AC: in GBK, BIG5 or UHC the AC takes in the ASCII byte after it.
    with psycopg.connect(fc_relay.dsn(target="strictdb"), autocommit=True) as conn:
        # No Sync between: the relay cannot wait for the first answer, so it refuses.
        refused = pytest.raises(psycopg.errors.InsufficientPrivilege, match="send a Sync")
        with refused, conn.pipeline() as pipe:
            conn.execute("SELECT %s::int", (1,))
            conn.execute("SELECT '€a' || %s::text", (2,))
            pipe.sync()
        # Positive controls: with a Sync between, it waits for the first answer; text
        # every encoding reads alike (accented Latin, a quote after it) goes at once.
        with conn.pipeline() as pipe:
            a = conn.execute("SELECT %s::int", (1,))
            pipe.sync()
            b = conn.execute("SELECT '€a' || %s::text", (2,))
        assert a.fetchone() == (1,) and b.fetchone() == ("€a2",)
        with conn.cursor() as cur:
            cur.executemany("SELECT 'Müller' || %s::text", [(1,), (2,), (3,)])
        with conn.pipeline():
            a = conn.execute("SELECT %s::int", (1,))
            b = conn.execute("SELECT 'café' || %s::text", (2,))
        assert a.fetchone() == (1,) and b.fetchone() == ("café2",)


# -- 3. FunctionCall ---------------------------------------------------------------------


def _oid(fc: PgRelay, signature: str) -> int:
    with psycopg.connect(fc.direct_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT %s::regprocedure::oid::int", (signature,)).fetchone()
        assert row is not None
        return int(row[0])


def test_function_call_is_refused_by_default(fc_relay: PgRelay) -> None:
    terminate = _oid(fc_relay, "pg_terminate_backend(integer, bigint)")
    xml = _oid(fc_relay, "query_to_xml(text, boolean, boolean, text)")
    with psycopg.connect(fc_relay.direct_dsn, autocommit=True) as victim:
        pid = victim.info.backend_pid
        with _login(fc_relay, "appdb") as s:
            s.sendall(proto.function_call(terminate, [str(pid).encode(), b"0"]))
            msgs = _read(s, 1)
            assert [t for t, _ in msgs] == [b"E", b"Z"], msgs
            err = _fields(msgs[0][1])
            assert err["C"] == "42501" and "FunctionCall" in err["M"]
            s.sendall(proto.function_call(xml, [b"SELECT pan FROM cards", b"true", b"false", b""]))
            msgs = _read(s, 1)
            assert [t for t, _ in msgs] == [b"E", b"Z"]
            assert PAN.encode() not in b"".join(b for _, b in msgs)
            # The session goes on.
            s.sendall(proto.query("SELECT 42"))
            assert [t for t, _ in _read(s, 1)] == [b"T", b"D", b"C", b"Z"]
        assert victim.execute("SELECT 1").fetchone() == (1,)  # not terminated
    relay = fc_relay.relay
    wait_for(
        lambda: any(
            e.get("msg") == "command.blocked" and e.get("rule") == "castgate:function-call"
            for e in relay.logs
        ),
        30,
    )


def test_function_call_where_allowed_is_policed_logged_recorded_and_masked(
    fc_relay: PgRelay,
) -> None:
    terminate = _oid(fc_relay, "pg_terminate_backend(integer, bigint)")
    xml = _oid(fc_relay, "query_to_xml(text, boolean, boolean, text)")
    textcat = _oid(fc_relay, "textcat(text, text)")
    to_number = _oid(fc_relay, "to_number(text, text)")
    with psycopg.connect(fc_relay.direct_dsn, autocommit=True) as victim:
        pid = victim.info.backend_pid
        with _login(fc_relay, "fndb") as s:
            # The rules see SELECT pg_catalog.pg_terminate_backend(...): blocked.
            s.sendall(proto.function_call(terminate, [str(pid).encode(), b"0"]))
            msgs = _read(s, 1)
            assert [t for t, _ in msgs] == [b"E", b"Z"]
            assert "no-terminate" in _fields(msgs[0][1])["M"]
            # query_to_xml runs; its card numbers come back masked.
            s.sendall(proto.function_call(xml, [b"SELECT pan FROM cards", b"true", b"false", b""]))
            msgs = _read(s, 1)
            assert [t for t, _ in msgs] == [b"V", b"Z"], msgs
            value = proto.parse_function_result(msgs[0][1])
            assert value is not None
            assert PAN.encode() not in value and masked(PAN).encode() in value
            # Positive control: a value without a card number comes back byte for byte.
            s.sendall(proto.function_call(textcat, [b"plain ", b"text 42"]))
            msgs = _read(s, 1)
            assert msgs[0] == (b"V", struct.pack("!i", 13) + b"plain text 42"), msgs
            # A binary numeric result: decoded by its type, NULL when it is a card number.
            s.sendall(proto.function_call(to_number, [PAN.encode(), b"9" * 16], [0], 1))
            msgs = _read(s, 1)
            assert msgs[0] == (b"V", struct.pack("!i", -1)), msgs
            s.sendall(proto.function_call(to_number, [b"42", b"99"], [0], 1))
            msgs = _read(s, 1)
            assert msgs[0][0] == b"V" and proto.parse_function_result(msgs[0][1]) == (
                struct.pack("!hhhh", 1, 0, 0, 0) + struct.pack("!h", 42)
            )
        assert victim.execute("SELECT 1").fetchone() == (1,)
    relay = fc_relay.relay

    def logged() -> bool:
        texts = [(c["text"], c["status"]) for c in commands(relay, "fndb")]
        return any("query_to_xml" in str(t) and st == "function call" for t, st in texts)

    wait_for(logged, 30)
    texts = [str(c["text"]) for c in commands(relay, "fndb")]
    assert any(t.startswith("SELECT pg_catalog.pg_terminate_backend(") for t in texts)
    assert all(PAN not in t for t in texts)
    wait_for(lambda: "query_to_xml" in cast_texts(relay), 30)
    cast = cast_texts(relay)
    assert PAN not in cast and "plain text 42" in cast


# -- 4. every message that carries text ---------------------------------------------------


def test_notifications_parameter_status_error_fields_and_column_names_are_masked(
    fc_relay: PgRelay,
) -> None:
    got: list[tuple[str, str]] = []
    with psycopg.connect(fc_relay.dsn(target="appdb"), autocommit=True) as conn:
        conn.add_notify_handler(lambda n: got.append((n.channel, n.payload)))
        conn.execute(f'LISTEN "{PAN}"')
        conn.execute("LISTEN plain")
        conn.execute(f"SELECT pg_notify('{PAN}', 'paid with {PAN}')")
        conn.execute("SELECT pg_notify('plain', 'nothing to hide')")
        conn.execute("SELECT 1")  # (any round trip delivers what is queued)
        assert (masked(PAN), f"paid with {masked(PAN)}") in got
        assert ("plain", "nothing to hide") in got
        # ParameterStatus: application_name comes back as set.
        conn.execute(f"SELECT set_config('application_name', 'agent {PAN}', false)")
        assert conn.info.parameter_status("application_name") == f"agent {masked(PAN)}"
        conn.execute("SELECT set_config('application_name', 'agent 42', false)")
        assert conn.info.parameter_status("application_name") == "agent 42"
        # Every field of an error: table, column, constraint, schema, message, detail.
        conn.execute(
            f'CREATE TEMP TABLE "{PANS[1]}" ("{PAN}" int NOT NULL '
            f'CONSTRAINT "{PANS[2]}" CHECK ("{PAN}" > 0))'
        )
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            conn.execute(f'INSERT INTO "{PANS[1]}" VALUES (-1)')
        diag = err.value.diag
        assert diag.table_name == masked(PANS[1])
        assert diag.constraint_name == masked(PANS[2])
        assert PANS[1] not in (diag.message_primary or "")
        with pytest.raises(psycopg.errors.NotNullViolation) as err:
            conn.execute(f'INSERT INTO "{PANS[1]}" VALUES (NULL)')
        assert err.value.diag.column_name == masked(PAN)
        # A hint and a context (plpgsql RAISE).
        with pytest.raises(psycopg.errors.RaiseException) as err:
            conn.execute(
                f"DO $$ BEGIN RAISE EXCEPTION 'x' USING HINT = 'try {PAN}', "
                f"SCHEMA = '{PAN}', COLUMN = '{PAN}', DATATYPE = '{PAN}'; END $$"
            )
        d = err.value.diag
        assert d.message_hint == f"try {masked(PAN)}"
        assert d.schema_name == d.column_name == d.datatype_name == masked(PAN)
        # Column names: masked in place.
        cur = conn.execute(f'SELECT 1 AS "{PAN}", 2 AS plain')
        assert cur.description is not None
        assert [c.name for c in cur.description] == [masked(PAN), "plain"]
        assert cur.fetchone() == (1, 2)
        cur = conn.execute(f'SELECT %s::int AS "{PAN}"', (3,))
        assert cur.description is not None and cur.description[0].name == masked(PAN)
    # The ParameterStatus of the startup answer too.
    with psycopg.connect(fc_relay.dsn(target="appdb") + f" application_name={PAN}") as conn:
        assert conn.info.parameter_status("application_name") == (
            f"castgate:ci-agent {masked(PAN)}"
        )
    assert PAN not in cast_texts(fc_relay.relay)


# -- 5. long statements ---------------------------------------------------------------------


def test_a_statement_over_the_size_limit_is_kept_truncated_and_forwarded_whole(
    fc_relay: PgRelay,
) -> None:
    relay = fc_relay.relay
    limit = load_config(relay.config).recording.max_statement_bytes
    filler = "x" * (limit + 4096)
    text = f"SELECT '{PAN}' AS head, length('{filler}') AS n, '{PANS[1]}' AS tail"
    with psycopg.connect(fc_relay.dsn(target="strictdb"), autocommit=True) as conn:
        row = conn.execute(text).fetchone()  # type: ignore[call-overload]
        assert row == (masked(PAN), len(filler), masked(PANS[1]))
    cfg = load_config(relay.config)
    keep = Masker(mask_policy(cfg)).mask(text)
    digest = hashlib.sha256(keep.encode()).hexdigest()
    found: list[str] = []

    def logged() -> bool:
        found[:] = [str(c["text"]) for c in commands(relay, "strictdb") if digest in str(c["text"])]
        return bool(found)

    wait_for(logged, 30)
    kept = found[0]
    assert kept.startswith(keep[:limit])
    assert f"statement of {len(keep.encode())} bytes truncated; sha256 {digest}" in kept
    assert len(kept) < limit + 200 and PAN not in kept
    wait_for(lambda: digest in cast_texts(relay), 30)
    # Positive control: a statement under the limit is kept whole.
    with psycopg.connect(fc_relay.dsn(target="strictdb"), autocommit=True) as conn:
        conn.execute("SELECT 'short statement kept whole'")
    wait_for(
        lambda: any(
            c["text"] == "SELECT 'short statement kept whole'" for c in commands(relay, "strictdb")
        ),
        30,
    )


# -- COPY TO STDOUT and pg_dump through the relay ------------------------------------------


def test_copy_to_stdout_masks_mask_columns_in_text_and_csv(fc_relay: PgRelay) -> None:
    with psycopg.connect(fc_relay.dsn(target="appdb"), autocommit=True) as conn:
        conn.execute("INSERT INTO secrets VALUES (2, 'tab\there, \"q\"') ")
        conn.execute("CREATE TEMP TABLE plain (id int, code text)")
        conn.execute("INSERT INTO plain SELECT * FROM secrets")

        def copy(sql: str) -> bytes:
            with conn.cursor() as cur, cur.copy(sql) as cp:
                return b"".join(bytes(b) for b in cp)

        try:
            assert copy("COPY secrets TO STDOUT") == (b'1\t***-***-***\n2\t***\\*****, "*"\n')
            assert copy("COPY public.secrets (code, id) TO STDOUT") == (
                b'***-***-***\t1\n***\\*****, "*"\t2\n'
            )
            assert copy("COPY secrets TO STDOUT (FORMAT csv, HEADER)") == (
                b'id,code\n1,***-***-***\n2,"***\t****, ""*"""\n'
            )
            # A query over the table: every field (the relay cannot tell which is which).
            assert copy("COPY (SELECT id, code FROM secrets WHERE id = 1) TO STDOUT") == (
                b"*\t***-***-***\n"
            )
            # Positive control: the same data in a table without mask_columns.
            assert copy("COPY plain TO STDOUT") == (b'1\tabc-123-xyz\n2\ttab\\there, "q"\n')
        finally:
            conn.execute("DELETE FROM secrets WHERE id = 2")


# -- pg_dump through the relay ------------------------------------------------------------


def test_pg_dump_through_the_relay_restores_with_card_numbers_masked(
    fc_relay: PgRelay, tmp_path: Path
) -> None:
    """What an auditor should expect: a dump taken through the relay is complete and
    restores, but it is not a backup of the card data: every card number in it is masked
    (bin6-last4) by content, and every ``mask_columns`` value is starred."""
    out = tmp_path / "dump.sql"
    dsn = fc_relay.dsn(target="strictdb")
    env = {k: v for k, v in os.environ.items() if k != "PGCLIENTENCODING"}
    res = subprocess.run(
        ["pg_dump", "--no-owner", "-t", "cards", "-t", "secrets", "-f", str(out), "-d", dsn],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    dump = out.read_text()
    assert all(p not in dump for p in PANS) and masked(PAN) in dump
    assert "abc-123-xyz" not in dump and "1\t***-***-***" in dump  # secrets.code
    server = fc_relay.server
    restored = server.create_database("restored_from_relay")
    try:
        res = subprocess.run(
            ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-q", "-f", str(out), restored],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        assert res.returncode == 0, res.stderr
        with psycopg.connect(restored, autocommit=True) as conn:
            rows = conn.execute("SELECT pan FROM cards ORDER BY id").fetchall()
        assert [r[0] for r in rows] == [masked(p) for p in PANS]
        with psycopg.connect(restored, autocommit=True) as conn:
            assert conn.execute("SELECT code FROM secrets").fetchall() == [("***-***-***",)]
    finally:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS restored_from_relay")
