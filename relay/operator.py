"""The operator entry on the relay's SSH listener: the reserved user ``castgate``.

``ssh -t castgate@relay watch SESSION`` / ``approve ID`` / ``deny ID REASON`` /
``sessions`` / ``approvals``. Only identities holding an operator role (approver,
auditor, admin) get in; every action is an audit event (PCI DSS 10.2.1.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shlex
import signal
import struct
import sys
import termios
from typing import Any

import asyncssh
from asyncssh.misc import TermModes, TermSize

from recorder.store import StoreError
from relay import peer
from relay.approvals import ApprovalError
from relay.context import RelayContext
from relay.identity import Identity
from relay.live import Neutraliser, neutralise, printable, render_event

log = logging.getLogger("castgate.operator")

OPERATOR_USER = "castgate"
OPERATOR_ROLES = {"approver", "auditor", "admin"}
# Seconds the console has to exit after its SSH session ends (SIGHUP) before SIGKILL.
_CONSOLE_GRACE = 5.0


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


HELP = """castgate operator commands:
  sessions                 live and recent sessions
  approvals                pending approval requests
  approve ID [REASON]      approve a held command
  deny ID REASON           deny a held command
  watch SESSION            watch a live session (q or Ctrl-C to stop)
  console                  the operator console (needs ssh -t)
