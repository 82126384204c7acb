"""A relay with PostgreSQL targets in front of the real test PostgreSQL server, and a
``cards`` table full of test card numbers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from recorder.masking import luhn_complete
from tests.fix_postgres import PostgresServer
from tests.fix_relay import Relay, start_relay
from tests.fix_sshd import SshTarget

APP_PASSWORD = "app-secret-for-tests"
PANS = [
    luhn_complete("411111111111111"),
    luhn_complete("555555555555444"),
    luhn_complete("37828224631000"),
    luhn_complete("601111111111111"),
]


@dataclass
class PgRelay:
    """The relay plus direct access to the database behind it."""

    relay: Relay
    server: PostgresServer
    direct_dsn: str

    def dsn(self, **kw: str) -> str:
        return self.relay.pg_dsn(**kw)


def _prepare_app_db(server: PostgresServer) -> str:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS app")
        conn.execute("DROP ROLE IF EXISTS app")
        conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        conn.execute("CREATE DATABASE app OWNER app")
    dsn = f"host={server.host} port={server.port} dbname=app user=app password={APP_PASSWORD}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE cards (id int PRIMARY KEY, holder text, pan text, note text)")
        conn.execute("CREATE TABLE victims (id int)")
        conn.execute("INSERT INTO victims SELECT generate_series(1, 5)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO cards VALUES (%s, %s, %s, %s)",
                [(i + 1, f"holder{i}", pan, f"paid with {pan}") for i, pan in enumerate(PANS)],
            )
            cur.execute("CREATE TABLE secrets (id int, code text)")
            cur.execute("INSERT INTO secrets VALUES (1, 'abc-123-xyz')")
    return dsn


PG_TARGETS = """
[[targets]]
name = "appdb"
kind = "postgres"
address = "127.0.0.1:{port}"
database = "app"
user = "app"
password_env = "APPDB_PASSWORD"
groups = ["agents", "sre"]
mask_columns = ["secrets.code"]
tls = "disable"
[[targets]]
name = "appdb-tls"
kind = "postgres"
address = "127.0.0.1:{port}"
database = "app"
user = "app"
password_env = "APPDB_PASSWORD"
groups = ["agents", "sre"]
mask_columns = ["secrets.code"]
tls = "require"
[[rules]]
name = "no-drop-database"
sql = ["DropdbStmt"]
action = "block"
[[rules]]
name = "no-truncate"
sql = ["TruncateStmt"]
action = "block"
[[rules]]
name = "unbounded-writes"
sql = ["DeleteStmt:no-where", "UpdateStmt:no-where"]
action = "approve"
approvers = ["sre"]
timeout = "20s"
"""


@pytest.fixture(scope="module")
def pg_relay(
    sshd_target: SshTarget,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PgRelay]:
    """A relay whose ``appdb`` target is the test server's ``app`` database."""
    direct = _prepare_app_db(postgres_server)
    relay = start_relay(
        tmp_path_factory.mktemp("pgrelay"),
        sshd_target,
        extra=PG_TARGETS.format(port=postgres_server.port),
        env={"APPDB_PASSWORD": APP_PASSWORD},
    )
    try:
        yield PgRelay(relay, postgres_server, direct)
    finally:
        relay.stop()


def casts(relay: Relay) -> list[Path]:
    return sorted(relay.recordings().glob("*.cast"))
