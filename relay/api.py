"""The HTTP control API (aiohttp, on the relay's event loop): sessions and their audit
records and casts, live WebSocket streams, approvals, Prometheus metrics, health, and
the OpenAPI document describing exactly these routes.

Bearer tokens (static or OIDC, the same checks as agents) map to roles through the
``[roles]`` table. Every read of a recording or an audit record is itself an audit
event (PCI DSS 10.2.1.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field

from recorder.objectstore import ObjectStoreError, locate_cast
from recorder.store import StoreError
from recorder.store.spool import store_unavailable
from relay import peer
from relay.approvals import ApprovalError
from relay.context import RelayContext
from relay.identity import AuthError, Identity
from relay.live import LiveStream
from relay.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from relay.metrics import exposition, relay_registry
from relay.openapi import document, operation, undocumented
from relay.tokens import identity_detail

log = logging.getLogger("castgate.api")

# What one API peer may send: request bodies are approval reasons (a few hundred bytes),
# and watchers send nothing but control frames; larger ones are refused (HTTP 413,
# WebSocket close 1009) before they are read into memory whole.
BODY_MAX = 64 * 1024
WS_MESSAGE_MAX = 4 * 1024
"""The largest WebSocket message taken (aiohttp's ``max_msg_size`` refuses its own
figure: it is one more)."""

ROLE_KEY = web.AppKey("ctx", RelayContext)
METRICS_KEY = web.AppKey("metrics", CollectorRegistry)
OPENAPI_KEY = web.AppKey("openapi", dict[str, Any])
IDENT = "identity"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIMIT = 10_000
ApprovalStatus = Literal["pending", "approved", "denied", "expired", "interrupted", "all"]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=_json_default),
        status=status,
        content_type="application/json",
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class _Fail(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _ctx(request: web.Request) -> RelayContext:
    return request.app[ROLE_KEY]


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else "?"


async def _authenticate(request: web.Request) -> Identity:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    ctx = _ctx(request)
    if scheme.lower() != "bearer" or not token.strip():
        raise _Fail(401, "missing bearer token")
    peer = _peer(request)
    if ctx.limiter.blocked(peer):
        raise _Fail(429, "too many failed authentication attempts; try later")
    try:
        ident = await asyncio.to_thread(ctx.tokens.identity, token.strip())
    except AuthError as exc:
        ctx.limiter.failure(peer)
        ctx.audit.emit(
            "auth", None, "failure", peer, "api", {"method": "bearer", "reason": str(exc)}
        )
        raise _Fail(401, f"invalid token: {exc}") from None
    ctx.limiter.success(peer)
    return ident


def requires(*roles: str) -> Callable[[Handler], Handler]:
    """Route decorator: an authenticated identity holding one of ``roles``."""

    def wrap(handler: Handler) -> Handler:
        async def inner(request: web.Request) -> web.StreamResponse:
            try:
                ident = await _authenticate(request)
                held = _ctx(request).roles.of(ident.groups)
                if not held & set(roles):
                    raise _Fail(403, f"{ident.name} lacks the role: one of {', '.join(roles)}")
                request[IDENT] = ident
                return await handler(request)
            except _Fail as exc:
                return _error(exc.status, str(exc))

        return inner

    return wrap


def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or not 0 < int(raw) <= MAX_LIMIT:
        raise _Fail(400, f"{name} must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _time_param(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise _Fail(400, f"{name} must be an ISO 8601 time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _bool_param(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw.lower() not in ("true", "false", "1", "0"):
        raise _Fail(400, f"{name} must be true or false")
    return raw.lower() in ("true", "1")


# -- models: what the handlers below take and answer (relay/openapi.py builds the
# document from them; extra fields of store rows are allowed and passed through) --------


class Error(BaseModel):
    error: str


class Session(BaseModel):
    id: str
    identity: str
    target: str
    protocol: str
    status: str


class Run(BaseModel):
    run_id: str
    provider: str | None = None
    initiator: str | None = None
    repository: str | None = None
    ref: str | None = None
    sha: str | None = None
    sessions: int
    session_ids: list[str]
    first_started_at: datetime
    last_ended_at: datetime | None = None
    commands: int = 0
    blocked: int = 0
    approvals: int = 0
    masked: int = 0
    masking_counts: dict[str, Any] = {}


class Approval(BaseModel):
    id: int
    status: str
    identity: str
    target: str
    command: str
    rule: str
    decisions: list[dict[str, Any]] = []


Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT)]
_OBJECT: dict[str, Any] = {"type": "object"}
_TEXT: dict[str, Any] = {"type": "string"}


# -- routes ------------------------------------------------------------------------------


class Health(BaseModel):
    status: str


@operation("Health", Health, 503, auth=False)
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process and its store answer."""
    ctx = _ctx(request)
    try:
        await asyncio.to_thread(ctx.store.list_sessions, limit=1)
    except StoreError as exc:
        # Sessions go on meanwhile: their store writes are spooled on disk.
        return _json(
            {"status": "error", "error": str(exc), "spooled_writes": ctx.spool.pending}, 503
        )
    return _json(
        {
            "status": "ok",
            "node": ctx.node,
            "live_sessions": len(ctx.live),
            "spooled_writes": ctx.spool.pending,
        }
    )


