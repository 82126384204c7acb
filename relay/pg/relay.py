"""The PostgreSQL wire relay: agents connect with ``dbname=TARGET user=IDENTITY
password=TOKEN``; the relay authenticates the token, checks the target's groups,
connects to the target with the target's own credential, and then moves messages both
ways: every statement through the policy, every result row and error through the
masker, every statement into the query log and the psql-like transcript.

Start-up and authentication use asyncio streams; once relayed, each side of a session is
an asyncio protocol whose reads are handled as they arrive (``_ClientPipe``,
``_UpstreamPipe``), and only a statement that must wait (an approval) goes to a task.
Responses come back in request order, so the client side queues what it sent (a deque
of pending requests) and the server side consumes it as responses arrive: that is how a
DataRow knows its columns and an error knows which statement failed. The transcript and
the query log (relay/pg/querylog.py, shared by the listener's sessions) are written
after the answer has gone to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import secrets
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import Format

from recorder.config import TargetConfig
from recorder.recording import CastWriter, DiscardWriter, RecordingError
from recorder.session import SessionRecorder
from recorder.store import StoreError
from relay.context import RelayContext, new_session_id
from relay.identity import AuthError, Identity
from relay.pg import copymask
from relay.pg import protocol as p
from relay.pg.copymask import CopyPlan, MaskTable
from relay.pg.protocol import RowRun
from relay.pg.querylog import QueryLog
from relay.pg.rows import RowMasker
from relay.pg.sql import (
    FUNCTION_CALL_RULE,
    PINNED,
    PINNED_RULE,
    PINNED_SETTINGS,
    PINNED_VALUES,
    TOO_LONG,
    TOO_LONG_RULE,
    UNPARSED,
    UNPARSED_RULES,
    Check,
    CopyOut,
    SqlGate,
    copies_out,
    reads_the_same,
    setting_ok,
)
from relay.pg.transcript import Bound, Transcript
from relay.pg.upstream import (
    Upstream,
    UpstreamError,
    connect,
    resolve_mask_columns,
    simple_query,
)
from relay.pg.values import CopyBinaryMasker, Malformed, Unmaskable, parameter_types
from relay.policy import Decision, ScopedPolicy

log = logging.getLogger("castgate.pg")

_PASS_PARAMS = {
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "extra_float_digits",
    "IntervalStyle",
    "search_path",
}
# Up to what asyncio reads from a socket at once: a large result is masked in blocks
# of this size (each block costs a fixed few hundred microseconds of numpy and RE2).
_SERVER_READ = 256 * 1024
# Transcript text waits at most this long (or this many characters) for the cast.
_CAST_BATCH = 0.05
_CAST_BATCH_BYTES = 64 * 1024
# Statements and answers waiting to be drawn into the transcript before a batch is
# drawn and written at once (else every _CAST_BATCH seconds).
_POST_MAX = 2048
# Or once the result rows waiting for it hold this many bytes (a large result is read
# faster than _CAST_BATCH lets the transcript keep up; it draws only its first rows).
_POST_BYTES = 1 << 20


def _startup_encoding(value: str | None) -> str | None:
    """Why a client's startup ``client_encoding`` is refused, or None.

    The relay pins every session to UTF8 rather than decoding with the session's
    encoding: SJIS, GBK, BIG5, UHC, GB18030 and JOHAB put ASCII bytes (backslash,
    quote) inside multibyte characters, so checking a statement exactly would need the
    server's own decoder for each, and every message the relay rewrites would have to
    be re-encoded in it. UTF-8 never does; SQL_ASCII (what libpq asks for in the C
    locale) means "no conversion", the same bytes, so it becomes UTF8 too."""
    if value is None:
        return None
    norm = "".join(c for c in value.lower() if c.isalnum())
    if norm in ("utf8", "unicode", "sqlascii"):
        return None
    return (
        f"client_encoding {value!r} is not supported: the relay reads every statement as "
        "UTF-8 (connect with client_encoding=UTF8)"
    )


def is_loopback(host: str) -> bool:
    """True for a listener address on the loopback interface."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _write_passed(
    writer: asyncio.StreamWriter, data: bytes, same: int, out: bytearray | None
) -> None:
    """Send what one read passed on (``_client_data``, ``_server_data``): ``out`` once
    something changed, else the first ``same`` bytes of the read as they came."""
    if out is None:
        if same:
            writer.write(data if same == len(data) else data[:same])
    elif out:
        writer.write(out)


class CancelMap:
    """Our (pid, key) handed to each client, mapped to the target's, so a CancelRequest
    reaches only the session it names."""

    def __init__(self) -> None:
        self._map: dict[tuple[int, int], tuple[TargetConfig, int, bytes]] = {}

    def issue(self, target: TargetConfig, up_pid: int, up_key: bytes) -> tuple[int, int]:
        while True:
            pid, key = secrets.randbits(31) or 1, secrets.randbits(31)
            if (pid, key) not in self._map:
                self._map[(pid, key)] = (target, up_pid, up_key)
                return pid, key

    def get(self, pid: int, key: int) -> tuple[TargetConfig, int, bytes] | None:
        return self._map.get((pid, key))

    def drop(self, pid: int, key: int) -> None:
        self._map.pop((pid, key), None)


# -- requests awaiting responses ---------------------------------------------------------


@dataclass
class _Query:
    text: str  # masked
    started: float
    rows: int = 0
    log: bool = True
    raw: str = ""  # as sent (a COPY in it is read again when its rows come)
    copies: int = 0


@dataclass
class _Parse:
    name: str


@dataclass
class _Bind:
    pass


@dataclass
class _Describe:
    kind: str
    name: str
    hidden: bool


@dataclass
class _Execute:
    portal: str
    statement: str
    formats: tuple[int, ...]
    text: str  # masked
    started: float
    rows: int = 0


@dataclass
class _FunctionCall:
    text: str  # masked
    name: str
    rettype: int
    result_format: int
    started: float


@dataclass
class _Close:
    pass


@dataclass
class _Sync:
    pass


_Pending = _Query | _Parse | _Bind | _Describe | _Execute | _FunctionCall | _Close | _Sync
# Requests that run something on the target (and so could change a session setting
# before what follows them is read).
_RUNS = (_Query, _Bind, _Execute, _FunctionCall)
# Requests answered by a ReadyForQuery: waiting for the queue to empty after one of these
# last ends, and a pipeline with another kind last has no such answer coming.
_READY = (_Query, _Sync, _FunctionCall)
# Frontend messages after startup; anything else is a protocol violation, refused.
_FRONTEND = frozenset(bytes([c]) for c in b"QPBDECSHXFdcf")
# Return types whose binary form is their text (masked in place) or raw bytes.
_TEXT_LIKE = frozenset((17, 18, 19, 25, 114, 142, 705, 1042, 1043, 3802))
_PLAIN_IDENT = re.compile(r"[a-z_][a-z0-9_$]*")


class SessionEnd(Exception):
    """The relay ends the session: the FATAL it sends (already masked) and why."""

    def __init__(self, sqlstate: str, message: str, status: str, event: dict[str, Any]) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.status = status
        self.event = event


async def _mask_tables(up: Upstream, keys: set[tuple[int, int]]) -> dict[str, list[MaskTable]]:
    """The tables holding ``mask_columns`` (``keys``: table OID, column number), by name,
    with their columns in order (what a COPY of the table without a column list sends)."""
    if not keys:
        return {}
    oids = ", ".join(str(int(oid)) for oid in sorted({k[0] for k in keys}))
    rows = await simple_query(
        up,
        "SELECT c.oid, n.nspname, c.relname, a.attnum, a.attname "  # noqa: S608 - integers
        "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE a.attnum > 0 AND NOT a.attisdropped AND c.oid IN ({oids}) "
        "ORDER BY c.oid, a.attnum",
    )
    found: dict[int, tuple[str, str, list[str], set[str]]] = {}
    for oid_b, nsp, rel, num, name in rows:
        oid = int(oid_b or b"0")
        entry = found.setdefault(oid, ((nsp or b"").decode(), (rel or b"").decode(), [], set()))
        col = (name or b"").decode()
        entry[2].append(col)
        if (oid, int(num or b"0")) in keys:
            entry[3].add(col)
    tables: dict[str, list[MaskTable]] = {}
    for schema, table, cols, masked in found.values():
        tables.setdefault(table, []).append(MaskTable(schema, tuple(cols), frozenset(masked)))
    return tables


def _unsettled(raw: bytes) -> bool:
    """True when the statement bytes ``raw`` could read differently under another
    client_encoding or standard_conforming_strings (see ``_settled_decision``)."""
    return (not raw.isascii() or b"\\'" in raw) and not reads_the_same(raw)


def _query_bytes(parse_body: bytes) -> bytes:
    """The statement text of a Parse body, as sent (the name is NUL-terminated first)."""
    start = parse_body.find(b"\0") + 1
    end = parse_body.find(b"\0", start)
    return parse_body[start : end if end >= 0 else len(parse_body)]


def _strictest(decisions: list[Decision]) -> Decision:
    """Of the decisions on the statements of one text, the one that applies: a block
    before an approval before an allow (the first of each)."""
    for action in ("block", "approve"):
        for d in decisions:
            if d.action == action:
                return d
    return decisions[0]


def _sql_literal(value: bytes | None, fmt: int) -> str:
    if value is None:
        return "NULL"
    if fmt == 1:
        return f"'\\x{value.hex()}'"
    return "'" + value.decode("utf-8", "replace").replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    return name if _PLAIN_IDENT.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def call_text(schema: str, name: str, call: p.FunctionCall) -> str:
    """The SQL the rules see for a FunctionCall: ``SELECT schema.name('arg', ...)``, text
    arguments as literals, binary ones as bytea hex."""
    args = ", ".join(_sql_literal(a, f) for a, f in zip(call.args, call.formats, strict=True))
    return f"SELECT {_sql_ident(schema)}.{_sql_ident(name)}({args})"


