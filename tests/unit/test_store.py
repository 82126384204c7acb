"""The audit store, against SQLite and a real PostgreSQL server alike."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from recorder.store import Store, StoreError
from recorder.store.schema import metadata
from tests.fix_postgres import PostgresServer

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
TABLES = {
    "events",
    "sessions",
    "commands",
    "approvals",
    "approval_decisions",
    "checkpoints",
    "manifests",
    "nodes",
}


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


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))


def _session(store: Store, id: str = "s1", **kwargs: Any) -> str:
    kwargs.setdefault("started_at", T0)
    store.create_session(id, "alice", "web", "ssh", **kwargs)
    return id


def _approval(store: Store, *, min_approvals: int = 1, identity: str = "alice") -> int:
    if store.get_session("s1") is None:
        _session(store)
    return store.create_approval(
        session_id="s1",
        identity=identity,
        target="web",
        command="git-receive-pack 'repo.git'",
        rule="push-needs-approval",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        min_approvals=min_approvals,
        approver_groups=["sre"],
    )


def _decide(store: Store, approval_id: int, decisions: list[str], i: int) -> dict[str, Any]:
    return store.add_decision(approval_id, approver=f"approver{i}", decision=decisions[i])


def _status(store: Store, approval_id: int) -> str:
    approval = store.get_approval(approval_id)
    assert approval is not None
    status: str = approval["status"]
    return status


def _race(n: int, action: Callable[[int], Any]) -> list[Any]:
    """Run ``action(i)`` in n threads released together; return results or exceptions."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = action(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


# --- migrations -----------------------------------------------------------------------


