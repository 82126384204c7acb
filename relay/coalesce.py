"""Write coalescing for asyncssh connections.

asyncssh writes every SSH packet to its transport on its own, and sends an ``SSH_MSG_IGNORE``
packet in front of each one, so relaying one 256 KiB read of the other hop costs some
sixteen ``send`` system calls, each waking the peer. ``coalesce`` puts a thin transport in
front of the connection's socket transport that gathers the writes made while the event
loop runs its ready callbacks and hands them to the socket transport as one write, once
per loop iteration (``call_soon``): one system call per batch, at the cost of one pass
through the loop (microseconds) for the first packet of a batch.

Flow control is unchanged: what is gathered is at most what one loop iteration produced,
and the socket transport behind still pauses the protocol past its high-water mark.

The relay's one adapter over asyncssh internals: asyncssh has no public hook for its
transport, so ``coalesce`` replaces the private ``SSHConnection._transport`` attribute
(which asyncssh sets in ``connection_made`` and writes every packet to). Nothing else in
the relay touches asyncssh's private state. tests/unit/test_coalesce.py runs a real
asyncssh connection through it and fails when an upgrade renames or bypasses that
attribute.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh


class CoalescingTransport:
    """Stands in for a connection's transport; writes reach ``inner`` once per loop
    iteration, joined, in order. Everything else is ``inner``'s."""

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.inner = inner
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        """Queue ``data``; the first write of a batch schedules the flush."""
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._size += len(data)

    def flush(self) -> None:
        """Hand what was gathered to the socket transport (one write)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._size = 0
        if self.inner.is_closing():
            return
        self.inner.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def writelines(self, lines: list[bytes]) -> None:
        """As ``write`` for each."""
        for line in lines:
            self.write(line)

    def write_eof(self) -> None:
        """Flush, then half-close."""
        self.flush()
        self.inner.write_eof()

    def close(self) -> None:
        """Flush, then close: what was written before the close still goes out."""
        self.flush()
        self.inner.close()

    def abort(self) -> None:
        """Close at once; what was gathered is dropped, as the transport drops its buffer."""
        self._pending = []
        self._size = 0
        self.inner.abort()

    def get_write_buffer_size(self) -> int:
        """Bytes gathered here plus the socket transport's buffer."""
        return self._size + self.inner.get_write_buffer_size()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def coalesce(conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> bool:
    """Put a CoalescingTransport in front of ``conn``'s transport (idempotent; a closed
    connection is left as it is). True when ``conn``'s writes now go through one."""
    transport = getattr(conn, "_transport", None)
    if transport is None:
        return False
    if not isinstance(transport, CoalescingTransport):
        conn._transport = CoalescingTransport(transport, asyncio.get_running_loop())  # type: ignore[assignment]
    return True