@dataclass
class _Columns:
    rows: RowMasker
    names: tuple[str, ...]
    formats: tuple[int, ...]


class _Pipe(asyncio.Protocol):
    """One side of a session once authenticated (the relayed phase): reads are handled
    in data_received, not by a reader task woken per read. What both sides share:
    pausing reading for any number of reasons, and a future for "the socket's write
    buffer is over its high-water mark"."""

    def __init__(self, session: PgSession) -> None:
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.write_paused: asyncio.Future[None] | None = None
        self.detached = False  # the session has ended: later bytes are dropped
        self._pauses = 0
        self._holding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def eof_received(self) -> bool:
        return False  # close the transport: the peer is done

    def connection_lost(self, exc: Exception | None) -> None:
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)

    def pause_writing(self) -> None:
        if self.write_paused is None:
            self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter, self.write_paused = self.write_paused, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
        if self._holding:
            return
        self._holding = True
        self.pause()

        async def wait() -> None:
            try:
                await ready
            except (ConnectionError, OSError):
                pass  # the other side is gone: the session is ending anyway
            finally:
                self._holding = False
                self.resume()

        self.session._holds.add(task := asyncio.ensure_future(wait()))
        task.add_done_callback(self.session._holds.discard)


class _UpstreamPipe(_Pipe):
    """The target's side: every read goes to ``PgSession._server_data``. ``done``
    resolves to (failure, lost): a processing error to raise, or the connection's end
    (None or the OSError that ended it)."""

    def __init__(self, session: PgSession) -> None:
        super().__init__(session)
        self.done: asyncio.Future[tuple[BaseException | None, BaseException | None]] = (
            self.loop.create_future()
        )

    def data_received(self, data: bytes) -> None:
        if self.detached or self.done.done():
            return
        try:
            self.session._server_data(data)
        except Exception as exc:
            self._finish(exc, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(None, exc)
        super().connection_lost(exc)

    def _finish(self, failure: BaseException | None, lost: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result((failure, lost))


class _ClientPipe(_Pipe):
    """The client's side: reads go to ``PgSession._client_data``; while a statement is
    on the slow path (waiting for an approval, say) reading pauses and what was already
    read waits in ``backlog``. ``done`` resolves to the error to raise, or None when the
    client has left."""

    def __init__(self, session: PgSession) -> None:
        super().__init__(session)
        self.done: asyncio.Future[BaseException | None] = self.loop.create_future()
        self.backlog: deque[bytes] = deque()

    def data_received(self, data: bytes) -> None:
        if self.detached or self.done.done():
            return
        if self.session._slow is not None:
            self.backlog.append(data)
            return
        try:
            self.session._client_data(data)
        except Exception as exc:
            self.finish(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish(exc)
        super().connection_lost(exc)

    def finish(self, failure: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(failure)


class PgSession:
    """One client connection through the relay."""

    def __init__(
        self,
        ctx: RelayContext,
        listener: PgListener,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.ctx = ctx
        self.listener = listener
        self.cr = reader
        self.cw = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.id = new_session_id()
        self.tls = False
        self.ident: Identity | None = None
        self.target: TargetConfig | None = None
        self.up: Upstream | None = None
        self.rec: SessionRecorder | None = None
        self.transcript: Transcript | None = None
        self.pending: deque[_Pending] = deque()
        self.stmt_text: dict[str, str] = {}
        self.stmt_raw: dict[str, str] = {}  # (only on targets with mask_columns, for COPY)
        self.stmt_desc: dict[str, list[p.Field] | None] = {}
        self.portal_desc: dict[str, list[p.Field] | None] = {}
        self.portal_stmt: dict[str, tuple[str, tuple[int, ...]]] = {}
        # For the transcript: each portal's Bind (its parameters), each statement's
        # parameter types (from Parse, or the server's ParameterDescription).
        self.portal_bind: dict[str, bytes] = {}
        self.stmt_types: dict[str, tuple[int, ...]] = {}
        # A COPY TO STDOUT in the binary format, masked field by field.
        self._copy: CopyBinaryMasker | None = None
        self.described: set[str] = set()
        self.mask_keys: set[tuple[int, int]] = set()
        self.sentinels: dict[str, str] = {}
        self.columns: _Columns | None = None
        self._pipe: _UpstreamPipe | None = None
        self._cpipe: _ClientPipe | None = None
        self._cdec = p.client_decoder(ctx.cfg.limits.pg_max_message)
        self._slow: asyncio.Future[None] | None = None
        self._sdec = p.MessageDecoder()
        # RowDescriptions repeat (the same statements run again and again): parsed and
        # matched against mask_columns once per distinct message; command tags too.
        # With the body to send instead when a name or tag had to be masked.
        self._described: dict[bytes, tuple[list[p.Field], _Columns | None, bytes | None]] = {}
        self._completes: dict[bytes, tuple[str, int | None, bytes | None]] = {}
        self._holds: set[asyncio.Future[None]] = set()
        self._scoped: ScopedPolicy | None = None
        self._gate: SqlGate | None = None
        self._exec_cols: dict[tuple[Any, ...], tuple[list[p.Field], _Columns]] = {}
        # Rows of a result whose shape is unknown: masked by content only.
        self._plain_rows = RowMasker(ctx.masker, full=ctx.masker.policy.style == "full")
        self.status = "closed"
        self.cancel_key: tuple[int, int] | None = None
        self._qlog = listener.qlog
        self.statements = 0
        self._early = b""
        self._cast_buf: list[str] = []
        self._cast_len = 0
        self._cast_timer: asyncio.TimerHandle | None = None
        # Transcript work waiting to be drawn, in order (see ``_transcribe``).
        self._post: list[tuple[Any, ...]] = []
        self._post_bytes = 0
        # The target's own FATAL message (masked), once it sent one: it is ending the
        # connection and has told the client why.
        self._target_fatal: str | None = None
        self._rec_failed = False
        self._loop = asyncio.get_event_loop()
        self._stmt_limit = ctx.cfg.recording.max_statement_bytes
        # Resolved once the target has answered everything sent (see ``_settle``).
        self._idle: asyncio.Future[None] | None = None
        # FunctionCall OIDs looked up: (schema, name, return type), None when unknown.
        self._functions: dict[int, tuple[str, str, int] | None] = {}
        # Tables holding mask_columns, by name (for COPY TO STDOUT), and the plan of the
        # COPY whose rows are coming.
        self._copy_tables: dict[str, list[MaskTable]] = {}
        self._copy_plan: CopyPlan | None = None
        # Client messages that may have to wait (an approval, a lookup, the target's
        # answers), by type; every other message goes as on the fast path.
        self._slow_handlers: dict[
            bytes, Callable[[p.Message, bytearray, list[str | Bound]], Awaitable[bool]]
        ] = {
            b"Q": self._slow_query,
            b"P": self._slow_parse,
            b"F": self._slow_function_call,
            b"X": self._slow_terminate,
        }
        # Target messages other than the hot few (rows, descriptions, completions,
        # ReadyForQuery), by type: each returns the bytes to send instead (b"" for
        # nothing), or None to pass the message on as it came.
        self._server_handlers: dict[
            bytes, Callable[[p.Message, list[tuple[Any, ...]] | None], bytes | None]
        ] = {
            b"E": self._on_error,
            b"N": self._on_error,
            b"t": self._on_parameter_description,
            b"n": self._on_no_data,
            b"s": self._on_portal_end,
            b"I": self._on_portal_end,
            b"d": self._on_copy_data,
            b"H": self._on_copy_out,
            b"c": self._on_copy_done,
            b"A": self._on_notification,
            b"S": self._on_parameter_status,
            b"V": self._on_function_result,
        }

    # -- setup ---------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        """Write to the client and wait while its socket buffer is full. Once the
        session is relayed the transport reports that to ``_ClientPipe``, no longer to
        the stream writer, so its drain() would not wait."""
        self.cw.write(data)
        cpipe = self._cpipe
        if cpipe is None:
            await self.cw.drain()
            return
        if self.cw.transport.is_closing():
            raise ConnectionResetError("client connection closed")
        if cpipe.write_paused is not None:
            await asyncio.shield(cpipe.write_paused)

    async def _fatal(self, sqlstate: str, text: str) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            await self._send(p.error_response(sqlstate, text, severity="FATAL"))

    async def run(self) -> None:
        try:
            if await self._startup():
                await self._relay()
        except SessionEnd as exc:
            self.status = exc.status
            self._marker(f"terminated: {exc.message}")
            self.ctx.emit(
                "pg.session_end",
                self.ident.name if self.ident else None,
                "failure",
                self.peer,
                f"postgres:{self.target.name if self.target else ''}",
                exc.event,
                session_id=self.id,
            )
            await self._fatal(exc.sqlstate, exc.message)
        except p.ProtocolError as exc:
            self.status = "protocol error"
            await self._fatal(exc.sqlstate, f"castgate: {exc}")
            self.ctx.emit(
                exc.kind,
                self.ident.name if self.ident else None,
                "failure",
                self.peer,
                "postgres",
                exc.detail,
            )
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            if self.status != "recording failed":  # the relay closed it on purpose
                self.status = "disconnected"
        except Exception as exc:
            log.exception("pg.session_error", extra={"session": self.id})
            self.status = "error"
            await self._fatal("XX000", f"castgate: internal error: {exc}")
        finally:
            await self._close()

    async def _refuse(
        self,
        user: str,
        database: str,
        reason: str,
        sqlstate: str,
        message: str,
        method: str = "token",
    ) -> bool:
        """Log a failed authentication (PCI DSS 10.2.1.4) and end the connection."""
        self.ctx.emit(
            "auth",
            user or None,
            "failure",
            self.peer,
            f"postgres:{database}",
            {"method": method, "reason": reason},
        )
        await self._fatal(sqlstate, message)
        return False

    async def _read_startup(self, dec: p.StartupDecoder) -> p.Startup:
        while True:
            pkt = dec.feed(b"")
            if pkt is not None:
                return pkt
            data = await asyncio.wait_for(self.cr.read(8192), 30)
            if not data:
                raise ConnectionError("client closed during startup")
            pkt = dec.feed(data)
            if pkt is not None:
                return pkt

    async def _startup(self) -> bool:
        dec = p.StartupDecoder(self.ctx.cfg.limits.pg_max_startup)
        while True:
            try:
                pkt = await self._read_startup(dec)
            except TimeoutError:
                raise p.ProtocolError("startup timed out") from None
            if pkt.code == p.SSL_REQUEST:
                if dec.rest():
                    raise p.ProtocolError("data after SSLRequest before the TLS handshake")
                if self.listener.tls is not None and not self.tls:
                    await self._send(b"S")
                    await self.cw.start_tls(self.listener.tls)
                    self.tls = True
                else:
                    await self._send(b"N")
                continue
            if pkt.code == p.GSSENC_REQUEST:
                await self._send(b"N")
                continue
            if pkt.code == p.CANCEL_REQUEST:
                await self._cancel(pkt.body)
                return False
            break
        major = pkt.code >> 16
        if major != 3:
            await self._fatal(
                "0A000", f"castgate: unsupported protocol version {major}.{pkt.code & 0xFFFF}"
            )
            return False
        params = pkt.params
        unsupported = [k for k in params if k.startswith("_pq_.")]
        if (pkt.code & 0xFFFF) > 0 or unsupported:
            # We speak 3.0; libpq 18 asks for 3.2 and falls back when told.
            self.cw.write(p.negotiate_protocol_version(0, unsupported))
        user = params.get("user", "")
        database = params.get("database", user)
        if params.get("replication"):
            await self._fatal("28000", "castgate: replication connections are not relayed")
            return False
        if self.listener.require_tls and not self.tls:
            return await self._refuse(
                user,
                database,
                "password without TLS",
                "28000",
                "castgate: this listener requires TLS (sslmode=require) before a token is sent",
            )
        await self._send(p.auth_request(3))
        msgs = p.MessageDecoder(max_message=65536)
        password: bytes | None = None
        data = dec.rest()  # the client may have sent its password along with the startup
        early = bytearray()
        while password is None:
            if not data:
                data = await asyncio.wait_for(self.cr.read(8192), 60)
                if not data:
                    raise ConnectionError("client closed during authentication")
            for msg in msgs.feed(data):
                if password is None:
                    if msg.type != b"p":
                        raise p.ProtocolError(f"expected a password message, got {msg.type!r}")
                    password = msg.body.rstrip(b"\0")
                else:
                    early += msg.raw()
            data = b""
        self._early = bytes(early) + msgs.take_rest()
        if self.ctx.limiter.blocked(self.peer):
            return await self._refuse(
                user,
                database,
                "too many failed attempts from this address",
                "28000",
                "castgate: too many failed authentication attempts; try later",
            )
        try:
            ident = await asyncio.to_thread(
                self.ctx.auth.by_token, password.decode("utf-8", "replace")
            )
        except AuthError as exc:
            self.ctx.limiter.failure(self.peer)
            return await self._refuse(
                user,
                database,
                str(exc),
                "28P01",
                f"castgate: authentication failed for {user!r}: {exc}",
            )
        if ident.name != user:
            return await self._refuse(
                user,
                database,
                f"token belongs to {ident.name}",
                "28P01",
                f"castgate: the token is not {user!r}'s (user must be the identity name)",
                method=ident.method,
            )
        self.ident = ident
        self.ctx.emit(
            "auth",
            ident.name,
            "success",
            self.peer,
            f"postgres:{database}",
            {
                "method": ident.method,
                "groups": list(ident.groups),
                **self.ctx.identity_detail(ident),
            },
        )
        target = self.ctx.policy.target(database)
        if target is None or target.kind != "postgres":
            reason = f"no PostgreSQL target named {database!r}"
        elif not self.ctx.policy.can_access(ident.groups, target):
            reason = f"identity {ident.name} is not in any group of target {target.name}"
        else:
            reason = None
        if reason is not None or target is None:
            self.ctx.emit(
                "access",
                ident.name,
                "failure",
                self.peer,
                f"postgres:{database}",
                {"reason": reason},
            )
            await self._fatal("42501", f"castgate: {reason}")
            return False
        self.target = target
        refused = _startup_encoding(params.get("client_encoding"))
        if refused is not None:
            refused = self.ctx.masker.mask(refused)
            self.ctx.emit(
                "access",
                ident.name,
                "failure",
                self.peer,
                f"postgres:{target.name}",
                {"reason": refused},
            )
            await self._fatal("22023", f"castgate: {refused}")
            return False
        forwarded = {k: v for k, v in params.items() if k in _PASS_PARAMS}
        # One encoding: the target reads exactly the bytes the relay checked (see
        # ``_startup_encoding``).
        forwarded.update(PINNED_VALUES)
        forwarded.setdefault("application_name", "")
        forwarded["application_name"] = f"castgate:{ident.name}" + (
            f" {forwarded['application_name']}" if forwarded["application_name"] else ""
        )
        try:
            self.up = await connect(target, forwarded)
            if target.mask_columns:
                self.mask_keys = await resolve_mask_columns(self.up, target.mask_columns)
                self._copy_tables = await _mask_tables(self.up, self.mask_keys)
        except UpstreamError as exc:
            self.status = "target unreachable"
            # The target's refusal can quote a startup parameter the client chose.
            why = self.ctx.masker.mask(str(exc))
            self.ctx.emit(
                "target.connect",
                ident.name,
                "failure",
                self.peer,
                f"postgres:{target.name}",
                {"reason": why},
            )
            await self._fatal("08006", f"castgate: {why}")
            return False
        self.ctx.credential_used(self.id, ident.name, self.peer, target)
        failure = self._open_recording()
        # The session row first, even for a refused session: the row says why.
        await asyncio.to_thread(
            self.ctx.spool.create_session,
            self.id,
            identity=ident.name,
            target=target.name,
            protocol="postgres",
            groups=list(ident.groups),
            auth_method=ident.method,
            source=self.peer,
            node=self.ctx.node,
            cast_path=str(self.ctx.cfg.recordings_dir / f"{self.id}.cast"),
            title=f"{ident.name}@{target.name}",
            **self.ctx.attribute_session(self.id, ident),
        )
        if failure is not None:
            self._recording_failed(failure, at_start=True)
            if self.status == "recording failed":
                return False
        self.ctx.live[self.id] = self
        self.ctx.emit(
            "session.start",
            ident.name,
            "success",
            self.peer,
            f"postgres:{target.name}",
            {"tls": self.tls},
            session_id=self.id,
        )
        out = bytearray(p.auth_request(0))
        masker = self.ctx.masker
        for k, v in self.up.params.items():
            if k in PINNED_SETTINGS and not setting_ok(k, v):
                self.status = "pinned setting changed"
                await self._fatal("22023", f"castgate: target {target.name} reports {k} {v!r}")
                return False
            out += p.parameter_status(masker.mask(k), masker.mask(v))
        self.cancel_key = self.listener.cancels.issue(target, self.up.pid, self.up.key)
        out += p.backend_key_data(*self.cancel_key)
        if failure is not None:
            out += p.notice_response(
                f"castgate: this session cannot be recorded ({failure.rsplit(': ', 1)[-1]}); "
                "it continues unrecorded"
            )
        out += p.ready_for_query(self.up.status)
        await self._send(bytes(out))
        return True

    async def _cancel(self, body: bytes) -> None:
        if len(body) < 8:
            return
        pid, key = struct.unpack_from("!ii", body, 0)
        found = self.listener.cancels.get(pid, key)
        if found is None:
            self.ctx.emit(
                "pg.cancel", None, "failure", self.peer, "postgres", {"reason": "unknown key"}
            )
            return
        target, up_pid, up_key = found
        host, _, port = target.address.rpartition(":")
        with contextlib.suppress(OSError, TimeoutError):
            _r, w = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 10)
            w.write(p.cancel_request(up_pid, up_key))
            await w.drain()
            w.close()
        self.ctx.emit("pg.cancel", None, "success", self.peer, f"postgres:{target.name}", None)

    def _open_recording(self) -> str | None:
        """Open the cast; returns why it could not be, or None. A failed cast is
        replaced by a DiscardWriter, so the transcript and the live view go on."""
        assert self.ident is not None and self.target is not None
        cfg = self.ctx.cfg
        path = cfg.recordings_dir / f"{self.id}.cast"
        failure = None
        writer: CastWriter
        try:
            writer = CastWriter(
                path,
                width=120,
                height=40,
                session_id=self.id,
                signing_key=self.ctx.signing_key,
                title=f"{self.ident.name}@{self.target.name}: psql",
                env={"TERM": "xterm-256color", "SHELL": "/bin/sh"},
                fsync_interval=cfg.recording.fsync_interval,
                on_checkpoint=self._checkpoint,
                threaded=True,
                extra_header={
                    "identity": self.ident.name,
                    "target": self.target.name,
                    "protocol": "postgres",
                    **self.ctx.identity_detail(self.ident),
                },
                on_error=self._writer_failed,
            )
        except RecordingError as exc:
            failure = str(exc)
            writer = DiscardWriter(path, session_id=self.id, width=120, height=40, error=failure)
        live = self.ctx.hub.open(
            self.id,
            {"identity": self.ident.name, "target": self.target.name, "protocol": "postgres"},
            120,
            40,
        )
        self.rec = SessionRecorder(
            writer, self.ctx.masker, input_mode="none", hold_deadline=0, live=live
        )
        self.transcript = Transcript(
            self.target.name, cfg.recording.max_result_rows, self.ctx.masker
        )
        self._write_cast(
            self.transcript.banner(self.ident.name, self.target.database or self.target.name)
        )
        self._flush_cast()
        return failure

    def _checkpoint(self, lines: int, chain_hash: str) -> None:
        self.ctx.checkpoint(self.id, lines, chain_hash)  # from the writer pool

    def _write_cast(self, text: str) -> None:
        """Queue transcript text (built from masked parts) after what waits to be drawn;
        written by ``_flush_cast`` as one cast event per batch."""
        if self.rec is not None:
            if self._post:
                self._run_post()
            self._cast_buf.append(text)
            self._cast_len += len(text)

    def _cast_soon(self) -> None:
        """Draw and write the queued transcript within ``_CAST_BATCH`` seconds (at once
        past ``_CAST_BATCH_BYTES`` or ``_POST_MAX`` items): a session running thousands
        of statements a second costs tens of cast events a second, not thousands, and
        draws its statements in batches."""
        if not self._cast_buf and not self._post:
            return
        if (
            self._cast_len >= _CAST_BATCH_BYTES
            or len(self._post) >= _POST_MAX
            or self._post_bytes >= _POST_BYTES
        ):
            self._flush_cast()
        elif self._cast_timer is None:
            self._cast_timer = asyncio.get_running_loop().call_later(_CAST_BATCH, self._flush_cast)

    def _flush_cast(self) -> None:
        if self._cast_timer is not None:
            self._cast_timer.cancel()
            self._cast_timer = None
        self._run_post()
        if self.rec is None or not self._cast_buf:
            return
        text, self._cast_buf, self._cast_len = "".join(self._cast_buf), [], 0
        try:
            self.rec.output_masked(text.encode())
        except RecordingError as exc:
            self._recording_failed(str(exc))

    def _recording_failed(self, message: str, *, at_start: bool = False) -> None:
        """Apply ``recording.on_failure`` once: the recording is aborted (left unsealed,
        verifiable up to its last complete line) and replaced by a DiscardWriter;
        ``terminate`` ends the connection with a FATAL error naming the cause,
        ``continue`` sends a notice and goes on unrecorded. Also the writer pool's
        ``on_error`` hook, called on the loop."""
        if self._rec_failed:
            return
        self._rec_failed = True
        rec = self.rec
        if rec is not None and not isinstance(rec.writer, DiscardWriter):
            rec.writer.abort()
            rec.writer = DiscardWriter.replacing(rec.writer, message)
        terminate = self.ctx.cfg.recording.on_failure == "terminate"
        action = ("refused" if at_start else "terminated") if terminate else "continued"
        self.ctx.recording_failed(
            session_id=self.id,
            actor=self.ident.name if self.ident else None,
            origin=self.peer,
            resource=f"postgres:{self.target.name if self.target else ''}",
            error=message,
            action=action,
        )
        # The client learns the cause, not the relay's file paths.
        why = message.rsplit(": ", 1)[-1]
        if not terminate:
            if not at_start:  # at start, the notice goes with the startup answer
                with contextlib.suppress(Exception):
                    self.cw.write(
                        p.notice_response(
                            f"castgate: this session cannot be recorded ({why}); it "
                            "continues unrecorded"
                        )
                    )
            return
        self.status = "recording failed"
        text = "connection refused" if at_start else "session terminated"
        with contextlib.suppress(Exception):
            self.cw.write(
                p.error_response(
                    "58030",
                    f"castgate: this session cannot be recorded ({why}); {text}",
                    severity="FATAL",
                )
            )
            self.cw.close()
        if self.up is not None:
            with contextlib.suppress(Exception):
                self.up.writer.close()

    def _writer_failed(self, message: str) -> None:
        """``on_error`` of the cast writer: runs in a writer thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to end
            self._loop.call_soon_threadsafe(self._recording_failed, message)

    def _marker(self, text: str) -> None:
        # After the transcript of everything that came before it.
        self._flush_cast()
        if self.rec is not None:
            with contextlib.suppress(RecordingError):
                self.rec.marker(text)

    # -- the relay loops ----------------------------------------------------------------

    async def _relay(self) -> None:
        assert self.up is not None
        # The target's side is a protocol whose data_received handles each read at once:
        # a reader task woken per read (asyncio streams) cost a 1-client round trip
        # about a fifth of its time. Bytes the stream had already buffered go first.
        reader = self.up.reader
        buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
        early = bytes(buffered)
        buffered.clear()
        pipe = self._pipe = _UpstreamPipe(self)
        self.up.writer.transport.set_protocol(pipe)
        pipe.connection_made(self.up.writer.transport)
        if early:
            pipe.data_received(early)
        # The client's side likewise; statements that must wait go to a task.
        creader = self.cr
        cbuffered: bytearray = creader._buffer  # type: ignore[attr-defined]
        cearly = self._early + bytes(cbuffered)
        cbuffered.clear()
        self._early = b""
        cpipe = self._cpipe = _ClientPipe(self)
        self.cw.transport.set_protocol(cpipe)
        cpipe.connection_made(self.cw.transport)
        if cearly:
            cpipe.data_received(cearly)
        try:
            waits: list[asyncio.Future[Any]] = [cpipe.done, pipe.done]
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if pipe.done in done:
                failure, lost = pipe.done.result()
                if failure is not None:
                    raise failure
                # The server side ended first, and not because the relay closed it.
                if cpipe.done not in done and self.status in ("closed", "target closed"):
                    if self.status == "closed":
                        self.status = "target closed"
                    if lost is None or isinstance(lost, OSError):
                        await self._target_lost(lost)
                        return
            if cpipe.done in done:
                error = cpipe.done.result()
                if error is not None:
                    raise error
        finally:
            pipe.detached = cpipe.detached = True
            slow = self._slow
            if slow is not None:
                slow.cancel()
                with contextlib.suppress(BaseException):
                    await slow

    async def _target_lost(self, exc: BaseException | None) -> None:
        """The target ended the connection (backend terminated, server stopped or
        killed, connection reset): log the statements it left unanswered, tell the client
        with a FATAL naming the target (unless the target's own FATAL, rewritten to name
        it, already did), and write an audit event. ``_close`` then seals the cast."""
        assert self.ident is not None and self.target is not None
        name = self.target.name
        self.status = "target lost"
        pending = list(self.pending)
        if self._target_fatal is not None and pending and isinstance(pending[0], _Query):
            pending = pending[1:]  # the FATAL logged it as an error already
        for req in pending:
            if isinstance(req, _Execute | _FunctionCall) or (isinstance(req, _Query) and req.log):
                self._log(req.text, "allow", None, "target lost")
        self.pending.clear()
        reason = self._target_fatal
        if reason is None:
            reason = f"castgate: target {name} closed the connection" + (f" ({exc})" if exc else "")
            if self.transcript is not None:
                self._write_cast(self.transcript.error("FATAL", reason, None))
            with contextlib.suppress(OSError, ConnectionError):
                await self._send(p.error_response("08006", reason, severity="FATAL"))
        self._flush_cast()
        self.ctx.emit(
            "target.lost",
            self.ident.name,
            "failure",
            self.peer,
            f"postgres:{name}",
            {"reason": reason},
            session_id=self.id,
        )

    def _decide(self, text: str) -> Decision:
        """The decision on a SQL text: each of its statements by the rules (the
        strictest applies), or the relay's own refusal of what it cannot check."""
        scoped = self._scoped
        if scoped is None:
            assert self.ident is not None and self.target is not None
            # This identity's rules on this target, and the keywords they need, once.
            scoped = self._scoped = self.ctx.policy.scoped(self.target.name, self.ident.groups)
            self._gate = SqlGate(scoped.sql_nodes, scoped.enforcing)
        assert self._gate is not None
        chk = self._gate.check(text)
        if chk.problem is not None:
            return self._problem(chk)
        each = chk.nodes
        if not each:
            return scoped.decide(text, None)
        if len(each) == 1:
            return scoped.decide(text, each[0])
        return _strictest([scoped.decide(text, nodes) for nodes in each])

    def _problem(self, chk: Check) -> Decision:
        """The relay's decision on a text it cannot check (the reason is masked: a parse
        error quotes the statement)."""
        assert self.target is not None
        reason = self.ctx.masker.mask(chk.reason or "")
        if chk.problem == TOO_LONG:
            return Decision("block", TOO_LONG_RULE)
        if chk.problem == UNPARSED:
            action = self.target.unparsed
            return Decision(
                action,
                UNPARSED_RULES[action],
                f"the relay cannot parse this statement ({reason}), so no rule can be checked",
            )
        assert chk.problem == PINNED
        return Decision("block", PINNED_RULE, reason)

    async def _enforce(self, decision: Decision, masked: str) -> tuple[bool, str]:
        """Carry out a block or approve decision: (allowed, message if refused)."""
        assert self.ident is not None and self.target is not None and decision.rule is not None
        rule = decision.rule
        if decision.action == "block":
            self._marker(f"blocked: {rule.name}")
            self._log(masked, "block", rule.name, "blocked")
            self.ctx.emit(
                "command.blocked",
                self.ident.name,
                "failure",
                self.peer,
                f"postgres:{self.target.name}",
                {"rule": rule.name, "command": masked, "reason": decision.reason},
                session_id=self.id,
            )
            why = f": {decision.reason}" if decision.reason else ""
            return False, f"castgate: blocked by rule {rule.name}{why}"

        asked: list[int] = []

        def requested(approval_id: int) -> None:
            asked.append(approval_id)
            self._marker(f"approval #{approval_id} requested (rule {rule.name})")
            why = f": {decision.reason}" if decision.reason else ""
            self.cw.write(
                p.notice_response(
                    f"castgate: approval #{approval_id} required (rule {rule.name}{why}), waiting"
                )
            )

        try:
            outcome = await self.ctx.await_approval(
                session_id=self.id,
                identity=self.ident.name,
                target=self.target.name,
                command=masked,
                rule=rule,
                on_requested=requested,
            )
        except StoreError as exc:
            # Fail closed: without its store an approval can be neither asked nor awaited.
            approval_id = asked[0] if asked else None
            self._marker(f"refused: approval store unavailable (rule {rule.name})")
            self._log(masked, "approve", rule.name, "store unavailable")
            self.ctx.emit(
                "command.approval",
                self.ident.name,
                "failure",
                self.peer,
                f"postgres:{self.target.name}",
                {
                    "rule": rule.name,
                    "approval": approval_id,
                    "status": "store unavailable",
                    "error": str(exc),
                },
                session_id=self.id,
            )
            return False, f"castgate: approval store unavailable; refused (rule {rule.name})"
        self._marker(outcome.describe())
        self.ctx.emit(
            "command.approval",
            self.ident.name,
            "success" if outcome.approved else "failure",
            self.peer,
            f"postgres:{self.target.name}",
            {"rule": rule.name, "approval": outcome.approval_id, "status": outcome.status},
            session_id=self.id,
        )
        if outcome.approved:
            self.cw.write(p.notice_response(f"castgate: {outcome.describe()}"))
            return True, ""
        self._log(masked, "approve", rule.name, outcome.status)
        return False, f"castgate: {outcome.describe()}"

    def _sentinel(self, message: str) -> str:
        """A statement the server rejects during analysis, leaving its transaction and
        pipeline state exactly as a real error would; its error is rewritten."""
        nonce = secrets.token_hex(8)
        self.sentinels[nonce] = message
        return f'SELECT * FROM pg_catalog."castgate-refused-{nonce}"'  # noqa: S608 - hex nonce

    async def _client_messages(self, msgs: Iterable[p.Message]) -> bool:
        """Client messages the slow way: a statement a rule holds or blocks is enforced
        here (it may wait for an approval), a FunctionCall is looked up and decided.
        False once the client said Terminate."""
        out = bytearray()
        # Transcript lines of the statements forwarded by this batch: written after
        # the forward (see ``_after_forward``).
        said: list[str | Bound] = []
        handlers = self._slow_handlers
        for msg in msgs:
            handler = handlers.get(msg.type)
            if handler is not None:
                if not await handler(msg, out, said):
                    return False
                continue
            # Everything else as on the fast path.
            extra = self._client_fast(msg, said)
            assert extra is not None  # (only the handlers' types go slow)
            out += extra
            out += msg.raw()
        self._send_out(out, said)
        await self._up_drain()
        return True

    def _send_out(self, out: bytearray, said: list[str | Bound]) -> None:
        """Forward what a slow batch holds so far (before it waits for something)."""
        assert self.up is not None
        if out:
            self.up.writer.write(bytes(out))
            out.clear()
        self._after_forward(said)

    async def _refuse_or_run(
        self, decision: Decision, kept: str, out: bytearray, said: list[str | Bound]
    ) -> tuple[bool, str]:
        """Enforce a decision that is not a plain allow, after forwarding what came
        before it: (allowed, why not)."""
        self._send_out(out, said)
        return await self._enforce(decision, kept)

    async def _slow_query(self, msg: p.Message, out: bytearray, said: list[str | Bound]) -> bool:
        text = p.parse_query(msg.body)
        kept = self._kept(text)
        self.statements += 1
        decision = await self._settled_decision(text, _unsettled(msg.body), out, said)
        if decision.action != "allow":
            ok, why = await self._refuse_or_run(decision, kept, out, said)
            if not ok:
                self.pending.append(_Query(kept, time.monotonic(), log=False))
                out += p.query(self._sentinel(why))
                if self.transcript is not None:
                    self._write_cast(self.transcript.query(kept))
                return True
        self.pending.append(_Query(kept, time.monotonic(), raw=text))
        said.append(kept)
        out += msg.raw()
        return True

    async def _slow_parse(self, msg: p.Message, out: bytearray, said: list[str | Bound]) -> bool:
        parse = p.parse_parse(msg.body)
        kept = self._kept(parse.query)
        self.stmt_text[parse.name] = kept
        self.stmt_types[parse.name] = parse.param_types
        if self._copy_tables:
            self.stmt_raw[parse.name] = parse.query
        unsettled = _unsettled(_query_bytes(msg.body))
        decision = await self._settled_decision(parse.query, unsettled, out, said)
        self.pending.append(_Parse(parse.name))
        if decision.action != "allow":
            ok, why = await self._refuse_or_run(decision, kept, out, said)
            if not ok:
                out += p.parse_msg(parse.name, self._sentinel(why), parse.param_types)
                return True
        out += msg.raw()
        return True

    async def _slow_terminate(
        self, msg: p.Message, out: bytearray, said: list[str | Bound]
    ) -> bool:
        out += msg.raw()
        self._send_out(out, said)
        await self._up_drain()
        return False

    async def _settled_decision(
        self, text: str, unsettled: bool, out: bytearray, said: list[str | Bound]
    ) -> Decision:
        """Decide ``text`` once its meaning is certain. A text whose multibyte
        characters could take in an ASCII byte under another client_encoding (SJIS,
        GBK, ...), or with a backslash before a quote (standard_conforming_strings off),
        splits into other tokens there (``sql.reads_the_same``); a statement still
        running on the target could have changed either (a function calling set_config:
        no parser sees that), and the target reports it only with its next
        ReadyForQuery. So such a text waits until the target has answered everything
        before it (the ParameterStatus check ends the session if a pinned setting
        changed), or, in a pipeline with no ReadyForQuery coming before it, is refused.
        ASCII without a backslash before a quote, and accented Latin text, read the same
        under every encoding PostgreSQL offers a client."""
        if unsettled and any(isinstance(r, _RUNS) for r in self.pending):
            self._send_out(out, said)
            if not await self._settle():
                return Decision(
                    "block",
                    PINNED_RULE,
                    "a statement with non-ASCII characters or backslashes cannot be checked "
                    "behind others in one pipeline (a setting could change before it is "
                    "read): send a Sync before it",
                )
        return self._decide(text)

    async def _settle(self) -> bool:
        """Wait until the target has answered every request sent; False when no
        ReadyForQuery is coming for the last one (the client has not sent its Sync)."""
        pending = self.pending
        if not pending:
            return True
        if not isinstance(pending[-1], _READY):
            return False
        self._idle = self._loop.create_future()
        try:
            await self._idle
        finally:
            self._idle = None
        return True

    def _kept(self, text: str) -> str:
        """What the transcript, the query log and approvals keep of a statement: masked,
        and past ``recording.max_statement_bytes`` a prefix with the statement's length
        and the SHA-256 of its masked text (of the masked text: a digest of a known
        statement around a masked card number would give the number away)."""
        masked = self.ctx.masker.mask(text)
        limit = self._stmt_limit
        if len(masked) * 4 <= limit:  # (a character is at most four bytes)
            return masked
        raw = masked.encode("utf-8", "surrogateescape")
        if len(raw) <= limit:
            return masked
        digest = hashlib.sha256(raw).hexdigest()
        head = raw[:limit].decode("utf-8", "ignore")
        return f"{head}\n... [castgate: statement of {len(raw)} bytes truncated; sha256 {digest}]"

    async def _slow_function_call(
        self, msg: p.Message, out: bytearray, said: list[str | Bound]
    ) -> bool:
        """A FunctionCall: refused unless the target sets ``allow_function_call``; there
        it is decided as ``SELECT schema.name(args)`` of the function its OID names."""
        assert self.target is not None
        call = p.parse_function_call(msg.body)
        self.statements += 1
        self._send_out(out, said)
        info = None
        if not self.target.allow_function_call:
            text = f"-- FunctionCall of function OID {call.oid} ({len(call.args)} arguments)"
            decision = Decision(
                "block",
                FUNCTION_CALL_RULE,
                "the FunctionCall protocol message is not allowed on this target "
                "(allow_function_call); call the function in SQL",
            )
        else:
            info = await self._function_info(call.oid)
            if info is None:
                text = f"-- FunctionCall of function OID {call.oid}"
                decision = Decision("block", FUNCTION_CALL_RULE, f"no function has OID {call.oid}")
            else:
                text = call_text(info[0], info[1], call)
                decision = self._decide(text)
        kept = self._kept(text)
        if decision.action != "allow":
            ok, why = await self._enforce(decision, kept)
            if not ok:
                self.pending.append(_Query(kept, time.monotonic(), log=False))
                out += p.query(self._sentinel(why))
                if self.transcript is not None:
                    self._write_cast(self.transcript.query(kept))
                return True
        assert info is not None
        self.pending.append(
            _FunctionCall(kept, info[1], info[2], call.result_format, time.monotonic())
        )
        said.append(kept)
        out += msg.raw()
        return True

    async def _function_info(self, oid: int) -> tuple[str, str, int] | None:
        """(schema, name, return type OID) of a function, looked up on a connection of
        its own (the session's may be inside a failed transaction or a pipeline)."""
        if oid in self._functions:
            return self._functions[oid]
        assert self.target is not None and self.ident is not None
        info = None
        try:
            up = await connect(
                self.target,
                {"application_name": f"castgate:{self.ident.name} lookup", **PINNED_VALUES},
            )
            try:
                sql = (
                    "SELECT n.nspname, p.proname, p.prorettype FROM pg_catalog.pg_proc p "  # noqa: S608 - an integer
                    "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
                    f"WHERE p.oid = {int(oid)}"
                )
                rows = await simple_query(up, sql)
            finally:
                up.writer.close()
            if rows and all(v is not None for v in rows[0]):
                schema, name, rettype = (v.decode() for v in rows[0] if v is not None)
                info = (schema, name, int(rettype))
        except (UpstreamError, OSError, ValueError):
            info = None
        if len(self._functions) < 1024:
            self._functions[oid] = info
        return info

    def _client_data(self, data: bytes) -> None:
        """One read from the client, handled where it arrives (``_ClientPipe``). The
        first message that needs the slow path (a statement no rule simply allows,
        Terminate) goes to ``_client_slow`` with everything after it, and reading
        pauses until that is done."""
        assert self.up is not None
        dec = self._cdec
        # As on the target's side: the read itself is forwarded while every message in
        # it passes unchanged (``same`` bytes so far), ``out`` made at the first change.
        out: bytearray | None = bytearray() if dec.buffered() else None
        same = 0
        msgs = dec.feed(data)
        said: list[str | Bound] = []
        fast = self._client_fast
        for msg in msgs:
            extra = fast(msg, said)
            if extra is None:
                self._forward(data, same, out)
                self._after_forward(said)
                self._start_slow([msg, *msgs])
                return
            if extra and out is None:
                out = bytearray(data[:same])
            if out is None:
                same += 5 + len(msg.body)
            else:
                out += extra
                out += msg.raw()
        self._forward(data, same, out)
        self._after_forward(said)
        pipe = self._pipe
        if pipe is not None and pipe.write_paused is not None and self._cpipe is not None:
            # The target's buffer is full: stop reading the client until it drains.
            self._cpipe.hold_until(asyncio.shield(pipe.write_paused))

    def _forward(self, data: bytes, same: int, out: bytearray | None) -> None:
        assert self.up is not None
        _write_passed(self.up.writer, data, same, out)

    def _client_fast(self, msg: p.Message, said: list[str | Bound]) -> bytes | None:
        """One client message on the fast path: what must go to the target before it
        (usually nothing), or None (and nothing changed) when it needs the slow path.
        The message itself is the caller's to forward."""
        t = msg.type
        if t == b"Q":
            text = p.parse_query(msg.body)
            body = msg.body
            # (``_unsettled``'s first test inline: this runs for every statement.)
            unsettled = (not body.isascii() or b"\\'" in body) and _unsettled(body)
            if (unsettled and self._runs_pending()) or self._decide(text).action != "allow":
                return None
            kept = self._kept(text)
            self.statements += 1
            self.pending.append(_Query(kept, time.monotonic(), raw=text))
            said.append(kept)
        elif t == b"P":
            parse = p.parse_parse(msg.body)
            query = parse.query
            body = msg.body
            unsettled = (not body.isascii() or b"\\'" in body) and _unsettled(_query_bytes(body))
            if (unsettled and self._runs_pending()) or self._decide(query).action != "allow":
                return None
            self.stmt_text[parse.name] = self._kept(query)
            self.stmt_types[parse.name] = parse.param_types
            if self._copy_tables:
                self.stmt_raw[parse.name] = query
            self.pending.append(_Parse(parse.name))
        elif t == b"B":
            bind = p.parse_bind(msg.body)
            self.portal_stmt[bind.portal] = (bind.statement, bind.result_formats)
            self.portal_bind[bind.portal] = msg.body
            self.described.discard(bind.portal)
            self.pending.append(_Bind())
        elif t == b"D":
            kind, name = p.parse_describe(msg.body)
            if kind == "P":
                self.described.add(name)
            self.pending.append(_Describe(kind, name, hidden=False))
        elif t == b"E":
            portal, _max = p.parse_execute(msg.body)
            extra = b""
            if portal not in self.described:
                # The relay must know the columns to mask them: ask, and swallow the
                # answer (never synthesise one the client did not ask for).
                extra = p.describe("P", portal)
                self.pending.append(_Describe("P", portal, hidden=True))
                self.described.add(portal)
            stmt, fmts = self.portal_stmt.get(portal, ("", ()))
            text = self.stmt_text.get(stmt, "")
            self.statements += 1
            self.pending.append(_Execute(portal, stmt, fmts, text, time.monotonic()))
            params = self.portal_bind.get(portal)
            said.append(
                text if params is None else Bound(text, params, self.stmt_types.get(stmt, ()))
            )
            return extra
        elif t == b"C":
            self.pending.append(_Close())
        elif t == b"S":
            self.pending.append(_Sync())
        elif t in b"XF":
            return None
        elif t not in _FRONTEND:
            # What the relay does not know it cannot check: the session ends.
            raise p.ProtocolError(f"unexpected message type {t!r}")
        # Flush, CopyData/Done/Fail (input goes to the target as typed): forwarded
        # unchanged.
        return b""

    def _runs_pending(self) -> bool:
        return any(isinstance(r, _RUNS) for r in self.pending)

    def _start_slow(self, msgs: list[p.Message]) -> None:
        cpipe = self._cpipe
        assert cpipe is not None
        cpipe.pause()
        self._slow = asyncio.ensure_future(self._client_slow(msgs))

    async def _client_slow(self, msgs: list[p.Message]) -> None:
        cpipe = self._cpipe
        assert cpipe is not None
        try:
            more = await self._client_messages(msgs)
            while more and cpipe.backlog:
                more = await self._client_messages(list(self._cdec.feed(cpipe.backlog.popleft())))
        except Exception as exc:
            cpipe.finish(exc)
            return
        finally:
            self._slow = None
        if not more:
            cpipe.finish(None)
            return
        cpipe.resume()

    def _columns_for(self, fields: list[p.Field]) -> _Columns:
        keys = self.mask_keys
        masked = (
            [(f.table_oid, f.attnum) in keys for f in fields] if keys else [False] * len(fields)
        )
        formats = tuple(f.format for f in fields)
        return _Columns(
            rows=RowMasker(
                self.ctx.masker,
                masked,
                formats,
                [f.type_oid for f in fields],
                full=self.ctx.masker.policy.style == "full",
            ),
            names=tuple(f.name for f in fields),
            formats=formats,
        )

    def _log(
        self,
        text: str,
        action: str,
        rule: str | None,
        status: str,
        rows: int | None = None,
        duration: float | None = None,
    ) -> None:
        # A tuple now, the store's row in the query log's thread.
        self._qlog.add((self.id, time.time(), text, action, rule, status, rows, duration))

    def _rewrite_error(self, body: bytes) -> tuple[bytes, str, str | None]:
        """Mask an ErrorResponse/NoticeResponse, every field of it (the column, table,
        constraint, schema, data type, hint, context and internal query name or quote
        the data as much as message and detail do); a sentinel's error becomes ours."""
        fields = p.parse_fields(body)
        msg = next((v for c, v in fields if c == "M"), "")
        for nonce, text in list(self.sentinels.items()):
            if nonce in msg:
                del self.sentinels[nonce]
                new = [("S", "ERROR"), ("V", "ERROR"), ("C", "42501"), ("M", text)]
                return p.fields_body(new), text, None
        mask = self.ctx.masker.mask
        new_fields = [(c, mask(v)) for c, v in fields]
        severity = dict(fields).get("V") or dict(fields).get("S")
        if severity in ("FATAL", "PANIC") and self.target is not None:
            # The target is ending the connection: the client learns which target did.
            new_fields = [
                (c, f"target {self.target.name}: {v}" if c == "M" else v) for c, v in new_fields
            ]
            self._target_fatal = next((v for c, v in new_fields if c == "M"), "")
        detail = next((v for c, v in new_fields if c == "D"), None)
        message = next((v for c, v in new_fields if c == "M"), "")
        return p.fields_body(new_fields), message, detail

    def _server_data(self, data: bytes) -> None:
        """One read from the target, handled where it arrives (``_UpstreamPipe``): the
        answers masked and sent on, the transcript and the log queued."""
        assert self.up is not None
        dec = self._sdec
        pending = self.pending
        described = self._described
        completes = self._completes
        handlers = self._server_handlers
        # Most reads go out as they came (nothing to mask, nothing to hide): then the
        # read itself is sent, without re-framing its messages. ``out`` is made at the
        # first change; until then ``same`` counts the bytes passed unchanged.
        out: bytearray | None = bytearray() if dec.buffered() else None
        same = 0
        # Transcript work waits until the client has its answer (it is for the
        # recording, not for the client), in the order the messages came.
        todo: list[tuple[Any, ...]] | None = [] if self.transcript is not None else None
        for msg in dec.feed_runs(data):
            if type(msg) is RowRun:
                head = pending[0] if pending else None
                if isinstance(head, _Execute):
                    head.rows += msg.nrows
                    if self.columns is None:
                        self.columns = self._execute_columns(head)
                        if todo is not None and self.columns is not None:
                            # Its RowDescription went to Describe: the table starts here.
                            todo.append((1, self.columns))
                elif isinstance(head, _Query):
                    head.rows += msg.nrows
                cols = self.columns
                rows = (cols.rows if cols is not None else self._plain_rows).mask_run(
                    msg, self.rec.input_counts if self.rec else None
                )
                if todo is not None:
                    todo.append((0, rows, msg.nrows))
                    self._post_bytes += len(rows)
                if out is not None:
                    out += rows
                elif rows is msg.raw:
                    same += len(rows)
                else:
                    out = bytearray(data[:same])
                    out += rows
                continue
            assert type(msg) is p.Message  # (for mypy: the only other kind)
            t = msg.type
            instead: bytes | None = None
            if t == b"T":
                seen = described.get(msg.body)
                if seen is None:
                    seen = self._row_description(msg.body)
                fields, cols, masked = seen
                head = pending[0] if pending else None
                if isinstance(head, _Describe):
                    pending.popleft()
                    if head.kind == "S":
                        self.stmt_desc[head.name] = fields
                    else:
                        self.portal_desc[head.name] = fields
                    if head.hidden:
                        instead = b""
                else:
                    if cols is None:
                        cols = self._columns_for(fields)
                        if len(described) < 256:
                            described[msg.body] = (fields, cols, masked)
                    self.columns = cols
                    if todo is not None:
                        todo.append((1, cols))
                if instead is None and masked is not None:
                    instead = p.message(b"T", masked)
            elif t == b"C":
                done = completes.get(msg.body)
                if done is None:
                    done = self._command_complete(msg.body)
                    if len(completes) < 256:
                        completes[msg.body] = done
                tag, count, masked = done
                head = pending[0] if pending else None
                elapsed = 0.0
                if isinstance(head, _Execute):
                    pending.popleft()
                    elapsed = (time.monotonic() - head.started) * 1000
                    self._log(head.text, "allow", None, tag, count, elapsed)
                elif isinstance(head, _Query):
                    elapsed = (time.monotonic() - head.started) * 1000
                    if head.log:
                        self._log(head.text, "allow", None, tag, count, elapsed)
                if todo is not None:
                    todo.append((2, tag, elapsed))
                self.columns = None
                if masked is not None:
                    instead = p.message(b"C", masked)
            elif t == b"Z":
                head = pending[0] if pending else None
                if isinstance(head, _READY):
                    pending.popleft()
                self.up.status = msg.body[:1]
                self.columns = None
                self._copy = None
                idle = self._idle
                if idle is not None and not pending and not idle.done():
                    idle.set_result(None)
            elif t in (b"1", b"2", b"3"):
                head = pending[0] if pending else None
                if isinstance(head, _Parse):
                    self.stmt_desc.pop(head.name, None)
                if head is not None and not isinstance(head, _READY):
                    pending.popleft()
            else:
                handler = handlers.get(t)
                if handler is not None:
                    instead = handler(msg, todo)
            if instead is None:
                # Passed on unchanged.
                if out is None:
                    same += 5 + len(msg.body)
                else:
                    out += msg.raw()
            else:
                if out is None:
                    out = bytearray(data[:same])
                out += instead
        _write_passed(self.cw, data, same, out)
        if todo:
            self._post.extend(todo)
            self._cast_soon()
        pipe = self._pipe
        if pipe is not None:
            cpipe = self._cpipe
            if cpipe is not None and cpipe.write_paused is not None:
                # A slow client: stop reading the target until it has caught up.
                pipe.hold_until(asyncio.shield(cpipe.write_paused))

    # -- target messages: masking and bookkeeping (``_server_handlers``) ---------------

    def _row_description(self, body: bytes) -> tuple[list[p.Field], _Columns | None, bytes | None]:
        """Fields of a RowDescription with their names masked (a column can be named
        after a card number: ``SELECT 1 AS "4111..."``), and the masked body to send
        if any name changed."""
        mask = self.ctx.masker.mask_bytes
        if mask(body) is body:  # (no name can hold a match: the common case)
            return p.parse_row_description(body), None, None
        masked = p.map_row_description_names(body, mask)
        if masked is body:
            return p.parse_row_description(body), None, None
        return p.parse_row_description(masked), None, masked

    def _command_complete(self, body: bytes) -> tuple[str, int | None, bytes | None]:
        masked = self.ctx.masker.mask_bytes(body)
        tag, count = p.parse_command_complete(masked)
        return tag, count, None if masked is body else masked

    def _on_error(self, msg: p.Message, todo: list[tuple[Any, ...]] | None) -> bytes | None:
        pending = self.pending
        body, message, detail = self._rewrite_error(msg.body)
        if msg.type == b"E":
            self._copy_plan = None
            head = pending[0] if pending else None
            if isinstance(head, _Query):
                if head.log:
                    self._log(head.text, "allow", None, "error")
            elif isinstance(head, _FunctionCall):
                self._log(head.text, "allow", None, "error")
            elif head is not None and not isinstance(head, _Sync):
                # Extended protocol: the server skips to the next Sync. An Execute it
                # skips failed too (a Bind's error, say): logged.
                while pending and not isinstance(pending[0], _Sync):
                    skipped = pending.popleft()
                    if isinstance(skipped, _Execute):
                        self._log(skipped.text, "allow", None, "error")
            self.columns = None
        if todo is not None:
            todo.append((3, body, message, detail))
        return p.message(msg.type, body)

    def _on_parameter_description(
        self, msg: p.Message, todo: list[tuple[Any, ...]] | None
    ) -> bytes | None:
        head = self.pending[0] if self.pending else None
        if isinstance(head, _Describe) and head.kind == "S":
            # The parameters' types: the transcript draws binary parameters by them.
            with contextlib.suppress(ValueError, struct.error):
                self.stmt_types[head.name] = parameter_types(msg.body)
        if isinstance(head, _Describe) and head.hidden:
            return b""
        return None

    def _on_no_data(self, msg: p.Message, todo: list[tuple[Any, ...]] | None) -> bytes | None:
        pending = self.pending
        head = pending[0] if pending else None
        if isinstance(head, _Describe):
            pending.popleft()
            (self.stmt_desc if head.kind == "S" else self.portal_desc)[head.name] = None
            if head.hidden:
                return b""
        return None

    def _on_portal_end(self, msg: p.Message, todo: list[tuple[Any, ...]] | None) -> bytes | None:
        pending = self.pending
        head = pending[0] if pending else None
        if isinstance(head, _Execute):
            pending.popleft()
            self._log(
                head.text,
                "allow",
                None,
                "suspended" if msg.type == b"s" else "empty",
                head.rows,
            )
            if todo is not None:
                # The rows so far are drawn (a client fetching in batches).
                todo.append((2, "", (time.monotonic() - head.started) * 1000))
        self.columns = None
        return None

    def _on_copy_data(self, msg: p.Message, todo: list[tuple[Any, ...]] | None) -> bytes | None:
        if self._copy is not None:
            # Binary COPY: masked by the fields' layouts (a row may span messages).
            try:
                binary = self._copy.feed(msg.body, self.rec.input_counts if self.rec else None)
            except Malformed as exc:
                raise p.ProtocolError(f"malformed binary COPY data: {exc}") from None
            except Unmaskable as exc:
                raise SessionEnd(
                    "0A000",
                    f"castgate: {exc} may hold a card number the relay cannot mask in the "
                    "binary format; the session ends (COPY in text or CSV format)",
                    "refused binary copy",
                    {"reason": "binary COPY field that may hold a card number"},
                ) from None
            if binary is msg.body:
                return None
            return p.message(b"d", binary) if binary else b""
        # COPY TO STDOUT rows: mask_columns fields, then by content like any output.
        body = msg.body
        plan = self._copy_plan
        if plan is not None:
            body = plan.mask_row(body, self._plain_rows.mask_value)
        masked = self.ctx.masker.mask_bytes(body)
        return None if masked == msg.body else p.message(b"d", masked)

    def _on_copy_out(self, msg: p.Message, todo: list[tuple[Any, ...]] | None) -> bytes | None:
        """CopyOutResponse: which fields of the rows to come are in mask_columns; a
        binary COPY is masked by its fields' layouts."""
        self._copy_plan = None
        self._copy = CopyBinaryMasker(self.ctx.masker) if msg.body[:1] == b"\x01" else None
        if not self._copy_tables:
            return None
        head = self.pending[0] if self.pending else None
        copy: CopyOut | None = None
        if isinstance(head, _Query):
            found = copies_out(head.raw)
            if found is not None and head.copies < len(found):
                copy = found[head.copies]
            head.copies += 1
        elif isinstance(head, _Execute):
            found = copies_out(self.stmt_raw.get(head.statement, ""))
            copy = found[0] if found else None
        plan = copymask.plan(copy, self._copy_tables)
        if plan is not None and msg.body[:1] != b"\0":
            # Binary COPY: fields cannot be found without the types; nothing of it goes.
            raise SessionEnd(
                "0A000",
                "castgate: a binary COPY of a table with mask_columns cannot be masked; "
                "the session ends (COPY in text or CSV format)",
                "refused binary copy",
                {"reason": "binary COPY of mask_columns"},
            )
        self._copy_plan = plan
        return None

    def _on_copy_done(self, msg: p.Message, todo: list[tuple[Any, ...]] | None) -> bytes | None:
        self._copy_plan = None
        copy, self._copy = self._copy, None
        rest = copy.finish() if copy is not None else b""
        return p.message(b"d", rest) + msg.raw() if rest else None

    def _on_notification(self, msg: p.Message, todo: list[tuple[Any, ...]] | None) -> bytes | None:
        """NOTIFY: the channel and the payload masked (the process id is the target's)."""
        mask = self.ctx.masker.mask_bytes
        if mask(msg.body) is msg.body:
            return None
        pid, channel, payload = p.parse_notification(msg.body)
        return p.notification(pid, mask(channel), mask(payload))

    def _on_parameter_status(
        self, msg: p.Message, todo: list[tuple[Any, ...]] | None
    ) -> bytes | None:
        """A setting the target reports: masked (``set_config('application_name', ...)``
        sends back whatever it was given), and a pinned one that changed ends the
        session (nothing the relay checks after it would mean what the target reads)."""
        raw_name, raw_value = p.parse_parameter_status(msg.body)
        name = raw_name.decode("utf-8", "replace")
        mask = self.ctx.masker.mask_bytes
        if name in PINNED_SETTINGS:
            value = raw_value.decode("utf-8", "replace")
            if not setting_ok(name, value):
                shown = self.ctx.masker.mask(value)
                raise SessionEnd(
                    "22023",
                    f"castgate: {name} changed to {shown!r} on target "
                    f"{self.target.name if self.target else ''}; the relay reads statements "
                    f"only with {name} {PINNED_VALUES[name]}, so the session ends",
                    "pinned setting changed",
                    {"setting": name, "value": shown},
                )
        if mask(msg.body) is msg.body:
            return None
        return p.parameter_status_bytes(mask(raw_name), mask(raw_value))

    def _on_function_result(
        self, msg: p.Message, todo: list[tuple[Any, ...]] | None
    ) -> bytes | None:
        """FunctionCallResponse: the value masked by its type and format, logged and
        drawn as a one-row result."""
        head = self.pending[0] if self.pending else None
        if not isinstance(head, _FunctionCall):
            raise p.ProtocolError("FunctionCallResponse without a FunctionCall")
        value = p.parse_function_result(msg.body)
        masked = self._mask_value(value, head.rettype, head.result_format)
        elapsed = (time.monotonic() - head.started) * 1000
        self._log(head.text, "allow", None, "function call", 1, elapsed)
        if todo is not None:
            cols = self._columns_for([p.Field(head.name, 0, 0, head.rettype, head.result_format)])
            row = p.data_row([masked])
            todo.append((1, cols))
            todo.append((0, row, 1))
            todo.append((2, "", elapsed))
            self._post_bytes += len(row)
        return None if masked is value else p.function_result(masked)

    def _mask_value(self, value: bytes | None, type_oid: int, fmt: int) -> bytes | None:
        """One value of a known type and format, masked: text (and binary text-like
        types) in place, other binary values decoded by psycopg's loader and NULL when
        their text holds a match, unknown ones scanned as bytes."""
        if value is None:
            return None
        mask = self.ctx.masker.mask_bytes
        if fmt == 0 or type_oid in _TEXT_LIKE:
            masked = mask(value)
            return value if masked == value else masked
        loader = psycopg.adapters.get_loader(type_oid, Format.BINARY)
        if loader is None:
            masked = mask(value)
            return value if masked == value else masked
        try:
            text = str(loader(type_oid).load(value))
        except Exception:  # a value psycopg cannot read is not shown
            return None
        return value if self.ctx.masker.mask(text) == text else None

    async def _up_drain(self) -> None:
        """Wait while the target's socket buffer is over its high-water mark."""
        pipe = self._pipe
        if pipe is not None and pipe.write_paused is not None:
            await asyncio.shield(pipe.write_paused)

    def _after_forward(self, said: list[str | Bound]) -> None:
        """Queue the statements just sent to the target for the transcript, after the
        answers that came before them."""
        if said:
            if self.transcript is not None:
                self._post.extend([(4, text) for text in said])
            said.clear()
        self._cast_soon()

    def _run_post(self) -> None:
        if self._post:
            todo, self._post, self._post_bytes = self._post, [], 0
            self._transcribe(todo)

    def _transcribe(self, todo: list[tuple[Any, ...]]) -> None:
        """Draw statements and answers into the transcript, in the order they came.

        Nothing here is on a client's round trip: items queue as messages pass
        (``_server_data``, ``_after_forward``) and are drawn a batch at a time when the
        cast is written, so the drawing code runs hot for hundreds of statements
        instead of cold between every two reads. Items: (0, rows, count) a run of
        masked DataRows, (1, columns) a RowDescription, (2, tag, ms) CommandComplete,
        (3, body, message, detail) an error or notice, (4, text) a statement sent."""
        tr = self.transcript
        if tr is None or self.rec is None:
            return
        buf = self._cast_buf
        size = 0
        for item in todo:
            kind = item[0]
            if kind == 0:
                tr.add_rows(item[1], item[2])
                continue
            if kind == 1:
                tr.columns(item[1].names, item[1].formats, item[1].rows.type_oids)
                continue
            if kind == 2:
                text = tr.complete(item[1], item[2])
            elif kind == 4:
                text = tr.query(item[1])
            else:
                sev = next((v for c, v in p.parse_fields(item[1]) if c == "S"), "ERROR")
                text = tr.error(sev, item[2], item[3])
            buf.append(text)
            size += len(text)
        self._cast_len += size

    def _execute_columns(self, ex: _Execute) -> _Columns | None:
        # A prepared statement runs again and again: its columns are matched against
        # mask_columns once per description and result formats, not per Execute.
        fields = self.portal_desc.get(ex.portal)
        key: tuple[Any, ...]
        if fields is not None:
            source: list[p.Field] = fields
            key = ("P", ex.portal)
        else:
            desc = self.stmt_desc.get(ex.statement)
            if desc is None:
                return None
            source = desc
            key = ("S", ex.statement, tuple(ex.formats))
        hit = self._exec_cols.get(key)
        if hit is not None and hit[0] is source:
            return hit[1]
        cols = self._columns_for(
            source if fields is not None else p.with_formats(source, ex.formats)
        )
        if len(self._exec_cols) >= 256:
            self._exec_cols.clear()
        self._exec_cols[key] = (source, cols)
        return cols

    async def _close(self) -> None:
        # Live watchers see the end of the transcript too.
        self._flush_cast()
        self.ctx.live.pop(self.id, None)
        self.ctx.hub.close(self.id, self.status)
        if self.cancel_key is not None:
            self.listener.cancels.drop(*self.cancel_key)
        if self.up is not None:
            with contextlib.suppress(Exception):
                self.up.writer.write(p.message(b"X"))
                self.up.writer.close()
        with contextlib.suppress(Exception):
            self.cw.close()
        if self.ident is None or self.target is None:
            return
        await self._qlog.flush()
        self._flush_cast()
        manifest = None
        rec = self.rec
        if rec is not None:
            try:
                rec.close(
                    self.status,
                    {
                        "identity": self.ident.name,
                        "target": self.target.name,
                        "statements": self.statements,
                    },
                )
                manifest = rec.manifest or None  # empty: the recording had failed
                if manifest is not None:
                    self.ctx.track(asyncio.ensure_future(self.ctx.index_cast(rec.writer.path)))
            except RecordingError as exc:
                self._recording_failed(str(exc))
        # After a failure: how far the unsealed cast got, and no manifest.
        await self.ctx.end_session(self.id, rec, status=self.status)
        self.ctx.emit(
            "session.end",
            self.ident.name,
            "success" if self.status == "closed" else "failure",
            self.peer,
            f"postgres:{self.target.name}",
            {"status": self.status, "statements": self.statements},
            session_id=self.id,
        )

    async def close(self, reason: str) -> None:
        """End the session from the relay's side (shutdown)."""
        self.status = reason
        with contextlib.suppress(Exception):
            self.cw.write(p.error_response("57P01", f"castgate: {reason}", severity="FATAL"))
            self.cw.close()
        if self.up is not None:
            with contextlib.suppress(Exception):
                self.up.writer.close()


class PgListener:
    """The PostgreSQL listener of a relay process."""

    def __init__(self, ctx: RelayContext, host: str, tls: ssl.SSLContext | None) -> None:
        self.ctx = ctx
        self.tls = tls
        req = ctx.cfg.listen.postgres_require_tls
        self.require_tls = (not is_loopback(host)) if req is None else req
        self.cancels = CancelMap()
        self.sessions: set[PgSession] = set()
        # One query log for all sessions of this listener (see relay/pg/querylog.py).
        self.qlog = QueryLog(ctx.spool)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio.start_server callback: one client connection."""
        peer = writer.get_extra_info("peername")
        admitted = self.ctx.connections.admit("postgres", str(peer[0]) if peer else "?")
        if isinstance(admitted, str):
            await _refuse_connection(reader, writer, f"castgate: {admitted}")
            return
        try:
            await self._serve(reader, writer)
        finally:
            self.ctx.connections.release(admitted)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = PgSession(self.ctx, self, reader, writer)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)


_NEGOTIATIONS = (80877103, 80877104)  # SSLRequest, GSSENCRequest
_REFUSAL_READ_S = 10.0


async def _refuse_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, why: str
) -> None:
    """Refuse a connection past the limits with a FATAL 53300 the client shows: the
    answer comes where a client reads one, after its startup packet (an SSLRequest or
    GSSENCRequest first is declined), within a short bound."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
        async with asyncio.timeout(_REFUSAL_READ_S):
            for _ in range(3):
                length, code = struct.unpack("!II", await reader.readexactly(8))
                if code in _NEGOTIATIONS and length == 8:
                    writer.write(b"N")
                    continue
                if 8 <= length <= 10_000:
                    await reader.readexactly(length - 8)
                break
    with contextlib.suppress(OSError):
        writer.write(p.error_response("53300", why, severity="FATAL"))
        await writer.drain()
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
