"""A prototype, for measurement only: the SSH relay's exec path split into two processes,
one per hop, to see what a second core would give the bulk figures.

- front (this process): the agents' hop, an asyncssh server; per session it opens a Unix
  socket to the back process, sends the command line, and writes what comes back to
  the agent's channel.
- back (a child process): the target's hop, an asyncssh client to the target; the
  target's output goes through the product's SessionRecorder (StreamMasker with the
  bench's masking policy, threaded CastWriter, hold-back flushed at the end) and the
  masked bytes go to the front over the socket.

Flow control runs through both: a full agent channel pauses the socket's reading, a full
socket pauses the target channel's reading. Both asyncssh connections coalesce their
writes (relay/coalesce.py). Exit status, stderr, PTYs, policy and the store are left out:
this measures bytes, it is not a relay.

Run: .venv/bin/python -m bench.split_relay HOST:PORT USER KEY_FILE HOST_KEY_LINE
Prints ``PORT HOST_KEY_LINE`` on one line when listening; SIGTERM ends it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import asyncssh

from recorder.masking import CustomPattern, Masker, MaskPolicy
from recorder.recording import CastWriter
from recorder.session import SessionRecorder
from recorder.signing import SigningKey
from relay.coalesce import coalesce

ENCRYPTION = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
Target = tuple[str, int, str, str, str]


# -- back: the target's hop -------------------------------------------------------------


class _Up(asyncssh.SSHClientSession[bytes]):
    def __init__(self, sock: asyncio.Transport, rec: SessionRecorder) -> None:
        self.sock = sock
        self.rec = rec
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        masked = self.rec.output(data)
        if masked:
            self.sock.write(masked)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set_result(None)


class _Back(asyncio.Protocol):
    """One session on the back: reads the command line, then streams masked output."""

    def __init__(self, conn: asyncssh.SSHClientConnection, rec_dir: Path, key: SigningKey):
        self.conn, self.rec_dir, self.key = conn, rec_dir, key
        self.buf = b""
        self.up: asyncssh.SSHClientChannel[bytes] | None = None
        self.sock: asyncio.Transport
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.sock = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None and b"\n" in self.buf:
            command = self.buf.split(b"\n", 1)[0].decode()
            self.task = asyncio.ensure_future(self._run(command))

    async def _run(self, command: str) -> None:
        sid = os.urandom(6).hex()
        writer = CastWriter(
            self.rec_dir / f"{sid}.cast",
            width=80,
            height=24,
            session_id=sid,
            signing_key=self.key,
            fsync_interval=1.0,
            threaded=True,
        )
        rec = SessionRecorder(writer, _MASKER)
        self.up, session = await self.conn.create_session(
            lambda: _Up(self.sock, rec), command, encoding=None
        )
        assert isinstance(session, _Up)
        await session.done
        tail = rec.close()
        if tail:
            self.sock.write(tail)
        self.sock.close()
        for f in self.rec_dir.glob(f"{sid}.*"):
            f.unlink(missing_ok=True)

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()


_MASKER = Masker(
    MaskPolicy(patterns=[CustomPattern("stripe-key", "sk_live_[A-Za-z0-9]{24}")])
)  # the bench's policy: bin6-last4 and one custom pattern


async def _back_main(path: str, target: Target) -> None:
    host, port, user, key, host_key = target
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
    rec_dir = Path(tempfile.mkdtemp(prefix="castgate-split-"))
    signing = SigningKey.generate()
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: _Back(conn, rec_dir, signing), path)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    conn.close()
    shutil.rmtree(rec_dir, ignore_errors=True)


def _back(path: str, target: Target) -> None:
    asyncio.run(_back_main(path, target))


# -- front: the agents' hop -------------------------------------------------------------


class _FromBack(asyncio.Protocol):
    def __init__(self, down: _Down) -> None:
        self.down = down

    def data_received(self, data: bytes) -> None:
        self.down.chan.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.chan.exit(0)


class _Down(asyncssh.SSHServerSession[bytes]):
    def __init__(self, path: str) -> None:
        self.path = path
        self.chan: asyncssh.SSHServerChannel[bytes]
        self.command = ""
        self.sock: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def session_started(self) -> None:
        self.task = asyncio.ensure_future(self._start())

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        sock, _ = await loop.create_unix_connection(lambda: _FromBack(self), self.path)
        self.sock = sock
        sock.write(self.command.encode() + b"\n")

    def eof_received(self) -> bool:
        return True  # the agent's stdin ended: keep sending its output

    def pause_writing(self) -> None:
        if self.sock is not None:
            self.sock.pause_reading()

    def resume_writing(self) -> None:
        if self.sock is not None:
            self.sock.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sock is not None:
            self.sock.close()


class _Server(asyncssh.SSHServer):
    def __init__(self, path: str) -> None:
        self.path = path

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        coalesce(conn)

    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: a benchmark on 127.0.0.1

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        return _Down(self.path)


async def main() -> None:
    address, user, key, host_key = sys.argv[1:5]
    host, _, port = address.rpartition(":")
    target = (host, int(port), user, key, host_key)
    workdir = Path(tempfile.mkdtemp(prefix="castgate-split-sock-"))
    path = str(workdir / "back.sock")
    back = multiprocessing.get_context("spawn").Process(target=_back, args=(path, target))
    back.start()
    try:
        while not Path(path).exists():
            await asyncio.sleep(0.05)
        server_key = asyncssh.generate_private_key("ssh-ed25519")
        acceptor = await asyncssh.create_server(
            lambda: _Server(path),
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
    finally:
        if back.pid is not None:
            os.kill(back.pid, signal.SIGTERM)
        back.join(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
