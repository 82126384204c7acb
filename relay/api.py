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
from typing import Any

from aiohttp import WSMsgType, web

from recorder.objectstore import ObjectStoreError, locate_cast
from recorder.store import StoreError
from recorder.store.spool import store_unavailable
from relay import peer
from relay.approvals import ApprovalError
from relay.context import RelayContext
from relay.identity import AuthError, Identity
from relay.live import LiveStream
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
IDENT = "identity"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIMIT = 10_000


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


# -- routes ------------------------------------------------------------------------------


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


def _fault_metrics(ctx: RelayContext) -> list[str]:
    """Recording failures and the store spool (alerts for on-call)."""
    spool = ctx.spool
    lines = [
        "# HELP castgate_recording_failures_total Sessions whose recording failed, by what "
        "was done (terminated, refused, continued).",
        "# TYPE castgate_recording_failures_total counter",
    ]
    for action in ("terminated", "refused", "continued"):
        n = ctx.audit.recording_failures[action]
        lines.append(f'castgate_recording_failures_total{{action="{action}"}} {n}')
    return [
        *lines,
        "# HELP castgate_store_available The audit store takes writes (0: they are spooled).",
        "# TYPE castgate_store_available gauge",
        f"castgate_store_available {int(spool.available)}",
        "# HELP castgate_store_spool_pending Store writes waiting in the on-disk spool.",
        "# TYPE castgate_store_spool_pending gauge",
        f"castgate_store_spool_pending {spool.pending}",
        "# HELP castgate_store_spooled_total Store writes spooled during outages.",
        "# TYPE castgate_store_spooled_total counter",
        f"castgate_store_spooled_total {spool.spooled}",
        "# HELP castgate_store_replayed_total Spooled store writes replayed to the store.",
        "# TYPE castgate_store_replayed_total counter",
        f"castgate_store_replayed_total {spool.replayed}",
        "# HELP castgate_store_rejected_total Spooled writes the store refused (kept aside).",
        "# TYPE castgate_store_rejected_total counter",
        f"castgate_store_rejected_total {spool.rejected}",
    ]


@requires("auditor", "admin")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    ctx = _ctx(request)
    lines = [
        "# HELP castgate_up The relay is running.",
        "# TYPE castgate_up gauge",
        "castgate_up 1",
        "# HELP castgate_live_sessions Sessions open now.",
        "# TYPE castgate_live_sessions gauge",
    ]
    by_proto: dict[str, int] = {"ssh": 0, "postgres": 0}
    for stream in ctx.hub.streams.values():
        proto = str(stream.meta.get("protocol", "ssh"))
        by_proto[proto] = by_proto.get(proto, 0) + 1
    lines += [f'castgate_live_sessions{{protocol="{p}"}} {n}' for p, n in sorted(by_proto.items())]
    lines += [
        "# HELP castgate_watchers Live watchers connected.",
        "# TYPE castgate_watchers gauge",
        f"castgate_watchers {sum(len(s.watchers) for s in ctx.hub.streams.values())}",
        "# HELP castgate_approvals_pending Approval requests waiting for a decision.",
        "# TYPE castgate_approvals_pending gauge",
        f"castgate_approvals_pending {len(ctx.broker._events)}",
        "# HELP castgate_events_total Audit events written, by kind and outcome.",
        "# TYPE castgate_events_total counter",
    ]
    for (kind, outcome), n in sorted(ctx.audit.counters.items()):
        lines.append(f'castgate_events_total{{kind="{kind}",outcome="{outcome}"}} {n}')
    lines += _fault_metrics(ctx)
    if ctx.shipping.uploader is not None:
        up = ctx.shipping.uploader
        lines += [
            "# HELP castgate_uploads_total Casts shipped to object storage, by outcome.",
            "# TYPE castgate_uploads_total counter",
            f'castgate_uploads_total{{outcome="success"}} {up.uploaded}',
            f'castgate_uploads_total{{outcome="failure"}} {up.failed}',
            "# HELP castgate_upload_bytes_total Bytes of casts confirmed in object storage.",
            "# TYPE castgate_upload_bytes_total counter",
            f"castgate_upload_bytes_total {up.bytes}",
            "# HELP castgate_uploads_pending Casts waiting for an upload (attempt).",
            "# TYPE castgate_uploads_pending gauge",
            f"castgate_uploads_pending {up.pending}",
        ]
    if ctx.cluster is not None:
        status = ctx.cluster.status()
        lines += [
            "# HELP castgate_cluster_listening Listening for approval decisions of other relays.",
            "# TYPE castgate_cluster_listening gauge",
            f"castgate_cluster_listening {int(status['listening'])}",
            "# HELP castgate_approval_notifications_total Decisions announced by LISTEN/NOTIFY.",
            "# TYPE castgate_approval_notifications_total counter",
            f"castgate_approval_notifications_total {status['notifications']}",
            "# HELP castgate_cluster_listen_reconnects_total LISTEN connections lost.",
            "# TYPE castgate_cluster_listen_reconnects_total counter",
            f"castgate_cluster_listen_reconnects_total {status['reconnects']}",
        ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


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


@requires("auditor", "admin", "approver")
async def live(request: web.Request) -> web.StreamResponse:
    """WebSocket: the current screen, then the masked live events until the end."""
    ctx = _ctx(request)
    ident: Identity = request[IDENT]
    sid = request.match_info["id"]
    stream = ctx.hub.get(sid)
    if stream is None:
        return await _live_elsewhere(request, ident, sid)
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=WS_MESSAGE_MAX + 1)
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
    written to the connection as frames the stream builds once for all its watchers
    (see relay/live.py)."""
    transport = request.transport
    if not isinstance(transport, asyncio.Transport):
        return ws  # the client is already gone
    watcher, screen = stream.subscribe_frames(transport)
    reader = asyncio.ensure_future(_drain_ws(ws))
    ended = asyncio.ensure_future(watcher.next())
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
        watcher.start()
        # Until the session ends (or this watcher is dropped) or the client leaves.
        await asyncio.wait((reader, ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        reader.cancel()
        ended.cancel()
        watcher.close()
        with contextlib.suppress(Exception):
            await ws.close()
    return ws


async def _live_elsewhere(request: web.Request, ident: Identity, sid: str) -> web.StreamResponse:
    """A session live on another relay of the deployment: proxy the owner's stream."""
    ctx = _ctx(request)
    try:
        owner = await peer.owner_url(ctx, sid)
    except peer.PeerError as exc:
        return _error(exc.status, str(exc))
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=WS_MESSAGE_MAX + 1)
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
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=WS_MESSAGE_MAX + 1)
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


