"""A bare asyncio TCP passthrough in one Python process (no parsing, no masking, no
recording): the ceiling DESIGN.md measures for the PostgreSQL relay, rebuilt so
bench_pg can measure it in the same run as the castgate relay. Same I/O shape as
relay/pg/relay.py: asyncio streams, ``read(65536)``, write, drain, one task per
direction.

``--protocol``: the same passthrough on protocol callbacks (data_received writes to the
other side at once, reading paused while the other side's buffer is full), the I/O shape
relay/pg/relay.py has used since its third session: the ceiling of that design.

Run: .venv/bin/python -m bench.bare_tcp HOST:PORT [--protocol]
Prints the listening port on one line when ready; SIGTERM ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class _Side(asyncio.Protocol):
    """One socket of a protocol-callback passthrough; ``peer`` is the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)  # the target's connection is still opening
            return
        peer.transport.write(data)

    def pause_writing(self) -> None:
        # Our buffer towards this socket is full: stop reading the other side.
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def _serve_protocol(host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    def client() -> _Side:
        side = _Side()

        async def attach() -> None:
            try:
                _, up = await loop.create_connection(_Side, host, port)
            except OSError:
                if side.transport is not None:
                    side.transport.close()
                return
            up.peer, side.peer = side, up
            if side.early:
                assert up.transport is not None
                up.transport.write(b"".join(side.early))
                side.early.clear()

        task = loop.create_task(attach())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)
        return side

    return await loop.create_server(client, "127.0.0.1", 0)


_TASKS: set[asyncio.Task[None]] = set()


async def _serve_streams(host: str, port: int) -> asyncio.Server:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pump(cr, uw), _pump(ur, cw))

    return await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)


async def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    serve = _serve_protocol if "--protocol" in sys.argv[2:] else _serve_streams
    server = await serve(host, int(port))
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
