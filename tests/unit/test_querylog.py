"""The PostgreSQL relay's query log: rows of every session of a process go to the store
in shared batches, in order, and a session's flush waits for its own rows."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from recorder.store import Store, StoreError
from recorder.store.spool import StoreSpool
from relay.pg.querylog import Entry, QueryLog


class CountingSpool(StoreSpool):
    """A real spool over a real SQLite store that counts its query-log writes, can be
    made to fail them, and can hold one until the test lets it go."""

    def __init__(self, store: Store, directory: Path) -> None:
        super().__init__(store, directory)
        self.batches: list[int] = []
        self.fail = False
        self.gate: threading.Event | None = None

    def add_finished_commands(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise StoreError("audit store error: disk I/O error")
        self.batches.append(len(rows))
        super().add_finished_commands(rows)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[CountingSpool]:
    store = Store.open(f"sqlite:///{tmp_path / 'castgate.db'}")
    sp = CountingSpool(store, tmp_path / "spool")
    for sid in ("s1", "s2", "s3"):
        sp.create_session(sid, "agent", "appdb", "postgres")
    yield sp
    sp.close()
    store.close()


def _sync(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body on a fresh event loop (the suite has no asyncio plugin)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


def _entry(sid: str, n: int) -> Entry:
    return (sid, time.time(), f"SELECT {n}", "allow", None, "SELECT", 1, 0.1)


def _texts(spool: StoreSpool, sid: str) -> list[str]:
    return [c["text"] for c in spool.store.list_commands(sid)]


@_sync
async def test_sessions_share_one_batch_and_flush_waits_for_it(spool: CountingSpool) -> None:
    qlog = QueryLog(spool, interval=30)
    for n in range(300):
        qlog.add(_entry(f"s{n % 3 + 1}", n))
    assert spool.batches == []  # nothing before the interval or a flush
    await qlog.flush()
    assert spool.batches == [300]
    assert _texts(spool, "s2") == [f"SELECT {n}" for n in range(1, 300, 3)]
    await qlog.flush()  # nothing queued: returns at once, writes nothing
    assert spool.batches == [300]


@_sync
async def test_rows_go_out_after_the_interval_without_a_flush(spool: CountingSpool) -> None:
    qlog = QueryLog(spool, interval=0.05)
    qlog.add(_entry("s1", 1))
    qlog.add(_entry("s1", 2))
    for _ in range(100):
        await asyncio.sleep(0.02)
        if spool.batches:
            break
    assert spool.batches == [2]
    assert _texts(spool, "s1") == ["SELECT 1", "SELECT 2"]


@_sync
async def test_a_full_batch_goes_at_once(spool: CountingSpool) -> None:
    qlog = QueryLog(spool, interval=30, max_rows=50)
    for n in range(50):
        qlog.add(_entry("s1", n))
    for _ in range(100):
        await asyncio.sleep(0.02)
        if spool.batches:
            break
    assert spool.batches == [50]


@_sync
async def test_flush_during_a_write_waits_for_rows_added_meanwhile(
    spool: CountingSpool,
) -> None:
    qlog = QueryLog(spool, interval=30, max_rows=10)
    spool.gate = threading.Event()
    for n in range(10):
        qlog.add(_entry("s1", n))  # a full batch: its write starts and blocks
    await asyncio.sleep(0.05)
    qlog.add(_entry("s2", 99))  # arrives while the first batch is being written
    waiting = asyncio.ensure_future(qlog.flush())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    spool.gate.set()
    await asyncio.wait_for(waiting, 10)
    assert spool.batches == [10, 1]
    assert _texts(spool, "s2") == ["SELECT 99"]


@_sync
async def test_a_failed_write_is_logged_and_the_log_goes_on(
    spool: CountingSpool, caplog: pytest.LogCaptureFixture
) -> None:
    qlog = QueryLog(spool, interval=30)
    spool.fail = True
    qlog.add(_entry("s1", 1))
    with caplog.at_level(logging.ERROR, logger="castgate.pg"):
        await asyncio.wait_for(qlog.flush(), 10)  # returns: it does not hang
    assert any(r.msg == "store.query_log_failed" for r in caplog.records)
    spool.fail = False
    qlog.add(_entry("s1", 2))
    await asyncio.wait_for(qlog.close(), 10)
    assert _texts(spool, "s1") == ["SELECT 2"]
