"""Clients that speak the binary format (asyncpg everywhere, psycopg's binary cursors,
SQLAlchemy on both drivers) through the relay against a real server: every type an
agent reads masks its card numbers the way the type allows, rows without one arrive
exactly as the server sent them, ``mask_columns`` text comes back starred (not NULL),
and the transcript shows binary results and bound parameters, with control characters
escaped. The clients parsing every message is the proof that the wire stays valid."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from psycopg.types.composite import CompositeInfo, register_composite
from sqlalchemy.ext.asyncio import create_async_engine

from tests.fix_pg_relay import PANS, PgRelay, casts
from tests.fix_relay import TOKENS, wait_for

PAN = PANS[0]
MASKED = PAN[:6] + "*" * (len(PAN) - 10) + PAN[-4:]
COLUMNS = "id, t, v, n, b8, bt, j, jb, ta, ba, na, r, rec, f"


def _raw(text: str) -> list[str]:
    return [p for p in PANS if re.search(r"(?<![0-9])" + p + r"(?![0-9])", text)]


@pytest.fixture(scope="module")
def binvals(pg_relay: PgRelay) -> Iterator[PgRelay]:
    """Row 1 holds the card number in every column, row 2 holds none."""
    with psycopg.connect(pg_relay.direct_dsn, autocommit=True) as conn:
        conn.execute("CREATE TYPE cardref AS (label text, num bigint)")
        conn.execute(
            "CREATE TABLE binvals (id int PRIMARY KEY, t text, v varchar(60), n numeric,"
            " b8 bigint, bt bytea, j json, jb jsonb, ta text[], ba bigint[], na numeric[],"
            " r int8range, rec cardref, f float8)"
        )
        conn.execute(
            "INSERT INTO binvals VALUES (1, %(t)s::text, %(t)s::text, %(n)s::text::numeric,"
            " %(n)s::text::bigint, %(bt)s, %(j)s::json, %(j)s::jsonb, ARRAY[%(t)s::text, 'plain'], ARRAY[%(n)s::text::bigint, 7],"
            " ARRAY[%(n)s::text::numeric, 1.5],"
            " int8range(%(n)s::text::bigint, %(n)s::text::bigint + 10),"
            " ROW('mine', %(n)s::text::bigint), %(n)s::text::float8)",
            {
                "t": f"paid with {PAN}",
                "n": PAN,
                "bt": f"card {PAN}".encode(),
                "j": json.dumps({"pan": PAN, "num": int(PAN)}),
            },
        )
        conn.execute(
            "INSERT INTO binvals VALUES (2, 'hello', 'world', 12.5, 42, '\\x0001ff',"
            " '{\"a\": [1, 2]}', '{\"a\": [1, 2]}', ARRAY['x', NULL], ARRAY[1, 2],"
            " ARRAY[3.25], int8range(1, 5), ROW('other', 9), 2.5)"
        )
    yield pg_relay


def _connect(relay: PgRelay) -> Any:
    return asyncpg.connect(
        host="127.0.0.1",
        port=relay.relay.pg_port,
        user="ci-agent",
        password=TOKENS["ci-agent"],
        database="appdb",
        ssl=False,
    )


def _check_row1(row: Any) -> None:
    """Row 1 through the relay: every card number masked as its type allows."""
    assert row["t"] == f"paid with {MASKED}" and row["v"] == f"paid with {MASKED}"
    assert row["n"] is None and row["b8"] is None and row["f"] is None  # numbers: NULL
    assert bytes(row["bt"]) == f"card {MASKED}".encode()  # bytea: in place
    j, jb = (x if isinstance(x, dict) else json.loads(x) for x in (row["j"], row["jb"]))
    assert j["pan"] == MASKED and j["num"] == MASKED  # still JSON: the number a string
    assert jb == j
    assert list(row["ta"]) == [f"paid with {MASKED}", "plain"]
    assert list(row["ba"]) == [None, 7]  # an array element NULL, the array re-encoded
    assert list(row["na"]) == [None, Decimal("1.5")]
    assert row["r"] is None  # a range cannot have a NULL bound: NULL whole
    assert tuple(row["rec"]) == ("mine", None)
    assert not _raw(repr(dict(row)))


async def _asyncpg_rows(relay: PgRelay) -> tuple[list[Any], list[Any]]:
    conn = await _connect(relay)
    kw = dict(kv.split("=", 1) for kv in relay.direct_dsn.split())
    direct = await asyncpg.connect(
        host=kw["host"],
        port=int(kw["port"]),
        user=kw["user"],
        password=kw["password"],
        database=kw["dbname"],
        ssl=False,
    )
    try:
        q = f"SELECT {COLUMNS} FROM binvals ORDER BY id"
        return list(await conn.fetch(q)), list(await direct.fetch(q))
    finally:
        await conn.close()
        await direct.close()


def _dsn_url(relay: PgRelay, driver: str) -> str:
    return (
        f"postgresql+{driver}://ci-agent:{quote(TOKENS['ci-agent'], safe='')}"
        f"@127.0.0.1:{relay.relay.pg_port}/appdb"
    )


def test_asyncpg_binary_results_are_masked_by_type(binvals: PgRelay) -> None:
    via, direct = asyncio.run(_asyncpg_rows(binvals))
    _check_row1(via[0])
    # Positive control: without a card number every value arrives as it is.
    assert [tuple(r) for r in via[1:]] == [tuple(r) for r in direct[1:]]
    assert _raw(repr(dict(direct[0])))  # (the data does hold the card number)


def test_asyncpg_mask_columns_text_in_binary_is_the_masked_string(binvals: PgRelay) -> None:
    async def run() -> tuple[Any, Any]:
        conn = await _connect(binvals)
        try:
            return await conn.fetchval("SELECT code FROM secrets"), await conn.fetchval(
                "SELECT id FROM secrets"
            )
        finally:
            await conn.close()

    code, ident = asyncio.run(run())
    assert code == "***-***-***"  # as in the text format, not NULL
    assert ident == 1


def test_asyncpg_prepared_statements_parameters_and_their_transcript(binvals: PgRelay) -> None:
    marker = "prepared-check"

    async def run() -> list[Any]:
        conn = await _connect(binvals)
        try:
            stmt = await conn.prepare(f"SELECT t, b8, '{marker}' AS m FROM binvals WHERE id = $1")
            rows = [await stmt.fetchrow(1), await stmt.fetchrow(2)]
            rows.append(await conn.fetchval("SELECT $1::text", f"echo {PAN}"))
            rows.append(await conn.fetchval("SELECT $1::bigint", int(PAN)))
            rows.append(await conn.fetchval("SELECT $1::int + 1", 41))
            return rows
        finally:
            await conn.close()

    r1, r2, echo, big, plain = asyncio.run(run())
    assert r1["t"] == f"paid with {MASKED}" and r1["b8"] is None
    assert (r2["t"], r2["b8"]) == ("hello", 42)
    assert echo == f"echo {MASKED}" and big is None and plain == 42

    def cast_text() -> str | None:
        for c in casts(binvals.relay):
            text = c.read_text()
            if marker in text and c.with_name(c.name + ".manifest.json").exists():
                return "".join(
                    json.loads(x)[2] for x in text.splitlines()[1:] if json.loads(x)[1] == "o"
                )
        return None

    wait_for(lambda: cast_text() is not None, 15)
    out = cast_text()
    assert out is not None
    # Binary results drawn like text ones, parameters with their statement, masked.
    assert "WHERE id = $1\r\nParameters: $1 = '1'\r\n" in out
    assert f"paid with {MASKED}" in out and " hello " in out and " 42 " in out
    assert f"Parameters: $1 = 'echo {MASKED}'" in out
    assert f"Parameters: $1 = '{MASKED}'" in out
    assert "Parameters: $1 = '41'\r\n ?column?\r\n----------\r\n 42 " in out
    assert not _raw(out)


def test_asyncpg_copy_both_ways(binvals: PgRelay) -> None:
    async def run() -> bytes:
        conn = await _connect(binvals)
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS copied_in (id int, t text)")
            # COPY FROM STDIN in the binary format: input reaches the target as typed.
            await conn.copy_records_to_table(
                "copied_in", records=[(1, f"in {PAN}"), (2, "plain")], columns=["id", "t"]
            )
            buf = io.BytesIO()
            await conn.copy_from_query(
                "SELECT id, t, v, n, bt, j, jb, ta, ba, na, rec FROM binvals ORDER BY id",
                output=buf,
                format="binary",
            )
            return buf.getvalue()
        finally:
            await conn.close()

    data = asyncio.run(run())
    assert not _raw(data.decode("latin-1"))
    with psycopg.connect(binvals.direct_dsn, autocommit=True) as direct:
        assert direct.execute("SELECT t FROM copied_in ORDER BY id").fetchall() == [
            (f"in {PAN}",),
            ("plain",),
        ]
        # The masked binary COPY stream is still one the server itself reads back.
        direct.execute("CREATE TEMP TABLE back (LIKE binvals)")
        with direct.cursor() as cur:
            with cur.copy(
                "COPY back (id, t, v, n, bt, j, jb, ta, ba, na, rec) FROM STDIN (FORMAT binary)"
            ) as copy:
                copy.write(data)
            rows = cur.execute("SELECT t, n, bt, ba, rec FROM back ORDER BY id").fetchall()
    assert rows[0] == (f"paid with {MASKED}", None, f"card {MASKED}".encode(), [None, 7], "(mine,)")
    assert rows[1] == ("hello", Decimal("12.5"), b"\x00\x01\xff", [1, 2], "(other,9)")


def test_copy_text_and_csv_are_masked(binvals: PgRelay) -> None:
    with psycopg.connect(binvals.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        for opts in ("", "(FORMAT csv)"):
            with cur.copy(f"COPY (SELECT t, n, ta FROM binvals ORDER BY id) TO STDOUT {opts}") as c:
                data = b"".join(bytes(chunk) for chunk in c).decode()
            assert MASKED in data and not _raw(data), data
            assert "hello" in data


def test_psycopg_binary_cursor_and_pipeline(binvals: PgRelay) -> None:
    with psycopg.connect(binvals.dsn(), autocommit=True) as conn:
        # The composite type read as such (psycopg asks the catalog, through the relay).
        info = CompositeInfo.fetch(conn, "cardref")
        assert info is not None
        register_composite(info, conn)
        with conn.cursor(binary=True) as cur:
            cur.execute(f"SELECT {COLUMNS} FROM binvals ORDER BY id")
            names = [d.name for d in cur.description or []]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        _check_row1(rows[0])
        with psycopg.connect(binvals.direct_dsn) as direct:
            register_composite(info, direct)
            dcur = direct.cursor(binary=True)
            dcur.execute(f"SELECT {COLUMNS} FROM binvals WHERE id = 2")
            assert tuple(rows[1].values()) == dcur.fetchone()
        with conn.cursor(binary=True) as c1, conn.cursor(binary=True) as c2:
            with conn.pipeline():
                c1.execute("SELECT b8, ba FROM binvals WHERE id = %s", (1,))
                c2.execute("SELECT code FROM secrets")
            assert c1.fetchone() == (None, [None, 7])
            assert c2.fetchone() == ("***-***-***",)


def test_a_binary_cursor_over_the_simple_query_protocol(binvals: PgRelay) -> None:
    # Another way to binary results: DECLARE ... BINARY CURSOR, FETCH by simple Query
    # (libpq's PQexec, as psql sends it); the RowDescription says binary.
    with psycopg.connect(binvals.dsn()) as conn:
        pg = conn.pgconn
        pg.exec_(b"BEGIN")
        pg.exec_(b"DECLARE c BINARY CURSOR FOR SELECT b8, t, n FROM binvals ORDER BY id")
        res = pg.exec_(b"FETCH ALL FROM c")
        assert res.fformat(0) == 1
        assert [res.get_value(0, i) for i in range(3)] == [
            None,
            b"paid with " + MASKED.encode(),
            None,
        ]
        assert res.get_value(1, 0) == (42).to_bytes(8, "big")
        pg.exec_(b"COMMIT")


def test_sqlalchemy_with_psycopg_and_asyncpg(binvals: PgRelay) -> None:
    query = sa.text("SELECT t, n, b8, ba FROM binvals ORDER BY id")
    engine = sa.create_engine(_dsn_url(binvals, "psycopg"), connect_args={"sslmode": "disable"})
    try:
        with engine.connect() as conn:
            sync_rows = [tuple(r) for r in conn.execute(query)]
    finally:
        engine.dispose()

    async def run() -> list[tuple[Any, ...]]:
        aengine = create_async_engine(_dsn_url(binvals, "asyncpg"), connect_args={"ssl": False})
        try:
            async with aengine.connect() as conn:
                return [tuple(r) for r in await conn.execute(query)]
        finally:
            await aengine.dispose()

    async_rows = asyncio.run(run())
    # psycopg's text format: a number holding a card number is NULL there too, an
    # array element NULL (starred digits would be no number the client can read).
    assert sync_rows[0] == async_rows[0] == (f"paid with {MASKED}", None, None, [None, 7])
    assert sync_rows[1] == async_rows[1] == ("hello", Decimal("12.5"), 42, [1, 2])


def test_transcript_escapes_control_characters(binvals: PgRelay) -> None:
    with psycopg.connect(binvals.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT 'shown' AS \"a\r\nappdb=> DROP TABLE fake\", E'\\x1b[2Jgone' AS v"
        ).fetchone()
    assert row == ("shown", "\x1b[2Jgone")  # the client gets the data as it is

    def cast_text() -> str | None:
        for c in casts(binvals.relay):
            text = c.read_text()
            if "gone" in text and c.with_name(c.name + ".manifest.json").exists():
                return "".join(
                    json.loads(x)[2] for x in text.splitlines()[1:] if json.loads(x)[1] == "o"
                )
        return None

    wait_for(lambda: cast_text() is not None, 15)
    out = cast_text()
    assert out is not None
    assert "\nappdb=> DROP TABLE fake" not in out and "\x1b[2J" not in out
    # In the statement the line break is kept behind psql's continuation prompt; in
    # the column name it is escaped; ESC is \x1B in both.
    assert "appdb-> appdb=> DROP TABLE fake" in out and "\\x1B[2Jgone" in out
    assert "a\\r\\nappdb=> DROP TABLE fake |" in out
    assert " shown " in out  # positive control: the row is drawn


def test_no_raw_card_number_in_casts_store_or_logs(binvals: PgRelay) -> None:
    # (after the tests above, in file order: every session they opened has ended)
    relay = binvals.relay
    wait_for(lambda: all(c.with_name(c.name + ".manifest.json").exists() for c in casts(relay)), 15)
    hits: list[tuple[str, list[str]]] = []
    for path in Path(relay.workdir).rglob("*"):
        if path.is_file():
            found = _raw(path.read_bytes().decode("latin-1"))
            if found:
                hits.append((str(path), found))
    assert not hits
    assert not _raw(json.dumps(relay.logs))


def test_binary_copy_of_an_eight_byte_card_number_ends_the_session(binvals: PgRelay) -> None:
    # An int8 or float8 in a binary COPY cannot be told from a timestamp: one that reads
    # as a card number ends the session rather than reach the client raw.
    query = "COPY (SELECT {}::{}) TO STDOUT (FORMAT binary)"
    with psycopg.connect(binvals.dsn(), autocommit=True) as conn:
        # Positive control: eight-byte values that are no card number pass exactly.
        with conn.cursor() as cur, cur.copy(query.format("now()", "timestamptz")) as copy:
            assert b"".join(bytes(b) for b in copy)
        with (
            psycopg.connect(binvals.direct_dsn, autocommit=True) as d,
            d.cursor() as cur,
            cur.copy(query.format(12345, "int8")) as copy,
        ):
            direct = b"".join(bytes(b) for b in copy)
        with conn.cursor() as cur, cur.copy(query.format(12345, "int8")) as copy:
            assert b"".join(bytes(b) for b in copy) == direct
    for kind in ("int8", "float8"):
        with (
            psycopg.connect(binvals.dsn(), autocommit=True) as conn,
            conn.cursor() as cur,
            pytest.raises(psycopg.errors.FeatureNotSupported, match="cannot mask"),
            cur.copy(query.format(PAN, kind)) as copy,
        ):
            for _ in copy:
                pass
