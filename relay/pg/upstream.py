"""Connecting to a PostgreSQL target as the relay: startup, authentication with the
target's own credential (SCRAM-SHA-256 through scramp, md5, cleartext), optional TLS,
and the catalogue lookup that turns ``mask_columns`` names into (table OID, column)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import struct
from dataclasses import dataclass, field

import scramp

from recorder.config import TargetConfig
from relay.pg import protocol as p
from relay.pg.pipe import Pipe


class UpstreamError(Exception):
    """The target refused or failed; the message is shown to the agent."""


@dataclass
class Upstream:
    """An authenticated connection to the target, ready for queries."""

    pipe: Pipe
    params: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    key: bytes = b""
    status: bytes = b"I"
    leftover: list[p.Message] = field(default_factory=list)

    @property
    def writer(self) -> Pipe:
        """Where what goes to the target is written (``write``, ``close``)."""
        return self.pipe


async def _read_messages(pipe: Pipe, dec: p.MessageDecoder) -> list[p.Message]:
    data = await pipe.read(65536)
    if not data:
        raise UpstreamError("the target closed the connection")
    return list(dec.feed(data))


def _error_text(body: bytes) -> str:
    fields = dict(p.parse_fields(body))
    return f"{fields.get('S', 'ERROR')}: {fields.get('M', 'unknown error')} ({fields.get('C', '')})"


async def connect(
    target: TargetConfig, client_params: dict[str, str], *, timeout: float = 15.0
) -> Upstream:
    """Open and authenticate a connection to ``target``."""
    host, _, port = target.address.rpartition(":")
    if not host:
        host, port = target.address, "5432"
    password = os.environ.get(target.password_env, "") if target.password_env else ""
    loop = asyncio.get_running_loop()
    try:
        _transport, pipe = await asyncio.wait_for(
            loop.create_connection(Pipe, host.strip("[]"), int(port)), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise UpstreamError(f"cannot reach target {target.name}: {exc}") from None
    try:
        if target.tls != "disable":
            pipe.write(struct.pack("!ii", 8, p.SSL_REQUEST))
            answer = await asyncio.wait_for(pipe.readexactly(1), timeout)
            if answer == b"S":
                await _start_tls(pipe, target, host.strip("[]"), timeout)
            elif target.tls in ("require", "verify-full"):
                raise UpstreamError(
                    f"target {target.name} does not offer TLS (tls = {target.tls!r})"
                )
        params = {
            "user": target.user or "postgres",
            "database": target.database or target.name,
        }
        params.update(client_params)
        pipe.write(p.startup_message(params))
        up = Upstream(pipe)
        await asyncio.wait_for(_authenticate(up, target, password), timeout)
        return up
    except UpstreamError:
        pipe.close()
        raise
    except (OSError, TimeoutError, asyncio.IncompleteReadError, p.ProtocolError) as exc:
        pipe.close()
        # str(), not the exception: an exception is always truthy, and a timeout's
        # text is empty.
        why = str(exc) or (
            f"no answer within {timeout:g} s"
            if isinstance(exc, TimeoutError)
            else type(exc).__name__
        )
        raise UpstreamError(f"target {target.name}: {why}") from None


async def send_cancel(target: TargetConfig, pid: int, key: bytes, timeout: float = 10.0) -> None:
    """Send a CancelRequest for the backend (``pid``, ``key``) of ``target``; a target
    that cannot be reached is not retried (the statement runs on, as with psql's)."""
    host, _, port = target.address.rpartition(":")
    if not host:
        host, port = target.address, "5432"
    with contextlib.suppress(OSError, TimeoutError):
        _r, w = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout
        )
        w.write(p.cancel_request(pid, key))
        await w.drain()
        w.close()
        await w.wait_closed()


async def _start_tls(pipe: Pipe, target: TargetConfig, host: str, timeout: float) -> None:
    ctx = ssl.create_default_context()
    if target.tls != "verify-full":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if pipe.take():
        raise UpstreamError(f"target {target.name} sent data before the TLS handshake")
    assert pipe.transport is not None
    transport = await asyncio.get_running_loop().start_tls(
        pipe.transport, pipe, ctx, server_hostname=host, ssl_handshake_timeout=timeout
    )
    assert isinstance(transport, asyncio.Transport)
    pipe.set_transport(transport)


