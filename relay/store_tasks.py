"""Store writes the relay makes in the background: cast checkpoints, and the replay of
writes spooled while the store was away."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque

from recorder.store.spool import StoreSpool

log = logging.getLogger("castgate.relay")


class Checkpoints:
    """Cast checkpoints queued by the writer pool, stored from the event loop."""

    def __init__(self, spool: StoreSpool) -> None:
        self.spool = spool
        self._queue: deque[tuple[str, int, str]] = deque()
        # One thread at a time: two could otherwise store a session's checkpoints out
        # of order, and the store's latest would not be the last.
        self._lock = threading.Lock()

    def queue(self, session_id: str, lines: int, chain_hash: str) -> None:
        """Queue a cast's checkpoint (called by the writer pool after each fsync).
        Storing it in the pool thread itself would let a slow or hanging store stall
        every cast that thread writes."""
        self._queue.append((session_id, lines, chain_hash))

    def store_now(self) -> None:
        """Store what is queued (blocking: run it in a thread)."""
        with self._lock:
            latest: dict[str, tuple[int, str]] = {}
            while self._queue:
                sid, lines, chain_hash = self._queue.popleft()
                latest[sid] = (lines, chain_hash)  # a later one covers the earlier
            for sid, (lines, chain_hash) in latest.items():
                try:
                    self.spool.add_checkpoint(sid, lines, chain_hash)
                except Exception:
                    log.exception("store.checkpoint_failed", extra={"session": sid})

    async def flush(self) -> None:
        """Store what is queued now (a session's end: its seal's checkpoint first)."""
        await asyncio.to_thread(self.store_now)

    async def run(self, every: float = 0.2) -> None:
        """Store queued checkpoints every ``every`` seconds until cancelled (then once
        more, so a clean shutdown keeps them all)."""
        try:
            while True:
                await asyncio.sleep(every)
                if self._queue:
                    await self.flush()
        finally:
            if self._queue:
                await self.flush()


class SpoolReplay:
    """Replays store writes spooled during an outage, for as long as the relay runs."""

    def __init__(self, spool: StoreSpool) -> None:
        self.spool = spool

    async def run(self, idle: float = 0.5, backoff: float = 5.0) -> None:
        """A look every ``idle`` seconds, at most one attempt every ``backoff`` seconds
        while the store stays away (no retry storm)."""
        delay = idle
        while True:
            await asyncio.sleep(delay)
            if not self.spool.pending:
                delay = idle
                continue
            try:
                await asyncio.to_thread(self.spool.replay)
            except Exception:
                log.exception("spool.replay_failed")
            delay = idle if not self.spool.pending else min(delay * 2, backoff)
