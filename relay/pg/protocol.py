"""PostgreSQL wire protocol v3: framing and the message bodies the relay reads or
writes. No I/O: decoders take bytes and yield messages; builders return bytes.

Frontend and backend messages share type bytes with different meanings ('D' is
Describe one way and DataRow the other), so each direction has its own decoder.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

PROTOCOL_3_0 = 196608
PROTOCOL_3_2 = 196610
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

# Size caps: a startup packet is small (PostgreSQL's own MAX_STARTUP_PACKET_LENGTH); a
# message may carry a large COPY row or query but never more than the server itself
# accepts (1 GB) and, by default, here less. Clients' messages have their own cap
# (``limits.pg_max_message``, ``client_decoder``).
MAX_STARTUP = 10_000
MAX_MESSAGE = 256 * 1024 * 1024

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!ci")
_I16 = struct.Struct("!h")


class ProtocolError(Exception):
    """The peer broke the protocol; the message is fit to send back in an ErrorResponse."""

    sqlstate = "08P01"
    """What the ErrorResponse that ends the session says: protocol_violation."""
    kind = "pg.protocol"
    """The audit event kind the session's end is written as."""

    @property
    def detail(self) -> dict[str, object]:
        """The audit event's detail."""
        return {"error": str(self)}


class TooLarge(ProtocolError):
    """A packet or message whose length field says more than the relay takes: refused
    before it is buffered. Its size, not its content, goes to the audit log."""

    kind = "limit.exceeded"

    def __init__(
        self, what: str, size: int, limit: int, setting: str | None, text: str | None = None
    ) -> None:
        where = f" (limits.{setting})" if setting else ""
        super().__init__(
            text or f"{what} of {size} bytes exceeds the limit of {limit} bytes{where}"
        )
        self.what, self.size, self.limit, self.setting = what, size, limit, setting

    @property
    def detail(self) -> dict[str, object]:
        return {
            "error": str(self),
            "limit": self.setting,
            "request": self.what,
            "size": self.size,
            "max": self.limit,
        }


class MessageTooLarge(TooLarge):
    """A typed message past the limit: program_limit_exceeded, as PostgreSQL answers a
    statement too large to handle."""

    sqlstate = "54000"


class StartupTooLarge(TooLarge):
    """A startup packet past the limit: protocol_violation, as PostgreSQL itself says
    (it logs "invalid length of startup packet" and closes the connection unanswered;
    the relay answers, so the client can show why)."""


# What reading past the end of a body, or a missing NUL, raises inside the parsers below:
# each parser turns them into one ProtocolError naming the message.
_MALFORMED = (IndexError, ValueError, struct.error)


def _malformed(what: str) -> ProtocolError:
    return ProtocolError(f"malformed {what} message")


class Message(NamedTuple):
    """One typed message: its type byte and body (without type and length). A tuple:
    the relay makes several per statement, and a frozen dataclass costs twice as much
    to build."""

    type: bytes
    body: bytes

    def raw(self) -> bytes:
        """The message as it travels on the wire."""
        return _HDR.pack(self.type, len(self.body) + 4) + self.body


class RowRun(NamedTuple):
    """Consecutive complete DataRow messages of one read, framed as on the wire."""

    raw: bytes
    nrows: int
    # Where each row starts in ``raw`` (the decoder found them anyway).
    starts: list[int] | None = None


@dataclass(frozen=True)
class Startup:
    """An untyped startup-phase packet: StartupMessage, SSLRequest, GSSENCRequest or
    CancelRequest."""

    code: int
    body: bytes

    @property
    def params(self) -> dict[str, str]:
        """Parameters of a StartupMessage."""
        parts = self.body.split(b"\0")
        out: dict[str, str] = {}
        for i in range(0, len(parts) - 1, 2):
            if not parts[i]:
                break
            out[parts[i].decode("utf-8", "replace")] = parts[i + 1].decode("utf-8", "replace")
        return out


