"""Background threads that write, hash and fsync the casts of every session of a process.

One thread per cast (the first design) woke its thread once per event: with hundreds of
sessions the hand-offs of the GIL between the event loop and those threads became the
largest cost of a busy relay and the source of its tail latency. A pool of a few threads
serves all casts instead, and it is woken at most once per batch: the event loop only
appends to a deque (atomic under the GIL, no lock, no notify) and sets an Event when the
pool has gone idle. After each batch the thread lingers a moment so that the next batch
is larger ("group commit"); live watchers never wait for it, they are fed by the session.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any, Protocol


class PoolClient(Protocol):
    """What a pool thread calls: every item a client submitted, in submission order."""

    def process(self, items: list[Any]) -> None: ...


class _Worker:
    def __init__(self, name: str, linger: float) -> None:
        self.queue: deque[tuple[PoolClient, Any]] = deque()
        self.idle = False
        self.wake = threading.Event()
        self.linger = linger
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, client: PoolClient, item: Any) -> None:
        self.queue.append((client, item))
        # Read after the append: if the worker set ``idle`` after our append, it re-checks
        # the queue before sleeping and sees the item; if before, we wake it.
        if self.idle:
            self.idle = False
            self.wake.set()

    def _run(self) -> None:
        queue = self.queue
        while True:
            if not queue:
                self.idle = True
                if not queue:
                    self.wake.wait()
                self.wake.clear()
                self.idle = False
                continue
            batch: dict[PoolClient, list[Any]] = {}
            while queue:
                client, item = queue.popleft()
                items = batch.get(client)
                if items is None:
                    batch[client] = [item]
                else:
                    items.append(item)
            for client, items in batch.items():
                client.process(items)
            if self.linger:
                time.sleep(self.linger)


class WriterPool:
    """A fixed set of worker threads; each client is served by one of them, so its items
    are processed in order.

    Args:
        threads: worker threads (fsyncs of one thread's casts delay each other, so more
            than one keeps a slow disk from stalling every session).
        linger: seconds a worker waits after a batch before taking the next.
    """

    def __init__(self, threads: int = 2, linger: float = 0.002) -> None:
        self._workers = [_Worker(f"cast-writer-{i}", linger) for i in range(threads)]
        self._next = itertools.cycle(range(threads))

    def assign(self) -> _Worker:
        """The worker a new client submits to (round robin)."""
        return self._workers[next(self._next)]


_shared: WriterPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> WriterPool:
    """The process-wide pool, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = WriterPool()
        return _shared
