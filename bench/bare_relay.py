"""A bare asyncssh exec relay (no masking, no recording, no store, no policy): the
ceiling DESIGN.md measures, rebuilt so bench_ssh can measure it in the same run as the
castgate relay. Same shape as relay/ssh_relay.py: callback API on both hops, AES-GCM
first, flow control passed through, writes coalesced per loop iteration
(relay/coalesce.py).

Run: .venv/bin/python -m bench.bare_relay HOST:PORT USER KEY_FILE HOST_KEY_LINE
Prints ``PORT HOST_KEY_LINE`` on one line when listening; SIGTERM ends it.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import asyncssh

from relay.coalesce import coalesce

ENCRYPTION = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]


class _Up(asyncssh.SSHClientSession[bytes]):
    def __init__(self, down: _Down) -> None:
        self.down = down

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.down.chan.write(data, datatype)

    def eof_received(self) -> bool:
        self.down.chan.write_eof()
        return True

    def exit_status_received(self, status: int) -> None:
        self.down.status = status

    def pause_writing(self) -> None:
        self.down.chan.pause_reading()

    def resume_writing(self) -> None:
        self.down.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.chan.exit(self.down.status)


class _Down(asyncssh.SSHServerSession[bytes]):
    def __init__(self, upstream: asyncio.Task[asyncssh.SSHClientConnection]) -> None:
        self.upstream = upstream
        self.status = 255
        self.up: asyncssh.SSHClientChannel[bytes] | None = None
        self.chan: asyncssh.SSHServerChannel[bytes]
        self.command: str | None = None
        self.early: list[bytes | None] = []

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def session_started(self) -> None:
        self.task = asyncio.ensure_future(self._start())

    async def _start(self) -> None:
        conn = await self.upstream
        self.up, _ = await conn.create_session(lambda: _Up(self), self.command, encoding=None)
        for item in self.early:
            if item is None:
                self.up.write_eof()
            else:
                self.up.write(item)
        self.early.clear()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.up is None:
            self.early.append(data)
        else:
            self.up.write(data)

    def eof_received(self) -> bool:
        if self.up is None:
            self.early.append(None)
        else:
            self.up.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


class _Server(asyncssh.SSHServer):
    def __init__(self, target: tuple[str, int, str, str, str]) -> None:
        self.target = target
        self.upstream: asyncio.Task[asyncssh.SSHClientConnection] | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        coalesce(conn)
        self.upstream = asyncio.ensure_future(self._connect())

    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: a benchmark on 127.0.0.1

    def connection_lost(self, exc: Exception | None) -> None:
        task = self.upstream
        if task is None:
            return
        if task.done() and not task.cancelled() and task.exception() is None:
            task.result().close()
        else:
            task.cancel()

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        assert self.upstream is not None
        return _Down(self.upstream)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        host, port, user, key, host_key = self.target
        conn = await asyncssh.connect(
            host,
            port,
            username=user,
            client_keys=[key],
            known_hosts=([asyncssh.import_public_key(host_key)], [], []),
            config=[],
            agent_path=None,
            encryption_algs=ENCRYPTION,
        )
        coalesce(conn)
        return conn


async def main() -> None:
    address, user, key, host_key = sys.argv[1:5]
    host, _, port = address.rpartition(":")
    target = (host, int(port), user, key, host_key)
    server_key = asyncssh.generate_private_key("ssh-ed25519")
    acceptor = await asyncssh.create_server(
        lambda: _Server(target),
        "127.0.0.1",
        0,
        server_host_keys=[server_key],
        encoding=None,
        line_editor=False,
        encryption_algs=ENCRYPTION,
        allow_pty=False,
    )
    listen_port = acceptor.sockets[0].getsockname()[1]
    line = server_key.export_public_key().decode().split()
    print(f"{listen_port} {line[0]} {line[1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    acceptor.close()


if __name__ == "__main__":
    asyncio.run(main())