class StartupDecoder:
    """Reads the untyped packets a client sends before its StartupMessage is accepted."""

    def __init__(self, max_startup: int = MAX_STARTUP) -> None:
        self._buf = bytearray()
        self._max = max_startup

    def feed(self, data: bytes) -> Startup | None:
        """Add bytes; returns a complete packet (the rest stays buffered) or None."""
        self._buf += data
        if len(self._buf) < 4:
            return None
        # The length comes first: a packet too long is refused before it is read.
        (length,) = _I32.unpack_from(self._buf, 0)
        if length > self._max:
            # In PostgreSQL's words ("invalid length of startup packet"), and the limit.
            raise StartupTooLarge(
                "startup packet",
                length,
                self._max,
                "pg_max_startup",
                f"invalid startup packet length {length}: over the limit of {self._max}"
                " bytes (limits.pg_max_startup)",
            )
        if len(self._buf) < 8:
            return None
        if length < 8:
            raise ProtocolError(f"invalid startup packet length {length}")
        if len(self._buf) < length:
            return None
        (code,) = _I32.unpack_from(self._buf, 4)
        body = bytes(self._buf[8:length])
        del self._buf[:length]
        return Startup(code, body)

    def rest(self) -> bytes:
        """Bytes received after the last packet (the client pipelined ahead)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


class MessageDecoder:
    """Splits a byte stream into typed messages; one instance per direction."""

    def __init__(self, max_message: int = MAX_MESSAGE, setting: str | None = None) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._setting = setting  # the config key of ``max_message``, for the error

    def buffered(self) -> int:
        """Bytes of an incomplete message held from earlier reads."""
        return len(self._buf)

    def feed(self, data: bytes) -> Iterator[Message]:
        """Add bytes and yield every complete message."""
        return cast(Iterator[Message], self._feed(data, runs=False))

    def feed_runs(self, data: bytes) -> Iterator[Message | RowRun]:
        """Like ``feed``, but consecutive complete DataRows ('D' from the server) come
        as one ``RowRun``: a result set is masked a block at a time (relay/pg/rows.py)."""
        return self._feed(data, runs=True)

    def _feed(self, data: bytes, runs: bool) -> Iterator[Message | RowRun]:
        buf = self._buf
        cap = self._max
        if buf:
            buf += data
            if len(buf) >= 5:
                (length,) = _I32.unpack_from(buf, 1)
                if 4 <= length <= cap and len(buf) < 1 + length:
                    return  # still inside one large message: no copy until it is whole
            src = bytes(buf)
            buf.clear()
        else:
            # The usual case: the read starts with a message. Bodies are sliced from
            # it (one copy each; a run that is the whole read is not copied at all).
            src = data if type(data) is bytes else bytes(data)
        pos = 0
        n = len(src)
        try:
            while n - pos >= 5:
                if runs and src[pos] == 0x44:
                    start = pos
                    starts: list[int] = []
                    while n - pos >= 5 and src[pos] == 0x44:
                        (length,) = _I32.unpack_from(src, pos + 1)
                        if length < 4 or length > cap:
                            raise self._bad_length(b"D", length)
                        end = pos + 1 + length
                        if end > n:
                            break
                        starts.append(pos - start)
                        pos = end
                    if not starts:
                        break
                    yield RowRun(src[start:pos], len(starts), starts)
                    continue
                typ, length = _HDR.unpack_from(src, pos)
                if length < 4 or length > cap:
                    raise self._bad_length(typ, length)
                end = pos + 1 + length
                if end > n:
                    break
                msg = Message(typ, src[pos + 5 : end])
                pos = end  # before the yield: a caller may stop after any message
                yield msg
        finally:
            # What is left (an incomplete message, or what a caller that stopped early
            # did not take) waits for the next read or ``take_rest``.
            if pos < n:
                buf += memoryview(src)[pos:]

    def _bad_length(self, typ: bytes, length: int) -> ProtocolError:
        if length < 4 or self._setting is None:
            # Malformed, or past a cap no peer should reach (not a configured limit).
            return ProtocolError(f"invalid length {length} for message type {typ!r}")
        # A client's: named as the client would know it, with the setting that allows more.
        name = _NAMES.get(typ, f"message type {typ!r}")
        return MessageTooLarge(name, 1 + length, 1 + self._max, self._setting)

    def take_rest(self) -> bytes:
        """Hand over the bytes of an incomplete message (to another decoder)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


# Frontend message names, for the error that refuses one too large.
_NAMES = {
    b"Q": "Query message",
    b"P": "Parse message",
    b"B": "Bind message",
    b"d": "CopyData message",
    b"F": "FunctionCall message",
    b"p": "password message",
    b"D": "Describe message",
    b"E": "Execute message",
    b"C": "Close message",
    b"f": "CopyFail message",
}


def client_decoder(max_message: int) -> MessageDecoder:
    """The decoder of a client's messages in the relayed phase, capped at
    ``limits.pg_max_message`` (the whole message, type byte and length included)."""
    return MessageDecoder(max_message - 1, setting="pg_max_message")


# -- reading bodies -------------------------------------------------------------------


