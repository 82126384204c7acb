"""Several relays sharing one store (issue 8): node identity, registration, heartbeats,
the reaper of lost relays, and the LISTEN/NOTIFY listener that carries approval
decisions between relays.

Every relay registers itself in the store's ``nodes`` table and keeps its heartbeat
fresh. Every relay also scans for nodes whose heartbeat is older than
``cluster.node_timeout`` and declares them lost: their live sessions and pending
approvals become ``interrupted`` (the store claims each lost node in one conditional
update, so relays reaping at once do it exactly once). With a PostgreSQL store a relay
LISTENs on the approvals channel and wakes a held command as soon as any relay records
a decision on it; the broker's poll covers a lost notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from datetime import datetime
from importlib import metadata
from typing import TYPE_CHECKING, Any

from recorder.config import Config, ConfigError
from recorder.store import APPROVALS_CHANNEL, StoreError

if TYPE_CHECKING:
    from relay.context import RelayContext

log = logging.getLogger("castgate.cluster")

# The broker's poll for decisions it was not told about: slow while notifications
# arrive, fast while the LISTEN connection is down (and on SQLite, where nothing listens).
POLL_LISTENING = 2.0
POLL_FALLBACK = 0.5
_RECONNECT_MAX = 10.0


def default_node_id(cfg: Config) -> str:
    """``cluster.node``, else the host name and a hash of the data directory: stable
    across restarts (a restarted relay finds its own sessions), distinct for two
    relays on one machine."""
    if cfg.cluster.node:
        return cfg.cluster.node
    data = str(cfg.data_path.resolve())
    host = socket.gethostname().split(".")[0] or "relay"
    return f"{host}-{hashlib.sha256(data.encode()).hexdigest()[:8]}"


_PEER_TOKEN_MIN = 16


def peer_token(cfg: Config) -> str | None:
    """The relay-to-relay secret from the variable ``cluster.peer_token_env`` names, or
    None when not configured. ConfigError when the variable is unset or too short."""
    name = cfg.cluster.peer_token_env
    if not name:
        return None
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(f"cluster.peer_token_env: environment variable {name} is not set")
    if len(value) < _PEER_TOKEN_MIN:
        raise ConfigError(
            f"cluster.peer_token_env: the secret in {name} is shorter than "
            f"{_PEER_TOKEN_MIN} characters"
        )
    return value


def castgate_version() -> str:
    """The installed castgate version, recorded with each node."""
    try:
        return metadata.version("castgate")
    except metadata.PackageNotFoundError:
        return "unknown"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Cluster:
    """This relay's membership in the deployment: register, heartbeat, reap, listen."""

    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg.cluster
        self.listening = False
        self.notifications = 0
        self.reconnects = 0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def api_url(self) -> str | None:
        """The URL other relays reach this relay's control API at."""
        configured = self.cfg.advertise_api
        return configured.rstrip("/") if configured else self.ctx.api_url

    async def start(self) -> None:
        """Register this node and start the heartbeat/reaper and the listener."""
        ctx = self.ctx
        before = await asyncio.to_thread(
            ctx.store.register_node, ctx.node, api_url=self.api_url, version=castgate_version()
        )
        if before is not None and before["stopped_at"] is None:
            # The previous run of this node did not stop cleanly and nobody reaped it
            # yet; its sessions were closed by interrupt_stale before we got here.
            log.warning("cluster.rejoined", extra={"node": ctx.node})
        log.info("cluster.registered", extra={"node": ctx.node, "api": self.api_url})
        self._tasks.append(asyncio.ensure_future(self._beat()))
        if ctx.store.libpq_url() is not None:
            self._tasks.append(asyncio.ensure_future(self._listen()))

    async def advertise(self) -> None:
        """Record the API URL once the API listens (its port may be chosen by the OS)."""
        if self.cfg.advertise_api is None and self.ctx.api_url is not None:
            await asyncio.to_thread(
                self.ctx.store.register_node,
                self.ctx.node,
                api_url=self.api_url,
                version=castgate_version(),
            )

    async def stop(self) -> None:
        """Stop the background tasks and mark this node stopped (clean shutdown)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        try:
            await asyncio.to_thread(self.ctx.store.stop_node, self.ctx.node)
        except StoreError as exc:
            log.warning("cluster.stop_failed", extra={"error": str(exc)})

    # -- heartbeat and reaper ----------------------------------------------------------

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat)
            try:
                await self.beat_once()
            except StoreError as exc:
                # The store may be restarting; the next beat tries again. Other relays
                # reap this one only if this lasts longer than node_timeout.
                log.warning("cluster.heartbeat_failed", extra={"error": str(exc)})
            except Exception:
                # Never let the heartbeat die: others would take this relay for lost.
                log.exception("cluster.heartbeat_error")

    async def beat_once(self) -> None:
        """One heartbeat, then one scan for lost relays."""
        ctx = self.ctx
        if not await asyncio.to_thread(ctx.store.heartbeat_node, ctx.node):
            await self._declared_lost()
        reaped = await asyncio.to_thread(
            ctx.store.reap_nodes, self.cfg.node_timeout, exclude=ctx.node
        )
        for row in reaped:
            beat = row["heartbeat_at"]
            detail = {
                "sessions": row["sessions"],
                "approvals": row["approvals"],
                "last_heartbeat": beat.isoformat() if isinstance(beat, datetime) else beat,
            }
            log.warning("cluster.node_lost", extra={"node": row["node"], **detail})
            await ctx.audit.event(
                "node.lost", None, "success", ctx.node, f"node:{row['node']}", detail
            )

    async def _declared_lost(self) -> None:
        """Another relay found this one's heartbeat too old (a stall longer than
        node_timeout) and interrupted its sessions in the store: end those sessions
        here too, so what runs matches the record, and register again."""
        ctx = self.ctx
        log.warning("cluster.declared_lost", extra={"node": ctx.node})
        for sid, session in list(ctx.live.items()):
            row = await asyncio.to_thread(ctx.store.get_session, sid)
            if row is not None and row["ended_at"] is not None:
                with contextlib.suppress(Exception):
                    await session.close("relay declared lost by the cluster")
        await asyncio.to_thread(
            ctx.store.register_node, ctx.node, api_url=self.api_url, version=castgate_version()
        )
        await ctx.audit.event("node.rejoin", None, "success", ctx.node, f"node:{ctx.node}", None)

    # -- approvals: LISTEN/NOTIFY -----------------------------------------------------

    async def _listen(self) -> None:
        import psycopg

        url = self.ctx.store.libpq_url()
        assert url is not None
        broker = self.ctx.broker
        delay = 0.2
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    url,
                    autocommit=True,
                    application_name="castgate-listen",
                    connect_timeout=10,
                    # A peer that vanished without a FIN must not leave us listening to
                    # nothing for hours.
                    keepalives=1,
                    keepalives_idle=15,
                    keepalives_interval=5,
                    keepalives_count=3,
                )
                async with conn:
                    await conn.execute(f"LISTEN {APPROVALS_CHANNEL}")
                    self.listening = True
                    broker.poll_interval = POLL_LISTENING
                    # Decisions made while not listening were not announced to us.
                    broker.wake_all()
                    delay = 0.2
                    log.info("cluster.listening", extra={"channel": APPROVALS_CHANNEL})
                    async for note in conn.notifies():
                        self._on_notify(note.payload)
            except (psycopg.Error, OSError) as exc:
                log.warning("cluster.listen_failed", extra={"error": _one_line(exc)})
            except Exception:
                log.exception("cluster.listen_error")
            finally:
                self.listening = False
                broker.poll_interval = POLL_FALLBACK
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)

    def _on_notify(self, payload: str) -> None:
        if not payload.isdigit():
            return
        self.notifications += 1
        self.ctx.broker.wake(int(payload))

    def status(self) -> dict[str, Any]:
        """Figures for /metrics."""
        return {
            "listening": self.listening,
            "notifications": self.notifications,
            "reconnects": self.reconnects,
        }