def test_open_migrates_to_head_and_reopening_changes_nothing(store_url: str) -> None:
    first = Store.open(store_url)
    try:
        assert first.schema_version == "0003"
        first.add_event("relay.start", None, "success", "node-a", "relay")
    finally:
        first.close()

    engine = _engine(store_url)
    try:
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) >= TABLES
            # The revisions must build exactly the model the code queries.
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    finally:
        engine.dispose()

    again = Store.open(store_url)
    try:
        assert again.schema_version == "0003"
        assert [e["kind"] for e in again.list_events()] == ["relay.start"]
    finally:
        again.close()
    engine = _engine(store_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        assert [v[0] for v in versions] == ["0003"]
    finally:
        engine.dispose()


_OPEN_AND_PRINT_VERSION = """
import sys
from recorder.store import Store
print("ready", flush=True)
sys.stdin.readline()
store = Store.open(sys.argv[1])
print(store.schema_version)
store.close()
"""


def test_relays_starting_together_migrate_once(store_url: str) -> None:
    # Separate processes, as separate relays would be: the database lock must hold on
    # its own, without the in-process lock around alembic.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AND_PRINT_VERSION, store_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    # Start the three migrations together, once the slow imports are behind them all.
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outcomes = [p.communicate(timeout=60) for p in procs]
    results = [(p.returncode, out.strip()) for p, (out, _) in zip(procs, outcomes, strict=True)]
    assert results == [(0, "0003")] * 3, outcomes


def test_stores_opened_together_in_one_process(store_url: str) -> None:
    opened = _race(3, lambda _: Store.open(store_url))
    try:
        assert all(isinstance(s, Store) for s in opened), opened
        assert {s.schema_version for s in opened} == {"0003"}
    finally:
        for s in opened:
            if isinstance(s, Store):
                s.close()


def test_closed_store_refuses_work(store: Store) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_events()


def test_sqlite_store_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "castgate.db"
    with Store.open(f"sqlite:///{path}") as opened:
        opened.add_event("auth", "alice", "success", "127.0.0.1", "web")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:secret@h/db", "unsupported store URL scheme"),
        ("sqlite:///relative/castgate.db", "must be absolute"),
        ("sqlite://", "needs a file"),
        ("not a url", "cannot parse"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as info:
        Store.open(url)
    assert "secret" not in str(info.value)


@pytest.mark.postgres
def test_postgres_login_failure_is_a_one_line_store_error(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.url().replace(postgres_server.password, "wrong-password")
    with pytest.raises(StoreError, match=r"cannot connect.*password authentication") as info:
        Store.open(url)
    assert "wrong-password" not in str(info.value)
    assert "\n" not in str(info.value)


# --- audit events ---------------------------------------------------------------------


def test_events_keep_the_six_pci_fields(store: Store) -> None:
    cest = timezone(timedelta(hours=2))
    event_id = store.add_event(
        "auth",
        "alice",
        "failure",
        "203.0.113.7:51234",
        "ssh:web",
        detail={"method": "publickey", "reason": "unknown key"},
        session_id=None,
        at=datetime(2025, 3, 1, 14, 0, 0, 123456, tzinfo=cest),
    )
    [event] = store.list_events()
    assert event == {
        "id": event_id,
        "at": datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "kind": "auth",
        "actor": "alice",
        "outcome": "failure",
        "origin": "203.0.113.7:51234",
        "resource": "ssh:web",
        "detail": {"method": "publickey", "reason": "unknown key"},
        "session_id": None,
    }
    assert event["at"].utcoffset() == timedelta(0)


def test_event_time_defaults_to_now_utc(store: Store) -> None:
    before = datetime.now(UTC)
    store.add_event("relay.start", None, "success", None, None)
    after = datetime.now(UTC)
    [event] = store.list_events()
    assert event["at"].tzinfo is not None
    assert before - timedelta(seconds=1) <= event["at"] <= after + timedelta(seconds=1)
    assert event["detail"] is None


def test_events_filter_by_kind_session_and_time(store: Store) -> None:
    rows = [
        ("auth", "alice", "success", None),
        ("session.start", "alice", "success", "s1"),
        ("recording.read", "bob", "success", "s1"),
        ("auth", "mallory", "failure", None),
        ("session.start", "carol", "success", "s2"),
    ]
    ids = [
        store.add_event(
            kind, actor, outcome, "o", "r", session_id=sid, at=T0 + timedelta(minutes=i)
        )
        for i, (kind, actor, outcome, sid) in enumerate(rows)
    ]

    def ids_of(**kwargs: Any) -> list[int]:
        return [e["id"] for e in store.list_events(**kwargs)]

    assert ids_of() == ids
    assert ids_of(kind="auth") == [ids[0], ids[3]]
    assert ids_of(session_id="s1") == [ids[1], ids[2]]
    assert ids_of(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == ids[1:3]
    assert ids_of(kind="session.start", since=T0 + timedelta(minutes=2)) == [ids[4]]
    assert ids_of(limit=2) == ids[:2]
    # Bounds given in another zone mean the same instants.
    plus5 = timezone(timedelta(hours=5))
    assert ids_of(since=(T0 + timedelta(minutes=3)).astimezone(plus5)) == ids[3:]


def test_events_refuse_bad_outcomes_and_naive_times(store: Store) -> None:
    with pytest.raises(ValueError, match="outcome"):
        store.add_event("auth", "alice", "ok", None, None)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.add_event("auth", "alice", "success", None, None, at=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        store.list_events(since=datetime(2025, 1, 1))
    assert store.list_events() == []


# --- sessions -------------------------------------------------------------------------


def test_session_create_end_and_get(store: Store) -> None:
    store.create_session(
        "s1",
        "ci-agent",
        "appdb",
        "postgres",
        groups=["agents", "ops"],
        auth_method="token",
        source="10.1.2.3:40000",
        node="relay-a",
        cast_path="recordings/s1.cast",
        title="psql appdb",
        started_at=T0,
    )
    live = store.get_session("s1")
    assert live is not None
    assert live["groups"] == ["agents", "ops"]
    assert live["started_at"] == T0
    assert live["ended_at"] is None
    assert live["status"] == "live"

    store.end_session(
        "s1",
        status="ok",
        exit_status=0,
        lines=412,
        final_hash="ab" * 32,
        masking_counts={"pan": 3, "track": 0},
        ended_at=T0 + timedelta(minutes=5),
    )
    ended = store.get_session("s1")
    assert ended is not None
    assert ended == {
        "id": "s1",
        "identity": "ci-agent",
        "target": "appdb",
        "protocol": "postgres",
        "groups": ["agents", "ops"],
        "auth_method": "token",
        "source": "10.1.2.3:40000",
        "node": "relay-a",
        "cast_path": "recordings/s1.cast",
        "title": "psql appdb",
        "started_at": T0,
        "ended_at": T0 + timedelta(minutes=5),
        "status": "ok",
        "exit_status": 0,
        "lines": 412,
        "final_hash": "ab" * 32,
        "masking_counts": {"pan": 3, "track": 0},
        "attributes": None,
        "run_id": None,
    }
    assert store.get_session("nope") is None


def test_session_end_is_written_once(store: Store) -> None:
    _session(store)
    with pytest.raises(StoreError, match="already exists"):
        _session(store)
    store.end_session("s1", status="ok", exit_status=0)
    with pytest.raises(StoreError, match="already ended"):
        store.end_session("s1", status="terminated", exit_status=1)
    with pytest.raises(StoreError, match="no session"):
        store.end_session("missing", status="ok")
    ended = store.get_session("s1")
    assert ended is not None
    assert (ended["status"], ended["exit_status"]) == ("ok", 0)


def test_list_sessions_newest_first_with_filters(store: Store) -> None:
    for i, (identity, target) in enumerate(
        [("alice", "web"), ("bob", "appdb"), ("alice", "appdb"), ("carol", "web")]
    ):
        store.create_session(f"s{i}", identity, target, "ssh", started_at=T0 + timedelta(minutes=i))
    store.end_session("s1", status="ok")
    store.end_session("s3", status="interrupted")

    def ids_of(**kwargs: Any) -> list[str]:
        return [s["id"] for s in store.list_sessions(**kwargs)]

    assert ids_of() == ["s3", "s2", "s1", "s0"]
    assert ids_of(live=True) == ["s2", "s0"]
    assert ids_of(live=False) == ["s3", "s1"]
    assert ids_of(identity="alice") == ["s2", "s0"]
    assert ids_of(target="appdb", live=True) == ["s2"]
    assert ids_of(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == [
        "s2",
        "s1",
    ]
    assert ids_of(limit=1) == ["s3"]


# --- commands -------------------------------------------------------------------------


def test_commands_are_logged_and_finished(store: Store) -> None:
    _session(store)
    first = store.add_command("s1", "SELECT pan FROM cards", kind="sql", action="allow", at=T0)
    second = store.add_command(
        "s1", "DELETE FROM cards", kind="sql", action="block", rule="unbounded-writes"
    )
    store.finish_command(first, status="ok", rows=12, duration_ms=3.5, bytes_in=40, bytes_out=900)
    [one, two] = store.list_commands("s1")
    assert one["id"] == first
    assert one["at"] == T0
    assert (one["text"], one["kind"], one["action"], one["rule"]) == (
        "SELECT pan FROM cards",
        "sql",
        "allow",
        None,
    )
    assert (one["status"], one["rows"], one["duration_ms"], one["bytes_in"], one["bytes_out"]) == (
        "ok",
        12,
        3.5,
        40,
        900,
    )
    assert one["finished_at"] is not None
    assert (two["id"], two["action"], two["rule"], two["status"]) == (
        second,
        "block",
        "unbounded-writes",
        None,
    )
    assert store.list_commands("other") == []

    with pytest.raises(StoreError, match="already finished"):
        store.finish_command(first, status="error")
    with pytest.raises(StoreError, match="no command"):
        store.finish_command(second + 100, status="ok")
    with pytest.raises(ValueError, match="kind"):
        store.add_command("s1", "ls", kind="telnet", action="allow")
    # Commands belong to a recorded session.
    with pytest.raises(StoreError):
        store.add_command("missing", "ls", kind="exec", action="allow")


def test_many_finished_commands_in_one_call(store: Store) -> None:
    """The PostgreSQL relay's query log: one call, one transaction, every column bound
    as add_command + finish_command would (both store dialects)."""
    _session(store)
    later = T0 + timedelta(seconds=2)
    store.add_finished_commands(
        [
            {
                "session_id": "s1",
                "at": T0,
                "finished_at": T0,
                "text": "SELECT 1",
                "kind": "sql",
                "action": "allow",
                "status": "SELECT 1",
                "rows": 1,
                "duration_ms": 0.25,
            },
            {
                "session_id": "s1",
                "at": T0,
                "finished_at": later,
                "text": "DROP TABLE t",
                "kind": "sql",
                "action": "block",
                "rule": "no-drop",
                "status": "blocked",
            },
        ]
    )
    [one, two] = store.list_commands("s1")
    assert (one["at"], one["finished_at"], one["text"], one["rows"], one["duration_ms"]) == (
        T0,
        T0,
        "SELECT 1",
        1,
        0.25,
    )
    assert (two["finished_at"], two["rule"], two["status"], two["rows"]) == (
        later,
        "no-drop",
        "blocked",
        None,
    )
    with pytest.raises(ValueError, match="kind"):
        store.add_finished_commands([{**one, "id": None, "kind": "nope"}])
    with pytest.raises(ValueError, match="timezone-aware"):
        store.add_finished_commands(
            [
                {
                    "session_id": "s1",
                    "at": datetime(2026, 1, 1),
                    "text": "x",
                    "kind": "sql",
                    "action": "allow",
                }
            ]
        )


def test_many_finished_commands_keep_order_and_every_value_exactly(
    store: Store, store_url: str
) -> None:
    """A large batch comes back in order with its values as given: odd text (quotes,
    backslashes, escapes, non-ASCII; on SQLite a NUL, which PostgreSQL text refuses),
    numbers, NULLs and both times. SQLite takes a batch as one JSON parameter; one with
    a NUL goes the ordinary way."""
    _session(store)
    odd = ["it's", 'say "hi"', "C:\\path\\n", "\u00e9\u4e2d\U0001f600", "tab\tnew\nline"]
    if store_url.startswith("sqlite"):
        odd.append("nul\x00in")
    rows = []
    for i in range(300):
        at = T0 + timedelta(microseconds=i * 1001)
        rows.append(
            {
                "session_id": "s1",
                "at": at,
                "finished_at": at if i % 3 else at + timedelta(milliseconds=5),
                "text": f"SELECT {i} -- {odd[i % len(odd)]}",
                "kind": "sql",
                "action": ("allow", "block", "approve")[i % 3],
                "rule": None if i % 3 == 0 else f"rule-{i}",
                "approval_id": None,
                "status": "SELECT 1",
                "rows": None if i % 5 == 0 else i,
                "duration_ms": i / 7,
            }
        )
    # The same without the NUL row: the fast path for SQLite.
    for batch in ([r for r in rows if "\x00" not in r["text"]], rows[:6]):
        store.add_finished_commands(batch)
    got = store.list_commands("s1")
    want = [r for r in rows if "\x00" not in r["text"]] + rows[:6]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["text"] == w["text"]
        assert (g["at"], g["finished_at"]) == (w["at"], w["finished_at"])
        assert (g["action"], g["rule"], g["rows"]) == (w["action"], w["rule"], w["rows"])
        assert g["duration_ms"] == pytest.approx(w["duration_ms"], rel=1e-12)


def test_command_links_to_its_approval(store: Store) -> None:
    approval_id = _approval(store)
    cmd = store.add_command(
        "s1", "git-receive-pack 'repo.git'", kind="git", action="approve", approval_id=approval_id
    )
    [row] = store.list_commands("s1")
    assert (row["id"], row["approval_id"]) == (cmd, approval_id)


# --- approvals ------------------------------------------------------------------------


def test_approval_is_created_pending(store: Store) -> None:
    approval_id = _approval(store)
    approval = store.get_approval(approval_id)
    assert approval is not None
    assert approval["status"] == "pending"
    assert approval["identity"] == "alice"
    assert approval["approver_groups"] == ["sre"]
    assert approval["min_approvals"] == 1
    assert approval["decisions"] == []
    assert approval["expires_at"].tzinfo is not None
    assert store.get_approval(approval_id + 1000) is None


def test_a_requester_never_approves_its_own_request(store: Store) -> None:
    approval_id = _approval(store)
    with pytest.raises(StoreError, match="own request"):
        store.add_decision(approval_id, approver="alice", decision="approve")
    approval = store.get_approval(approval_id)
    assert approval is not None
    assert (approval["status"], approval["decisions"]) == ("pending", [])


def test_two_approvals_need_two_distinct_approvers(store: Store) -> None:
    approval_id = _approval(store, min_approvals=2)
    after_one = store.add_decision(approval_id, approver="bob", decision="approve", reason="ok")
    assert after_one["status"] == "pending"
    with pytest.raises(StoreError, match="already decided"):
        store.add_decision(approval_id, approver="bob", decision="approve")
    after_two = store.add_decision(approval_id, approver="carol", decision="approve")
    assert after_two["status"] == "approved"
    assert after_two["resolved_at"] is not None
    assert [(d["approver"], d["decision"], d["reason"]) for d in after_two["decisions"]] == [
        ("bob", "approve", "ok"),
        ("carol", "approve", None),
    ]
    assert store.get_approval(approval_id) == after_two


def test_a_deny_resolves_at_once(store: Store) -> None:
    approval_id = _approval(store, min_approvals=3)
    store.add_decision(approval_id, approver="bob", decision="approve")
    denied = store.add_decision(
        approval_id, approver="carol", decision="deny", reason="not during the freeze"
    )
    assert denied["status"] == "denied"
    assert denied["reason"] == "not during the freeze"
    assert [d["decision"] for d in denied["decisions"]] == ["approve", "deny"]


def test_deciding_a_resolved_approval_fails(store: Store) -> None:
    approval_id = _approval(store)
    store.add_decision(approval_id, approver="bob", decision="approve")
    with pytest.raises(StoreError, match="is approved, not pending"):
        store.add_decision(approval_id, approver="carol", decision="deny")
    with pytest.raises(StoreError, match="no approval"):
        store.add_decision(approval_id + 1000, approver="carol", decision="deny")
    approval = store.get_approval(approval_id)
    assert approval is not None
    assert approval["status"] == "approved"
    assert len(approval["decisions"]) == 1


def test_an_expired_approval_cannot_be_decided(store: Store) -> None:
    approval_id = _approval(store)
    approval = store.get_approval(approval_id)
    assert approval is not None
    late = approval["expires_at"] + timedelta(seconds=1)
    with pytest.raises(StoreError, match="expired"):
        store.add_decision(approval_id, approver="bob", decision="approve", at=late)
    assert _status(store, approval_id) == "pending"


def test_set_approval_status_only_changes_pending(store: Store) -> None:
    expiring = _approval(store)
    approved = _approval(store)
    store.add_decision(approved, approver="bob", decision="approve")
    store.set_approval_status(expiring, "expired", reason="timeout 10m")
    store.set_approval_status(approved, "interrupted", reason="relay stopped")
    expired = store.get_approval(expiring)
    assert expired is not None
    assert (expired["status"], expired["reason"]) == ("expired", "timeout 10m")
    assert expired["resolved_at"] is not None
    assert _status(store, approved) == "approved"
    with pytest.raises(ValueError, match="status"):
        store.set_approval_status(expiring, "approved")
    with pytest.raises(StoreError, match="expired, not pending"):
        store.add_decision(expiring, approver="bob", decision="approve")


def test_list_approvals_by_status_and_session(store: Store) -> None:
    _session(store, "s2")
    first = _approval(store)
    second = _approval(store, min_approvals=2)
    store.add_decision(first, approver="bob", decision="deny")
    store.add_decision(second, approver="bob", decision="approve")
    pending = store.list_approvals(status="pending")
    assert [a["id"] for a in pending] == [second]
    assert [d["approver"] for d in pending[0]["decisions"]] == ["bob"]
    assert [a["id"] for a in store.list_approvals()] == [first, second]
    assert [a["id"] for a in store.list_approvals(status="denied", session_id="s1")] == [first]
    assert store.list_approvals(session_id="s2") == []


def test_concurrent_decisions_resolve_exactly_once(store: Store) -> None:
    # A few rounds, since one round may happen not to interleave.
    for _ in range(4):
        approval_id = _approval(store)
        decisions = ["approve", "deny"]
        results = _race(
            2,
            partial(_decide, store, approval_id, decisions),
        )
        wins = [r for r in results if isinstance(r, dict)]
        losses = [r for r in results if isinstance(r, StoreError)]
        assert (len(wins), len(losses)) == (1, 1), results
        assert "not pending" in str(losses[0])
        final = store.get_approval(approval_id)
        assert final is not None
        assert final["status"] == wins[0]["status"]
        assert final["status"] in ("approved", "denied")
        assert len(final["decisions"]) == 1


def test_concurrent_approvals_are_all_counted(store: Store) -> None:
    approval_id = _approval(store, min_approvals=2)
    results = _race(2, partial(_decide, store, approval_id, ["approve", "approve"]))
    assert all(isinstance(r, dict) for r in results), results
    # Had both transactions counted only their own decision, nobody would approve.
    assert sorted(r["status"] for r in results) == ["approved", "pending"]
    final = store.get_approval(approval_id)
    assert final is not None
    assert final["status"] == "approved"
    assert {d["approver"] for d in final["decisions"]} == {"approver0", "approver1"}


# --- integrity ------------------------------------------------------------------------


def test_latest_checkpoint_is_the_one_with_most_lines(store: Store) -> None:
    _session(store)
    _session(store, "s2")
    assert store.latest_checkpoint("s1") is None
    store.add_checkpoint("s1", 100, "a" * 64, at=T0)
    store.add_checkpoint("s1", 300, "c" * 64, at=T0 + timedelta(seconds=2))
    store.add_checkpoint("s1", 200, "b" * 64, at=T0 + timedelta(seconds=3))
    store.add_checkpoint("s2", 900, "d" * 64, at=T0)
    assert store.latest_checkpoint("s1") == {
        "session_id": "s1",
        "lines": 300,
        "chain_hash": "c" * 64,
        "at": T0 + timedelta(seconds=2),
    }


def test_manifest_round_trip_and_replace(store: Store) -> None:
    _session(store)
    assert store.get_manifest("s1") is None
    manifest: dict[str, Any] = {
        "version": 1,
        "session": "s1",
        "files": [{"path": "s1.cast", "sha256": "e" * 64, "lines": 412}],
        "signature": {"alg": "ed25519", "value": "AAAA"},
        "note": "Zoë, ünïcode, 東京",
        "masked": None,
    }
    store.put_manifest("s1", manifest)
    assert store.get_manifest("s1") == manifest
    store.put_manifest("s1", {"version": 2})
    assert store.get_manifest("s1") == {"version": 2}


# --- pipeline runs ----------------------------------------------------------------------


def test_runs_group_sessions_by_run_id(store: Store) -> None:
    attrs = {
        "provider": "github",
        "subject": "repo:acme/payments:ref:refs/heads/main",
        "run_id": "github:100:1",
        "attributes": {"actor": "octocat", "repository": "acme/payments", "ref": "refs/heads/main"},
    }
    _session(store, "a1", attributes=attrs, run_id="github:100:1")
    _session(
        store, "a2", attributes=attrs, run_id="github:100:1", started_at=T0 + timedelta(seconds=5)
    )
    retry = {**attrs, "run_id": "github:100:2"}
    _session(
        store, "b1", attributes=retry, run_id="github:100:2", started_at=T0 + timedelta(seconds=60)
    )
    _session(store, "x", started_at=T0 + timedelta(seconds=1))  # a person's session: no run
    store.add_command("a1", "uptime", kind="exec", action="allow")
    store.add_command("a2", "rm -rf /", kind="exec", action="block", rule="no-rm-rf")
    store.create_approval(
        session_id="a2", identity="alice", target="web", command="systemctl restart x", rule="r",
        min_approvals=1, approver_groups=["sre"], expires_at=T0 + timedelta(hours=1),
    )  # fmt: skip
    store.end_session("a1", status="closed", masking_counts={"pan": 2, "stripe-key": 1})
    store.end_session("a2", status="closed", masking_counts={"pan": 1})

    runs = store.list_runs()
    assert [r["run_id"] for r in runs] == ["github:100:2", "github:100:1"]
    first = runs[1]
    assert first["session_ids"] == ["a1", "a2"]
    assert (first["initiator"], first["repository"], first["ref"]) == (
        "octocat",
        "acme/payments",
        "refs/heads/main",
    )
    assert (first["commands"], first["blocked"], first["approvals"]) == (2, 1, 1)
    assert first["masking_counts"] == {"pan": 3, "stripe-key": 1} and first["masked"] == 4
    assert first["live"] == 0 and first["last_ended_at"] is not None
    assert runs[0]["live"] == 1 and runs[0]["last_ended_at"] is None
    assert [r["id"] for r in store.run_sessions("github:100:1")] == ["a1", "a2"]
    assert store.get_session("a1")["attributes"] == attrs  # type: ignore[index]
    assert [r["run_id"] for r in store.list_runs(since=T0 + timedelta(seconds=30))] == [
        "github:100:2"
    ]
    assert store.list_runs(run_id="github:100:1")[0]["sessions"] == 2