def cstring(body: bytes, pos: int) -> tuple[str, int]:
    """A NUL-terminated string at ``pos``; returns it and the position after it.
    Raises ProtocolError when there is no NUL."""
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("malformed message: a string is not NUL-terminated")
    return body[pos:end].decode("utf-8", "replace"), end + 1


def parse_query(body: bytes) -> str:
    """The SQL text of a Query message."""
    return body[: body.index(b"\0")].decode("utf-8", "replace") if b"\0" in body else ""


@dataclass(frozen=True)
class Parse:
    """A Parse message."""

    name: str
    query: str
    param_types: tuple[int, ...]


def parse_parse(body: bytes) -> Parse:
    """Decode Parse."""
    try:
        name, pos = cstring(body, 0)
        query, pos = cstring(body, pos)
        (n,) = _I16.unpack_from(body, pos)
        types = struct.unpack_from(f"!{n}i", body, pos + 2) if n > 0 else ()
    except _MALFORMED:
        raise _malformed("Parse") from None
    return Parse(name, query, tuple(types))


@dataclass(frozen=True)
class Bind:
    """What the relay needs of a Bind: names and result formats."""

    portal: str
    statement: str
    result_formats: tuple[int, ...]


def parse_bind(body: bytes) -> Bind:
    """Decode Bind (parameter values are skipped, not copied)."""
    try:
        portal, pos = cstring(body, 0)
        stmt, pos = cstring(body, pos)
        (nfmt,) = _I16.unpack_from(body, pos)
        # Negative counts would move the position backwards (and loop on garbage).
        if nfmt < 0:
            raise ValueError
        pos += 2 + 2 * nfmt
        (nparams,) = _I16.unpack_from(body, pos)
        pos += 2
        for _ in range(nparams):
            (length,) = _I32.unpack_from(body, pos)
            pos += 4 + max(length, 0)
        (nres,) = _I16.unpack_from(body, pos)
        res = struct.unpack_from(f"!{nres}h", body, pos + 2) if nres > 0 else ()
    except _MALFORMED:
        raise _malformed("Bind") from None
    return Bind(portal, stmt, tuple(res))


def parse_describe(body: bytes) -> tuple[str, str]:
    """(``S`` or ``P``, name) of a Describe or Close."""
    if body[:1] not in (b"S", b"P"):
        raise _malformed("Describe/Close")
    return chr(body[0]), cstring(body, 1)[0]


def parse_execute(body: bytes) -> tuple[str, int]:
    """(portal, max rows) of an Execute."""
    try:
        portal, pos = cstring(body, 0)
        return portal, _I32.unpack_from(body, pos)[0]
    except _MALFORMED:
        raise _malformed("Execute") from None


@dataclass(frozen=True)
class Field:
    """A column of a RowDescription."""

    name: str
    table_oid: int
    attnum: int
    type_oid: int
    format: int


_FIELD = struct.Struct("!ihihih")


def parse_row_description(body: bytes) -> list[Field]:
    """Decode RowDescription."""
    try:
        (n,) = _I16.unpack_from(body, 0)
        pos = 2
        fields = []
        for _ in range(n):
            name, pos = cstring(body, pos)
            table, attnum, typ, _len, _mod, fmt = _FIELD.unpack_from(body, pos)
            pos += _FIELD.size
            fields.append(Field(name, table, attnum, typ, fmt))
    except _MALFORMED:
        raise _malformed("RowDescription") from None
    return fields


def with_formats(fields: Sequence[Field], formats: Sequence[int]) -> list[Field]:
    """Fields with the result formats a Bind asked for (none: text; one: all)."""
    if not formats:
        return [
            f if f.format == 0 else Field(f.name, f.table_oid, f.attnum, f.type_oid, 0)
            for f in fields
        ]
    out = []
    for i, f in enumerate(fields):
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        out.append(Field(f.name, f.table_oid, f.attnum, f.type_oid, fmt))
    return out


def parse_data_row(body: bytes) -> list[bytes | None]:
    """Decode DataRow values (None is SQL NULL); ProtocolError when a length runs past
    the body."""
    try:
        (n,) = _I16.unpack_from(body, 0)
        pos = 2
        values: list[bytes | None] = []
        for _ in range(n):
            (length,) = _I32.unpack_from(body, pos)
            pos += 4
            if length < 0:
                values.append(None)
            else:
                if pos + length > len(body):
                    raise ValueError
                values.append(body[pos : pos + length])
                pos += length
    except _MALFORMED:
        raise _malformed("DataRow") from None
    return values