@operation("Prometheus metrics", _TEXT, content_type="text/plain")
@requires("auditor", "admin")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format (relay/metrics.py)."""
    body = exposition(request.app[METRICS_KEY])
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


class SessionQuery(BaseModel):
    live: bool | None = None
    identity: str | None = None
    target: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: Limit | None = None


class SessionList(BaseModel):
    sessions: list[Session]


@operation("List sessions, newest first", SessionList, 400, query=SessionQuery)
@requires("auditor", "admin", "approver")
async def list_sessions(request: web.Request) -> web.Response:
    """Sessions, newest first, with filters."""
    ctx = _ctx(request)
    rows = await asyncio.to_thread(
        ctx.store.list_sessions,
        live=_bool_param(request, "live"),
        identity=request.query.get("identity"),
        target=request.query.get("target"),
        since=_time_param(request, "since"),
        until=_time_param(request, "until"),
        limit=_int_param(request, "limit") or 200,
    )
    for row in rows:
        stream = ctx.hub.get(row["id"])
        row["live_here"] = stream is not None
        row.pop("cast_path", None)
    return _json({"sessions": rows})


class ExchangedToken(BaseModel):
    token: str
    expires_at: datetime
    identity: str
    run_id: str | None = None


@operation(
    "Exchange the OIDC bearer token for a short castgate token (same identity and "
    "expiry), for SSH passwords",
    ExchangedToken,
    429,
)
async def exchange_token(request: web.Request) -> web.Response:
    """A short castgate token for the OIDC token given as the bearer (any identity the
    token authenticates; no role needed): for clients that cannot send the OIDC token
    itself, such as OpenSSH (at most 1023 bytes of password)."""
    ctx = _ctx(request)
    try:
        ident = await _authenticate(request)
    except _Fail as exc:
        return _error(exc.status, str(exc))
    if ident.method != "oidc":
        return _error(403, "only an OIDC token can be exchanged")
    try:
        token, expires = await asyncio.to_thread(ctx.tokens.exchange, ident)
    except ValueError as exc:
        return _error(403, str(exc))
    when = datetime.fromtimestamp(expires, UTC)
    ctx.audit.emit(
        "token.exchange",
        ident.name,
        "success",
        _peer(request),
        "api",
        {"expires_at": when.isoformat(), **identity_detail(ident)},
    )
    return _json(
        {"token": token, "expires_at": when, "identity": ident.name, "run_id": ident.run_id}
    )


class RunQuery(BaseModel):
    since: datetime | None = None
    until: datetime | None = None


class RunList(BaseModel):
    runs: list[Run]


@operation("List pipeline runs, newest first", RunList, 400, query=RunQuery)
@requires("auditor", "admin", "approver")
async def list_runs(request: web.Request) -> web.Response:
    """Pipeline runs (sessions sharing a CI token's run), newest first."""
    ctx = _ctx(request)
    runs = await asyncio.to_thread(
        ctx.store.list_runs,
        since=_time_param(request, "since"),
        until=_time_param(request, "until"),
    )
    return _json({"runs": runs})


class RunRecord(BaseModel):
    run: Run
    sessions: list[Session]


@operation("A pipeline run with its sessions", RunRecord, 404)
@requires("auditor", "admin")
async def get_run(request: web.Request) -> web.Response:
    """One pipeline run with its sessions."""
    ctx = _ctx(request)
    ident: Identity = request[IDENT]
    rid = request.match_info["id"]
    runs = await asyncio.to_thread(ctx.store.list_runs, run_id=rid)
    if not runs:
        raise _Fail(404, f"no run {rid}")
    rows = await asyncio.to_thread(ctx.store.run_sessions, rid)
    for row in rows:
        row.pop("cast_path", None)
    ctx.audit.emit(
        "record.read", ident.name, "success", _peer(request), f"run:{rid}", {"via": "api"}
    )
    return _json({"run": runs[0], "sessions": rows})


async def _session_or_404(request: web.Request) -> dict[str, Any]:
    ctx = _ctx(request)
    sid = request.match_info["id"]
    row = await asyncio.to_thread(ctx.store.get_session, sid)
    if row is None:
        raise _Fail(404, f"no session {sid}")
    return row


class SessionRecord(BaseModel):
    session: Session
    commands: list[Any]
    approvals: list[Any]
    events: list[Any]


@operation("A session's audit record", SessionRecord, 404)
@requires("auditor", "admin")
async def get_session(request: web.Request) -> web.Response:
    """One session's audit record: the session, its commands, approvals and events."""
    ctx = _ctx(request)
    ident: Identity = request[IDENT]
    row = await _session_or_404(request)  # a _Fail becomes the response in requires()
    sid = row["id"]
    commands = await asyncio.to_thread(ctx.store.list_commands, sid)
    approvals = await asyncio.to_thread(ctx.store.list_approvals, session_id=sid)
    events = await asyncio.to_thread(ctx.store.list_events, session_id=sid)
    manifest = await asyncio.to_thread(ctx.store.get_manifest, sid)
    row.pop("cast_path", None)
    ctx.audit.emit(
        "record.read",
        ident.name,
        "success",
        _peer(request),
        f"session:{sid}",
        {"via": "api"},
        session_id=sid,
    )
    return _json(
        {
            "session": row,
            "commands": commands,
            "approvals": approvals,
            "events": events,
            "manifest": manifest,
        }
    )


@operation(
    "Download the cast (fetched from [s3] when not on this relay)",
    _TEXT,
    404,
    502,
    content_type="application/x-asciicast",
)
@requires("auditor", "admin")
async def get_cast(request: web.Request) -> web.StreamResponse:
    """Download the session's cast (asciicast v2, as recorded)."""
    ctx = _ctx(request)
    ident: Identity = request[IDENT]
    row = await _session_or_404(request)  # a _Fail becomes the response in requires()
    if not row["cast_path"]:
        return _error(404, f"no recording for session {row['id']}")
    try:
        # Not here (another relay's, or shipped with keep_local off): from [s3].
        path = await asyncio.to_thread(locate_cast, ctx.cfg, Path(row["cast_path"]))
    except ObjectStoreError as exc:
        return _error(502, str(exc))
    if not path.is_file():
        return _error(404, f"no recording for session {row['id']}")
    ctx.audit.emit(
        "recording.read",
        ident.name,
        "success",
        _peer(request),
        f"session:{row['id']}",
        {"via": "api"},
        session_id=row["id"],
    )
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "application/x-asciicast",
            "Content-Disposition": f'attachment; filename="{row["id"]}.cast"',
        },
    )