"""


def _when(value: Any) -> str:
    return str(value or "")[:19].replace("T", " ")


class OperatorSession(asyncssh.SSHServerSession[bytes]):
    """One operator channel."""

    def __init__(self, ctx: RelayContext, ident: Identity, peer: str) -> None:
        self.ctx = ctx
        self.ident = ident
        self.peer = peer
        self.roles = ctx.roles.of(ident.groups)
        self.command: str | None = None
        self.pty = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.chan: asyncssh.SSHServerChannel[bytes]
        self.term_type = "xterm-256color"
        self.term_size = (80, 24)
        self._master: int | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: TermSize, term_modes: TermModes) -> bool:
        self.pty = True
        self.term_type = term_type or "xterm-256color"
        if term_size[0] and term_size[1]:
            self.term_size = (term_size[0], term_size[1])
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if width and height:
            self.term_size = (width, height)
            if self._master is not None:
                _set_winsize(self._master, width, height)

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def session_started(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.write(self._master, data)
            return
        if b"q" in data or b"\x03" in data or b"\x04" in data:
            self._stop.set()

    def eof_received(self) -> bool:
        self._stop.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _out(self, text: str) -> None:
        nl = "\r\n" if self.pty else "\n"
        self.chan.write(text.replace("\n", nl).encode())

    async def _run(self) -> None:
        status = 0
        try:
            status = await self._dispatch(shlex.split(self.command or ""))
        except ValueError as exc:
            self._out(f"castgate: {exc}\n")
            status = 2
        except Exception as exc:
            log.exception("operator.error")
            self._out(f"castgate: internal error: {exc}\n")
            status = 1
        with contextlib.suppress(Exception):
            self.chan.exit(status)

    async def _dispatch(self, argv: list[str]) -> int:
        if not argv or argv[0] in ("help", "-h", "--help"):
            self._out(HELP)
            return 0 if argv else 2
        cmd, args = argv[0], argv[1:]
        self.ctx.audit.emit(
            "operator.command",
            self.ident.name,
            "success",
            self.peer,
            "operator",
            {"command": self.ctx.masker.mask(" ".join(argv))},
        )
        if cmd == "sessions":
            rows = await asyncio.to_thread(self.ctx.store.list_sessions, limit=50)
            for r in rows:
                self._out(
                    f"{r['id']}  {r['status']:<12} {r['identity']}@{r['target']} "
                    f"({r['protocol']})  {_when(r.get('started_at'))}\n"
                )
            return 0
        if cmd == "approvals":
            rows = await asyncio.to_thread(self.ctx.store.list_approvals, status="pending")
            for r in rows:
                line = f"#{r['id']} {r['identity']}@{r['target']} rule {r['rule']}: {r['command']}"
                self._out(printable(line) + "\n")  # the agent's command: no escapes
            if not rows:
                self._out("no pending approvals\n")
            return 0
        if cmd in ("approve", "deny"):
            if "approver" not in self.roles:
                self._out(f"castgate: {self.ident.name} does not have the approver role\n")
                return 1
            if not args or not args[0].isdigit():
                self._out(f"usage: {cmd} ID {'[REASON]' if cmd == 'approve' else 'REASON'}\n")
                return 2
            reason = " ".join(args[1:]) or None
            if cmd == "deny" and not reason:
                self._out("usage: deny ID REASON\n")
                return 2
            try:
                row = await self.ctx.broker.decide(
                    int(args[0]),
                    approver=self.ident.name,
                    approve=cmd == "approve",
                    reason=reason,
                    origin=f"ssh:{self.peer}",
                )
            except (ApprovalError, StoreError) as exc:
                self._out(f"castgate: {exc}\n")
                return 1
            self._out(f"approval #{row['id']}: {row['status']}\n")
            return 0
        if cmd == "watch":
            if not args:
                self._out("usage: watch SESSION\n")
                return 2
            return await self._watch(args[0])
        if cmd == "console":
            return await self._console()
        self._out(f"castgate: unknown command {cmd!r}\n{HELP}")
        return 2

    async def _console(self) -> int:
        """Run ``castgate console`` on a PTY bridged to this channel, authenticated to
        the API with a token that lives as long as this session."""
        if not self.pty:
            self._out("castgate: the console needs a terminal: ssh -t castgate@relay console\n")
            return 2
        if self.ctx.api_url is None:
            self._out("castgate: the control API is disabled (listen.api)\n")
            return 1
        token = self.ctx.tokens.issue(self.ident)
        master, slave = os.openpty()
        _set_winsize(slave, *self.term_size)

        def ctty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # A relay started under nohup ignores SIGHUP, and the console would inherit
            # that: it must end when its terminal (this session) goes away.
            signal.signal(signal.SIGHUP, signal.SIG_DFL)

        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/"),
            "LANG": "C.UTF-8",
            "TERM": self.term_type,
            "CASTGATE_TOKEN": token,  # not on the command line: ps would show it
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "castgate.cli",
                "console",
                "--api",
                self.ctx.api_url,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                preexec_fn=ctty,
                env=env,
            )
        finally:
            os.close(slave)
        self._master = master
        os.set_blocking(master, False)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(master)
                if not done.done():
                    done.set_result(None)
                return
            self.chan.write(data)

        loop.add_reader(master, readable)
        try:
            stopped = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if proc.returncode is None and not done.done():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGHUP)
            try:
                status = await asyncio.wait_for(proc.wait(), _CONSOLE_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                status = await proc.wait()
        finally:
            if proc.returncode is None:
                # Cancelled (the relay is stopping): the console must not outlive it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                loop.remove_reader(master)
            self._master = None
            os.close(master)
            self.ctx.tokens.revoke(token)
        return status if status >= 0 else 128 - status

    async def _watch_elsewhere(self, session_id: str) -> int:
        """Watch a session another relay of the deployment holds, through its API."""
        try:
            async with peer.open_live(self.ctx, session_id, self.ident.name) as remote:
                self.ctx.audit.emit(
                    "recording.watch",
                    self.ident.name,
                    "success",
                    self.peer,
                    f"session:{session_id}",
                    {"via": "ssh", "node": remote.node},
                    session_id=session_id,
                )
                texts = peer.events(remote)
                clean = Neutraliser()  # one per watch: sequences cut between events
                while not self._stop.is_set():
                    nxt = asyncio.ensure_future(anext(texts, None))
                    stop = asyncio.ensure_future(self._stop.wait())
                    done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                    stop.cancel()
                    if nxt not in done:
                        nxt.cancel()
                        await asyncio.gather(nxt, return_exceptions=True)
                        break
                    text = nxt.result()
                    if text is None:
                        break
                    event = json.loads(text)
                    if event.get("type") == "screen":
                        self.chan.write(b"\x1b[H\x1b[2J")
                    self.chan.write(render_event(event, clean).encode())
                await texts.aclose()
        except peer.PeerError as exc:
            self._out(f"castgate: {exc}\n")
            return 1
        return 0

    async def _watch(self, session_id: str) -> int:
        stream = self.ctx.hub.get(session_id)
        if stream is None:
            return await self._watch_elsewhere(session_id)
        self.ctx.audit.emit(
            "recording.watch",
            self.ident.name,
            "success",
            self.peer,
            f"session:{session_id}",
            {"via": "ssh"},
            session_id=session_id,
        )
        watcher, screen = stream.subscribe()
        clean = Neutraliser()  # one per watch: sequences cut between events
        try:
            self.chan.write(b"\x1b[H\x1b[2J" + neutralise(screen).encode())
            while not self._stop.is_set():
                nxt = asyncio.ensure_future(watcher.next())
                stop = asyncio.ensure_future(self._stop.wait())
                done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if nxt not in done:
                    nxt.cancel()
                    break
                ev = nxt.result()
                if ev is None:
                    break
                self.chan.write(render_event(ev.as_json(), clean).encode())
        finally:
            watcher.close()
        return 0