@requires("approver", "auditor", "admin")
async def list_approvals(request: web.Request) -> web.Response:
    """Approval requests (default: pending)."""
    ctx = _ctx(request)
    status = request.query.get("status", "pending")
    allowed = ("pending", "approved", "denied", "expired", "interrupted", "all")
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


@requires("approver")
async def approve(request: web.Request) -> web.Response:
    """Approve a held command."""
    return await _decide(request, True)


@requires("approver")
async def deny(request: web.Request) -> web.Response:
    """Deny a held command (a reason is required)."""
    return await _decide(request, False)


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3 document of this API."""
    return _json(OPENAPI)


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
    return app


# -- OpenAPI -----------------------------------------------------------------------------

_ERR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _op(
    summary: str,
    ok: dict[str, Any],
    *codes: int,
    params: list[dict[str, Any]] | None = None,
    body: bool = False,
    auth: bool = True,
    reason_required: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok}
    for code in codes:
        responses[str(code)] = _ERR
    if auth:
        responses.setdefault("401", _ERR)
        responses.setdefault("403", _ERR)
        responses.setdefault("503", _ERR)  # the audit store is unavailable
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body:
        schema: dict[str, Any] = {"type": "object", "properties": {"reason": {"type": "string"}}}
        if reason_required:  # a denial needs a non-empty reason (_decide answers 400)
            schema["required"] = ["reason"]
            schema["properties"]["reason"]["minLength"] = 1
        op["requestBody"] = {
            "required": reason_required,
            "content": {"application/json": {"schema": schema}},
        }
    if not auth:
        op["security"] = []
    return op


def _ok(schema: dict[str, Any], content_type: str = "application/json") -> dict[str, Any]:
    return {"description": "ok", "content": {content_type: {"schema": schema}}}


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_OBJ = {"type": "object"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "castgate control API", "version": "1"},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "Session": {
                "type": "object",
                "required": ["id", "identity", "target", "protocol", "status"],
                "properties": {
                    "id": {"type": "string"},
                    "identity": {"type": "string"},
                    "target": {"type": "string"},
                    "protocol": {"type": "string"},
                    "status": {"type": "string"},
                },
            },
            "Run": {
                "type": "object",
                "required": ["run_id", "sessions", "session_ids", "first_started_at"],
                "properties": {
                    "run_id": {"type": "string"},
                    "provider": {"type": "string", "nullable": True},
                    "initiator": {"type": "string", "nullable": True},
                    "repository": {"type": "string", "nullable": True},
                    "ref": {"type": "string", "nullable": True},
                    "sha": {"type": "string", "nullable": True},
                    "sessions": {"type": "integer"},
                    "session_ids": {"type": "array", "items": {"type": "string"}},
                    "first_started_at": {"type": "string", "format": "date-time"},
                    "last_ended_at": {"type": "string", "format": "date-time", "nullable": True},
                    "commands": {"type": "integer"},
                    "blocked": {"type": "integer"},
                    "approvals": {"type": "integer"},
                    "masked": {"type": "integer"},
                    "masking_counts": _OBJ,
                },
            },
            "Approval": {
                "type": "object",
                "required": ["id", "status", "identity", "target", "command", "rule"],
                "properties": {
                    "id": {"type": "integer"},
                    "status": {"type": "string"},
                    "identity": {"type": "string"},
                    "target": {"type": "string"},
                    "command": {"type": "string"},
                    "rule": {"type": "string"},
                    "decisions": {"type": "array", "items": _OBJ},
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {
            "get": _op(
                "Health",
                _ok(
                    {
                        "type": "object",
                        "required": ["status"],
                        "properties": {"status": {"type": "string"}},
                    }
                ),
                503,
                auth=False,
            )
        },
        "/metrics": {"get": _op("Prometheus metrics", _ok({"type": "string"}, "text/plain"))},
        "/openapi.json": {"get": _op("This document", _ok(_OBJ), auth=False)},
        "/api/v1/sessions": {
            "get": _op(
                "List sessions, newest first",
                _ok(
                    {
                        "type": "object",
                        "required": ["sessions"],
                        "properties": {
                            "sessions": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/Session"},
                            }
                        },
                    }
                ),
                400,
                params=[
                    {"name": "live", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "identity", "in": "query", "schema": {"type": "string"}},
                    {"name": "target", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "since",
                        "in": "query",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "until",
                        "in": "query",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                    },
                ],
            )
        },
        "/api/v1/token/exchange": {
            "post": _op(
                "Exchange the OIDC bearer token for a short castgate token (same identity "
                "and expiry), for SSH passwords",
                _ok(
                    {
                        "type": "object",
                        "required": ["token", "expires_at", "identity"],
                        "properties": {
                            "token": {"type": "string"},
                            "expires_at": {"type": "string", "format": "date-time"},
                            "identity": {"type": "string"},
                            "run_id": {"type": "string", "nullable": True},
                        },
                    }
                ),
                429,
            )
        },
        "/api/v1/runs": {
            "get": _op(
                "List pipeline runs, newest first",
                _ok(
                    {
                        "type": "object",
                        "required": ["runs"],
                        "properties": {
                            "runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}}
                        },
                    }
                ),
                400,
                params=[
                    {
                        "name": "since",
                        "in": "query",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "until",
                        "in": "query",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                ],
            )
        },
        "/api/v1/runs/{id}": {
            "get": _op(
                "A pipeline run with its sessions",
                _ok(
                    {
                        "type": "object",
                        "required": ["run", "sessions"],
                        "properties": {
                            "run": {"$ref": "#/components/schemas/Run"},
                            "sessions": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/Session"},
                            },
                        },
                    }
                ),
                404,
                params=[_ID],
            )
        },
        "/api/v1/sessions/{id}": {
            "get": _op(
                "A session's audit record",
                _ok(
                    {
                        "type": "object",
                        "required": ["session", "commands", "approvals", "events"],
                        "properties": {
                            "session": {"$ref": "#/components/schemas/Session"},
                            "commands": {"type": "array"},
                            "approvals": {"type": "array"},
                            "events": {"type": "array"},
                        },
                    }
                ),
                404,
                params=[_ID],
            )
        },
        "/api/v1/sessions/{id}/cast": {
            "get": _op(
                "Download the cast (fetched from [s3] when not on this relay)",
                _ok({"type": "string"}, "application/x-asciicast"),
                404,
                502,
                params=[_ID],
            )
        },
        "/api/v1/sessions/{id}/live": {
            "get": _op(
                "WebSocket live stream (upgrade); proxied from the relay holding the session",
                _ok(_OBJ),
                400,
                404,
                502,
                params=[_ID],
            )
        },
        "/api/v1/approvals": {
            "get": _op(
                "List approvals",
                _ok(
                    {
                        "type": "object",
                        "required": ["approvals"],
                        "properties": {
                            "approvals": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/Approval"},
                            }
                        },
                    }
                ),
                400,
                params=[
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": [
                                "pending",
                                "approved",
                                "denied",
                                "expired",
                                "interrupted",
                                "all",
                            ],
                        },
                    }
                ],
            )
        },
        "/api/v1/approvals/{id}": {
            "get": _op(
                "One approval", _ok({"$ref": "#/components/schemas/Approval"}), 404, params=[_ID]
            )
        },
        "/api/v1/approvals/{id}/approve": {
            "post": _op(
                "Approve",
                _ok({"$ref": "#/components/schemas/Approval"}),
                400,
                404,
                409,
                params=[_ID],
                body=True,
            )
        },
        "/api/v1/approvals/{id}/deny": {
            "post": _op(
                "Deny (reason required)",
                _ok({"$ref": "#/components/schemas/Approval"}),
                400,
                404,
                409,
                params=[_ID],
                body=True,
                reason_required=True,
            )
        },
    },
}
