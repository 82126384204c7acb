"""The query log of a relay process's PostgreSQL sessions: one row per statement,
written to the store in batches.

Every session of the process shares one writer: rows wait in memory for at most
``interval`` seconds (or until ``max_rows`` are waiting) and go to the store in one
transaction from one thread at a time. Eight busy sessions flushing on their own took
eight transactions where one does, and their threads fought over SQLite's write lock and
the GIL beside the event loop (bench/RESULTS.md, fourth session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from recorder.store.spool import StoreSpool

log = logging.getLogger("castgate.pg")

# (session_id, wall time, text, action, rule, status, rows, duration_ms)
Entry = tuple[str, float, str, str, str | None, str, int | None, float | None]


class QueryLog:
    """Batches query-log rows of every session and writes them through the spool."""

    def __init__(self, spool: StoreSpool, interval: float = 0.25, max_rows: int = 4000) -> None:
        self._spool = spool
        self._interval = interval
        self._max_rows = max_rows
        self._rows: list[Entry] = []
        # Rows handed to add() and rows written (or given up on) so far: flush() waits
        # for the second to reach the first as it was when flush() was called.
        self._added = 0
        self._done = 0
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def add(self, entry: Entry) -> None:
        """Queue one statement's row (its text already masked)."""
        self._rows.append(entry)
        self._added += 1
        if self._task is not None:
            return  # the running writer picks it up
        if len(self._rows) >= self._max_rows:
            self._start()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._start)

    async def flush(self) -> None:
        """Return once every row added before this call is in the store (or its write
        failed and was logged)."""
        if self._done >= self._added:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((self._added, fut))
        if self._task is None:
            self._start()
        await asyncio.shield(fut)

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._rows:
                rows, self._rows = self._rows, []
                try:
                    await asyncio.to_thread(self._write, rows)
                except Exception:
                    log.exception("store.query_log_failed", extra={"rows": len(rows)})
                self._done += len(rows)
                self._wake()
                if len(self._rows) < self._max_rows and not self._waiters:
                    break  # what came in meanwhile waits its interval like any row
        finally:
            self._task = None
            if self._rows and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self._interval, self._start)
            self._wake()

    def _wake(self) -> None:
        keep = []
        for upto, fut in self._waiters:
            if self._done >= upto or (self._task is None and not self._rows):
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((upto, fut))
        self._waiters = keep

    def _write(self, entries: list[Entry]) -> None:
        """In a worker thread: the store's rows, in one transaction."""
        rows: list[dict[str, Any]] = []
        append = rows.append
        for sid, wall, text, action, rule, status, count, duration in entries:
            now = datetime.fromtimestamp(wall, UTC)
            append(
                {
                    "session_id": sid,
                    "at": now,
                    "text": text,
                    "kind": "sql",
                    "action": action,
                    "rule": rule,
                    "status": status,
                    "rows": count,
                    "duration_ms": duration,
                    "finished_at": now,
                }
            )
        self._spool.add_finished_commands(rows)

    async def close(self) -> None:
        """Write what is queued (relay shutdown)."""
        await self.flush()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