def parse_fields(body: bytes) -> list[tuple[str, str]]:
    """The (code, value) fields of an ErrorResponse or NoticeResponse."""
    out = []
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = cstring(body, pos + 1)
        out.append((code, value))
    return out


def parse_command_complete(body: bytes) -> tuple[str, int | None]:
    """(tag, row count) of CommandComplete, e.g. ('SELECT 3', 3)."""
    end = body.find(b"\0")
    tag = (body[:end] if end >= 0 else body).decode("utf-8", "replace")
    last = tag.rsplit(" ", 1)[-1]
    # isdigit() alone accepts characters int() refuses ('²').
    return tag, int(last) if last.isascii() and last.isdigit() else None


# -- building messages ------------------------------------------------------------------


def message(typ: bytes, body: bytes = b"") -> bytes:
    """Frame a message."""
    return _HDR.pack(typ, len(body) + 4) + body


def data_row(values: Sequence[bytes | None]) -> bytes:
    """A DataRow message."""
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(_I32.pack(-1))
        else:
            parts.append(_I32.pack(len(v)))
            parts.append(v)
    return message(b"D", b"".join(parts))


def fields_body(fields: Sequence[tuple[str, str]]) -> bytes:
    """Body of an ErrorResponse/NoticeResponse."""
    return b"".join(c.encode() + v.encode() + b"\0" for c, v in fields) + b"\0"


def error_response(
    sqlstate: str, text: str, *, severity: str = "ERROR", detail: str | None = None
) -> bytes:
    """An ErrorResponse."""
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", text)]
    if detail:
        fields.append(("D", detail))
    return message(b"E", fields_body(fields))


def notice_response(text: str, *, severity: str = "NOTICE") -> bytes:
    """A NoticeResponse."""
    return message(
        b"N", fields_body([("S", severity), ("V", severity), ("C", "00000"), ("M", text)])
    )


def ready_for_query(status: bytes) -> bytes:
    """ReadyForQuery with transaction status I, T or E."""
    return message(b"Z", status)


def startup_message(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    """A StartupMessage."""
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 8) + _I32.pack(version) + body


def auth_request(code: int, extra: bytes = b"") -> bytes:
    """An Authentication* message (0 ok, 3 cleartext, 5 md5, 10 SASL, 11/12 SASL steps)."""
    return message(b"R", _I32.pack(code) + extra)


def password_message(secret: bytes) -> bytes:
    """PasswordMessage / SASLResponse (the caller adds the NUL for cleartext)."""
    return message(b"p", secret)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    """SASLInitialResponse."""
    return message(b"p", mechanism.encode() + b"\0" + _I32.pack(len(data)) + data)


def negotiate_protocol_version(minor: int, unsupported: Sequence[str]) -> bytes:
    """NegotiateProtocolVersion: the newest minor version we speak and the options we
    do not recognise."""
    body = _I32.pack(minor) + _I32.pack(len(unsupported))
    body += b"".join(o.encode() + b"\0" for o in unsupported)
    return message(b"v", body)


def backend_key_data(pid: int, key: int) -> bytes:
    """BackendKeyData with a 4-byte key (protocol 3.0)."""
    return message(b"K", struct.pack("!ii", pid, key))


def cancel_request(pid: int, key: bytes) -> bytes:
    """A CancelRequest packet for the upstream server."""
    body = struct.pack("!ii", CANCEL_REQUEST, pid) + key
    return _I32.pack(len(body) + 4) + body


