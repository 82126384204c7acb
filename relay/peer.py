"""Relay to relay: watching a session that another relay of the deployment holds.

A watcher may connect to any relay. When the session is live on another node, this
relay opens the owner's internal live route (``LIVE_PATH``) at the owner's advertised
API URL, authenticated with the shared peer secret (``cluster.peer_token_env``), and
passes the owner's events through. The secret is compared in constant time and never
logged; the watching identity travels along for the owner's log, while the audit event
of the watch is written once, by the relay the watcher is connected to.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp

from recorder.errors import CastgateError
from relay.live import Event

if TYPE_CHECKING:
    from relay.context import RelayContext

LIVE_PATH = "/internal/v1/sessions/{id}/live"
PEER_HEADER = "X-Castgate-Peer-Token"
ACTOR_HEADER = "X-Castgate-Actor"
NODE_HEADER = "X-Castgate-Node"
_CONNECT_TIMEOUT = 10.0


class PeerError(CastgateError):
    """A session cannot be watched through this relay; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RemoteLive:
    """An open live stream from the relay that owns the session."""

    node: str
    ws: aiohttp.ClientWebSocketResponse


def peer_token_ok(ctx: RelayContext, presented: str | None) -> bool:
    """Whether ``presented`` is this deployment's peer secret (constant time)."""
    if ctx.peer_token is None or not presented:
        return False
    return hmac.compare_digest(presented.encode(), ctx.peer_token.encode())


async def owner_url(ctx: RelayContext, session_id: str) -> tuple[str, str]:
    """The node holding a live session that is not live here, and its API URL; raises
    PeerError (404) naming why the session cannot be watched from here."""
    row = await asyncio.to_thread(ctx.store.get_session, session_id)
    if row is None:
        raise PeerError(404, f"no session {session_id}")
    if row["ended_at"] is not None:
        raise PeerError(404, f"session {session_id} is not live ({row['status']})")
    node = row.get("node")
    if not node or node == ctx.node:
        raise PeerError(404, f"session {session_id} is not live on this relay")
    found = await asyncio.to_thread(ctx.store.get_node, node)
    if found is None or found["stopped_at"] is not None or not found["api_url"]:
        raise PeerError(404, f"session {session_id} is on relay {node}, which is not running")
    if ctx.peer_token is None:
        raise PeerError(
            404,
            f"session {session_id} is live on relay {node}; watching it through this relay "
            "needs cluster.peer_token_env",
        )
    return node, str(found["api_url"]).rstrip("/")


@asynccontextmanager
async def open_live(
    ctx: RelayContext, session_id: str, actor: str, owner: tuple[str, str] | None = None
) -> AsyncIterator[RemoteLive]:
    """Connect to the owner's live stream of ``session_id`` on behalf of ``actor``
    (``owner``: what :func:`owner_url` returned, if the caller asked already). Raises
    PeerError: 404 when the session is not live anywhere we can reach it, 502 when its
    relay cannot be reached or refuses us."""
    node, base = owner or await owner_url(ctx, session_id)
    assert ctx.peer_token is not None  # owner_url checked it
    url = base.replace("http", "ws", 1) + LIVE_PATH.format(id=quote(session_id, safe=""))
    headers = {PEER_HEADER: ctx.peer_token, ACTOR_HEADER: actor, NODE_HEADER: ctx.node}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            ws = await asyncio.wait_for(
                http.ws_connect(url, headers=headers, heartbeat=30, autoping=True),
                _CONNECT_TIMEOUT,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 404:
                raise PeerError(404, f"session {session_id} is not live") from None
            raise PeerError(
                502, f"relay {node} refused the watch of session {session_id}: {exc.status}"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PeerError(
                502, f"relay {node} at {base} cannot be reached: {exc or type(exc).__name__}"
            ) from None
        async with ws:
            yield RemoteLive(node, ws)


async def events(remote: RemoteLive) -> AsyncGenerator[str, None]:
    """The owner's events as JSON text, ending with its ``end``, or with an ``end`` of
    our own when the connection to the owner breaks first."""
    async for msg in remote.ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        text = str(msg.data)
        yield text
        if text.startswith('{"type": "end"'):  # relay.live.Event.as_json, key order kept
            return
    lost = Event("end", f"connection to relay {remote.node} lost")
    yield json.dumps(lost.as_json())