@operation(
    "WebSocket live stream (upgrade); proxied from the relay holding the session",
    _OBJECT,
    400,
    404,
    502,
)
@requires("auditor", "admin", "approver")
async def live(request: web.Request) -> web.StreamResponse:
    """WebSocket: the current screen, then the masked live events until the end."""
    ctx = _ctx(request)
    ident: Identity = request[IDENT]
    sid = request.match_info["id"]
    stream = ctx.hub.get(sid)
    if stream is None:
        return await _live_elsewhere(request, ident, sid)
    ws = _watch_socket()
    if not ws.can_prepare(request).ok:  # aiohttp would answer a text/plain 400
        return _error(400, "a WebSocket upgrade is required")
    await ws.prepare(request)
    ctx.audit.emit(
        "recording.watch",
        ident.name,
        "success",
        _peer(request),
        f"session:{sid}",
        {"via": "api"},
        session_id=sid,
    )
    return await _serve_stream(ws, stream, request)


async def _serve_stream(
    ws: web.WebSocketResponse, stream: LiveStream, request: web.Request
) -> web.WebSocketResponse:
    """Send a prepared WebSocket the stream's screen, then its events until the end,
    as the messages the stream encodes once for all its watchers (see relay/live.py)."""

    async def send(payload: bytes) -> None:
        await ws.send_frame(payload, WSMsgType.TEXT)

    watcher, screen = stream.subscribe_frames(send)
    reader = asyncio.ensure_future(_drain_ws(ws))
    sender: asyncio.Future[None] | None = None
    try:
        await ws.send_json(
            {
                "type": "screen",
                "data": screen,
                "width": stream.width,
                "height": stream.height,
                "meta": stream.meta,
            }
        )
        sender = asyncio.ensure_future(watcher.run())
        # Until the session ends (or this watcher is dropped) or the client leaves.
        await asyncio.wait((reader, sender), return_when=asyncio.FIRST_COMPLETED)
    except ConnectionError:
        pass  # the client is gone (aiohttp raises ClientConnectionResetError)
    finally:
        reader.cancel()
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        watcher.close()
        with contextlib.suppress(Exception):
            await ws.close()
    return ws


