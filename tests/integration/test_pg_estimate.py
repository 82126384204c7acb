"""What a held statement would do, against the real PostgreSQL server: the tables and
operations from the parse tree, and the planner's estimate from a side connection that
never runs the statement, and whose failure is an answer, not an exception."""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Iterator

import psycopg
import pytest

from recorder.config import TargetConfig
from relay.pg.estimate import Touch, estimate, explainable, plan_estimate, touches
from tests.fix_pg_relay import APP_PASSWORD, _prepare_app_db
from tests.fix_postgres import PostgresServer

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def app(postgres_server: PostgresServer) -> Iterator[tuple[TargetConfig, str]]:
    dsn = _prepare_app_db(postgres_server)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, state text)")
        conn.execute(
            "INSERT INTO orders SELECT g, CASE WHEN g % 4 = 0 THEN 'stale' ELSE 'open' END"
            " FROM generate_series(1, 2000) g"
        )
        conn.execute("ANALYZE orders")
    mp = pytest.MonkeyPatch()
    mp.setenv("APPDB_PASSWORD", APP_PASSWORD)
    target = TargetConfig(
        name="appdb",
        kind="postgres",
        address=f"{postgres_server.host}:{postgres_server.port}",
        database="app",
        user="app",
        password_env="APPDB_PASSWORD",
        tls="disable",
    )
    yield target, dsn
    mp.undo()


def _count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM orders").fetchone()
        assert row is not None
        return int(row[0])


def test_a_held_delete_shows_its_estimate_and_never_runs(app: tuple[TargetConfig, str]) -> None:
    target, dsn = app
    sql = "DELETE FROM orders WHERE state = $1"
    est = asyncio.run(estimate(target, sql, [b"stale"], [0], [25]))
    assert est.error is None, est.error
    assert est.node == "Delete on orders"
    assert est.rows is not None and 350 <= est.rows <= 650  # 500 of 2000 rows are stale
    assert est.cost is not None and est.cost > 0
    assert _count(dsn) == 2000  # EXPLAIN, never ANALYZE: nothing was deleted
    # A binary-format parameter with the Parse's type, as asyncpg sends it.
    by_id = asyncio.run(
        estimate(target, "DELETE FROM orders WHERE id < $1", [struct.pack("!i", 101)], [1], [23])
    )
    assert by_id.error is None and by_id.rows is not None and 50 <= by_id.rows <= 200
    assert _count(dsn) == 2000


def test_what_a_statement_touches() -> None:
    assert touches("DELETE FROM orders o USING cards c WHERE o.id = c.id") == [
        Touch("delete", "orders"),
        Touch("read", "cards"),
    ]
    assert touches("UPDATE public.orders SET state = 'x'") == [Touch("update", "public.orders")]
    assert touches("INSERT INTO orders SELECT * FROM staging") == [
        Touch("insert", "orders"),
        Touch("read", "staging"),
    ]
    assert touches("TRUNCATE orders, cards") == [
        Touch("truncate", "orders"),
        Touch("truncate", "cards"),
    ]
    # A CTE's name is not a table.
    assert touches("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d") == [
        Touch("delete", "orders")
    ]
    assert touches("this is not sql") == []


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        ("DROP TABLE orders", "DropStmt has no plan to estimate"),
        ("EXPLAIN ANALYZE DELETE FROM orders", "ExplainStmt has no plan to estimate"),
        ("DELETE FROM orders; DELETE FROM cards", "more than one statement"),
        ("DELETE FROM", "not parsed"),
        ("CREATE TABLE t2 AS SELECT 1", "CreateTableAsStmt has no plan to estimate"),
    ],
)
def test_statements_that_are_not_explained(
    app: tuple[TargetConfig, str], sql: str, why: str
) -> None:
    target, dsn = app
    assert why in (explainable(sql) or "")
    est = asyncio.run(estimate(target, sql))
    assert est.rows is None and est.error is not None and why in est.error
    assert _count(dsn) == 2000


def test_estimate_failures_are_answers(app: tuple[TargetConfig, str]) -> None:
    target, dsn = app
    # An error from the server (no such table).
    est = asyncio.run(estimate(target, "DELETE FROM nowhere WHERE id = 1"))
    assert est.rows is None and est.error is not None and "42P01" in est.error
    # A planner-folded function that writes: refused by the read-only transaction.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE SEQUENCE IF NOT EXISTS tickets;"
            "CREATE OR REPLACE FUNCTION sneaky() RETURNS int IMMUTABLE LANGUAGE plpgsql AS"
            " $$BEGIN PERFORM nextval('tickets'); RETURN 1; END$$"
        )
    est = asyncio.run(estimate(target, "SELECT * FROM orders WHERE id = sneaky()"))
    assert est.error is not None and "read-only" in est.error
    with psycopg.connect(dsn) as conn:  # the planner's call of it changed nothing
        assert conn.execute("SELECT last_value, is_called FROM tickets").fetchone() == (1, False)
    assert _count(dsn) == 2000
    # An unreachable target.
    gone = target.model_copy(update={"address": "127.0.0.1:1"})
    est = asyncio.run(estimate(gone, "DELETE FROM orders WHERE id = 1", timeout=5))
    assert est.rows is None and est.error is not None and "cannot reach" in est.error


def test_a_lock_queue_does_not_stall_the_estimate(app: tuple[TargetConfig, str]) -> None:
    target, dsn = app
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(dsn) as conn:
            conn.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait()
            conn.rollback()

    t = threading.Thread(target=hold_lock)
    t.start()
    try:
        assert locked.wait(30)
        est = asyncio.run(estimate(target, "DELETE FROM orders WHERE id = 1", timeout=0.5))
        assert est.rows is None and est.error is not None and "55P03" in est.error  # lock_timeout
    finally:
        release.set()
        t.join()


def test_plan_readings() -> None:
    plan = b'[{"Plan": {"Node Type": "Seq Scan", "Plan Rows": 7, "Total Cost": 1.5}}]'
    assert plan_estimate(plan).as_json() == {
        "rows": 7,
        "cost": 1.5,
        "node": "Seq Scan",
        "error": None,
    }
    assert plan_estimate(b"[]").error is not None
    assert plan_estimate(b"not json").error is not None
