"""The control API's listening socket: aiohttp's request handler behind a connection
limit (relay/connlimit.py), on an asyncio server the relay owns (no reaching into an
aiohttp site for its socket).

aiohttp closes a connection that has not sent a whole request within its
``keepalive_timeout`` (armed when the connection opens, and again after each response),
so that one setting is both the header timeout and the idle timeout; the relay passes
``limits.api_idle_timeout``. A refused connection gets a plain HTTP 503 and is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from relay.connlimit import ConnectionLimits, Ticket

_REFUSAL = (
    "HTTP/1.1 503 Service Unavailable\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Connection: close\r\n"
    "Retry-After: 5\r\n"
    "Content-Length: {length}\r\n\r\n{body}"
)


_LINGER_S = 1.0


class _Guarded(asyncio.Protocol):
    """Counts one connection against the limits and hands every callback to aiohttp's
    handler (or refuses it before aiohttp sees it)."""

    def __init__(self, inner: Callable[[], asyncio.Protocol], limits: ConnectionLimits) -> None:
        self._make_inner = inner
        self._limits = limits
        self._inner: asyncio.Protocol | None = None
        self._ticket: Ticket | None = None
        self._refused: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
        admitted = self._limits.admit("api", source)
        if isinstance(admitted, str):
            assert isinstance(transport, asyncio.Transport)
            body = admitted + "\n"
            transport.write(_REFUSAL.format(length=len(body.encode()), body=body).encode())
            # Closing with the peer's request unread would reset the connection, and a
            # reset can destroy the 503 before the peer reads it: half-close, discard
            # what comes, close at the peer's end of file or after a short linger.
            transport.write_eof()
            asyncio.get_running_loop().call_later(_LINGER_S, transport.close)
            self._refused = transport
            return
        self._ticket = admitted
        self._inner = self._make_inner()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused is not None:
            self._refused.close()
            return None
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ticket is not None:
            self._limits.release(self._ticket)
            self._ticket = None
        if self._inner is not None:
            self._inner.connection_lost(exc)


async def start_api_server(
    runner: web.AppRunner, limits: ConnectionLimits, host: str, port: int, **kwargs: Any
) -> asyncio.Server:
    """Listen on ``host:port`` for ``runner`` (set up already); ``kwargs`` go to
    ``loop.create_server`` (``reuse_port``)."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Guarded(server, limits), host, port, **kwargs)
