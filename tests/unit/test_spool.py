"""The store spool: writes made while the audit store is away are queued on disk, in
order, and replayed once it is back, without duplicates."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc as sa_exc
from sqlalchemy.engine import Connection

from recorder.store import Store, StoreError
from recorder.store.spool import DONE_FILE, OPS_FILE, REJECTED_FILE, StoreSpool, store_unavailable


def _lost(what: str) -> StoreError:
    err = StoreError(f"audit store error: {what}")
    err.__cause__ = sa_exc.OperationalError("SELECT 1", {}, Exception(what))
    return err


class FlakyStore(Store):
    """A real SQLite store whose connection can be taken away: ``down`` refuses every
    transaction; ``lose_ack`` commits the next write and then reports the connection
    lost, like a server that died between COMMIT and its answer; ``refuse`` fails one
    method with a connection-level error while everything else works."""

    down = False
    lose_ack = 0
    refuse: str | None = None

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        if self.down:
            raise _lost("connection refused")
        with super()._tx(write=write) as conn:
            yield conn
        if write and self.lose_ack:
            self.lose_ack -= 1
            raise _lost("server closed the connection unexpectedly")

    def add_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        if self.refuse == "add_checkpoint":
            raise _lost("canceling statement due to statement timeout")
        super().add_checkpoint(*args, **kwargs)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FlakyStore]:
    opened = FlakyStore.open(f"sqlite:///{tmp_path / 'castgate.db'}")
    assert isinstance(opened, FlakyStore)
    yield opened
    opened.close()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "spool"


def _session(spool: StoreSpool, sid: str = "s1") -> None:
    spool.create_session(sid, "ci-agent", "web", "ssh", groups=["agents"], node="n1")


def _everything(spool: StoreSpool, sid: str = "s1") -> int:
    """One write of each kind a session makes; returns the command id it was given."""
    _session(spool, sid)
    spool.add_event(
        "session.start", "ci-agent", "success", "127.0.0.1:5", "ssh:web", {"k": [1]}, sid
    )
    cid = spool.add_command(sid, "uptime", kind="exec", action="allow")
    spool.add_checkpoint(sid, 3, "ab" * 32)
    spool.finish_command(cid, status="exited", exit_status=0, bytes_in=1, bytes_out=2)
    now = datetime.now(UTC)
    spool.add_finished_commands(
        [
            {
                "session_id": sid,
                "at": now,
                "text": "SELECT 1",
                "kind": "sql",
                "action": "allow",
                "status": "SELECT 1",
                "rows": 1,
                "finished_at": now,
            },
        ]
    )
    spool.end_session(sid, status="closed", exit_status=0, lines=3, final_hash="ab" * 32)
    spool.put_manifest(sid, {"session_id": sid, "lines": 3})
    return cid


def _counts(store: Store, sid: str = "s1") -> tuple[int, int, int, int]:
    return (
        len(store.list_sessions()),
        len(store.list_events(session_id=sid)),
        len(store.list_commands(sid)),
        1 if store.latest_checkpoint(sid) else 0,
    )


def test_a_working_store_is_written_directly(store: FlakyStore, spool_dir: Path) -> None:
    spool = StoreSpool(store, spool_dir)
    cid = _everything(spool)
    assert cid > 0
    assert spool.pending == 0 and spool.available
    assert not spool_dir.exists()
    assert _counts(store) == (1, 1, 2, 1)
    row = store.get_session("s1")
    assert row is not None and row["status"] == "closed"


def test_outage_spools_in_order_then_replays_everything(store: FlakyStore, spool_dir: Path) -> None:
    spool = StoreSpool(store, spool_dir)
    store.down = True
    before = datetime.now(UTC)
    cid = _everything(spool)
    assert cid < 0  # a placeholder until the store has the row
    assert spool.pending == 8 and not spool.available
    ops = spool_dir / OPS_FILE
    assert stat.S_IMODE(ops.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    lines = [json.loads(line) for line in ops.read_text().splitlines()]
    assert [e["op"] for e in lines] == [
        "create_session",
        "add_event",
        "add_command",
        "add_checkpoint",
        "finish_command",
        "add_finished_commands",
        "end_session",
        "put_manifest",
    ]
    assert [e["seq"] for e in lines] == list(range(1, 9))

    store.down = False
    # FIFO: while the spool holds writes, a new one joins the queue even though the
    # store answers again, so it cannot overtake the session row it depends on.
    spool.add_event("late", None, "success", None, None, None, "s1")
    assert spool.pending == 9 and store.get_session("s1") is None

    assert spool.replay() == 9
    assert spool.pending == 0 and spool.available
    assert not ops.exists() and not (spool_dir / DONE_FILE).exists()
    assert _counts(store) == (1, 2, 2, 1)
    session = store.get_session("s1")
    assert session is not None and session["status"] == "closed"
    # Times are when things happened, not when they were replayed.
    assert before <= session["started_at"] <= session["ended_at"] < datetime.now(UTC)
    (cmd,) = [c for c in store.list_commands("s1") if c["kind"] == "exec"]
    assert cmd["status"] == "exited" and cmd["bytes_out"] == 2
    assert store.get_manifest("s1") == {"session_id": "s1", "lines": 3}
    # Once empty, writes go straight to the store again.
    spool.add_event("after", None, "success", None, None, None, "s1")
    assert spool.pending == 0 and len(store.list_events(kind="after")) == 1


def test_spool_survives_a_restart(store: FlakyStore, spool_dir: Path) -> None:
    store.down = True
    first = StoreSpool(store, spool_dir)
    _everything(first)
    first.close()
    store.down = False
    again = StoreSpool(store, spool_dir)  # what the next relay process does at start
    assert again.pending == 8 and not again.available
    assert again.replay() == 8
    assert _counts(store) == (1, 1, 2, 1)
    (cmd,) = [c for c in store.list_commands("s1") if c["kind"] == "exec"]
    assert cmd["status"] == "exited"  # the placeholder id was mapped across the restart


def test_replay_stops_while_the_store_is_away_and_resumes(
    store: FlakyStore, spool_dir: Path
) -> None:
    spool = StoreSpool(store, spool_dir)
    store.down = True
    _everything(spool)
    assert spool.replay() == 0 and spool.pending == 8
    store.down = False
    assert spool.replay() == 8
    assert _counts(store) == (1, 1, 2, 1)


@pytest.mark.parametrize("crash_after", [1, 3, 5, 7])
def test_replay_after_a_crash_mid_replay_adds_nothing_twice(
    store: FlakyStore, spool_dir: Path, crash_after: int
) -> None:
    """A relay killed during replay leaves writes applied but not marked done (marks
    are not fsynced): the next replay finds them in the store and skips them."""
    store.down = True
    spool = StoreSpool(store, spool_dir)
    _everything(spool)
    store.down = False
    for _ in range(crash_after):
        head = spool._queue[0]
        # Applied and marked, but the marks never reach the disk before the crash.
        spool._done(head, spool._apply(head))
    spool.close()
    (spool_dir / DONE_FILE).unlink(missing_ok=True)  # the marks were lost with it
    again = StoreSpool(store, spool_dir)
    assert again.pending == 8
    assert again.replay() == 8
    assert _counts(store) == (1, 1, 2, 1)
    (cmd,) = [c for c in store.list_commands("s1") if c["kind"] == "exec"]
    assert cmd["status"] == "exited"


@pytest.mark.parametrize("nth_write", range(8))
def test_a_write_committed_before_its_ack_was_lost_is_not_duplicated(
    store: FlakyStore, spool_dir: Path, nth_write: int
) -> None:
    spool = StoreSpool(store, spool_dir)
    original = store._tx
    writes = 0

    @contextmanager
    def counting(*, write: bool) -> Iterator[Connection]:
        nonlocal writes
        if write:
            if writes == nth_write:
                store.lose_ack = 1
            writes += 1
        with original(write=write) as conn:
            yield conn

    store._tx = counting  # type: ignore[method-assign]
    _everything(spool)
    store._tx = original  # type: ignore[method-assign]
    assert spool.pending == 8 - nth_write  # that write and everything after it
    assert spool.replay() == 8 - nth_write
    assert _counts(store) == (1, 1, 2, 1)
    (cmd,) = [c for c in store.list_commands("s1") if c["kind"] == "exec"]
    assert cmd["status"] == "exited" and cmd["bytes_out"] == 2


def test_a_write_the_store_refuses_is_set_aside(store: FlakyStore, spool_dir: Path) -> None:
    spool = StoreSpool(store, spool_dir)
    store.down = True
    spool.end_session("never-created", status="closed")
    _everything(spool)
    store.down = False
    assert spool.replay() == 8
    assert spool.rejected == 1 and spool.pending == 0
    (rejected,) = [json.loads(x) for x in (spool_dir / REJECTED_FILE).read_text().splitlines()]
    assert rejected["op"] == "end_session" and "no session never-created" in rejected["error"]
    assert _counts(store) == (1, 1, 2, 1)


def test_a_write_failing_while_the_store_answers_cannot_block_the_rest(
    store: FlakyStore, spool_dir: Path
) -> None:
    spool = StoreSpool(store, spool_dir)
    store.down = True
    _everything(spool)
    store.down = False
    store.refuse = "add_checkpoint"
    assert spool.replay() == 3  # up to the checkpoint
    assert spool.replay() == 0
    assert spool.replay() == 4  # third strike: set aside, the rest goes through
    assert spool.rejected == 1 and spool.pending == 0
    assert _counts(store) == (1, 1, 2, 0)


def test_a_torn_last_line_is_cut_on_load(store: FlakyStore, spool_dir: Path) -> None:
    store.down = True
    spool = StoreSpool(store, spool_dir)
    _session(spool)
    spool.close()
    with (spool_dir / OPS_FILE).open("ab") as fh:
        fh.write(b'{"seq":2,"op":"add_ev')  # killed mid-append
    again = StoreSpool(store, spool_dir)
    assert again.pending == 1
    again.add_event("x", None, "success", None, None, None, "s1")
    store.down = False
    assert again.replay() == 2
    assert len(store.list_events(kind="x")) == 1


def test_only_connection_level_errors_count_as_unavailable() -> None:
    assert store_unavailable(_lost("connection refused"))
    integrity = StoreError("audit store error: duplicate key")
    integrity.__cause__ = sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key"))
    assert not store_unavailable(integrity)
    assert not store_unavailable(StoreError("session s1 has already ended"))


def test_other_store_errors_reach_the_caller(store: FlakyStore, spool_dir: Path) -> None:
    spool = StoreSpool(store, spool_dir)
    with pytest.raises(StoreError, match="no session"):
        spool.end_session("nope", status="closed")
    assert spool.pending == 0 and not spool_dir.exists()
