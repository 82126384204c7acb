"""Relay nodes in the audit store (issue 8): registration, heartbeats, reaping lost
relays, approval notifications and the additive 0002 migration, against SQLite and a
real PostgreSQL server alike."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command

from recorder.store import APPROVALS_CHANNEL, Store
from recorder.store.store import _alembic_config, _engine_url, _make_engine

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty store: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'castgate.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """An opened (and so migrated) store."""
    opened = Store.open(store_url)
    yield opened
    opened.close()


def _session(store: Store, id: str, node: str | None, *, ended: bool = False) -> None:
    store.create_session(id, "ci-agent", "web", "ssh", node=node, started_at=T0)
    if ended:
        store.end_session(id, status="closed", exit_status=0, lines=3, final_hash="ab")


def _approval(store: Store, session_id: str) -> int:
    return store.create_approval(
        session_id=session_id,
        identity="ci-agent",
        target="web",
        command="systemctl restart app",
        rule="restart-needs-approval",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )


def test_register_heartbeat_stop(store: Store) -> None:
    assert store.register_node("a", api_url="http://127.0.0.1:1", version="0.1.0") is None
    row = store.get_node("a")
    assert row is not None
    assert row["api_url"] == "http://127.0.0.1:1"
    assert row["stopped_at"] is None
    assert row["started_at"] == row["heartbeat_at"]
    assert store.heartbeat_node("a")
    beat = store.get_node("a")
    assert beat is not None and beat["heartbeat_at"] >= row["heartbeat_at"]
    assert not store.heartbeat_node("nobody")

    store.stop_node("a")
    stopped = store.get_node("a")
    assert stopped is not None and stopped["stopped_at"] is not None
    # A stopped node's heartbeat is refused: it has to register again.
    assert not store.heartbeat_node("a")
    before = store.register_node("a", api_url="http://127.0.0.1:2", version="0.2.0")
    assert before is not None and before["stopped_at"] is not None
    again = store.get_node("a")
    assert again is not None
    assert (again["api_url"], again["version"], again["stopped_at"]) == (
        "http://127.0.0.1:2",
        "0.2.0",
        None,
    )
    assert [n["id"] for n in store.list_nodes()] == ["a"]


def _age(store_url: str, node: str) -> None:
    """Make ``node``'s last heartbeat a year-old one, as if its relay had died then."""
    engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE nodes SET heartbeat_at = :t WHERE id = :id"), {"t": T0, "id": node}
            )
    finally:
        engine.dispose()


def test_reap_interrupts_only_the_lost_nodes_live_work(store_url: str, store: Store) -> None:
    for node in ("lost", "alive", "me"):
        store.register_node(node, api_url=None, version="0.1.0")
    _session(store, "lost-live", "lost")
    _session(store, "lost-done", "lost", ended=True)
    _session(store, "alive-live", "alive")
    _session(store, "legacy-live", None)
    held = _approval(store, "lost-live")
    other = _approval(store, "alive-live")
    assert store.reap_nodes(3600, exclude="me") == []

    _age(store_url, "lost")
    _age(store_url, "me")
    [reaped] = store.reap_nodes(3600, exclude="me")
    assert (reaped["node"], reaped["sessions"], reaped["approvals"]) == ("lost", 1, 1)
    assert reaped["heartbeat_at"] == T0
    lost = store.get_session("lost-live")
    assert lost is not None and lost["status"] == "interrupted" and lost["ended_at"] is not None
    done = store.get_session("lost-done")
    assert done is not None
    assert (done["status"], done["lines"], done["final_hash"]) == ("closed", 3, "ab")
    approval = store.get_approval(held)
    assert approval is not None
    assert (approval["status"], approval["reason"]) == ("interrupted", "relay lost lost")
    still = store.get_approval(other)
    assert still is not None and still["status"] == "pending"
    alive = store.get_session("alive-live")
    assert alive is not None and alive["ended_at"] is None
    # Sessions without a node are an old relay's: never reaped.
    legacy = store.get_session("legacy-live")
    assert legacy is not None and legacy["ended_at"] is None
    node = store.get_node("lost")
    assert node is not None and node["stopped_at"] is not None
    assert not store.heartbeat_node("lost")
    # The caller itself is never reaped, however old its heartbeat.
    me = store.get_node("me")
    assert me is not None and me["stopped_at"] is None
    # Nothing is reported twice.
    assert store.reap_nodes(3600, exclude="me") == []


