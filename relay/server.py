"""``castgate relay``: one asyncio process serving the SSH listener (PostgreSQL and the
HTTP API join it on the same loop). SIGTERM or SIGINT: stop accepting, end open sessions
cleanly, seal their casts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import asyncssh
from aiohttp import web

from recorder.config import Config, ConfigError
from recorder.recovery import recover_crashed
from recorder.signing import SigningKey
from recorder.store import Store
from relay.accept_log import install as install_accept_log
from relay.api import build_app
from relay.api_listener import start_api_server
from relay.approvals import interrupt_stale
from relay.cast_sync import sync_open_casts
from relay.cluster import Cluster
from relay.connlimit import raise_nofile_limit
from relay.context import RelayContext
from relay.pg.relay import PgListener
from relay.pg.tls import server_context
from relay.ssh_relay import ENCRYPTION, RelayServer

log = logging.getLogger("castgate.relay")

HOST_KEY_NAME = "ssh_host_ed25519"


def load_or_create_host_key(keys_dir: Path) -> asyncssh.SSHKey:
    """The relay's SSH host key, generated on first use (mode 0600)."""
    path = keys_dir / HOST_KEY_NAME
    if not path.exists():
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.export_private_key())
        (keys_dir / f"{HOST_KEY_NAME}.pub").write_bytes(key.export_public_key())
        return key
    return asyncssh.read_private_key(str(path))


RUNTIME_NAME = "relay.json"


def write_runtime(cfg: Config, listening: dict[str, str]) -> None:
    """Where this relay actually listens (ports chosen by the OS when the config says 0),
    for client commands on the same machine."""
    import json

    path = cfg.data_path / RUNTIME_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "listen": listening}))
    tmp.replace(path)


def split_address(value: str, what: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) to a tuple; ConfigError naming the key."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen.{what}: expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - an explicit ':port'


