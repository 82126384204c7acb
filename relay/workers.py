"""``castgate relay --workers N``: several relay processes behind the same listeners.

One relay process is one event loop, and a busy loop is one saturated core (DESIGN.md's
"single-process ceiling"). With ``listen.workers`` above one, this supervisor starts that
many relay processes on the same config; each binds the SSH, PostgreSQL and API
listeners with ``SO_REUSEPORT``, so the kernel spreads new connections over them. The
workers are relays of one deployment (relay/cluster.py): each is its own node
(``NODE-wN``) with its own private API address for the others, approval decisions reach
the worker holding the session through the store (LISTEN/NOTIFY on PostgreSQL, the poll
on SQLite), and a live watch that lands on another worker is proxied to the owner.

The supervisor does the one-time work first (store migrations, keys, the TLS
certificate, the ports the OS picks for ``:0``), writes ``data/relay.json``, forwards
SIGTERM/SIGINT, and when one worker dies it stops the others and exits non-zero, so a
service manager restarts the whole relay.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from recorder.config import Config, ConfigError

LISTEN_ENV = "CASTGATE_WORKER_LISTEN"
PEER_ENV = "CASTGATE_WORKER_PEER_TOKEN"
_LISTENERS = ("ssh", "postgres", "api")


def _reserve(value: str, what: str) -> tuple[socket.socket, str]:
    """Bind (without listening) a reusable socket on ``host:port``: it holds the port
    the OS picks for ``:0`` until the workers have bound the same one."""
    from relay.server import split_address

    host, port = split_address(value, what)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"listen.{what}: cannot bind {value}: {exc.strerror}") from None
    bound = sock.getsockname()[1]
    return sock, (f"[{host}]:{bound}" if family == socket.AF_INET6 else f"{host}:{bound}")


def worker_config(cfg: Config, index: int) -> Config:
    """The config of worker ``index``: the supervisor's resolved listeners, its own
    node id, and the relay-to-relay secret (the configured one, else the supervisor's)."""
    from relay.cluster import default_node_id

    listen = json.loads(os.environ.get(LISTEN_ENV, "{}"))
    cluster: dict[str, Any] = {"node": f"{default_node_id(cfg)}-w{index}"}
    if cfg.cluster.peer_token_env is None:
        cluster["peer_token_env"] = PEER_ENV
    return cfg.model_copy(
        update={
            "listen": cfg.listen.model_copy(update=listen),
            "cluster": cfg.cluster.model_copy(update=cluster),
        }
    )


def _prepare(cfg: Config) -> None:
    """What every worker would otherwise race to create."""
    from recorder.signing import SigningKey
    from recorder.store import Store
    from relay.pg.tls import server_context
    from relay.server import load_or_create_host_key

    Store.open(cfg.store_url()).close()  # migrations, once
    cfg.recordings_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    SigningKey.load_or_create(cfg.keys_dir)
    load_or_create_host_key(cfg.keys_dir)
    if cfg.listen.postgres:
        server_context(cfg)


def supervise(cfg: Config, config_path: Path, workers: int) -> int:
    """Run ``workers`` relay processes until SIGTERM/SIGINT or until one of them ends."""
    from relay.server import write_runtime

    _prepare(cfg)
    held: list[socket.socket] = []
    listen: dict[str, str] = {}
    for name in _LISTENERS:
        value = getattr(cfg.listen, name)
        if value:
            sock, resolved = _reserve(value, name)
            held.append(sock)
            listen[name] = resolved
    env = {**os.environ, LISTEN_ENV: json.dumps(listen)}
    if cfg.cluster.peer_token_env is None:
        env[PEER_ENV] = secrets.token_urlsafe(32)
    stop = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "castgate.cli",
                "relay",
                "-c",
                str(config_path),
                "--worker",
                str(i),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        for i in range(workers)
    ]
    write_runtime(cfg, listen)
    code = 0
    try:
        while not stop:
            ended = [p for p in procs if p.poll() is not None]
            if ended:
                code = 1  # a worker died: stop all, let the service manager restart
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for sock in held:
            sock.close()
    return code
