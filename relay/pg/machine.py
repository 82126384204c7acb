"""The PostgreSQL proxy as a machine without I/O: fed the bytes each side sends, it
returns what to pass on to the other side and what to log and transcribe.

The client's side (``client_data``) tracks each request as it goes to the target and
decides on the fast path every statement a rule simply allows; the first message that
needs more (a statement a rule holds or blocks, a FunctionCall, Terminate) comes back
in ``ClientStep.slow`` with everything after it, for the session to handle (it may wait
for an approval) with the machine's bookkeeping methods. The target's side
(``server_data``) pops the request each answer is for, masks rows, names, tags, errors,
notifications, COPY data and settings, and ends the session (``SessionEnd``) on what it
cannot mask. Sockets, tasks and timers are the session's (``relay/pg/relay.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from recorder.masking import Masker
from relay.pg import copymask
from relay.pg import protocol as p
from relay.pg.columns import ColumnMasking, Columns, Prepared
from relay.pg.copymask import CopyPlan
from relay.pg.protocol import RowRun
from relay.pg.requests import (
    READY,
    RUNS,
    Bind,
    Close,
    Describe,
    Execute,
    FunctionCall,
    Parse,
    Pending,
    Query,
    Sync,
)
from relay.pg.sql import (
    PINNED_SETTINGS,
    PINNED_VALUES,
    CopyOut,
    copies_out,
    reads_the_same,
    setting_ok,
)
from relay.pg.transcript import Bound
from relay.pg.values import CopyBinaryMasker, Malformed, Unmaskable, parameter_types
from relay.policy import Decision

# Frontend messages after startup; anything else is a protocol violation, refused.
_FRONTEND = frozenset(bytes([c]) for c in b"QPBDECSHXFdcf")
# Client messages the fast path hands to the session (they may have to wait).
_SLOW = frozenset((b"X", b"F"))

# Transcript items (``ServerStep.items``), in the order their messages came:
ROWS = 0  # (ROWS, masked DataRow bytes, row count)
COLUMNS = 1  # (COLUMNS, Columns): a RowDescription
COMPLETE = 2  # (COMPLETE, tag, milliseconds): CommandComplete, or the end of a batch
ERROR = 3  # (ERROR, masked body, message, detail): an ErrorResponse or NoticeResponse
STATEMENT = 4  # (STATEMENT, str | Bound): a statement sent


class SessionEnd(Exception):
    """The relay ends the session: the FATAL it sends (already masked) and why."""

    def __init__(self, sqlstate: str, message: str, status: str, event: dict[str, Any]) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.status = status
        self.event = event


# A query-log row of an allowed request: its masked text, how it ended (the command
# tag, "error", ...), rows and milliseconds when known. (A tuple: one a statement.)
Logged = tuple[str, str, int | None, float | None]


class ServerStep:
    """What one read from the target comes to (``send`` may be the read itself).
    Valid until the next read is fed: the machine refills the same object."""

    __slots__ = ("counts", "items", "logs", "ready", "row_bytes", "send")

    def __init__(self, items: list[tuple[Any, ...]] | None = None, counts: Any = None) -> None:
        self.send: bytes | bytearray = b""  # to the client
        self.items = items  # transcript items (None: no transcript)
        self.logs: list[Logged] = []
        self.row_bytes = 0  # of the DataRows among ``items``
        self.ready = False  # a ReadyForQuery came
        self.counts = counts  # the masker's hit counter (the recording's)


class ClientStep:
    """What one read from the client comes to; valid until the next read is fed."""

    __slots__ = ("said", "send", "slow")

    def __init__(self) -> None:
        self.send: bytes | bytearray = b""  # to the target
        self.said: list[str | Bound] = []  # statements sent, to transcribe
        self.slow: list[p.Message] | None = None  # from the first message the session must handle


def unsettled(raw: bytes) -> bool:
    """True when the statement bytes ``raw`` could read differently under another
    client_encoding or standard_conforming_strings (see ``PgSession._settled_decision``)."""
    return (not raw.isascii() or b"\\'" in raw) and not reads_the_same(raw)


def query_bytes(parse_body: bytes) -> bytes:
    """The statement text of a Parse body, as sent (the name is NUL-terminated first)."""
    start = parse_body.find(b"\0") + 1
    end = parse_body.find(b"\0", start)
    return parse_body[start : end if end >= 0 else len(parse_body)]


def _passed(data: bytes, same: int, out: bytearray | None) -> bytes | bytearray:
    """What one read passes on: ``out`` once something changed, else the first ``same``
    bytes of the read as they came (the read itself, without re-framing, mostly)."""
    if out is not None:
        return out
    return data if same == len(data) else data[:same]


class PgMachine:
    """The proxy state of one relayed session.

    Args:
        masker: the relay's masker.
        decide: the policy decision on a SQL text (the session's).
        stmt_limit: ``recording.max_statement_bytes``.
    """

    def __init__(
        self,
        masker: Masker,
        decide: Callable[[str], Decision],
        stmt_limit: int,
        *,
        max_message: int = p.MAX_MESSAGE + 1,
    ) -> None:
        self.masker = masker
        self.decide = decide
        self.stmt_limit = stmt_limit
        self.target: str | None = None  # its name, once known (a FATAL names it)
        self.pending: deque[Pending] = deque()
        self.prepared = Prepared()
        self.masking = ColumnMasking(masker)
        self.columns: Columns | None = None  # of the result whose rows are coming
        # A COPY TO STDOUT in the binary format, masked field by field; the plan of a
        # text COPY of a table with mask_columns.
        self.copy: CopyBinaryMasker | None = None
        self.copy_plan: CopyPlan | None = None
        # Statements the relay refused, sent as a statement that fails at analysis, by
        # the nonce its error quotes: the error is rewritten to this message.
        self.sentinels: dict[str, str] = {}
        # The target's own FATAL message (masked), once it sent one: it is ending the
        # connection and has told the client why.
        self.target_fatal: str | None = None
        self.statements = 0
        self.txn_status = b"I"
        # The client's messages are refused from their length field past
        # ``limits.pg_max_message`` (relay/pg/protocol.py).
        self._cdec = p.client_decoder(max_message)
        self._sdec = p.MessageDecoder()
        self._cstep = ClientStep()
        self._sstep = ServerStep([])
        # Target messages other than DataRows, by type: each returns the bytes to send
        # instead (b"" for nothing), or None to pass the message on as it came.
        self._server: dict[bytes, Callable[[p.Message, ServerStep], bytes | None]] = {
            b"T": self._on_row_description,
            b"C": self._on_command_complete,
            b"Z": self._on_ready,
            b"1": self._on_parse_bind_close,
            b"2": self._on_parse_bind_close,
            b"3": self._on_parse_bind_close,
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
            b"G": self._pass,  # CopyInResponse: the client's rows go as typed
            b"W": self._pass,  # CopyBothResponse: its CopyData is masked as COPY's
        }

    # -- the client's side ---------------------------------------------------------------

    def client_data(self, data: bytes) -> ClientStep:
        """One read from the client: what goes to the target now, and the messages
        from the first one the session must handle on (``ClientStep.slow``)."""
        dec = self._cdec
        # The read itself is forwarded while every message in it passes unchanged
        # (``same`` bytes so far), ``out`` made at the first change.
        out: bytearray | None = bytearray() if dec.buffered() else None
        same = 0
        msgs = dec.feed(data)
        # One step object per direction, refilled per read: a relayed statement
        # allocates no more than it must (the collector's cost shows per statement).
        step = self._cstep
        said = step.said
        said.clear()
        step.slow = None
        fast, query = self.client_message, self._fast_query
        for msg in msgs:
            extra = query(msg, said) if msg.type == b"Q" else fast(msg, said)
            if extra is None:
                step.slow = [msg, *msgs]
                break
            if extra and out is None:
                out = bytearray(data[:same])
            if out is None:
                same += 5 + len(msg.body)
            else:
                out += extra
                out += msg.raw()
        step.send = _passed(data, same, out)
        return step

    def client_messages(self, data: bytes) -> list[p.Message]:
        """The messages of a read held back while the session was on its slow path."""
        return list(self._cdec.feed(data))

    def client_message(self, msg: p.Message, said: list[str | Bound]) -> bytes | None:
        """One client message on the fast path: what must go to the target before it
        (usually nothing), or None (and nothing changed) when the session must handle
        it. The message itself is the caller's to forward."""
        t = msg.type
        if t == b"Q":
            return self._fast_query(msg, said)
        if t == b"P":
            return self._fast_parse(msg)
        if t == b"B":
            self.prepared.bind(msg.body)
            self.pending.append(Bind())
        elif t == b"D":
            kind, name = p.parse_describe(msg.body)
            if kind == "P":
                self.prepared.described.add(name)
            self.pending.append(Describe(kind, name, hidden=False))
        elif t == b"E":
            return self._execute(msg, said)
        elif t == b"C":
            self.pending.append(Close())
        elif t == b"S":
            self.pending.append(Sync())
        elif t in _SLOW:
            return None
        elif t not in _FRONTEND:
            # What the relay does not know it cannot check: the session ends.
            raise p.ProtocolError(f"unexpected message type {t!r}")
        # Flush, CopyData/Done/Fail (input goes to the target as typed): forwarded
        # unchanged.
        return b""

    def _fast_query(self, msg: p.Message, said: list[str | Bound]) -> bytes | None:
        text = p.parse_query(msg.body)
        body = msg.body
        # (``unsettled``'s first test inline: this runs for every statement.)
        unsure = (not body.isascii() or b"\\'" in body) and unsettled(body)
        if (unsure and self.runs_pending()) or self.decide(text).action != "allow":
            return None
        kept = self.kept(text)
        self.statements += 1
        self.pending.append(Query(kept, time.monotonic(), raw=text))
        said.append(kept)
        return b""

    def _fast_parse(self, msg: p.Message) -> bytes | None:
        parse = p.parse_parse(msg.body)
        body = msg.body
        unsure = (not body.isascii() or b"\\'" in body) and unsettled(query_bytes(body))
        if (unsure and self.runs_pending()) or self.decide(parse.query).action != "allow":
            return None
        self.parsed(parse, self.kept(parse.query))
        return b""

    def _execute(self, msg: p.Message, said: list[str | Bound]) -> bytes:
        portal, _max = p.parse_execute(msg.body)
        prepared = self.prepared
        extra = b""
        if portal not in prepared.described:
            # The relay must know the columns to mask them: ask, and swallow the
            # answer (never synthesise one the client did not ask for).
            extra = p.describe("P", portal)
            self.pending.append(Describe("P", portal, hidden=True))
            prepared.described.add(portal)
        stmt, fmts = prepared.portal_stmt.get(portal, ("", ()))
        text = prepared.stmt_text.get(stmt, "")
        self.statements += 1
        self.pending.append(Execute(portal, stmt, fmts, text, time.monotonic()))
        params = prepared.portal_bind.get(portal)
        said.append(
            text if params is None else Bound(text, params, prepared.stmt_types.get(stmt, ()))
        )
        return extra

    # -- bookkeeping of what the session sends on its slow path ------------------------

    def runs_pending(self) -> bool:
        """True while a request that runs something on the target is unanswered."""
        return any(isinstance(r, RUNS) for r in self.pending)

    def answers_coming(self) -> bool:
        """True when a ReadyForQuery will end what is pending (the last is one that
        gets it): waiting for the target to answer everything can end."""
        return not self.pending or isinstance(self.pending[-1], READY)

    def kept(self, text: str) -> str:
        """What the transcript, the query log and approvals keep of a statement: masked,
        and past ``recording.max_statement_bytes`` a prefix with the statement's length
        and the SHA-256 of its masked text (of the masked text: a digest of a known
        statement around a masked card number would give the number away)."""
        masked = self.masker.mask(text)
        limit = self.stmt_limit
        if len(masked) * 4 <= limit:  # (a character is at most four bytes)
            return masked
        raw = masked.encode("utf-8", "surrogateescape")
        if len(raw) <= limit:
            return masked
        digest = hashlib.sha256(raw).hexdigest()
        head = raw[:limit].decode("utf-8", "ignore")
        return f"{head}\n... [castgate: statement of {len(raw)} bytes truncated; sha256 {digest}]"

    def query_sent(self, kept: str, raw: str) -> None:
        """A Query the session forwards as it came."""
        self.pending.append(Query(kept, time.monotonic(), raw=raw))

    def parsed(self, parse: p.Parse, kept: str) -> None:
        """A Parse the session forwards (as it came, or its statement refused)."""
        self.prepared.parse(parse, kept, bool(self.masking.copy_tables))
        self.pending.append(Parse(parse.name))

    def function_call_sent(self, kept: str, name: str, rettype: int, result_format: int) -> None:
        self.pending.append(FunctionCall(kept, name, rettype, result_format, time.monotonic()))

    def refused(self, kept: str) -> None:
        """A statement the session refused (Query or FunctionCall), sent instead as a
        Query whose error (a ``sentinel``'s) ends it as the client expects."""
        self.pending.append(Query(kept, time.monotonic(), log=False))

    def sentinel(self, message: str) -> str:
        """A statement the server rejects during analysis, leaving its transaction and
        pipeline state exactly as a real error would; its error is rewritten."""
        nonce = secrets.token_hex(8)
        self.sentinels[nonce] = message
        return f'SELECT * FROM pg_catalog."castgate-refused-{nonce}"'  # noqa: S608 - hex nonce

    # -- the target's side ---------------------------------------------------------------

    def server_data(
        self, data: bytes, counts: Any = None, *, transcribe: bool = True
    ) -> ServerStep:
        """One read from the target: the answers masked (``send``), and the log rows
        and transcript items they come to. ``counts`` counts the masker's hits."""
        dec = self._sdec
        pending = self.pending
        handlers = self._server
        # Most reads go out as they came (nothing to mask, nothing to hide): then the
        # read itself is sent, without re-framing its messages. ``out`` is made at the
        # first change; until then ``same`` counts the bytes passed unchanged.
        out: bytearray | None = bytearray() if dec.buffered() else None
        same = 0
        step = self._sstep
        items = step.items
        if not transcribe:
            items = step.items = None
        elif items is None:
            items = step.items = []
        else:
            items.clear()
        step.logs.clear()
        step.row_bytes = 0
        step.ready = False
        step.counts = counts
        masking = self.masking
        for msg in dec.feed_runs(data):
            if type(msg) is RowRun:
                head = pending[0] if pending else None
                if type(head) is Execute or type(head) is Query:
                    head.rows += msg.nrows
                    if self.columns is None and type(head) is Execute:
                        self.columns = self._execute_columns(head, items)
                cols = self.columns
                rows = (cols.rows if cols is not None else masking.plain_rows).mask_run(msg, counts)
                if items is not None:
                    items.append((ROWS, rows, msg.nrows))
                    step.row_bytes += len(rows)
                if out is not None:
                    out += rows
                elif rows is msg.raw:
                    same += len(rows)
                else:
                    out = bytearray(data[:same])
                    out += rows
                continue
            assert type(msg) is p.Message  # (for mypy: the only other kind)
            handler = handlers.get(msg.type)
            if handler is None:
                # A message the relay does not know could carry anything: not passed.
                raise p.ProtocolError(f"unexpected message type {msg.type!r} from the target")
            instead = handler(msg, step)
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
        if out is not None:
            step.send = out
        else:
            step.send = data if same == len(data) else data[:same]
        return step

    def _execute_columns(
        self, head: Execute, items: list[tuple[Any, ...]] | None
    ) -> Columns | None:
        cols = self.masking.execute_columns(head, self.prepared)
        if items is not None and cols is not None:
            # Its RowDescription went to Describe: the table starts here.
            items.append((COLUMNS, cols))
        return cols

    def _pass(self, msg: p.Message, step: ServerStep) -> bytes | None:
        return None

    def _on_row_description(self, msg: p.Message, step: ServerStep) -> bytes | None:
        seen = self.masking.descriptions.get(msg.body)
        if seen is None:
            seen = self.masking.row_description(msg.body)
        fields, cols, masked = seen
        pending = self.pending
        head = pending[0] if pending else None
        if isinstance(head, Describe):
            pending.popleft()
            self.prepared.described_as(head.kind, head.name, fields)
            if head.hidden:
                return b""
        else:
            if cols is None:
                cols = self.masking.remember(msg.body, fields, masked)
            self.columns = cols
            if step.items is not None:
                step.items.append((COLUMNS, cols))
        return None if masked is None else p.message(b"T", masked)

    def _on_command_complete(self, msg: p.Message, step: ServerStep) -> bytes | None:
        done = self.masking.completes.get(msg.body)
        if done is None:
            done = self.masking.command_complete(msg.body)
        tag, count, masked = done
        pending = self.pending
        head = pending[0] if pending else None
        elapsed = 0.0
        if isinstance(head, Execute):
            pending.popleft()
            elapsed = (time.monotonic() - head.started) * 1000
            step.logs.append((head.text, tag, count, elapsed))
        elif isinstance(head, Query):
            elapsed = (time.monotonic() - head.started) * 1000
            if head.log:
                step.logs.append((head.text, tag, count, elapsed))
        if step.items is not None:
            step.items.append((COMPLETE, tag, elapsed))
        self.columns = None
        return None if masked is None else p.message(b"C", masked)

    def _on_ready(self, msg: p.Message, step: ServerStep) -> bytes | None:
        pending = self.pending
        head = pending[0] if pending else None
        if isinstance(head, READY):
            pending.popleft()
        self.txn_status = msg.body[:1]
        self.columns = None
        self.copy = None
        step.ready = True
        return None

    def _on_parse_bind_close(self, msg: p.Message, step: ServerStep) -> bytes | None:
        pending = self.pending
        head = pending[0] if pending else None
        if isinstance(head, Parse):
            self.prepared.stmt_desc.pop(head.name, None)
        if head is not None and not isinstance(head, READY):
            pending.popleft()
        return None

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
        mask = self.masker.mask
        new_fields = [(c, mask(v)) for c, v in fields]
        severity = dict(fields).get("V") or dict(fields).get("S")
        if severity in ("FATAL", "PANIC") and self.target is not None:
            # The target is ending the connection: the client learns which target did.
            name = self.target
            new_fields = [(c, f"target {name}: {v}" if c == "M" else v) for c, v in new_fields]
            self.target_fatal = next((v for c, v in new_fields if c == "M"), "")
        detail = next((v for c, v in new_fields if c == "D"), None)
        message = next((v for c, v in new_fields if c == "M"), "")
        return p.fields_body(new_fields), message, detail

    def _on_error(self, msg: p.Message, step: ServerStep) -> bytes | None:
        pending = self.pending
        body, message, detail = self._rewrite_error(msg.body)
        if msg.type == b"E":
            self.copy_plan = None
            head = pending[0] if pending else None
            if isinstance(head, Query):
                if head.log:
                    step.logs.append((head.text, "error", None, None))
            elif isinstance(head, FunctionCall):
                step.logs.append((head.text, "error", None, None))
            elif head is not None and not isinstance(head, Sync):
                # Extended protocol: the server skips to the next Sync. An Execute it
                # skips failed too (a Bind's error, say): logged.
                while pending and not isinstance(pending[0], Sync):
                    skipped = pending.popleft()
                    if isinstance(skipped, Execute):
                        step.logs.append((skipped.text, "error", None, None))
            self.columns = None
        if step.items is not None:
            step.items.append((ERROR, body, message, detail))
        return p.message(msg.type, body)

    def _on_parameter_description(self, msg: p.Message, step: ServerStep) -> bytes | None:
        head = self.pending[0] if self.pending else None
        if isinstance(head, Describe) and head.kind == "S":
            # The parameters' types: the transcript draws binary parameters by them.
            with contextlib.suppress(ValueError, struct.error):
                self.prepared.stmt_types[head.name] = parameter_types(msg.body)
        if isinstance(head, Describe) and head.hidden:
            return b""
        return None

    def _on_no_data(self, msg: p.Message, step: ServerStep) -> bytes | None:
        pending = self.pending
        head = pending[0] if pending else None
        if isinstance(head, Describe):
            pending.popleft()
            self.prepared.described_as(head.kind, head.name, None)
            if head.hidden:
                return b""
        return None

    def _on_portal_end(self, msg: p.Message, step: ServerStep) -> bytes | None:
        pending = self.pending
        head = pending[0] if pending else None
        if isinstance(head, Execute):
            pending.popleft()
            status = "suspended" if msg.type == b"s" else "empty"
            step.logs.append((head.text, status, head.rows, None))
            if step.items is not None:
                # The rows so far are drawn (a client fetching in batches).
                step.items.append((COMPLETE, "", (time.monotonic() - head.started) * 1000))
        self.columns = None
        return None

    def _on_copy_data(self, msg: p.Message, step: ServerStep) -> bytes | None:
        if self.copy is not None:
            return self._binary_copy_data(msg, self.copy, step.counts)
        # COPY TO STDOUT rows: mask_columns fields, then by content like any output.
        body = msg.body
        plan = self.copy_plan
        if plan is not None:
            body = plan.mask_row(body, self.masking.plain_rows.mask_value)
        masked = self.masker.mask_bytes(body)
        return None if masked == msg.body else p.message(b"d", masked)

    def _binary_copy_data(
        self, msg: p.Message, copy: CopyBinaryMasker, counts: Any
    ) -> bytes | None:
        # Binary COPY: masked by the fields' layouts (a row may span messages).
        try:
            binary = copy.feed(msg.body, counts)
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

    def _on_copy_out(self, msg: p.Message, step: ServerStep) -> bytes | None:
        """CopyOutResponse: which fields of the rows to come are in mask_columns; a
        binary COPY is masked by its fields' layouts."""
        self.copy_plan = None
        self.copy = CopyBinaryMasker(self.masker) if msg.body[:1] == b"\x01" else None
        tables = self.masking.copy_tables
        if not tables:
            return None
        head = self.pending[0] if self.pending else None
        copy: CopyOut | None = None
        if isinstance(head, Query):
            found = copies_out(head.raw)
            if found is not None and head.copies < len(found):
                copy = found[head.copies]
            head.copies += 1
        elif isinstance(head, Execute):
            found = copies_out(self.prepared.stmt_raw.get(head.statement, ""))
            copy = found[0] if found else None
        plan = copymask.plan(copy, tables)
        if plan is not None and msg.body[:1] != b"\0":
            # Binary COPY: fields cannot be found without the types; nothing of it goes.
            raise SessionEnd(
                "0A000",
                "castgate: a binary COPY of a table with mask_columns cannot be masked; "
                "the session ends (COPY in text or CSV format)",
                "refused binary copy",
                {"reason": "binary COPY of mask_columns"},
            )
        self.copy_plan = plan
        return None

    def _on_copy_done(self, msg: p.Message, step: ServerStep) -> bytes | None:
        self.copy_plan = None
        copy, self.copy = self.copy, None
        rest = copy.finish() if copy is not None else b""
        return p.message(b"d", rest) + msg.raw() if rest else None

    def _on_notification(self, msg: p.Message, step: ServerStep) -> bytes | None:
        """NOTIFY: the channel and the payload masked (the process id is the target's)."""
        mask = self.masker.mask_bytes
        if mask(msg.body) is msg.body:
            return None
        pid, channel, payload = p.parse_notification(msg.body)
        return p.notification(pid, mask(channel), mask(payload))

    def _on_parameter_status(self, msg: p.Message, step: ServerStep) -> bytes | None:
        """A setting the target reports: masked (``set_config('application_name', ...)``
        sends back whatever it was given), and a pinned one that changed ends the
        session (nothing the relay checks after it would mean what the target reads)."""
        raw_name, raw_value = p.parse_parameter_status(msg.body)
        name = raw_name.decode("utf-8", "replace")
        mask = self.masker.mask_bytes
        if name in PINNED_SETTINGS:
            value = raw_value.decode("utf-8", "replace")
            if not setting_ok(name, value):
                shown = self.masker.mask(value)
                raise SessionEnd(
                    "22023",
                    f"castgate: {name} changed to {shown!r} on target {self.target or ''}; "
                    f"the relay reads statements only with {name} {PINNED_VALUES[name]}, so "
                    "the session ends",
                    "pinned setting changed",
                    {"setting": name, "value": shown},
                )
        if mask(msg.body) is msg.body:
            return None
        return p.parameter_status_bytes(mask(raw_name), mask(raw_value))

    def _on_function_result(self, msg: p.Message, step: ServerStep) -> bytes | None:
        """FunctionCallResponse: the value masked by its type and format, logged and
        drawn as a one-row result."""
        head = self.pending[0] if self.pending else None
        if not isinstance(head, FunctionCall):
            raise p.ProtocolError("FunctionCallResponse without a FunctionCall")
        value = p.parse_function_result(msg.body)
        masked = self.masking.mask_value(value, head.rettype, head.result_format)
        elapsed = (time.monotonic() - head.started) * 1000
        step.logs.append((head.text, "function call", 1, elapsed))
        if step.items is not None:
            field_ = p.Field(head.name, 0, 0, head.rettype, head.result_format)
            row = p.data_row([masked])
            step.items.append((COLUMNS, self.masking.columns_for([field_])))
            step.items.append((ROWS, row, 1))
            step.items.append((COMPLETE, "", elapsed))
            step.row_bytes += len(row)
        return None if masked is value else p.function_result(masked)
