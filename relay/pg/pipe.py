"""One side of a PostgreSQL session (the client's or the target's) as an asyncio
protocol, from its connection to its end: no stream reader's buffer is taken over and
no transport's protocol swapped.

Until a handler is attached the pipe is read like a stream (``read``, ``readexactly``:
the startup, the authentication, the catalogue lookups); once one is (``attach``),
every read goes to it where it arrives (a reader task woken per read, as asyncio
streams do, cost a 1-client round trip about a fifth of its time). What it also keeps:
pausing reading for any number of reasons, and a future for "the socket's write buffer
is over its high-water mark".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

# Bytes read ahead while nobody reads them before reading pauses (a client sending
# faster than the startup reads it).
_LIMIT = 1 << 20


class Pipe(asyncio.Protocol):
    """``done`` resolves to (failure, lost) once the pipe stops: an error its handler
    raised, or the connection's end (None or the exception that ended it)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.write_paused: asyncio.Future[None] | None = None
        self.detached = False  # the session has ended: later bytes are dropped
        self.done: asyncio.Future[tuple[BaseException | None, BaseException | None]] = (
            self.loop.create_future()
        )
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._on_data: Callable[[bytes], None] | None = None
        self._inbox = bytearray()
        self._reader: asyncio.Future[None] | None = None
        self._eof = False
        self._full = False  # reading paused: nobody has read what came
        self._pauses = 0
        self._holding: set[asyncio.Future[Any]] = set()
        self._held = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.detached or self.done.done():
            return
        on_data = self._on_data
        if on_data is not None:
            try:
                on_data(data)
            except Exception as exc:
                self.finish(exc, None)
            return
        self._inbox += data
        if len(self._inbox) > _LIMIT and not self._full:
            self._full = True
            self.pause()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close the transport: the peer is done

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        self.finish(None, exc)
        if not self.closed.done():
            self.closed.set_result(None)
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)

    def pause_writing(self) -> None:
        if self.write_paused is None:
            self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter, self.write_paused = self.write_paused, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read like a stream until attached -----------------------------------------------

    def _wake(self) -> None:
        waiter, self._reader = self._reader, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        while not self._inbox and not self._eof:
            self._reader = self.loop.create_future()
            await self._reader

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes, waiting for some; b"" once the peer has closed."""
        await self._wait()
        data = bytes(self._inbox[:n])
        del self._inbox[:n]
        self._read_on()
        return data

    async def readexactly(self, n: int) -> bytes:
        while len(self._inbox) < n:
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._inbox), n)
            self._reader = self.loop.create_future()
            await self._reader
        data = bytes(self._inbox[:n])
        del self._inbox[:n]
        self._read_on()
        return data

    def _read_on(self) -> None:
        if self._full and len(self._inbox) <= _LIMIT:
            self._full = False
            self.resume()

    def take(self) -> bytes:
        """What has been read and not consumed (the client's pipelined messages)."""
        data = bytes(self._inbox)
        self._inbox.clear()
        self._read_on()
        return data

    def attach(self, on_data: Callable[[bytes], None], early: bytes = b"") -> None:
        """From now on every read goes to ``on_data``: ``early`` and what was read
        ahead first."""
        data = early + self.take()
        self._on_data = on_data
        if data:
            self.data_received(data)

    def set_transport(self, transport: asyncio.Transport) -> None:
        """The TLS transport ``loop.start_tls`` made over this pipe's connection."""
        self.transport = transport

    # -- the session's end, pauses, writes -----------------------------------------------

    def finish(self, failure: BaseException | None, lost: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result((failure, lost))

    def write(self, data: bytes | bytearray) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the socket's write buffer is over its high-water mark."""
        if self.transport is not None and self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        if self.write_paused is not None:
            await asyncio.shield(self.write_paused)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        """Stop reading (reasons are counted: the slow path, the other side full)."""
        self._pauses += 1
        if self._pauses == 1 and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        self._pauses -= 1
        if self._pauses == 0 and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def hold_until(self, ready: asyncio.Future[Any]) -> None:
        """Stop reading until ``ready`` (the other side's drain) completes."""
        if self._held:
            return
        self._held = True
        self.pause()

        async def wait() -> None:
            try:
                await ready
            except (ConnectionError, OSError):
                pass  # the other side is gone: the session is ending anyway
            finally:
                self._held = False
                self.resume()

        self._holding.add(task := asyncio.ensure_future(wait()))
        task.add_done_callback(self._holding.discard)