async def serve(
    cfg: Config,
    *,
    ready: Callable[[dict[str, str]], None] | None = None,
    worker: int | None = None,
) -> None:
    """Run the relay until SIGTERM/SIGINT. ``worker``: this process is one of several
    sharing the listeners (relay/workers.py)."""
    # Before anything opens a file: the connection limits are sized from this figure.
    soft, hard = raise_nofile_limit()
    store = await asyncio.to_thread(Store.open, cfg.store_url())
    cfg.recordings_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ctx = RelayContext(
        cfg,
        store,
        SigningKey.load_or_create(cfg.keys_dir),
        # Each worker spools its own writes (one file, one writer).
        spool_dir=cfg.data_path / (f"spool-w{worker}" if worker is not None else "spool"),
    )
    shared = worker is not None  # SO_REUSEPORT: the kernel spreads connections
    # First: the writes an earlier run spooled while the store was away, so that crash
    # recovery and the stale-session sweep below see the store as that run left it.
    if ctx.spool.pending:
        replayed = await asyncio.to_thread(ctx.spool.replay)
        log.warning(
            "relay.spool_replayed", extra={"replayed": replayed, "pending": ctx.spool.pending}
        )
    # Before listening: casts a crash left open are sealed (and their sessions ended as
    # interrupted) before anything else can see or ship them.
    recovered = await asyncio.to_thread(
        recover_crashed, store, cfg.recordings_dir, ctx.signing_key, ctx.node
    )
    if recovered:
        log.warning(
            "relay.recovered_casts",
            extra={
                "sealed": sum(r.sealed for r in recovered),
                "left_unsealed": [r.path.name for r in recovered if not r.sealed],
            },
        )
    stale = await asyncio.to_thread(interrupt_stale, store, ctx.node)
    if any(stale):
        log.warning(
            "relay.interrupted_on_restart", extra={"approvals": stale[0], "sessions": stale[1]}
        )
    # Registered before the listeners open: from here on other relays see this node
    # alive, and none of them can take a session opened below for a lost relay's.
    cluster = ctx.cluster = Cluster(ctx)
    await cluster.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    accept_log = install_accept_log(loop, cfg.limits.report_interval)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listening: dict[str, str] = {}
    ssh_server: asyncssh.SSHAcceptor | None = None
    pg_server: asyncio.Server | None = None
    pg: PgListener | None = None
    api_runner: web.AppRunner | None = None
    api_server: asyncio.Server | None = None
    own_servers: list[asyncio.Server] = []
    log.info(
        "relay.limits",
        extra={
            "open_files": soft,
            "open_files_hard": hard,
            "connections": ctx.connections.total,
            "connections_per_source": ctx.connections.per_source,
        },
    )
    report_task = asyncio.ensure_future(_report_refusals(ctx))
    spool_task = asyncio.ensure_future(ctx.spool_replay.run())
    sync_task = asyncio.ensure_future(sync_open_casts(ctx))
    checkpoint_task = asyncio.ensure_future(ctx.checkpoints.run())
    try:
        # After crash recovery, so its start scan ships the casts recovery sealed; before
        # the listeners, so a bad [s3] setting stops the relay before it accepts anyone.
        # One worker looks for what earlier runs left; each ships its own new casts.
        ctx.shipping.start_uploads(scan=worker in (None, 0))
        if cfg.listen.ssh:
            host, port = split_address(cfg.listen.ssh, "ssh")
            ssh_server = await asyncssh.create_server(
                lambda: RelayServer(ctx),
                host,
                port,
                server_host_keys=[load_or_create_host_key(cfg.keys_dir)],
                encoding=None,
                line_editor=False,
                encryption_algs=ENCRYPTION,
                x11_forwarding=False,
                agent_forwarding=False,
                allow_pty=True,
                login_timeout=30,
                keepalive_interval=30,
                reuse_port=shared,
            )
            sock = ssh_server.sockets[0].getsockname()
            listening["ssh"] = f"{sock[0]}:{sock[1]}"
        if cfg.listen.postgres:
            host, port = split_address(cfg.listen.postgres, "postgres")
            pg = PgListener(ctx, host, server_context(cfg))
            pg_server = await loop.create_server(pg.protocol, host, port, reuse_port=shared)
            sock = pg_server.sockets[0].getsockname()
            listening["postgres"] = f"{sock[0]}:{sock[1]}"
        if cfg.listen.api:
            host, port = split_address(cfg.listen.api, "api")
            api_runner = web.AppRunner(
                build_app(ctx), access_log=None, keepalive_timeout=cfg.limits.api_idle_timeout
            )
            await api_runner.setup()
            api_server = await start_api_server(
                api_runner, ctx.connections, host, port, reuse_port=shared
            )
            sock = api_server.sockets[0].getsockname()
            listening["api"] = f"{sock[0]}:{sock[1]}"
            api_host = "127.0.0.1" if sock[0] in ("0.0.0.0", "::") else sock[0]  # noqa: S104
            ctx.api_url = f"http://{api_host}:{sock[1]}"
            if shared:
                # The shared port reaches any worker: the others (watch proxying) and
                # this worker's own console need this one, on an address of its own.
                own = await start_api_server(api_runner, ctx.connections, "127.0.0.1", 0)
                own_servers.append(own)
                ctx.api_url = f"http://127.0.0.1:{own.sockets[0].getsockname()[1]}"
            await cluster.advertise()
        if not shared:
            write_runtime(cfg, listening)  # the supervisor writes it for its workers
        await ctx.audit.event(
            "relay.start", None, "success", ctx.node, "relay", {"listen": listening}
        )
        log.info("relay.listening", extra=listening)
        if ready is not None:
            ready(listening)
        await stop.wait()
    finally:
        log.info("relay.stopping", extra={"live_sessions": len(ctx.live)})
        if ssh_server is not None:
            ssh_server.close()
        if pg_server is not None:
            pg_server.close()
        for srv in (api_server, *own_servers):
            if srv is not None:
                srv.close()
        if api_runner is not None:
            await api_runner.cleanup()
        ctx.connections.flush_report(force=True)
        accept_log.flush()
        for session in list(ctx.live.values()):
            with contextlib.suppress(Exception):
                await session.close("relay shutdown")
        if ssh_server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ssh_server.wait_closed(), 5)
        await ctx.background.drain()
        if pg is not None:
            await pg.qlog.close()
        await ctx.shipping.stop_uploads()
        await ctx.background.drain()
        await cluster.stop()
        await ctx.audit.event("relay.stop", None, "success", ctx.node, "relay", None)
        # What is still spooled stays on disk; the next start replays it.
        report_task.cancel()
        spool_task.cancel()
        sync_task.cancel()
        checkpoint_task.cancel()  # stores what is queued on its way out
        with contextlib.suppress(asyncio.CancelledError):
            await checkpoint_task
        ctx.spool.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        store.close()


async def _report_refusals(ctx: RelayContext) -> None:
    # Refusals are reported when the next connection comes or goes; this reports the
    # last batch of a flood that stopped.
    while True:
        await asyncio.sleep(ctx.cfg.limits.report_interval)
        ctx.connections.flush_report()


def run_relay(cfg: Config, worker: int | None = None) -> int:
    """Blocking entry point for the CLI (one relay process, or worker ``worker``)."""
    from relay.log import setup_logging

    setup_logging()
    asyncio.run(serve(cfg, worker=worker))
    return 0