def parameter_status(name: str, value: str) -> bytes:
    """ParameterStatus."""
    return message(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def query(text: str) -> bytes:
    """A simple Query."""
    return message(b"Q", text.encode() + b"\0")


def parse_msg(name: str, text: str, param_types: Sequence[int] = ()) -> bytes:
    """A Parse message."""
    body = name.encode() + b"\0" + text.encode() + b"\0" + _I16.pack(len(param_types))
    body += b"".join(_I32.pack(t) for t in param_types)
    return message(b"P", body)


def describe(kind: str, name: str) -> bytes:
    """A Describe message (kind ``S`` or ``P``)."""
    return message(b"D", kind.encode() + name.encode() + b"\0")


# -- messages that carry text besides rows: found and rebuilt for masking ----------------


@dataclass(frozen=True)
class FunctionCall:
    """A FunctionCall ('F'): the function's OID, its arguments (None is NULL) with their
    formats, and the result format."""

    oid: int
    args: tuple[bytes | None, ...]
    formats: tuple[int, ...]
    result_format: int


def parse_function_call(body: bytes) -> FunctionCall:
    """Decode FunctionCall; each argument's format resolved (none given: text; one: all)."""
    try:
        (oid,) = struct.unpack_from("!I", body, 0)
        (nfmt,) = _I16.unpack_from(body, 4)
        if nfmt < 0:
            raise ValueError
        codes = struct.unpack_from(f"!{nfmt}h", body, 6)
        pos = 6 + 2 * nfmt
        (nargs,) = _I16.unpack_from(body, pos)
        if nargs < 0 or (nfmt > 1 and nfmt != nargs):
            raise ValueError
        pos += 2
        args: list[bytes | None] = []
        for _ in range(nargs):
            (length,) = _I32.unpack_from(body, pos)
            pos += 4
            if length < 0:
                args.append(None)
                continue
            if pos + length > len(body):
                raise ValueError
            args.append(body[pos : pos + length])
            pos += length
        (result,) = _I16.unpack_from(body, pos)
        if pos + 2 != len(body):
            raise ValueError
    except _MALFORMED:
        raise _malformed("FunctionCall") from None
    formats = codes if nfmt > 1 else (codes[0] if codes else 0,) * nargs
    return FunctionCall(oid, tuple(args), tuple(formats), result)


def parse_function_result(body: bytes) -> bytes | None:
    """The value of a FunctionCallResponse ('V'), None for NULL."""
    try:
        (length,) = _I32.unpack_from(body, 0)
        if length >= 0 and 4 + length != len(body):
            raise ValueError
    except _MALFORMED:
        raise _malformed("FunctionCallResponse") from None
    return None if length < 0 else body[4:]


def function_result(value: bytes | None) -> bytes:
    """A FunctionCallResponse message."""
    if value is None:
        return message(b"V", _I32.pack(-1))
    return message(b"V", _I32.pack(len(value)) + value)


def _cbytes(body: bytes, pos: int) -> tuple[bytes, int]:
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("malformed message: a string is not NUL-terminated")
    return body[pos:end], end + 1


def parse_notification(body: bytes) -> tuple[int, bytes, bytes]:
    """(process id, channel, payload) of a NotificationResponse ('A'), as bytes."""
    try:
        (pid,) = _I32.unpack_from(body, 0)
        channel, pos = _cbytes(body, 4)
        payload, _pos = _cbytes(body, pos)
    except _MALFORMED:
        raise _malformed("NotificationResponse") from None
    return pid, channel, payload


def notification(pid: int, channel: bytes, payload: bytes) -> bytes:
    """A NotificationResponse message."""
    return message(b"A", _I32.pack(pid) + channel + b"\0" + payload + b"\0")


def parse_parameter_status(body: bytes) -> tuple[bytes, bytes]:
    """(name, value) of a ParameterStatus ('S'), as bytes."""
    name, pos = _cbytes(body, 0)
    value, _pos = _cbytes(body, pos)
    return name, value


def parameter_status_bytes(name: bytes, value: bytes) -> bytes:
    """ParameterStatus from bytes (a masked value keeps its exact bytes)."""
    return message(b"S", name + b"\0" + value + b"\0")


def map_row_description_names(body: bytes, fn: Callable[[bytes], bytes]) -> bytes:
    """RowDescription ``body`` with each column name replaced by ``fn(name)`` (which must
    not add a NUL); the same object when no name changed."""
    try:
        (n,) = _I16.unpack_from(body, 0)
        pos = 2
        parts: list[bytes] = [body[:2]]
        changed = False
        for _ in range(n):
            name, end = _cbytes(body, pos)
            new = fn(name)
            changed = changed or new != name
            parts.append(new + b"\0" + body[end : end + _FIELD.size])
            pos = end + _FIELD.size
            if pos > len(body):
                raise ValueError
        parts.append(body[pos:])
    except _MALFORMED:
        raise _malformed("RowDescription") from None
    return b"".join(parts) if changed else body


def function_call(
    oid: int, args: Sequence[bytes | None], formats: Sequence[int] = (), result_format: int = 0
) -> bytes:
    """A FunctionCall message (clients build it; the relay's tests do)."""
    body = struct.pack("!I", oid) + _I16.pack(len(formats))
    body += b"".join(_I16.pack(f) for f in formats) + _I16.pack(len(args))
    for a in args:
        body += _I32.pack(-1) if a is None else _I32.pack(len(a)) + a
    return message(b"F", body + _I16.pack(result_format))