async def _authenticate(up: Upstream, target: TargetConfig, password: str) -> None:
    dec = p.MessageDecoder()
    scram: scramp.ScramClient | None = None
    user = target.user or "postgres"
    while True:
        for msg in await _read_messages(up.pipe, dec):
            if msg.type == b"E":
                raise UpstreamError(
                    f"target {target.name} refused the relay: {_error_text(msg.body)}"
                )
            if msg.type == b"R":
                (code,) = struct.unpack_from("!i", msg.body, 0)
                if code == 0:
                    continue
                if code == 3:
                    up.writer.write(p.password_message(password.encode() + b"\0"))
                elif code == 5:
                    salt = msg.body[4:8]
                    inner = hashlib.md5((password + user).encode()).hexdigest()  # noqa: S324 - the protocol's
                    outer = hashlib.md5(inner.encode() + salt).hexdigest()  # noqa: S324
                    up.writer.write(p.password_message(b"md5" + outer.encode() + b"\0"))
                elif code == 10:
                    mechs = [m for m in msg.body[4:].split(b"\0") if m]
                    if b"SCRAM-SHA-256" not in mechs:
                        raise UpstreamError(f"target {target.name} offers no SCRAM-SHA-256")
                    scram = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
                    first = scram.get_client_first().encode()
                    up.writer.write(p.sasl_initial_response("SCRAM-SHA-256", first))
                elif code == 11 and scram is not None:
                    scram.set_server_first(msg.body[4:].decode())
                    up.writer.write(p.password_message(scram.get_client_final().encode()))
                elif code == 12 and scram is not None:
                    try:
                        scram.set_server_final(msg.body[4:].decode())
                    except scramp.ScramException as exc:
                        raise UpstreamError(
                            f"target {target.name} failed SCRAM server verification: {exc}"
                        ) from None
                else:
                    raise UpstreamError(f"target {target.name} asks for unsupported auth {code}")
            elif msg.type == b"S":
                body = msg.body.split(b"\0")
                up.params[body[0].decode()] = body[1].decode()
            elif msg.type == b"K":
                (up.pid,) = struct.unpack_from("!i", msg.body, 0)
                up.key = msg.body[4:]
            elif msg.type == b"Z":
                up.status = msg.body[:1]
                return
            elif msg.type in (b"N", b"v"):
                continue
        await up.pipe.drain()


async def simple_query(up: Upstream, sql: str) -> list[list[bytes | None]]:
    """Run one query on a connection that is idle; returns its rows (text format)."""
    up.pipe.write(p.query(sql))
    await up.pipe.drain()
    dec = p.MessageDecoder()
    rows: list[list[bytes | None]] = []
    error = None
    while True:
        for msg in await _read_messages(up.pipe, dec):
            if msg.type == b"D":
                rows.append(p.parse_data_row(msg.body))
            elif msg.type == b"E":
                error = _error_text(msg.body)
            elif msg.type == b"Z":
                up.status = msg.body[:1]
                if error:
                    raise UpstreamError(error)
                return rows


async def resolve_mask_columns(up: Upstream, names: list[str]) -> set[tuple[int, int]]:
    """(table OID, attnum) of every ``[schema.]table.column`` in ``names``."""
    pairs: list[tuple[str | None, str, str]] = []
    for name in names:
        parts = name.split(".")
        if len(parts) == 2:
            pairs.append((None, parts[0], parts[1]))
        elif len(parts) == 3:
            pairs.append((parts[0], parts[1], parts[2]))
    if not pairs:
        return set()

    def lit(s: str) -> str:
        return "'" + s.replace("'", "''") + "'"

    conds = " OR ".join(
        f"(c.relname = {lit(t)} AND a.attname = {lit(col)}"
        + (f" AND n.nspname = {lit(schema)})" if schema else ")")
        for schema, t, col in pairs
    )
    sql = (
        "SELECT c.oid, a.attnum FROM pg_catalog.pg_attribute a "  # noqa: S608 - literals quoted above
        "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE a.attnum > 0 AND NOT a.attisdropped AND ({conds})"
    )
    rows = await simple_query(up, sql)
    return {(int(r[0] or b"0"), int(r[1] or b"0")) for r in rows}
