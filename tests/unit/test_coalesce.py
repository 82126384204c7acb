"""Write coalescing in front of asyncssh's transports (relay/coalesce.py), over a real
socket pair."""

from __future__ import annotations

import asyncio
import socket

from relay.coalesce import CoalescingTransport


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


class _Counting:
    """Counts the writes that reach the socket transport."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.inner.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def _pair() -> tuple[CoalescingTransport, _Counting, _Sink]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    sender, _ = await loop.create_connection(asyncio.Protocol, sock=a)
    sink = _Sink()
    await loop.create_connection(lambda: sink, sock=b)
    counting = _Counting(sender)
    return CoalescingTransport(counting, loop), counting, sink  # type: ignore[arg-type]


def test_writes_of_one_loop_iteration_reach_the_socket_as_one_write_in_order() -> None:
    async def main() -> None:
        t, counting, sink = await _pair()
        packets = [bytes([i]) * (1000 + i) for i in range(16)]
        for p in packets:
            t.write(p)
        assert counting.writes == []  # gathered, not yet written
        assert t.get_write_buffer_size() == sum(map(len, packets))
        await asyncio.sleep(0)
        assert counting.writes == [b"".join(packets)]
        t.write(b"next")
        await asyncio.sleep(0)
        assert counting.writes[1:] == [b"next"]
        t.close()
        await asyncio.wait_for(sink.closed.wait(), 10)
        assert bytes(sink.data) == b"".join(packets) + b"next"

    asyncio.run(main())


def test_close_sends_what_was_gathered_and_abort_drops_it() -> None:
    async def main() -> None:
        t, _counting, sink = await _pair()
        t.write(b"disconnect message")
        t.close()  # in the same iteration as the write
        await asyncio.wait_for(sink.closed.wait(), 10)
        assert bytes(sink.data) == b"disconnect message"

        t, counting, sink = await _pair()
        t.write(b"never sent")
        t.abort()
        await asyncio.wait_for(sink.closed.wait(), 10)
        await asyncio.sleep(0)  # the flush scheduled by the write finds nothing
        assert sink.data == b"" and counting.writes == []

    asyncio.run(main())


def test_other_calls_reach_the_socket_transport() -> None:
    async def main() -> None:
        t, _counting, sink = await _pair()
        assert t.get_extra_info("socket") is not None
        assert not t.is_closing()
        t.write(b"x")
        t.close()
        assert t.is_closing()
        await asyncio.wait_for(sink.closed.wait(), 10)
        assert sink.data == b"x"

    asyncio.run(main())
