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


class _Counted(CoalescingTransport):
    """Counts what asyncssh writes through the coalescing transport."""

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(inner, loop)
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        super().write(data)


def test_asyncssh_still_writes_every_packet_through_the_adapted_transport() -> None:
    """The asyncssh internal the adapter relies on (``SSHConnection._transport``): a real
    asyncssh server and client on loopback, the client's transport replaced after the
    handshake; an exec session's bytes must then all go through it. Fails when an
    asyncssh upgrade renames the attribute or writes around it."""
    import asyncssh

    from relay import coalesce as adapter

    async def main() -> None:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")

        async def echo(process: asyncssh.SSHServerProcess[str]) -> None:
            data = await process.stdin.read()
            process.stdout.write(data)
            process.exit(0)

        server = await asyncssh.listen(
            "127.0.0.1",
            0,
            server_host_keys=[host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(
                client_key.export_public_key().decode()
            ),
            process_factory=echo,
        )
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncssh.connect(
                "127.0.0.1",
                port,
                username="u",
                client_keys=[client_key],
                known_hosts=None,
                config=[],
                agent_path=None,
            ) as conn:
                original = adapter.CoalescingTransport
                adapter.CoalescingTransport = _Counted  # type: ignore[misc]
                try:
                    assert adapter.coalesce(conn)
                finally:
                    adapter.CoalescingTransport = original  # type: ignore[misc]
                counted = conn._transport  # type: ignore[attr-defined]
                assert isinstance(counted, _Counted)
                payload = "x" * 100_000
                result = await conn.run("echo", input=payload, check=True)
                assert result.stdout == payload
                # Every byte of the upload (and more: headers, MACs) went through it.
                assert counted.written > len(payload)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