def _watch_socket() -> web.WebSocketResponse:
    """A watcher's WebSocket. No permessage-deflate: the stream's messages are encoded
    once for all watchers, and compressing them would be work per watcher again."""
    return web.WebSocketResponse(heartbeat=30, max_msg_size=WS_MESSAGE_MAX + 1, compress=False)


async def _live_elsewhere(request: web.Request, ident: Identity, sid: str) -> web.StreamResponse:
    """A session live on another relay of the deployment: proxy the owner's stream."""
    ctx = _ctx(request)
    try:
        owner = await peer.owner_url(ctx, sid)
    except peer.PeerError as exc:
        return _error(exc.status, str(exc))
    ws = _watch_socket()
    if not ws.can_prepare(request).ok:
        return _error(400, "a WebSocket upgrade is required")
    async with contextlib.AsyncExitStack() as stack:
        try:
            remote = await stack.enter_async_context(peer.open_live(ctx, sid, ident.name, owner))
        except peer.PeerError as exc:
            return _error(exc.status, str(exc))
        await ws.prepare(request)
        ctx.audit.emit(
            "recording.watch",
            ident.name,
            "success",
            _peer(request),
            f"session:{sid}",
            {"via": "api", "node": remote.node},
            session_id=sid,
        )
        reader = asyncio.ensure_future(_drain_ws(ws))
        forward = asyncio.ensure_future(_forward(remote, ws))
        try:
            # Until the owner's stream ends or our watcher leaves, whichever is first.
            await asyncio.wait({reader, forward}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, forward):
                task.cancel()
            await asyncio.gather(reader, forward, return_exceptions=True)
            with contextlib.suppress(Exception):
                await ws.close()
    return ws


async def _forward(remote: peer.RemoteLive, ws: web.WebSocketResponse) -> None:
    async for text in peer.events(remote):
        await ws.send_str(text)


@undocumented("relay to relay, authenticated with the deployment's peer secret")
async def peer_live(request: web.Request) -> web.StreamResponse:
    """Relay to relay (not in the OpenAPI document): the live stream of a session held
    here, for another relay that proxies it to its watcher. Authenticated with the
    deployment's peer secret; the watch's audit event is written by that relay."""
    ctx = _ctx(request)
    if ctx.peer_token is None:
        return _error(404, "not found")
    origin = _peer(request)
    if ctx.limiter.blocked(origin):
        return _error(429, "too many failed authentication attempts; try later")
    if not peer.peer_token_ok(ctx, request.headers.get(peer.PEER_HEADER)):
        ctx.limiter.failure(origin)
        ctx.audit.emit(
            "auth", None, "failure", origin, "peer", {"method": "peer", "reason": "bad secret"}
        )
        return _error(401, "invalid peer token")
    ctx.limiter.success(origin)
    sid = request.match_info["id"]
    stream = ctx.hub.get(sid)
    if stream is None:
        return _error(404, f"session {sid} is not live on this relay")
    ws = _watch_socket()
    if not ws.can_prepare(request).ok:
        return _error(400, "a WebSocket upgrade is required")
    await ws.prepare(request)
    log.info(
        "peer.watch",
        extra={
            "session": sid,
            "actor": request.headers.get(peer.ACTOR_HEADER, "?")[:200],
            "peer_node": request.headers.get(peer.NODE_HEADER, "?")[:200],
            "origin": origin,
        },
    )
    return await _serve_stream(ws, stream, request)


async def _drain_ws(ws: web.WebSocketResponse) -> None:
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break


class ApprovalQuery(BaseModel):
    status: ApprovalStatus | None = None


class ApprovalList(BaseModel):
    approvals: list[Approval]


