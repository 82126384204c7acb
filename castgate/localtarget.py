"""An SSH target inside the demo: a small asyncssh server on loopback that runs exec
commands with the local shell, so ``castgate demo`` needs no sshd. It accepts only the
relay's target key, and exists only for the demo's lifetime."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh


async def _handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
    command = process.command or "exec /bin/sh -i"
    proc = await asyncio.create_subprocess_shell(
        command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await process.redirect(stdin=proc.stdin, stdout=proc.stdout, stderr=proc.stderr)
    status = await proc.wait()
    await process.stdout.drain()
    process.exit(status if status >= 0 else 128 - status)
    await process.wait_closed()  # runs asyncssh's redirect clean-up


@dataclass
class LocalTarget:
    """A running local target: its address, pinned host key and the relay's key."""

    port: int = 0
    host_key_line: str = ""
    client_key: Path = Path()
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncssh.SSHAcceptor | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self, keys_dir: Path) -> LocalTarget:
        """Generate keys in ``keys_dir`` and serve on 127.0.0.1 in a background thread."""
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = keys_dir / "demo_target_ed25519"
        self.client_key.write_bytes(client.export_private_key())
        self.client_key.chmod(0o600)
        parts = host_key.export_public_key().decode().split()
        self.host_key_line = f"{parts[0]} {parts[1]}"
        authorized = asyncssh.import_authorized_keys(client.export_public_key().decode())

        async def serve() -> None:
            self._server = await asyncssh.create_server(
                asyncssh.SSHServer,
                "127.0.0.1",
                0,
                server_host_keys=[host_key],
                authorized_client_keys=authorized,
                process_factory=_handle,
                encoding=None,
                allow_pty=False,
            )
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            loop.run_until_complete(serve())
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="demo-target", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the demo's local SSH target did not start")
        return self

    def stop(self) -> None:
        """Stop serving."""
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def close() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
