"""A PostgreSQL session's start-up, as separate steps the session runs in order:

1. ``Negotiation``: SSLRequest / GSSENCRequest answers, a CancelRequest, the
   StartupMessage (no I/O: fed bytes, it says what to answer);
2. ``check_startup``: what the StartupMessage asks for (protocol version, replication,
   TLS before a token is sent);
3. ``read_password`` and ``authenticate``: the token as the password, the rate limit,
   the identity it names;
4. ``admit``: the target, its groups, the client's encoding, the parameters forwarded;
5. ``connect_upstream`` and ``startup_answer``: the target's connection with its own
   credential, the mask_columns lookups, and what the client is told.

Each returns a ``Refusal`` (data: the FATAL and what the audit records) rather than
ending the connection itself: the session writes the audit event and the answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from recorder.config import TargetConfig
from recorder.masking import Masker
from relay.identity import AuthError, Identity
from relay.pg import protocol as p
from relay.pg.copymask import MaskTable
from relay.pg.pipe import Pipe
from relay.pg.sql import PINNED_SETTINGS, PINNED_VALUES, setting_ok
from relay.pg.upstream import (
    Upstream,
    UpstreamError,
    connect,
    resolve_mask_columns,
    simple_query,
)

_PASS_PARAMS = {
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "extra_float_digits",
    "IntervalStyle",
    "search_path",
}
STARTUP_READ_S = 30.0
PASSWORD_READ_S = 60.0


@dataclass(frozen=True)
class Refusal:
    """Why a connection is refused: the FATAL the client gets and the audit event
    (``event`` None: none is written)."""

    sqlstate: str
    message: str
    event: str | None = None
    reason: str | None = None
    method: str = "token"
    status: str | None = None  # the session's status, when it ends with one
    target: TargetConfig | None = None  # the target it was refused on, once admitted


@dataclass(frozen=True)
class Answer:
    """One byte to answer a negotiation request with; TLS starts after ``b"S"``."""

    byte: bytes
    start_tls: bool = False


@dataclass(frozen=True)
class Cancel:
    """A CancelRequest's body: (our pid, key) of the session it names."""

    body: bytes


class Negotiation:
    """The packets before the StartupMessage. ``feed`` returns what to answer, the
    Cancel or the StartupMessage, or None for more bytes."""

    def __init__(self, tls: bool, *, max_startup: int = p.MAX_STARTUP) -> None:
        self.tls_offered = tls
        self.tls = False  # TLS was started
        self._dec = p.StartupDecoder(max_startup)

    def feed(self, data: bytes) -> Answer | Cancel | p.Startup | None:
        pkt = self._dec.feed(data)
        if pkt is None:
            return None
        if pkt.code == p.SSL_REQUEST:
            if self._dec.rest():
                raise p.ProtocolError("data after SSLRequest before the TLS handshake")
            if self.tls_offered and not self.tls:
                self.tls = True
                return Answer(b"S", start_tls=True)
            return Answer(b"N")
        if pkt.code == p.GSSENC_REQUEST:
            return Answer(b"N")
        if pkt.code == p.CANCEL_REQUEST:
            return Cancel(pkt.body)
        return pkt

    def rest(self) -> bytes:
        """What the client sent after its StartupMessage (its password, say)."""
        return self._dec.rest()


@dataclass(frozen=True)
class Login:
    """A StartupMessage the relay will authenticate."""

    user: str
    database: str
    params: dict[str, str]
    preamble: bytes = b""  # a NegotiateProtocolVersion to send first, if needed


def check_startup(pkt: p.Startup, *, require_tls: bool, tls: bool) -> Login | Refusal:
    major = pkt.code >> 16
    if major != 3:
        return Refusal(
            "0A000", f"castgate: unsupported protocol version {major}.{pkt.code & 0xFFFF}"
        )
    params = pkt.params
    user = params.get("user", "")
    database = params.get("database", user)
    if params.get("replication"):
        return Refusal("28000", "castgate: replication connections are not relayed")
    unsupported = [k for k in params if k.startswith("_pq_.")]
    preamble = b""
    if (pkt.code & 0xFFFF) > 0 or unsupported:
        # We speak 3.0; libpq 18 asks for 3.2 and falls back when told.
        preamble = p.negotiate_protocol_version(0, unsupported)
    if require_tls and not tls:
        return Refusal(
            "28000",
            "castgate: this listener requires TLS (sslmode=require) before a token is sent",
            "auth",
            "password without TLS",
        )
    return Login(user, database, params, preamble)