@operation("List approvals", ApprovalList, 400, query=ApprovalQuery)
@requires("approver", "auditor", "admin")
async def list_approvals(request: web.Request) -> web.Response:
    """Approval requests (default: pending)."""
    ctx = _ctx(request)
    status = request.query.get("status", "pending")
    allowed = get_args(ApprovalStatus)
    if status not in allowed:
        return _error(400, f"status must be one of {', '.join(allowed)}")
    rows = await asyncio.to_thread(
        ctx.store.list_approvals, status=None if status == "all" else status
    )
    return _json({"approvals": rows})


def _approval_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise _Fail(404, f"no approval {raw}")
    return int(raw)


@operation("One approval", Approval, 404)
@requires("approver", "auditor", "admin")
async def get_approval(request: web.Request) -> web.Response:
    """One approval with its decisions."""
    ctx = _ctx(request)
    aid = _approval_id(request)
    row = await asyncio.to_thread(ctx.store.get_approval, aid)
    if row is None:
        return _error(404, f"no approval {aid}")
    return _json(row)


async def _decide(request: web.Request, approve: bool) -> web.Response:
    ctx = _ctx(request)
    ident: Identity = request[IDENT]
    aid = _approval_id(request)
    reason = None
    if request.can_read_body:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, 'body must be JSON: {"reason": "..."}')
        if not isinstance(body, dict) or not isinstance(body.get("reason", ""), str | None):
            return _error(400, 'body must be JSON: {"reason": "..."}')
        reason = body.get("reason") or None
    if not approve and not reason:
        return _error(400, "a denial needs a reason")
    if await asyncio.to_thread(ctx.store.get_approval, aid) is None:
        return _error(404, f"no approval {aid}")
    try:
        row = await ctx.broker.decide(
            aid, approver=ident.name, approve=approve, reason=reason, origin=_peer(request)
        )
    except ApprovalError as exc:
        return _error(403, str(exc))
    except StoreError as exc:
        if store_unavailable(exc):
            raise  # a 503, from the middleware
        return _error(409, str(exc))
    return _json(row)


class Decision(BaseModel):
    reason: str | None = None


class Denial(BaseModel):
    # a denial needs a non-empty reason (_decide answers 400)
    reason: Annotated[str, Field(min_length=1)]


@operation("Approve", Approval, 400, 404, 409, body=Decision)
@requires("approver")
async def approve(request: web.Request) -> web.Response:
    """Approve a held command."""
    return await _decide(request, True)


@operation("Deny (reason required)", Approval, 400, 404, 409, body=Denial, body_required=True)
@requires("approver")
async def deny(request: web.Request) -> web.Response:
    """Deny a held command (a reason is required)."""
    return await _decide(request, False)


@operation("This document", _OBJECT, auth=False)
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3 document of this API."""
    return _json(request.app[OPENAPI_KEY])


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No stack traces to clients: unexpected failures are logged and answered 500."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except StoreError as exc:
        if store_unavailable(exc):
            # An outage, not a bug: reads wait for the store (writes are spooled).
            log.warning("api.store_unavailable", extra={"path": request.path, "error": str(exc)})
            return _error(503, f"audit store unavailable: {exc}")
        log.exception("api.error", extra={"path": request.path})
        return _error(500, "internal error")
    except Exception:
        log.exception("api.error", extra={"path": request.path})
        return _error(500, "internal error")


def build_app(ctx: RelayContext) -> web.Application:
    """The aiohttp application."""
    app = web.Application(middlewares=[errors], client_max_size=BODY_MAX)
    app[ROLE_KEY] = ctx
    app[METRICS_KEY] = relay_registry(ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/api/v1/sessions", list_sessions)
    app.router.add_get("/api/v1/sessions/{id}", get_session)
    app.router.add_get("/api/v1/sessions/{id}/cast", get_cast)
    app.router.add_get("/api/v1/sessions/{id}/live", live)
    app.router.add_get(peer.LIVE_PATH, peer_live)
    app.router.add_post("/api/v1/token/exchange", exchange_token)
    app.router.add_get("/api/v1/runs", list_runs)
    app.router.add_get("/api/v1/runs/{id}", get_run)
    app.router.add_get("/api/v1/approvals", list_approvals)
    app.router.add_get("/api/v1/approvals/{id}", get_approval)
    app.router.add_post("/api/v1/approvals/{id}/approve", approve)
    app.router.add_post("/api/v1/approvals/{id}/deny", deny)
    app[OPENAPI_KEY] = openapi_document(app)
    return app


def openapi_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of ``app``'s routes, from what their handlers declare."""
    return document(app, "castgate control API", Error)