def test_stopped_nodes_are_not_reaped(store: Store) -> None:
    store.register_node("gone", api_url=None, version="0.1.0")
    _session(store, "s", "gone", ended=True)
    store.stop_node("gone")
    assert store.reap_nodes(0) == []


def test_concurrent_reapers_claim_each_node_once(store: Store) -> None:
    for i in range(3):
        store.register_node(f"n{i}", api_url=None, version="0.1.0")
        for j in range(2):
            _session(store, f"n{i}-s{j}", f"n{i}")
            _approval(store, f"n{i}-s{j}")
    results: list[list[dict[str, Any]]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def reap() -> None:
        try:
            start.wait(30)
            results.append(store.reap_nodes(0))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reap) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    claims = sorted(r["node"] for batch in results for r in batch)
    assert claims == ["n0", "n1", "n2"]
    assert sum(r["sessions"] for batch in results for r in batch) == 6
    assert sum(r["approvals"] for batch in results for r in batch) == 6
    assert all(s["status"] == "interrupted" for s in store.list_sessions())


def test_notify_approval_reaches_a_listener(store_url: str, store: Store) -> None:
    url = store.libpq_url()
    if not store_url.startswith("postgresql"):
        assert url is None
        store.notify_approval(1)  # nothing to notify, and no error
        return
    assert url is not None
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"LISTEN {APPROVALS_CHANNEL}")
        store.notify_approval(42)
        got = [n.payload for n in conn.notifies(timeout=30, stop_after=1)]
    assert got == ["42"]


def _columns(url: str) -> dict[str, list[str]]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            return {t: [c["name"] for c in insp.get_columns(t)] for t in insp.get_table_names()}
    finally:
        engine.dispose()


def test_migration_0002_is_additive(store_url: str) -> None:
    # A store at 0001 with a live session of an old relay, as during a rolling upgrade.
    engine = _make_engine(_engine_url(store_url))
    try:
        with engine.begin() as conn:
            config = _alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "0001")
    finally:
        engine.dispose()
    before = _columns(store_url)
    assert "nodes" not in before

    old_insert = sa.text(
        "INSERT INTO sessions (id, identity, target, protocol, groups, node, started_at, status)"
        " VALUES (:id, 'ci-agent', 'web', 'ssh', '[]', 'old-host', :at, 'live')"
    )

    def old_relay_writes(session_id: str) -> None:
        eng = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with eng.begin() as conn:
                conn.execute(old_insert, {"id": session_id, "at": T0})
        finally:
            eng.dispose()

    old_relay_writes("old-1")
    store = Store.open(store_url)
    try:
        assert store.schema_version == "0003"
        after = _columns(store_url)
        # Every table and column the old relay uses is still there, unchanged.
        # (Later revisions append columns: the old ones come first, unchanged.)
        assert {t: c[: len(before[t])] for t, c in after.items() if t in before} == before
        old_relay_writes("old-2")
        assert {s["id"] for s in store.list_sessions(live=True)} == {"old-1", "old-2"}
        # Old relays never register, so the reaper never touches their sessions.
        store.register_node("new", api_url=None, version="0.1.0")
        assert store.reap_nodes(0) == [
            {
                "node": "new",
                "heartbeat_at": store.get_node("new")["heartbeat_at"],  # type: ignore[index]
                "approvals": 0,
                "sessions": 0,
            }
        ]
        assert {s["id"] for s in store.list_sessions(live=True)} == {"old-1", "old-2"}
    finally:
        store.close()
