"""The PostgreSQL start-up steps one at a time, without sockets: negotiation, the
StartupMessage's checks, the password read, and the pipe they read from."""

from __future__ import annotations

import asyncio
import struct

import pytest

from relay.pg import protocol as p
from relay.pg.pipe import Pipe
from relay.pg.startup import (
    Answer,
    Cancel,
    Login,
    Negotiation,
    Refusal,
    check_startup,
    read_password,
    startup_encoding,
)


def packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", 8 + len(body), code) + body


def startup(version: int = p.PROTOCOL_3_0, **params: str) -> p.Startup:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return p.Startup(version, body)


def test_negotiation_offers_tls_once_declines_gss_and_returns_the_startup() -> None:
    neg = Negotiation(tls=True)
    assert neg.feed(packet(p.GSSENC_REQUEST)) == Answer(b"N")
    assert neg.feed(packet(p.SSL_REQUEST)) == Answer(b"S", start_tls=True)
    assert neg.tls
    assert neg.feed(packet(p.SSL_REQUEST)) == Answer(b"N")  # not twice
    msg = p.startup_message({"user": "ci-agent", "database": "appdb"})
    assert neg.feed(msg[:5]) is None  # a packet split across reads
    pkt = neg.feed(msg[5:] + b"pipelined")
    assert isinstance(pkt, p.Startup) and pkt.params["user"] == "ci-agent"
    assert neg.rest() == b"pipelined"


def test_negotiation_without_tls_and_with_bytes_smuggled_before_the_handshake() -> None:
    assert Negotiation(tls=False).feed(packet(p.SSL_REQUEST)) == Answer(b"N")
    # Bytes after an SSLRequest would be read as if they came over TLS: refused.
    with pytest.raises(p.ProtocolError, match="before the TLS handshake"):
        Negotiation(tls=True).feed(packet(p.SSL_REQUEST) + p.query("SELECT 1"))


def test_a_cancel_request_is_handed_over() -> None:
    body = struct.pack("!ii", 7, 9)
    assert Negotiation(tls=False).feed(packet(p.CANCEL_REQUEST, body)) == Cancel(body)


def test_check_startup_refuses_what_the_relay_does_not_relay() -> None:
    old = check_startup(startup(2 << 16, user="a"), require_tls=False, tls=False)
    assert isinstance(old, Refusal) and old.sqlstate == "0A000"
    repl = check_startup(startup(user="a", replication="true"), require_tls=False, tls=False)
    assert isinstance(repl, Refusal) and "replication" in repl.message
    plain = check_startup(startup(user="a"), require_tls=True, tls=False)
    assert isinstance(plain, Refusal) and plain.event == "auth"
    assert plain.reason == "password without TLS"
    ok = check_startup(startup(user="a"), require_tls=True, tls=True)
    assert ok == Login("a", "a", {"user": "a"})


def test_a_newer_protocol_minor_gets_a_negotiate_protocol_version_first() -> None:
    login = check_startup(
        startup((3 << 16) | 2, user="a", database="appdb", _pq_x="1"),
        require_tls=False,
        tls=False,
    )
    assert isinstance(login, Login) and login.database == "appdb"
    # (``_pq_x`` is no protocol option: only names with the ``_pq_.`` prefix are.)
    assert login.preamble == p.negotiate_protocol_version(0, [])


def test_client_encodings_other_than_utf8_are_refused() -> None:
    assert startup_encoding(None) is None
    assert startup_encoding("SQL_ASCII") is None and startup_encoding("utf-8") is None
    why = startup_encoding("SJIS")
    assert why is not None and "not supported" in why


def test_the_password_and_what_the_client_pipelined_behind_it() -> None:
    async def run() -> tuple[bytes, bytes]:
        pipe = Pipe()  # no transport: fed as the event loop would feed it
        pw = p.password_message(b"s3cret\0")
        pipe.data_received(pw[:3])
        task = asyncio.ensure_future(read_password(pipe, b""))
        await asyncio.sleep(0)
        pipe.data_received(pw[3:] + p.query("SELECT 1")[:4])
        return await task

    password, early = asyncio.run(run())
    assert password == b"s3cret" and early == p.query("SELECT 1")[:4]


def test_a_message_other_than_the_password_is_refused() -> None:
    async def run() -> None:
        await read_password(Pipe(), p.query("SELECT 1"))

    with pytest.raises(p.ProtocolError, match="expected a password message"):
        asyncio.run(run())


def test_a_pipe_hands_what_it_read_ahead_to_its_handler_first() -> None:
    async def run() -> list[bytes]:
        pipe = Pipe()
        got: list[bytes] = []
        pipe.data_received(b"read ahead ")
        pipe.attach(got.append, b"early ")
        pipe.data_received(b"then this")
        pipe.connection_lost(None)
        assert pipe.done.result() == (None, None)
        pipe.data_received(b"after the end")
        return got

    assert asyncio.run(run()) == [b"early read ahead ", b"then this"]


def test_a_pipe_reports_its_handlers_failure_and_its_peers_eof() -> None:
    async def run() -> None:
        pipe = Pipe()
        boom = ValueError("bad")

        def fail(data: bytes) -> None:
            raise boom

        pipe.attach(fail)
        pipe.data_received(b"x")
        assert pipe.done.result() == (boom, None)
        eof = Pipe()
        eof.data_received(b"ab")
        eof.eof_received()
        assert await eof.read() == b"ab" and await eof.read() == b""
        with pytest.raises(asyncio.IncompleteReadError):
            await eof.readexactly(1)

    asyncio.run(run())
