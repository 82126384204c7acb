"""The PostgreSQL wire relay: agents connect with ``dbname=TARGET user=IDENTITY
password=TOKEN``; the relay authenticates the token, checks the target's groups,
connects to the target with the target's own credential, and then moves messages both
ways: every statement through the policy, every result row and error through the
masker, every statement into the query log and the psql-like transcript.

This module is the asyncio glue. Each side of a session is an asyncio protocol from its
connection on (``relay/pg/pipe.py``); start-up runs as steps (``relay/pg/startup.py``);
once relayed, every read goes to the proxy machine (``relay/pg/machine.py``, no I/O)
where it arrives, and what the machine returns is written, logged and transcribed here.
Only a statement that must wait (an approval, a lookup, the target's answers) goes to a
task. The transcript and the query log (relay/pg/querylog.py, shared by the listener's
sessions) are written after the answer has gone to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from recorder.config import TargetConfig
from recorder.session import SessionRecorder
from relay.audit import BoundAudit
from relay.context import RelayContext, new_session_id
from relay.identity import Identity
from relay.pg import protocol as p
from relay.pg import startup as steps
from relay.pg.machine import (
    COLUMNS,
    COMPLETE,
    ROWS,
    STATEMENT,
    PgMachine,
    SessionEnd,
    query_bytes,
    unsettled,
)
from relay.pg.pipe import Pipe
from relay.pg.querylog import QueryLog
from relay.pg.requests import Execute as _Execute
from relay.pg.requests import FunctionCall as _FunctionCall
from relay.pg.requests import Pending
from relay.pg.requests import Query as _Query
from relay.pg.sql import (
    FUNCTION_CALL_RULE,
    PINNED,
    PINNED_RULE,
    PINNED_VALUES,
    TOO_LONG,
    TOO_LONG_RULE,
    UNPARSED,
    UNPARSED_RULES,
    Check,
    SqlGate,
)
from relay.pg.transcript import Bound, Transcript
from relay.pg.upstream import Upstream, UpstreamError, connect, send_cancel, simple_query
from relay.policy import Decision
from relay.session_core import SessionCore
from relay.session_recording import CastSpec
from relay.tokens import identity_detail

__all__ = ["CancelMap", "PgListener", "PgSession", "SessionEnd", "call_text", "is_loopback"]

log = logging.getLogger("castgate.pg")

is_loopback = steps.is_loopback
# Transcript text waits at most this long (or this many characters) for the cast.
_CAST_BATCH = 0.05
_CAST_BATCH_BYTES = 64 * 1024
# Statements and answers waiting to be drawn into the transcript before a batch is
# drawn and written at once (else every _CAST_BATCH seconds).
_POST_MAX = 2048
# Or once the result rows waiting for it hold this many bytes (a large result is read
# faster than _CAST_BATCH lets the transcript keep up; it draws only its first rows).
_POST_BYTES = 1 << 20
_PLAIN_IDENT = re.compile(r"[a-z_][a-z0-9_$]*")
# FunctionCall OIDs a session remembers looking up.
_FUNCTIONS_KEPT = 1024


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


class _Functions:
    """FunctionCall OIDs looked up: (schema, name, return type), None when unknown."""

    def __init__(self) -> None:
        self.known: dict[int, tuple[str, str, int] | None] = {}

    async def info(
        self, target: TargetConfig, identity: str, oid: int
    ) -> tuple[str, str, int] | None:
        """(schema, name, return type OID) of a function, looked up on a connection of
        its own (the session's may be inside a failed transaction or a pipeline)."""
        if oid in self.known:
            return self.known[oid]
        info = None
        try:
            up = await connect(
                target, {"application_name": f"castgate:{identity} lookup", **PINNED_VALUES}
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
        if len(self.known) < _FUNCTIONS_KEPT:
            self.known[oid] = info
        return info


class PgSession:
    """One client connection through the relay.

    Attributes beyond ~20: the transcript batching (``_cast_*``, ``_post*``) belongs to
    the recording lifecycle, which a protocol-neutral session core takes over."""

    def __init__(self, ctx: RelayContext, listener: PgListener, client: Pipe) -> None:
        self.ctx = ctx
        self.listener = listener
        self.cw = client  # the client's side (``write``, ``close``)
        peer = client.transport.get_extra_info("peername") if client.transport else None
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.id = new_session_id()
        self.tls = False
        self.ident: Identity | None = None
        self.target: TargetConfig | None = None
        self.up: Upstream | None = None
        self._core: SessionCore | None = None
        self.audit: BoundAudit = ctx.audit.bind(origin=self.peer, resource="postgres")
        self.transcript: Transcript | None = None
        self.machine = PgMachine(
            ctx.masker,
            self._decide,
            ctx.cfg.recording.max_statement_bytes,
            max_message=ctx.cfg.limits.pg_max_message,
        )
        self._upipe: Pipe | None = None  # the target's side, once relayed
        # While a statement is on the slow path: its task, and the reads that came.
        self._slow: asyncio.Future[None] | None = None
        self._backlog: deque[bytes] = deque()
        self._gate: SqlGate | None = None
        self.status = "closed"
        self.cancel_key: tuple[int, int] | None = None
        self._qlog = listener.qlog
        self._early = b""  # what the client pipelined behind its password
        self._cast_buf: list[str] = []
        self._cast_len = 0
        self._cast_timer: asyncio.TimerHandle | None = None
        # Transcript work waiting to be drawn, in order (see ``_transcribe``).
        self._post: list[tuple[Any, ...]] = []
        self._post_bytes = 0
        self._loop = asyncio.get_event_loop()
        # Resolved once the target has answered everything sent (see ``_settle``).
        self._idle: asyncio.Future[None] | None = None
        self._functions = _Functions()
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

    # The machine's state under the names the lifecycle methods use.
    @property
    def pending(self) -> deque[Pending]:
        return self.machine.pending

    @property
    def sentinels(self) -> dict[str, str]:
        return self.machine.sentinels

    @property
    def statements(self) -> int:
        return self.machine.statements

    @property
    def _target_fatal(self) -> str | None:
        return self.machine.target_fatal

    # -- setup ---------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        """Write to the client and wait while its socket buffer is full."""
        self.cw.write(data)
        await self.cw.drain()

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
            self.audit.failure("pg.session_end", **exc.event)
            await self._fatal(exc.sqlstate, exc.message)
        except p.ProtocolError as exc:
            self.status = "protocol error"
            await self._fatal(exc.sqlstate, f"castgate: {exc}")
            self.audit.bind(resource="postgres", session_id=None).failure(exc.kind, **exc.detail)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            if self.status != "recording failed":  # the relay closed it on purpose
                self.status = "disconnected"
        except Exception as exc:
            log.exception("pg.session_error", extra={"session": self.id})
            self.status = "error"
            await self._fatal("XX000", f"castgate: internal error: {exc}")
        finally:
            await self._close()

    async def _refused(self, refusal: steps.Refusal, user: str, database: str) -> bool:
        """End the connection with ``refusal``'s FATAL after its audit event (a failed
        authentication: PCI DSS 10.2.1.4)."""
        if refusal.status is not None:
            self.status = refusal.status
        if refusal.target is not None:
            self.target = refusal.target
        if refusal.event == "auth":
            self.audit.bind(actor=user or None, resource=f"postgres:{database}").failure(
                "auth", method=refusal.method, reason=refusal.reason
            )
        elif refusal.event is not None:
            resource = f"postgres:{self.target.name if self.target else database}"
            self.audit.bind(resource=resource).failure(refusal.event, reason=refusal.reason)
        await self._fatal(refusal.sqlstate, refusal.message)
        return False

    async def _negotiate(self) -> p.Startup | None:
        """SSL and GSS requests answered, TLS started: the StartupMessage, or None when
        the connection was a CancelRequest."""
        neg = steps.Negotiation(
            self.listener.tls is not None, max_startup=self.ctx.cfg.limits.pg_max_startup
        )
        data = b""
        while True:
            step = neg.feed(data)
            data = b""
            if step is None:
                try:
                    data = await asyncio.wait_for(self.cw.read(8192), steps.STARTUP_READ_S)
                except TimeoutError:
                    raise p.ProtocolError("startup timed out") from None
                if not data:
                    raise ConnectionError("client closed during startup")
            elif isinstance(step, steps.Answer):
                await self._send(step.byte)
                if step.start_tls:
                    await self._start_tls()
            elif isinstance(step, steps.Cancel):
                await self._cancel(step.body)
                return None
            else:
                self._early = neg.rest()
                return step

    async def _start_tls(self) -> None:
        assert self.listener.tls is not None and self.cw.transport is not None
        transport = await self._loop.start_tls(
            self.cw.transport, self.cw, self.listener.tls, server_side=True
        )
        assert isinstance(transport, asyncio.Transport)
        self.cw.set_transport(transport)
        self.tls = True

    async def _login(self) -> tuple[steps.Login, Identity] | None:
        """Negotiation, the StartupMessage's checks and the token: the login and its
        identity, or None (the connection refused or a CancelRequest)."""
        pkt = await self._negotiate()
        if pkt is None:
            return None
        login = steps.check_startup(pkt, require_tls=self.listener.require_tls, tls=self.tls)
        if isinstance(login, steps.Refusal):
            user = pkt.params.get("user", "")
            await self._refused(login, user, pkt.params.get("database", user))
            return None
        if login.preamble:
            self.cw.write(login.preamble)
        await self._send(p.auth_request(3))
        password, self._early = await steps.read_password(self.cw, self._early)
        ident = await steps.authenticate(self.ctx, self.peer, login.user, password)
        if isinstance(ident, steps.Refusal):
            await self._refused(ident, login.user, login.database)
            return None
        self.ident = ident
        self.audit = self.audit.bind(actor=ident.name, resource=f"postgres:{login.database}")
        self.audit.success(
            "auth", method=ident.method, groups=list(ident.groups), **identity_detail(ident)
        )
        return login, ident

    async def _startup(self) -> bool:
        found = await self._login()
        if found is None:
            return False
        login, ident = found
        admitted = steps.admit(self.ctx, ident, login)
        if isinstance(admitted, steps.Refusal):
            return await self._refused(admitted, login.user, login.database)
        target = self.target = admitted.target
        self.machine.target = target.name
        connected = await steps.connect_upstream(target, admitted.forwarded, self.ctx.masker)
        if isinstance(connected, steps.Refusal):
            return await self._refused(connected, login.user, target.name)
        self.up = connected.up
        self.machine.masking.keys = connected.mask_keys
        self.machine.masking.copy_tables = connected.copy_tables
        self.core.credential_used()
        return await self._begin(ident, target, connected.up)

    async def _begin(self, ident: Identity, target: TargetConfig, up: Upstream) -> bool:
        """The recording, the session row, and the client's answer to its startup."""
        failure = self._open_recording()
        if not await self.core.start(
            protocol="postgres", title=f"{ident.name}@{target.name}", failure=failure, tls=self.tls
        ):
            return False
        notice = None
        if failure is not None:
            notice = (
                f"castgate: this session cannot be recorded ({failure.rsplit(': ', 1)[-1]}); "
                "it continues unrecorded"
            )
        key = self.cancel_key = self.listener.cancels.issue(target, up.pid, up.key)
        answer = steps.startup_answer(up, target.name, self.ctx.masker, key, notice)
        if isinstance(answer, steps.Refusal):
            return await self._refused(answer, ident.name, target.name)
        self.machine.txn_status = up.status
        await self._send(answer)
        return True

    async def _cancel(self, body: bytes) -> None:
        if len(body) < 8:
            return
        pid, key = struct.unpack_from("!ii", body, 0)
        found = self.listener.cancels.get(pid, key)
        if found is None:
            self.audit.failure("pg.cancel", reason="unknown key")
            return
        target, up_pid, up_key = found
        await send_cancel(target, up_pid, up_key)
        self.audit.bind(resource=f"postgres:{target.name}").success("pg.cancel")

    # -- the session core ------------------------------------------------------------

    @property
    def core(self) -> SessionCore:
        """The session core, once the identity and the target are known."""
        if self._core is None:
            assert self.ident is not None and self.target is not None
            self._core = SessionCore(
                self.ctx,
                session_id=self.id,
                ident=self.ident,
                target=self.target,
                origin=self.peer,
                frontend=self,
                commands=self,
                on_lost=self._recording_lost,
            )
            self._core.recording.before_marker = self._flush_cast
            self.audit = self._core.audit
        return self._core

    @property
    def rec(self) -> SessionRecorder | None:
        """The session's recorder (None until the recording is opened)."""
        return self._core.rec if self._core is not None else None

    def _cancel_running(self) -> None:
        """The relay ends the session: a statement still running on the target is
        cancelled (closing the connection would let it run on until it next writes)."""
        up, target = self.up, self.target
        if up is None or target is None or not up.key or not self.machine.runs_pending():
            return
        key, up.key = up.key, b""  # once
        self.ctx.background.track(asyncio.ensure_future(send_cancel(target, up.pid, key)))

    def _open_recording(self) -> str | None:
        """Open the cast; returns why it could not be, or None. A failed cast is
        replaced by a DiscardWriter, so the transcript and the live view go on."""
        assert self.ident is not None and self.target is not None
        who = {"identity": self.ident.name, "target": self.target.name, "protocol": "postgres"}
        failure = self.core.recording.open(
            CastSpec(
                title=f"{self.ident.name}@{self.target.name}: psql",
                width=120,
                height=40,
                env={"TERM": "xterm-256color", "SHELL": "/bin/sh"},
                header={**who, **identity_detail(self.ident)},
                live=who,
            )
        )
        self.transcript = Transcript(
            self.target.name, self.ctx.cfg.recording.max_result_rows, self.ctx.masker
        )
        self._write_cast(
            self.transcript.banner(self.ident.name, self.target.database or self.target.name)
        )
        self._flush_cast()
        return failure

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
        self.core.recording.text(text)

    def _recording_failed(self, message: str, *, at_start: bool = False) -> None:
        """Apply ``recording.on_failure`` (the session core's recording)."""
        self.core.recording.fail(message, at_start=at_start)

    def _recording_lost(self, why: str, *, terminate: bool, at_start: bool) -> None:
        """The client learns that its session cannot be recorded: ``terminate`` ends
        the connection with a FATAL error naming the cause, ``continue`` sends a notice
        and goes on unrecorded."""
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

    def _marker(self, text: str) -> None:
        if self._core is not None:  # after the transcript of all before it (before_marker)
            self._core.recording.marker(text)

    def tell(self, text: str) -> None:
        """A relay message for the client (the session core's): a NoticeResponse."""
        self.cw.write(p.notice_response(text))

    # -- the relay loops ----------------------------------------------------------------

    async def _relay(self) -> None:
        assert self.up is not None
        # The target's side first: what it sent after its ReadyForQuery goes first.
        upipe = self._upipe = self.up.pipe
        upipe.attach(self._server_data)
        cpipe = self.cw
        early, self._early = self._early, b""
        cpipe.attach(self._client_data, early)
        try:
            waits: list[asyncio.Future[Any]] = [cpipe.done, upipe.done]
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if upipe.done in done:
                failure, lost = upipe.done.result()
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
                failure, lost = cpipe.done.result()
                error = failure if failure is not None else lost
                if error is not None:
                    raise error
        finally:
            upipe.detached = cpipe.detached = True
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
        self.audit.failure("target.lost", reason=reason)

    def _decide(self, text: str) -> Decision:
        """The decision on a SQL text: each of its statements by the rules (the
        strictest applies), or the relay's own refusal of what it cannot check."""
        scoped = self.core.scoped
        if self._gate is None:
            # The keywords this identity's rules on this target need, once.
            self._gate = SqlGate(scoped.sql_nodes, scoped.enforcing)
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
        """Carry out a block or approve decision (the session core): (allowed, message
        if refused)."""
        verdict = await self.core.enforce(decision, masked, "sql")
        return verdict.allowed, verdict.message

    # -- the command log (the session core's CommandLog) ------------------------------

    async def opened(self, command: str, kind: str, decision: Decision) -> None:
        """Statements are logged with their results (``_log``), not when decided."""

    async def refused(self, command: str, decision: Decision, status: str) -> None:
        """A refused statement is logged now: it has no result to wait for."""
        self._log(command, decision.action, decision.rule_name, status)

    def _sentinel(self, message: str) -> str:
        """A statement the server rejects during analysis, leaving its transaction and
        pipeline state exactly as a real error would; its error is rewritten."""
        nonce = secrets.token_hex(8)
        self.sentinels[nonce] = message
        return f'SELECT * FROM pg_catalog."castgate-refused-{nonce}"'  # noqa: S608 - hex nonce

    # -- the client's side ---------------------------------------------------------------

    def _client_data(self, data: bytes) -> None:
        """One read from the client, handled where it arrives. The first message that
        needs the slow path (a statement no rule simply allows, Terminate) goes to
        ``_client_slow`` with everything after it, and reading pauses until that is
        done; what is read meanwhile waits in ``_backlog``."""
        if self._slow is not None:
            self._backlog.append(data)
            return
        assert self.up is not None
        step = self.machine.client_data(data)
        if step.send:
            self.up.writer.write(step.send)
        self._after_forward(step.said)
        if step.slow is not None:
            self.cw.pause()
            self._slow = asyncio.ensure_future(self._client_slow(step.slow))
            return
        upipe = self._upipe
        if upipe is not None and upipe.write_paused is not None:
            # The target's buffer is full: stop reading the client until it drains.
            self.cw.hold_until(asyncio.shield(upipe.write_paused))

    async def _client_slow(self, msgs: list[p.Message]) -> None:
        cpipe = self.cw
        try:
            more = await self._client_messages(msgs)
            while more and self._backlog:
                more = await self._client_messages(
                    self.machine.client_messages(self._backlog.popleft())
                )
        except Exception as exc:
            cpipe.finish(exc, None)
            return
        finally:
            self._slow = None
        if not more:
            cpipe.finish(None, None)
            return
        cpipe.resume()

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
            extra = self.machine.client_message(msg, said)
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

    def _refuse_statement(self, kept: str, why: str, out: bytearray) -> None:
        """Send a refused Query or FunctionCall as a statement that fails with ``why``."""
        self.machine.refused(kept)
        out += p.query(self._sentinel(why))
        if self.transcript is not None:
            self._write_cast(self.transcript.query(kept))

    async def _slow_query(self, msg: p.Message, out: bytearray, said: list[str | Bound]) -> bool:
        m = self.machine
        text = p.parse_query(msg.body)
        kept = m.kept(text)
        m.statements += 1
        decision = await self._settled_decision(text, unsettled(msg.body), out, said)
        if decision.action != "allow":
            ok, why = await self._refuse_or_run(decision, kept, out, said)
            if not ok:
                self._refuse_statement(kept, why, out)
                return True
        m.query_sent(kept, text)
        said.append(kept)
        out += msg.raw()
        return True

    async def _slow_parse(self, msg: p.Message, out: bytearray, said: list[str | Bound]) -> bool:
        parse = p.parse_parse(msg.body)
        kept = self.machine.kept(parse.query)
        unsure = unsettled(query_bytes(msg.body))
        decision = await self._settled_decision(parse.query, unsure, out, said)
        self.machine.parsed(parse, kept)
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
        self, text: str, unsure: bool, out: bytearray, said: list[str | Bound]
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
        if unsure and self.machine.runs_pending():
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
        if not self.machine.pending:
            return True
        if not self.machine.answers_coming():
            return False
        self._idle = self._loop.create_future()
        try:
            await self._idle
        finally:
            self._idle = None
        return True

    async def _slow_function_call(
        self, msg: p.Message, out: bytearray, said: list[str | Bound]
    ) -> bool:
        """A FunctionCall: refused unless the target sets ``allow_function_call``; there
        it is decided as ``SELECT schema.name(args)`` of the function its OID names."""
        assert self.target is not None and self.ident is not None
        call = p.parse_function_call(msg.body)
        self.machine.statements += 1
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
            info = await self._functions.info(self.target, self.ident.name, call.oid)
            if info is None:
                text = f"-- FunctionCall of function OID {call.oid}"
                decision = Decision("block", FUNCTION_CALL_RULE, f"no function has OID {call.oid}")
            else:
                text = call_text(info[0], info[1], call)
                decision = self._decide(text)
        kept = self.machine.kept(text)
        if decision.action != "allow":
            ok, why = await self._enforce(decision, kept)
            if not ok:
                self._refuse_statement(kept, why, out)
                return True
        assert info is not None
        self.machine.function_call_sent(kept, info[1], info[2], call.result_format)
        said.append(kept)
        out += msg.raw()
        return True

    async def _up_drain(self) -> None:
        """Wait while the target's socket buffer is over its high-water mark."""
        upipe = self._upipe
        if upipe is not None and upipe.write_paused is not None:
            await asyncio.shield(upipe.write_paused)

    # -- the target's side ---------------------------------------------------------------

    def _server_data(self, data: bytes) -> None:
        """One read from the target, handled where it arrives: the answers masked and
        sent on, the log written, the transcript queued."""
        rec = self.rec
        step = self.machine.server_data(
            data,
            rec.input_counts if rec is not None else None,
            transcribe=self.transcript is not None,
        )
        if step.send:
            self.cw.write(step.send)
        if step.logs:
            add, sid, now = self._qlog.add, self.id, time.time()
            for text, status, rows, ms in step.logs:
                # A tuple now, the store's row in the query log's thread.
                add((sid, now, text, "allow", None, status, rows, ms))
        if step.items:
            # Transcript work waits until the client has its answer (it is for the
            # recording, not for the client), in the order the messages came.
            self._post.extend(step.items)
            self._post_bytes += step.row_bytes
            self._cast_soon()
        if step.ready:
            idle = self._idle
            if idle is not None and not self.machine.pending and not idle.done():
                idle.set_result(None)
        upipe = self._upipe
        if upipe is not None and self.cw.write_paused is not None:
            # A slow client: stop reading the target until it has caught up.
            upipe.hold_until(asyncio.shield(self.cw.write_paused))

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

    # -- the transcript ------------------------------------------------------------------

    def _after_forward(self, said: list[str | Bound]) -> None:
        """Queue the statements just sent to the target for the transcript, after the
        answers that came before them."""
        if said:
            if self.transcript is not None:
                self._post.extend([(STATEMENT, text) for text in said])
            said.clear()
        self._cast_soon()

    def _run_post(self) -> None:
        if self._post:
            todo, self._post, self._post_bytes = self._post, [], 0
            self._transcribe(todo)

    def _transcribe(self, todo: list[tuple[Any, ...]]) -> None:
        """Draw statements and answers into the transcript, in the order they came
        (the machine's items: ``relay/pg/machine.py``).

        Nothing here is on a client's round trip: items queue as messages pass
        (``_server_data``, ``_after_forward``) and are drawn a batch at a time when the
        cast is written, so the drawing code runs hot for hundreds of statements
        instead of cold between every two reads."""
        tr = self.transcript
        if tr is None or self.rec is None:
            return
        buf = self._cast_buf
        size = 0
        for item in todo:
            kind = item[0]
            if kind == ROWS:
                tr.add_rows(item[1], item[2])
                continue
            if kind == COLUMNS:
                tr.columns(item[1].names, item[1].formats, item[1].rows.type_oids)
                continue
            if kind == COMPLETE:
                text = tr.complete(item[1], item[2])
            elif kind == STATEMENT:
                text = tr.query(item[1])
            else:
                sev = next((v for c, v in p.parse_fields(item[1]) if c == "S"), "ERROR")
                text = tr.error(sev, item[2], item[3])
            buf.append(text)
            size += len(text)
        self._cast_len += size

    async def _close(self) -> None:
        # Live watchers see the end of the transcript too.
        self._flush_cast()
        self.ctx.live.pop(self.id, None)
        self.ctx.hub.close(self.id, self.status)
        if self.cancel_key is not None:
            self.listener.cancels.drop(*self.cancel_key)
        self._cancel_running()
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
        info = {"identity": self.ident.name, "target": self.target.name}
        self.core.seal(self.status, {**info, "statements": self.statements})
        await self.core.end(self.status, {"statements": self.statements})

    async def close(self, reason: str) -> None:
        """End the session from the relay's side (shutdown)."""
        self.status = reason
        self._cancel_running()
        with contextlib.suppress(Exception):
            self.cw.write(p.error_response("57P01", f"castgate: {reason}", severity="FATAL"))
            self.cw.close()
        if self.up is not None:
            with contextlib.suppress(Exception):
                self.up.writer.close()


class _ClientPipe(Pipe):
    """A client's connection to the listener: its session starts once it is made."""

    def __init__(self, listener: PgListener) -> None:
        super().__init__()
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.listener.accepted(self)


class PgListener:
    """The PostgreSQL listener of a relay process: ``protocol`` is the protocol factory
    for ``loop.create_server``."""

    def __init__(self, ctx: RelayContext, host: str, tls: ssl.SSLContext | None) -> None:
        self.ctx = ctx
        self.tls = tls
        req = ctx.cfg.listen.postgres_require_tls
        self.require_tls = (not is_loopback(host)) if req is None else req
        self.cancels = CancelMap()
        self.sessions: set[PgSession] = set()
        # One query log for all sessions of this listener (see relay/pg/querylog.py).
        self.qlog = QueryLog(ctx.spool)
        self._tasks: set[asyncio.Task[None]] = set()

    def protocol(self) -> Pipe:
        return _ClientPipe(self)

    def accepted(self, pipe: Pipe) -> None:
        task = asyncio.ensure_future(self.handle(pipe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle(self, pipe: Pipe) -> None:
        """One client connection, within the connection limits."""
        peer = pipe.transport.get_extra_info("peername") if pipe.transport else None
        admitted = self.ctx.connections.admit("postgres", str(peer[0]) if peer else "?")
        if isinstance(admitted, str):
            await _refuse_connection(pipe, f"castgate: {admitted}")
            return
        try:
            await self._serve(pipe)
        finally:
            self.ctx.connections.release(admitted)

    async def _serve(self, pipe: Pipe) -> None:
        session = PgSession(self.ctx, self, pipe)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)


_NEGOTIATIONS = (80877103, 80877104)  # SSLRequest, GSSENCRequest
_REFUSAL_READ_S = 10.0


async def _refuse_connection(pipe: Pipe, why: str) -> None:
    """Refuse a connection past the limits with a FATAL 53300 the client shows: the
    answer comes where a client reads one, after its startup packet (an SSLRequest or
    GSSENCRequest first is declined), within a short bound."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
        async with asyncio.timeout(_REFUSAL_READ_S):
            for _ in range(3):
                length, code = struct.unpack("!II", await pipe.readexactly(8))
                if code in _NEGOTIATIONS and length == 8:
                    pipe.write(b"N")
                    continue
                if 8 <= length <= 10_000:
                    await pipe.readexactly(length - 8)
                break
    with contextlib.suppress(OSError, ConnectionError):
        pipe.write(p.error_response("53300", why, severity="FATAL"))
        await pipe.drain()
    pipe.close()
    await pipe.closed