async def read_password(pipe: Pipe, data: bytes) -> tuple[bytes, bytes]:
    """The password message after an AuthenticationCleartextPassword, and what the
    client sent after it (``data``: what came with the startup)."""
    msgs = p.MessageDecoder(max_message=65536)
    password: bytes | None = None
    early = bytearray()
    while password is None:
        if not data:
            data = await asyncio.wait_for(pipe.read(8192), PASSWORD_READ_S)
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
    return password, bytes(early) + msgs.take_rest()


async def authenticate(ctx: Any, peer: str, user: str, password: bytes) -> Identity | Refusal:
    """The identity whose token ``password`` is, which must be ``user``."""
    if ctx.limiter.blocked(peer):
        return Refusal(
            "28000",
            "castgate: too many failed authentication attempts; try later",
            "auth",
            "too many failed attempts from this address",
        )
    try:
        ident: Identity = await asyncio.to_thread(
            ctx.auth.by_token, password.decode("utf-8", "replace")
        )
    except AuthError as exc:
        ctx.limiter.failure(peer)
        return Refusal(
            "28P01", f"castgate: authentication failed for {user!r}: {exc}", "auth", str(exc)
        )
    if ident.name != user:
        return Refusal(
            "28P01",
            f"castgate: the token is not {user!r}'s (user must be the identity name)",
            "auth",
            f"token belongs to {ident.name}",
            method=ident.method,
        )
    return ident


def startup_encoding(value: str | None) -> str | None:
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


@dataclass(frozen=True)
class Admitted:
    target: TargetConfig
    forwarded: dict[str, str]  # the startup parameters the target gets


def admit(ctx: Any, ident: Identity, login: Login) -> Admitted | Refusal:
    """The target ``login`` names, if ``ident`` may use it as the client asks."""
    target = ctx.policy.target(login.database)
    if target is None or target.kind != "postgres":
        reason = f"no PostgreSQL target named {login.database!r}"
        return Refusal("42501", f"castgate: {reason}", "access", reason)
    if not ctx.policy.can_access(ident.groups, target):
        reason = f"identity {ident.name} is not in any group of target {target.name}"
        return Refusal("42501", f"castgate: {reason}", "access", reason)
    refused = startup_encoding(login.params.get("client_encoding"))
    if refused is not None:
        refused = ctx.masker.mask(refused)
        return Refusal("22023", f"castgate: {refused}", "access", refused, target=target)
    forwarded = {k: v for k, v in login.params.items() if k in _PASS_PARAMS}
    # One encoding: the target reads exactly the bytes the relay checked (see
    # ``startup_encoding``).
    forwarded.update(PINNED_VALUES)
    app = forwarded.get("application_name", "")
    forwarded["application_name"] = f"castgate:{ident.name}" + (f" {app}" if app else "")
    return Admitted(target, forwarded)


@dataclass
class Connected:
    """The target's connection, and where its mask_columns are."""

    up: Upstream
    mask_keys: set[tuple[int, int]] = field(default_factory=set)
    copy_tables: dict[str, list[MaskTable]] = field(default_factory=dict)


async def connect_upstream(
    target: TargetConfig, forwarded: dict[str, str], masker: Masker
) -> Connected | Refusal:
    up: Upstream | None = None
    try:
        up = await connect(target, forwarded)
        found = Connected(up)
        if target.mask_columns:
            found.mask_keys = await resolve_mask_columns(up, target.mask_columns)
            found.copy_tables = await mask_tables(up, found.mask_keys)
        return found
    except UpstreamError as exc:
        if up is not None:
            up.writer.close()
        # The target's refusal can quote a startup parameter the client chose.
        why = masker.mask(str(exc))
        return Refusal(
            "08006", f"castgate: {why}", "target.connect", why, status="target unreachable"
        )


async def mask_tables(up: Upstream, keys: set[tuple[int, int]]) -> dict[str, list[MaskTable]]:
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


def startup_answer(
    up: Upstream, target: str, masker: Masker, cancel_key: tuple[int, int], notice: str | None
) -> bytes | Refusal:
    """AuthenticationOk, the target's settings (masked), our cancel key, a notice if
    any and ReadyForQuery; refused if the target reports a pinned setting changed."""
    out = bytearray(p.auth_request(0))
    for k, v in up.params.items():
        if k in PINNED_SETTINGS and not setting_ok(k, v):
            return Refusal(
                "22023",
                f"castgate: target {target} reports {k} {v!r}",
                status="pinned setting changed",
            )
        out += p.parameter_status(masker.mask(k), masker.mask(v))
    out += p.backend_key_data(*cancel_key)
    if notice is not None:
        out += p.notice_response(notice)
    out += p.ready_for_query(up.status)
    return bytes(out)


def is_loopback(host: str) -> bool:
    """True for a listener address on the loopback interface."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
