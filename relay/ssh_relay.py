"""The SSH relay: agents connect with ``ssh TARGET@relay``; the relay authenticates
them, checks the target's groups, applies the command policy, connects to the target
with the target's own credential and moves bytes both ways, masking and recording
what comes back.

asyncssh's callback API on both hops (no stream layer) with flow control passed through:
when the agent's channel fills, the relay stops reading from the target, and the other
way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.auth import KbdIntChallenge, KbdIntResponse
from asyncssh.misc import TermModes, TermSize

from recorder.config import TargetConfig
from recorder.recording import CastWriter, DiscardWriter, RecordingError
from recorder.session import SessionRecorder
from recorder.store import StoreError
from relay.approvals import Outcome
from relay.coalesce import coalesce
from relay.connlimit import Ticket
from relay.context import RelayContext, new_session_id
from relay.identity import AuthError, Identity
from relay.operator import OPERATOR_ROLES, OPERATOR_USER, OperatorSession
from relay.policy import Decision
from relay.shell_line import Key, KeyReader, ScriptUnit, ShellLine, StdinScript, TypedLine
from relay.shell_parse import analyze
from relay.ssh_limits import request_ok
from replay.castfile import MAX_SIZE as MAX_TERMINAL

log = logging.getLogger("castgate.ssh")

# Fast ciphers first: AES-GCM runs on AES-NI through cryptography on both hops.
ENCRYPTION = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
]
# Pack data and file transfers pass through byte for byte, recorded as metadata, only
# for these exact commands: one path argument, single-quoted without quotes inside or a
# plain word, never an option. Anything else is a normal masked, recorded command.
_PATH_ARG = r"(?:'(?!-)[^']*'|[A-Za-z0-9_./~@:+][A-Za-z0-9_./~@:+,=-]*)"
_GIT_BINARY = re.compile(rf"git[- ](?:upload-pack|receive-pack|upload-archive) {_PATH_ARG}")
# The legacy scp protocol as OpenSSH's `scp -O` starts it on the remote side.
_SCP = re.compile(rf"scp(?: -[rpdv])* -[tf](?: -[rpdv])* (?:-- )?{_PATH_ARG}")
_GIT = re.compile(r"^\s*git[ -]")
# Commands that rebind keys or the terminal's control characters.
_REBIND = frozenset({"bind", "bindkey", "zle"})
_STTY_READ = frozenset({"size", "-a", "--all", "-g", "--save", "sane"})
# Bash's history expansion (an interactive shell only): `!!`, `!-2`, `!rm` run text
# from the history, which the line does not show.
_HISTORY = re.compile(r"!(?![\s=(]|$)")
ENV_ALLOW = re.compile(r"^(LANG|LC_[A-Z]+|GIT_PROTOCOL|TZ)$")
_ECHO_QUIET = 0.03
_ECHO_MAX = 0.5
_FIRST_PROMPT_MAX = 5.0
# Keystrokes queued behind a shell line that waits for its policy decision (an approval
# can take minutes): past the high mark the agent's channel stops being read, so its SSH
# window, not the relay's memory, holds the rest.
_INPUT_HIGH = 1 << 20
_INPUT_LOW = 256 << 10
# Keystrokes (input = "all") waiting for their echo: never echoed this far means a
# hidden prompt, and they are dropped unrecorded.
_HELD_KEYS_MAX = 64 << 10
_CONNECT_TIMEOUT = 15
# Sessions (channels) one agent connection may hold open at once, as OpenSSH's
# MaxSessions: each costs a recording, an upstream channel and a store row.
MAX_SESSIONS_PER_CONNECTION = 10


def _clamp_size(width: int, height: int) -> tuple[int, int]:
    """A terminal size no larger than any recording or terminal model accepts (a
    hostile client may ask for 4294967295 x 4294967295)."""
    return min(width, MAX_TERMINAL), min(height, MAX_TERMINAL)


class _Upstream(asyncssh.SSHClientSession[bytes]):
    """The target side of one session: hands everything to the RelaySession."""

    def __init__(self, owner: RelaySession) -> None:
        self.owner = owner

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.owner.from_target(data, datatype)

    def eof_received(self) -> bool:
        self.owner.target_eof()
        return True

    def exit_status_received(self, status: int) -> None:
        self.owner.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.owner.exit_signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        self.owner.chan.pause_reading()

    def resume_writing(self) -> None:
        self.owner.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.target_closed(exc)


# Seconds past a token's expiry before its connection is closed (its sessions end at the
# expiry itself).
_EXPIRY_GRACE_S = 10.0


class RelayServer(asyncssh.SSHServer):
    """One agent connection: authentication and session admission."""

    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx
        self.identity: Identity | None = None
        self._last_ok: Identity | None = None
        self.target_name = ""
        self.peer = "?"
        self.conn: asyncssh.SSHServerConnection | None = None
        self._upstream: asyncio.Task[asyncssh.SSHClientConnection] | None = None
        self._ticket: Ticket | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.sessions: set[RelaySession] = set()

    # -- connection and authentication -------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        coalesce(conn)
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        admitted = self.ctx.connections.admit("ssh", str(peer[0]) if peer else "?")
        if isinstance(admitted, str):
            # After this callback: asyncssh sends the disconnect once it can.
            asyncio.get_running_loop().call_soon(
                conn.disconnect, asyncssh.DISC_TOO_MANY_CONNECTIONS, f"castgate: {admitted}"
            )
        else:
            self._ticket = admitted

    def connection_lost(self, exc: Exception | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            self.ctx.connections.release(ticket)
        if self._upstream is not None:
            task = self._upstream
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
            else:
                task.cancel()

    def begin_auth(self, username: str) -> bool:
        self.target_name = username
        return True

    def _throttled(self, method: str) -> bool:
        if self.ctx.limiter.blocked(self.peer):
            self.ctx.emit(
                "auth",
                None,
                "failure",
                self.peer,
                f"ssh:{self.target_name}",
                {"method": method, "reason": "too many failed attempts from this address"},
            )
            return True
        return False

    def _failed(self, method: str, reason: str, who: str | None = None) -> None:
        self.ctx.limiter.failure(self.peer)
        self.ctx.emit(
            "auth",
            who,
            "failure",
            self.peer,
            f"ssh:{self.target_name}",
            {"method": method, "reason": reason},
        )

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self._throttled("publickey"):
            return False
        ident = self.ctx.auth.by_public_key(key)
        if ident is None:
            self._failed("publickey", f"unknown key {key.get_fingerprint()}")
            return False
        self._last_ok = ident
        return True

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        return await self._token(password, "password")

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> KbdIntChallenge:
        return ("castgate", "Give your castgate token.", "", [("Token: ", False)])

    async def validate_kbdint_response(self, username: str, responses: KbdIntResponse) -> bool:
        return len(responses) == 1 and await self._token(responses[0], "keyboard-interactive")

    async def _token(self, secret: str, method: str) -> bool:
        if self._throttled(method):
            return False
        try:
            # A JWKS fetched over HTTPS may block: keep it off the event loop.
            ident = await asyncio.to_thread(self.ctx.auth.by_token, secret)
        except AuthError as exc:
            self._failed(method, str(exc))
            return False
        self._last_ok = ident
        return True

    def auth_completed(self) -> None:
        self.ctx.limiter.success(self.peer)
        self.identity = self._last_ok
        ident = self.identity
        assert ident is not None
        self.ctx.emit(
            "auth",
            ident.name,
            "success",
            self.peer,
            f"ssh:{self.target_name}",
            {
                "method": ident.method,
                "groups": list(ident.groups),
                **self.ctx.identity_detail(ident),
            },
        )
        deadline = self.ctx.token_deadline(ident)
        if deadline is not None:
            # The connection ends with its token: its sessions end at the deadline
            # (each with its message and marker); the connection a little after, so an
            # idle one (``ssh -N``, a multiplexing master) does not outlive it.
            delay = max(0.0, deadline - time.time()) + _EXPIRY_GRACE_S
            self._expiry = asyncio.get_running_loop().call_later(delay, self._token_expired)

    def _token_expired(self) -> None:
        self._expiry = None
        ident, conn = self.identity, self.conn
        if ident is None or conn is None:
            return
        message = self.ctx.token_expired(ident, self.peer, f"ssh:{self.target_name}")
        conn.disconnect(asyncssh.DISC_BY_APPLICATION, message)

    # -- admission ---------------------------------------------------------------

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        ident = self.identity
        assert ident is not None
        if self.target_name == OPERATOR_USER:
            if not self.ctx.roles(ident.groups) & OPERATOR_ROLES:
                self.ctx.emit(
                    "access",
                    ident.name,
                    "failure",
                    self.peer,
                    "operator",
                    {"reason": "no operator role"},
                )
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                    f"castgate: {ident.name} has no operator role (approver, auditor, admin)",
                )
            return OperatorSession(self.ctx, ident, self.peer)
        target = self.ctx.policy.target(self.target_name)
        reason = None
        if target is None or target.kind != "ssh":
            reason = f"no SSH target named {self.target_name!r}"
        elif not self.ctx.policy.can_access(ident.groups, target):
            reason = f"identity {ident.name} is not in any group of target {target.name}"
        if reason is not None or target is None:
            self.ctx.emit(
                "access",
                ident.name,
                "failure",
                self.peer,
                f"ssh:{self.target_name}",
                {"reason": reason},
            )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"castgate: {reason}"
            )
        if len(self.sessions) >= MAX_SESSIONS_PER_CONNECTION:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE,
                f"castgate: at most {MAX_SESSIONS_PER_CONNECTION} sessions per connection",
            )
        session = RelaySession(self.ctx, self, ident, target)
        self.sessions.add(session)
        return session

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        who = self.identity.name if self.identity else None
        self._refuse_forward(who, f"direct-tcpip to {dest_host}:{dest_port}")
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            "castgate: port forwarding is not allowed through this relay",
        )

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        who = self.identity.name if self.identity else None
        self._refuse_forward(who, f"tcpip-forward on {listen_host}:{listen_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        who = self.identity.name if self.identity else None
        self._refuse_forward(who, f"unix socket {dest_path}")
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            "castgate: socket forwarding is not allowed through this relay",
        )

    def _refuse_forward(self, who: str | None, what: str) -> None:
        self.ctx.emit(
            "forwarding",
            who,
            "failure",
            self.peer,
            f"ssh:{self.target_name}",
            {"request": what, "reason": "forwarding disabled"},
        )

    # -- upstream ----------------------------------------------------------------

    async def upstream(self, target: TargetConfig) -> asyncssh.SSHClientConnection:
        """The connection to the target, shared by this agent connection's sessions."""
        if self._upstream is None:
            self._upstream = asyncio.ensure_future(connect_target(self.ctx, target))
        return await asyncio.shield(self._upstream)


class TargetError(Exception):
    """The target cannot be reached; the message is shown to the agent."""


async def connect_target(ctx: RelayContext, target: TargetConfig) -> asyncssh.SSHClientConnection:
    """Connect to an SSH target with its own credential and its pinned host key."""
    host, _, port = target.address.rpartition(":")
    if not host:
        host, port = target.address, "22"
    kwargs: dict[str, Any] = {
        "username": target.user,
        "known_hosts": None,
        "config": [],
        "agent_path": None,
        "encryption_algs": ENCRYPTION,
        "client_keys": None,
        "password": None,
        "connect_timeout": _CONNECT_TIMEOUT,
    }
    if target.host_key:
        try:
            pinned = asyncssh.import_public_key(target.host_key)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise TargetError(
                f"target {target.name}: host_key is not a public key: {exc}"
            ) from None
        kwargs["known_hosts"] = ([pinned], [], [])
    if target.key_file:
        kwargs["client_keys"] = [str(ctx.cfg.resolve(target.key_file))]
    if target.password_env:
        kwargs["password"] = os.environ.get(target.password_env)
    try:
        conn = await asyncssh.connect(host.strip("[]"), int(port), **kwargs)
    except asyncssh.HostKeyNotVerifiable:
        raise TargetError(
            f"target {target.name} presented a host key that does not match the pinned "
            "host_key; refusing to connect"
        ) from None
    except asyncssh.PermissionDenied:
        raise TargetError(f"target {target.name} refused the relay's credential") from None
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        # A timeout carries no message (and an exception is always truthy): name it, so
        # the agent and the log say something.
        if isinstance(exc, OSError) and exc.errno:
            # asyncio's "[Errno 111] Connect call failed ('10.0.0.5', 22)": the cause,
            # without the target's internal address.
            reason = os.strerror(exc.errno)
        elif isinstance(exc, TimeoutError):
            reason = f"no SSH handshake within {_CONNECT_TIMEOUT} s"
        else:
            reason = str(exc) or type(exc).__name__
        raise TargetError(f"cannot reach target {target.name}: {reason}") from None
    coalesce(conn)
    return conn


class RelaySession(asyncssh.SSHServerSession[bytes]):
    """One channel of an agent: shell, exec or subsystem, bridged to the target."""

    def __init__(
        self, ctx: RelayContext, server: RelayServer, ident: Identity, target: TargetConfig
    ) -> None:
        self.ctx = ctx
        self.server = server
        self.ident = ident
        self.target = target
        self.id = new_session_id()
        self.kind = "shell"
        self.command: str | None = None
        self.subsystem: str | None = None
        self.term_type: str | None = None
        self.term_size = (80, 24)
        self.binary = False
        self.exit_status: int | None = None
        self.exit_signal: tuple[str, bool, str, str] | None = None
        self.chan: asyncssh.SSHServerChannel[bytes]
        self.up_chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.rec: SessionRecorder | None = None
        self._early: list[bytes | None] = []
        self._loop = asyncio.get_event_loop()
        self._done = self._loop.create_future()
        self._task: asyncio.Task[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._fed: dict[str, float] = {}  # loop time of each stream's last held output
        self._input: asyncio.Queue[bytes | None] | None = None
        self._line = ShellLine(80)
        self._typed = TypedLine()
        self._keyreader = KeyReader()
        # How the channel's input is taken: "pty" (keystrokes, the echo line model),
        # "stdin" (a shell reading commands from stdin: line-checked), "record" (an
        # interpreter the relay cannot check: input recorded), None (data to a command).
        self.mode: str | None = None
        self._scp = False
        self._unit_allowed = False
        self._last_output = 0.0
        self._last_input = 0.0
        self._echoed = False
        self._held_keys = bytearray()
        self._queued_in = 0
        self._input_paused = False
        self._ended = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = "closed"
        self._command_id: int | None = None
        self._rec_failed = False
        # Set when the relay ends the session (recording failed): nothing more flows.
        self._stopped = False

    # -- channel requests ----------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: TermSize, term_modes: TermModes) -> bool:
        if "\x00" in term_type or len(term_type) > 256:
            return False  # forwarded as is, OpenSSH would drop the shared upstream
        self.term_type = term_type
        if term_size[0] and term_size[1]:
            self.term_size = _clamp_size(term_size[0], term_size[1])
            self._line = ShellLine(self.term_size[0])
        return True

    def shell_requested(self) -> bool:
        self.kind = "shell"
        return request_ok(self)

    def exec_requested(self, command: str) -> bool:
        if not request_ok(self, command=command):
            return False
        if "\x00" in command:
            # No shell command holds a NUL, and OpenSSH drops the whole (shared)
            # upstream connection on one: refuse the request instead.
            self.ctx.emit(
                "exec",
                self.ident.name,
                "failure",
                self.server.peer,
                f"ssh:{self.target.name}",
                {"reason": "NUL byte in the command"},
            )
            return False
        self.kind = "exec"
        self.command = command
        self._scp = bool(_SCP.fullmatch(command))
        self.binary = bool(_GIT_BINARY.fullmatch(command)) or (self._scp and self.target.allow_scp)
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if not request_ok(self, subsystem=subsystem):
            return False
        if subsystem == "sftp" and self.target.allow_sftp:
            self.kind = "subsystem"
            self.subsystem = subsystem
            self.binary = True
            return True
        self.ctx.emit(
            "subsystem",
            self.ident.name,
            "failure",
            self.server.peer,
            f"ssh:{self.target.name}",
            {"subsystem": subsystem, "reason": "not enabled for this target"},
        )
        return False

    def session_started(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    # -- agent to target -----------------------------------------------------------

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._stopped:
            return
        self.bytes_in += len(data)
        if self.up_chan is None:
            # Held until the target session exists (an approval may take minutes):
            # stop reading so the agent's window, not our memory, holds the rest.
            self._early.append(data)
            self.chan.pause_reading()
        elif self._input is not None:
            self._input.put_nowait(data)
            self._queued_in += len(data)
            if self._queued_in > _INPUT_HIGH and not self._input_paused:
                self._input_paused = True
                self.chan.pause_reading()
        else:
            if self.mode == "record":
                self._safe(lambda rec: rec.input(data))
            else:
                self._record_input(data)
            self.up_chan.write(data)

    def eof_received(self) -> bool:
        if self.up_chan is None:
            self._early.append(None)
        elif self._input is not None:
            self._input.put_nowait(None)
        else:
            self.up_chan.write_eof()
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if not (width and height):
            return
        width, height = _clamp_size(width, height)
        self.term_size = (width, height)
        self._line.resize(width)
        if self.up_chan is not None:
            self.up_chan.change_terminal_size(width, height, pixwidth, pixheight)
        if self.rec is not None and not self.binary:
            self._safe(lambda rec: rec.resize(width, height))

    def signal_received(self, signal: str) -> None:
        if self.up_chan is not None:
            self.up_chan.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self.up_chan is not None:
            self.up_chan.send_break(msec)
        return True

    def pause_writing(self) -> None:
        if self.up_chan is not None:
            self.up_chan.pause_reading()

    def resume_writing(self) -> None:
        if self.up_chan is not None:
            self.up_chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.sessions.discard(self)
        if self._ended:
            return  # the session finished normally and is sealing its recording
        if not self._stopped:  # else the relay ended it, and its status says why
            self.status = "disconnected"
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.up_chan is not None:
            self.up_chan.close()

    def _record_input(self, data: bytes) -> None:
        if self.rec is not None and not self.binary and self.ctx.cfg.recording.input == "all":
            self._safe(lambda rec: rec.input(data))

    # -- target to agent -----------------------------------------------------------

    def from_target(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Output of the target: masked (unless binary), recorded, sent on."""
        if self._stopped:
            return
        self.bytes_out += len(data)
        if self.binary or self.rec is None:
            self.chan.write(data, datatype)
            return
        stream = "err" if datatype == asyncssh.EXTENDED_DATA_STDERR else "out"
        if self.mode == "pty":
            self._line.feed(data)
            self._last_output = time.monotonic()
            if self._line.awaiting:
                self._echoed = True
                self._release_keys()
        masked = self._safe(lambda rec: rec.output(data, stream))
        if masked:
            self.chan.write(masked, datatype)
        self._arm(stream, datatype)

    def _arm(self, stream: str, datatype: asyncssh.DataType) -> None:
        """Held output is released ``hold_deadline`` after the last chunk of its stream.
        One timer per stream that pushes itself back when more output came meanwhile:
        a new timer per chunk cost bulk output a timer and a cancel each."""
        if self.rec is None or not self.rec.pending(stream):
            timer = self._timers.pop(stream, None)
            if timer is not None:
                timer.cancel()
            return
        self._fed[stream] = self._loop.time()
        if stream not in self._timers:
            self._timers[stream] = self._loop.call_later(
                self.ctx.hold_deadline, self._deadline, stream, datatype
            )

    def _deadline(self, stream: str, datatype: asyncssh.DataType) -> None:
        self._timers.pop(stream, None)
        wait = self._fed.get(stream, 0.0) + self.ctx.hold_deadline - self._loop.time()
        if wait > 0:
            self._timers[stream] = self._loop.call_later(wait, self._deadline, stream, datatype)
            return
        masked = self._safe(lambda rec: rec.flush_output(stream))
        if masked:
            self.chan.write(masked, datatype)

    def _flush_all(self) -> None:
        if self._stopped:
            return  # the channel is closed
        for stream, datatype in (("err", asyncssh.EXTENDED_DATA_STDERR), ("out", None)):
            timer = self._timers.pop(stream, None)
            if timer is not None:
                timer.cancel()
            masked = self._safe(lambda rec, s=stream: rec.flush_output(s))  # type: ignore[misc]
            if masked:
                self.chan.write(masked, datatype)

    def target_eof(self) -> None:
        # The agent's EOF is sent with the exit status, as sshd orders them: an OpenSSH
        # multiplexing master that sees EOF first ends the session without the status.
        self._flush_all()

    def target_closed(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(exc)

    # -- recording -------------------------------------------------------------------

    def _safe(self, fn: Callable[[SessionRecorder], Any]) -> Any:
        """Run a recorder call; a recording failure applies ``recording.on_failure``."""
        if self.rec is None:
            return None
        try:
            return fn(self.rec)
        except RecordingError as exc:
            self._recording_failed(str(exc))
            return None

    def _recording_failed(self, message: str, *, at_start: bool = False) -> None:
        """Apply ``recording.on_failure`` once: the recording is aborted (left unsealed,
        verifiable up to its last complete line) and replaced by a DiscardWriter, so
        masking and the live view go on; ``terminate`` ends the session with a message,
        ``continue`` tells the agent and goes on unrecorded. Also the writer pool's
        ``on_error`` hook, called on the loop."""
        if self._rec_failed:
            return
        self._rec_failed = True
        policy = self.ctx.cfg.recording.on_failure
        rec = self.rec
        if rec is not None and not isinstance(rec.writer, DiscardWriter):
            rec.writer.abort()
            rec.writer = DiscardWriter.replacing(rec.writer, message)
        terminate = policy == "terminate"
        action = ("refused" if at_start else "terminated") if terminate else "continued"
        self.ctx.recording_failed(
            session_id=self.id,
            actor=self.ident.name,
            origin=self.server.peer,
            resource=f"ssh:{self.target.name}",
            error=message,
            action=action,
        )
        # The agent learns the cause, not the relay's file paths.
        why = message.rsplit(": ", 1)[-1]
        if not terminate:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.chan.write_stderr(
                    f"castgate: this session cannot be recorded ({why}); it continues "
                    "unrecorded\r\n".encode()
                )
            return
        self.status = "recording failed"
        self._stopped = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        text = "session refused" if at_start else "session terminated"
        with contextlib.suppress(OSError, asyncssh.Error):
            self.chan.write_stderr(
                f"\r\ncastgate: this session cannot be recorded ({why}); {text}\r\n".encode()
            )
            self.chan.exit(255)
        if self.up_chan is not None:
            self.up_chan.close()

    def _writer_failed(self, message: str) -> None:
        """``on_error`` of the cast writer: runs in a writer thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to end
            self._loop.call_soon_threadsafe(self._recording_failed, message)

    def _open_recording(self) -> str | None:
        """Open the cast; returns why it could not be, or None. A failed cast is
        replaced by a DiscardWriter (masking still applies to everything sent)."""
        title = self.command if self.command is not None else (self.subsystem or "shell")
        masked_title = self.ctx.masker.mask(title)
        self.masked_command = masked_title
        path = self.ctx.cfg.recordings_dir / f"{self.id}.cast"
        failure = None
        writer: CastWriter
        try:
            writer = CastWriter(
                path,
                width=self.term_size[0],
                height=self.term_size[1],
                session_id=self.id,
                signing_key=self.ctx.signing_key,
                title=f"{self.ident.name}@{self.target.name}: {masked_title}",
                env={"TERM": self.term_type or "dumb", "SHELL": "/bin/sh"},
                fsync_interval=self.ctx.cfg.recording.fsync_interval,
                on_checkpoint=self._checkpoint,
                threaded=True,
                extra_header={
                    "identity": self.ident.name,
                    "target": self.target.name,
                    "protocol": "ssh",
                    "kind": self.kind,
                    **self.ctx.identity_detail(self.ident),
                },
                on_error=self._writer_failed,
            )
        except RecordingError as exc:
            failure = str(exc)
            writer = DiscardWriter(
                path,
                session_id=self.id,
                width=self.term_size[0],
                height=self.term_size[1],
                error=failure,
            )
        self.live = self.ctx.hub.open(
            self.id,
            {
                "identity": self.ident.name,
                "target": self.target.name,
                "protocol": "ssh",
                "kind": self.kind,
            },
            self.term_size[0],
            self.term_size[1],
        )
        self.rec = SessionRecorder(
            writer,
            self.ctx.masker,
            input_mode=self.ctx.cfg.recording.input,
            hold_deadline=self.ctx.hold_deadline,
            live=self.live,
        )
        return failure

    def _checkpoint(self, lines: int, chain_hash: str) -> None:
        self.ctx.checkpoint(self.id, lines, chain_hash)  # from the writer pool

    def _to_agent(self, text: str) -> None:
        """A message from the relay, shown in the agent's terminal (or stderr) and kept
        in the recording as part of what the agent saw."""
        data = text.encode()
        if self.mode == "pty":
            data = b"\r\n" + data  # the cursor sits after the echoed command line
            masked = self._safe(lambda rec: rec.output(data)) if self.rec else data
            if masked:
                self.chan.write(masked)
            self._arm("out", None)
        else:
            masked = self._safe(lambda rec: rec.output(data, "err")) if self.rec else data
            if masked:
                self.chan.write_stderr(masked)
            self._arm("err", asyncssh.EXTENDED_DATA_STDERR)

    # -- the session -----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._run_inner()
        except asyncio.CancelledError:
            self.status = self.status if self.status != "closed" else "disconnected"
        except Exception as exc:
            log.exception("session.error", extra={"session": self.id})
            self.status = "error"
            with contextlib.suppress(Exception):
                self.chan.write_stderr(f"castgate: internal error: {exc}\r\n".encode())
                self.chan.exit(255)
        finally:
            # Sealing the cast and ending the session row must complete even when the
            # agent's connection drops mid-way: run it as its own task.
            fin = asyncio.ensure_future(self._finish())
            self.ctx.track(fin)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(fin)

    async def _run_inner(self) -> None:
        ctx = self.ctx
        failure = self._open_recording()
        # The session row first, even for a refused session: the row says why.
        await asyncio.to_thread(
            ctx.spool.create_session,
            self.id,
            identity=self.ident.name,
            target=self.target.name,
            protocol="ssh",
            groups=list(self.ident.groups),
            auth_method=self.ident.method,
            source=self.server.peer,
            node=ctx.node,
            cast_path=str(ctx.cfg.recordings_dir / f"{self.id}.cast"),
            title=self.masked_command,
            **ctx.attribute_session(self.id, self.ident),
        )
        if failure is not None:
            self._recording_failed(failure, at_start=True)
            if self._stopped:
                return
        ctx.live[self.id] = self
        await ctx.event(
            "session.start",
            self.ident.name,
            "success",
            self.server.peer,
            f"ssh:{self.target.name}",
            {"kind": self.kind, "command": self.masked_command},
            session_id=self.id,
        )
        refusal = self._choose_mode()
        if refusal is not None:
            await self._refuse(*refusal)
            return
        if self.kind == "exec" and self.command is not None:
            if not await self._exec_allowed(self.command):
                return
        elif self.kind == "subsystem":
            self._safe(lambda rec: rec.marker(f"subsystem {self.subsystem}: binary, not recorded"))
        try:
            conn = await self.server.upstream(self.target)
        except TargetError as exc:
            self.status = "target unreachable"
            await ctx.event(
                "target.connect",
                self.ident.name,
                "failure",
                self.server.peer,
                f"ssh:{self.target.name}",
                {"reason": str(exc)},
                session_id=self.id,
            )
            self._to_agent(f"castgate: {exc}\r\n")
            self._flush_all()
            self.chan.exit(255)
            return
        ctx.credential_used(self.id, self.ident.name, self.server.peer, self.target)
        if self._stopped:
            return  # terminated while waiting (approval, target): never start the command
        env: dict[bytes | str, bytes | str] = {
            k: v
            for k, v in self.chan.get_environment().items()
            if ENV_ALLOW.match(k) and "\x00" not in v  # a NUL would drop the upstream
        }
        try:
            self.up_chan, _ = await conn.create_session(
                lambda: _Upstream(self),
                self.command if self.kind == "exec" else None,
                subsystem=self.subsystem,
                env=env,
                term_type=self.term_type,
                term_size=(*self.term_size, 0, 0) if self.term_type else None,
                encoding=None,
            )
        except (asyncssh.Error, OSError) as exc:
            self.status = "target refused"
            self._to_agent(f"castgate: target {self.target.name} refused the session: {exc}\r\n")
            self._flush_all()
            self.chan.exit(255)
            return
        input_task: asyncio.Future[None] | None = None
        if self.mode == "pty":
            self._input = asyncio.Queue()
            input_task = asyncio.ensure_future(self._shell_input())
        elif self.mode == "stdin":
            self._input = asyncio.Queue()
            input_task = asyncio.ensure_future(self._stdin_input())
        for item in self._early:
            if item is None:
                self.eof_received()
            else:
                self.bytes_in -= len(item)
                self.data_received(item, None)
        self._early.clear()
        self.chan.resume_reading()
        try:
            lost = await self._done
        finally:
            if input_task is not None:
                input_task.cancel()
        self._flush_all()
        if isinstance(lost, Exception) and self.exit_status is None and self.exit_signal is None:
            self._to_agent(f"castgate: connection to target {self.target.name} lost: {lost}\r\n")
            self._flush_all()
            self.status = "target lost"
            self.ctx.emit(
                "target.lost",
                self.ident.name,
                "failure",
                self.server.peer,
                f"ssh:{self.target.name}",
                {"reason": str(lost)},
                session_id=self.id,
            )
        self._ended = True
        with contextlib.suppress(OSError, asyncssh.Error):
            if self.exit_signal is not None:
                self.chan.exit_with_signal(*self.exit_signal)
            else:
                self.chan.exit(self.exit_status if self.exit_status is not None else 255)

    def _choose_mode(self) -> tuple[str, str, str] | None:
        """How this channel's input is taken; or (rule, marker, message) when the
        target refuses this kind of channel."""
        target = self.target
        pty = self.term_type is not None
        if self.kind == "shell":
            if pty:
                self.mode = "pty"
            elif target.shell_without_pty == "refuse":
                return (
                    "castgate:shell-without-pty",
                    "refused: shell without a PTY",
                    f"a shell without a PTY is not allowed on target {target.name}; "
                    "use a PTY (ssh -t) or an exec command",
                )
            else:
                self.mode = "stdin"
            return None
        if self.kind != "exec" or self.command is None or self.binary:
            return None
        if self._scp:
            return (
                "castgate:scp",
                "refused: legacy scp protocol",
                f"the legacy scp protocol is not enabled for target {target.name} "
                "(allow_scp); use sftp (scp without -O) where it is allowed",
            )
        interpreter = analyze(self.command).interpreter
        if interpreter is not None and target.interpreters == "refuse":
            return (
                "castgate:interpreters",
                "refused: interpreter",
                f"starting an interactive interpreter is not allowed on target {target.name}",
            )
        if interpreter == "other":
            self.mode = "record"
        elif pty:
            # Whatever runs under a PTY may be a shell (bash -i, sudo -i, su, ssh):
            # lines submitted in it are checked like a shell's.
            self.mode = "pty"
        elif interpreter == "shell":
            if target.shell_without_pty == "refuse":
                return (
                    "castgate:shell-without-pty",
                    "refused: shell without a PTY",
                    f"a shell reading commands from stdin is not allowed on target "
                    f"{target.name}; use a PTY (ssh -t)",
                )
            self.mode = "stdin"
        return None

    async def _refuse(self, rule: str, marker: str, message: str) -> None:
        """A channel the target does not allow: logged like a blocked command."""
        self._safe(lambda rec: rec.marker(marker))
        self._to_agent(f"castgate: {message}\r\n")
        self._command_id = await asyncio.to_thread(
            self.ctx.spool.add_command,
            self.id,
            self.masked_command,
            kind="exec" if self.kind == "exec" else "shell",
            action="block",
            rule=rule,
        )
        await self.ctx.event(
            "command.blocked",
            self.ident.name,
            "failure",
            self.server.peer,
            f"ssh:{self.target.name}",
            {"rule": rule, "command": self.masked_command},
            session_id=self.id,
        )
        await self._finish_command("blocked")
        self._flush_all()
        self.chan.exit(126)

    def _decide(self, command: str) -> Decision:
        """The policy's decision on a command or line; starting an interpreter whose
        input cannot be checked as shell is opaque unless a rule decided it, and so is a
        PTY line that changes what keys do (the line model reads keys as the defaults
        bind them: a rebound Enter or Ctrl-C would run what it did not see)."""
        decision = self.ctx.policy.decide_shell(
            target=self.target.name, groups=self.ident.groups, command=command
        )
        if decision.action == "allow" and decision.rule is None:
            analysis = analyze(command)
            if analysis.interpreter == "other":
                program = analysis.commands[0].program if analysis.commands else "it"
                return self._opaque(f"starts {program}, an interpreter whose input is not checked")
            if self.mode == "pty":
                for cmd in analysis.commands:
                    if cmd.program in _REBIND or (
                        cmd.program == "stty" and not set(cmd.argv[1:]) <= _STTY_READ
                    ):
                        return self._opaque(f"{cmd.program} changes what keys do")
        return decision

    def _opaque(self, reason: str) -> Decision:
        return self.ctx.policy.scoped(self.target.name, self.ident.groups).opaque(reason)

    async def _exec_allowed(self, command: str) -> bool:
        masked = self.masked_command
        kind = "git" if _GIT.match(command) else "exec"
        if self.rec is not None and self.ctx.cfg.recording.input != "none" and not self.binary:
            self._safe(lambda rec: rec.command_line(command))
        elif self.binary:
            self._safe(lambda rec: rec.marker(f"{kind}: {masked} (binary stream, not recorded)"))
        decision = self._decide(command)
        allowed = await self._apply(decision, masked, kind)
        if not allowed:
            self._flush_all()
            self.chan.exit(126)
        return allowed

    async def _apply(self, decision: Decision, masked: str, kind: str) -> bool:
        """Record and enforce a policy decision; True when the command may run."""
        ctx = self.ctx
        self._command_id = await asyncio.to_thread(
            ctx.spool.add_command,
            self.id,
            masked,
            kind=kind,
            action=decision.action,
            rule=decision.rule_name,
        )
        if decision.action == "allow":
            return True
        rule = decision.rule
        assert rule is not None
        why = (
            f" ({decision.reason})"
            if decision.reason and decision.reason != decision.rule_name
            else ""
        )
        if decision.action == "block":
            self._safe(lambda rec: rec.marker(f"blocked: {rule.name}{why}"))
            self._to_agent(f"castgate: blocked by rule {rule.name}{why}: {masked}\r\n")
            await ctx.event(
                "command.blocked",
                self.ident.name,
                "failure",
                self.server.peer,
                f"ssh:{self.target.name}",
                {"rule": rule.name, "command": masked},
                session_id=self.id,
            )
            await self._finish_command("blocked")
            return False

        asked: list[int] = []

        def requested(approval_id: int) -> None:
            asked.append(approval_id)
            self._safe(
                lambda rec: rec.marker(f"approval #{approval_id} requested (rule {rule.name})")
            )
            self._to_agent(
                f"castgate: approval #{approval_id} required (rule {rule.name}), waiting{why}\r\n"
            )
            self._flush_all()

        try:
            outcome: Outcome = await ctx.await_approval(
                session_id=self.id,
                identity=self.ident.name,
                target=self.target.name,
                command=masked,
                rule=rule,
                on_requested=requested,
            )
        except StoreError as exc:
            await self._approval_unavailable(rule.name, str(exc), asked[0] if asked else None)
            return False
        self._safe(lambda rec: rec.marker(outcome.describe()))
        await ctx.event(
            "command.approval",
            self.ident.name,
            "success" if outcome.approved else "failure",
            self.server.peer,
            f"ssh:{self.target.name}",
            {"rule": rule.name, "approval": outcome.approval_id, "status": outcome.status},
            session_id=self.id,
        )
        if outcome.approved:
            self._to_agent(f"castgate: {outcome.describe()}\r\n")
            return True
        self._to_agent(f"castgate: {outcome.describe()}\r\n")
        await self._finish_command(outcome.status)
        return False

    async def _approval_unavailable(self, rule: str, error: str, approval_id: int | None) -> None:
        """Fail closed: without its store an approval can be neither asked for nor
        awaited, so the command is refused like a block."""
        self._safe(lambda rec: rec.marker(f"refused: approval store unavailable (rule {rule})"))
        self._to_agent(f"castgate: approval store unavailable; command refused (rule {rule})\r\n")
        await self.ctx.event(
            "command.approval",
            self.ident.name,
            "failure",
            self.server.peer,
            f"ssh:{self.target.name}",
            {"rule": rule, "approval": approval_id, "status": "store unavailable", "error": error},
            session_id=self.id,
        )
        await self._finish_command("store unavailable")

    async def _finish_command(self, status: str) -> None:
        if self._command_id is not None:
            cid, self._command_id = self._command_id, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    self.ctx.spool.finish_command,
                    cid,
                    status=status,
                    exit_status=self.exit_status,
                    bytes_in=self.bytes_in,
                    bytes_out=self.bytes_out,
                )

    async def _shell_input(self) -> None:
        """Keystrokes of a PTY session, in order: keys that only edit the line go
        straight to the target; a key that may run the line (Enter, and any key the
        relay does not model) first puts the echoed line through the policy."""
        assert self._input is not None and self.up_chan is not None
        up = self.up_chan
        while True:
            data = await self._input.get()
            if data is None:
                up.write_eof()
                return
            self._dequeued(data)
            for key in self._keyreader.feed(data):
                await self._key(key)

    def _dequeued(self, data: bytes) -> None:
        self._queued_in -= len(data)
        if self._input_paused and self._queued_in < _INPUT_LOW:
            self._input_paused = False
            self.chan.resume_reading()

    async def _key(self, key: Key) -> None:
        kind = key.kind
        if kind == "edit":
            await self._keys(key.data)
        elif kind == "accept":
            await self._submit(key.data)
        elif kind == "operate":
            # Operate-and-get-next would then draw the next history line as if typed,
            # before any keystroke marks where the line starts: sent as a plain Enter.
            await self._submit(b"\r")
        elif kind == "interrupt":
            self._line.abandon()
            self._line.expect_break()
            self._keyreader.line_ended()
            self._typed.take()
            self._echoed = False
            self._hold_keys(key.data)
            self._send_key(key.data)
        elif kind == "eof" and not self._line.awaiting and not self._line.break_pending:
            self._send_key(key.data)  # Ctrl-D on an empty line: the shell exits
        else:
            await self._check_key(key)

    def _send_key(self, data: bytes) -> None:
        assert self.up_chan is not None
        self._last_input = time.monotonic()
        self.up_chan.write(data)

    async def _start_line(self) -> None:
        """The first keystroke of a line: the prompt ends where the cursor is."""
        # Output still coming (the last command's, the prompt) would be read as part
        # of the line: a line typed right behind it starts once it has gone quiet.
        recent = time.monotonic() - self._last_output < _ECHO_QUIET
        if self._line.break_pending or not self._last_output or recent:
            await self._await_prompt()
        self._line.mark_input_start()
        self._echoed = False

    async def _keys(self, data: bytes) -> None:
        if not self._line.awaiting:
            await self._start_line()
        self._typed.feed(data)
        self._hold_keys(data)
        self._send_key(data)

    async def _await_prompt(self) -> None:
        """Typeahead: the shell has not answered the last line with a line break yet,
        or its output is still coming. The next line starts once it has and its output
        went quiet (bounded); started before, the line is unsure and decided as
        opaque."""
        # Before the shell's first output (the login banner, the first prompt) a
        # session may take seconds to start.
        first = not self._last_output
        deadline = time.monotonic() + (_FIRST_PROMPT_MAX if first else _ECHO_MAX)
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self._last_output >= _ECHO_QUIET
            if self._last_output and not self._line.break_pending and quiet:
                return
            await asyncio.sleep(_ECHO_QUIET / 3)

    async def _wait_echo(self) -> None:
        """Let the echo of the last keystrokes arrive before reading the line."""
        deadline = self._last_input + _ECHO_MAX
        while time.monotonic() < deadline:
            last = max(self._last_output, self._last_input)
            if self._echoed and time.monotonic() - last >= _ECHO_QUIET:
                break
            await asyncio.sleep(_ECHO_QUIET / 3)

    def _hold_keys(self, data: bytes) -> None:
        """Keystrokes are kept (input = "all") only once the terminal has echoed them:
        what is typed at a password prompt never reaches the recording."""
        if self.ctx.cfg.recording.input == "all":
            self._held_keys += data
            if self._echoed:
                self._release_keys()
            elif len(self._held_keys) > _HELD_KEYS_MAX:
                self._held_keys.clear()

    def _release_keys(self) -> None:
        if self._held_keys:
            keys, self._held_keys = bytes(self._held_keys), bytearray()
            self._record_input(keys)

    @staticmethod
    def _judge_line(
        line: str | None, typed: str, reliable: bool, echoed: bool
    ) -> tuple[str, str | None]:
        """The line to decide and, when the relay cannot tell what the shell will run,
        why (the line is then opaque)."""
        if line is None:
            return (typed if reliable else ""), (
                "the relay lost track of the line (output or a redraw it cannot follow)"
            )
        if not echoed:
            if reliable:
                return typed, None
            return "", "typed without echo, with keys the relay cannot replay"
        if reliable and typed != line:
            return line, "the echo does not match the keys typed (output while typing?)"
        if _HISTORY.search(line):
            return line, "history expansion runs text the line does not show"
        return line, None

    async def _decide_line(
        self, text: str, opaque: str | None, echoed: bool, decision: Decision | None = None
    ) -> bool:
        """Log, record and enforce the decision on a shell line; True when it may run."""
        if echoed:
            masked = self.ctx.masker.mask(text) if text else f"({opaque})"
            if text and self.ctx.cfg.recording.input == "commands":
                self._safe(lambda rec: rec.command_line(text))
        else:
            # Typed without echo (a password prompt, or `stty -echo`): the policy still
            # sees it; the recording and the command log never keep it.
            masked = "(input hidden: terminal echo off)"
            self._safe(lambda rec: rec.marker("input hidden (terminal echo off)"))
        if decision is None:
            decision = self._opaque(opaque) if opaque is not None else self._decide(text)
        allowed = await self._apply(decision, masked, "shell")
        if allowed and self._command_id is not None:
            await self._finish_command("submitted")
        return allowed

    def _discard_line(self) -> None:
        """The line was refused: discard it at the target, where the shell prints a
        fresh prompt. Until the shell answers with a line break, the model does not
        trust that it did (Ctrl-C can be ignored)."""
        assert self.up_chan is not None
        self.up_chan.write(b"\x03")
        self._line.abandon()
        self._line.expect_break()
        self._keyreader.line_ended()

    async def _submit(self, key: bytes) -> None:
        assert self.up_chan is not None
        if not self._line.awaiting:
            if self._line.break_pending:
                await self._await_prompt()
            if not self._line.break_pending:
                self._record_input(key)  # Enter on an empty line
                self._send_key(key)
                self._line.expect_break()
                return
            # The shell never answered the last line's Enter or discard: that line may
            # still be in its editor, and this Enter would run it.
            self._keyreader.line_ended()
            self._typed.take()
            reason = "the shell did not answer the previous line; it may still be pending"
            if await self._decide_line("", reason, echoed=True):
                self._record_input(key)
                self._send_key(key)
                self._line.expect_break()
            else:
                self._discard_line()
            return
        await self._wait_echo()
        echoed = self._echoed
        line = self._line.submitted()
        typed, reliable = self._typed.take()
        self._keyreader.line_ended()
        self._echoed = False
        if echoed:
            self._release_keys()
        else:
            self._held_keys.clear()
        text, opaque = self._judge_line(line, typed, reliable, echoed)
        if opaque is None and not text:
            self._record_input(key)
            self._send_key(key)
            self._line.expect_break()
            return
        if await self._decide_line(text, opaque, echoed):
            self._record_input(key)
            self._send_key(key)
            self._line.expect_break()
        else:
            self._discard_line()

    async def _check_key(self, key: Key) -> None:
        """A key the relay does not model (Ctrl-D on a line, Meta and Ctrl-X keys,
        vi-mode commands, function keys): it may run the line, so the line is checked
        first; an edit-and-execute key is opaque (an editor decides what runs)."""
        assert self.up_chan is not None
        if not self._line.awaiting:
            await self._start_line()
        else:
            await self._wait_echo()
        echoed = self._echoed
        typed, reliable = self._typed.peek()
        text, opaque = self._judge_line(self._line.peek(), typed, reliable, echoed or not typed)
        if key.kind == "execute":
            opaque = "edit-and-execute: an editor decides what runs"
        decision = None
        if opaque is None and text:
            decision = self._decide(text)
        checked = opaque is not None or (decision is not None and decision.action != "allow")
        if checked and not await self._decide_line(text, opaque, echoed or not typed, decision):
            self._typed.take()
            self._echoed = False
            self._discard_line()
            return
        self._typed.feed(key.data)
        self._hold_keys(key.data)
        self._send_key(key.data)
        if key.unsure or key.kind == "execute":
            self._line.mark_unsure()

    async def _stdin_input(self) -> None:
        """Stdin of a shell without a PTY is its command stream: each unit the shell
        would run is decided before any byte of it reaches the target; one waiting for
        approval holds what follows, in order."""
        assert self._input is not None and self.up_chan is not None
        script = StdinScript()
        while True:
            data = await self._input.get()
            if data is not None:
                self._dequeued(data)
            units = script.finish() if data is None else script.feed(data)
            for unit in units:
                await self._stdin_unit(unit)
            if data is None:
                self.up_chan.write_eof()
                return

    async def _stdin_unit(self, unit: ScriptUnit) -> None:
        assert self.up_chan is not None
        if unit.kind == "continuation":
            if self._unit_allowed:
                self.up_chan.write(unit.data)
            return
        if unit.kind == "blank":
            self.up_chan.write(unit.data)
            return
        text = unit.text
        if self.ctx.cfg.recording.input != "none":
            self._safe(lambda rec: rec.command_line(text))
        if unit.kind == "opaque":
            decision = self._opaque(unit.reason or "cannot be parsed")
        else:
            decision = self._decide(text)
        self._unit_allowed = await self._apply(decision, self.ctx.masker.mask(text), "shell")
        if self._unit_allowed:
            self.up_chan.write(unit.data)
            if self._command_id is not None:
                await self._finish_command("submitted")

    async def _finish(self) -> None:
        self.ctx.live.pop(self.id, None)
        self.ctx.hub.close(self.id, self.status)
        for timer in self._timers.values():
            timer.cancel()
        manifest = None
        rec = self.rec
        if rec is not None:
            try:
                if self.binary:
                    rec.marker(
                        f"end: exit {self.exit_status}, {self.bytes_out} bytes from target, "
                        f"{self.bytes_in} bytes from agent"
                    )
                tail = rec.close(
                    self.status,
                    {
                        "exit_status": self.exit_status,
                        "exit_signal": self.exit_signal[0] if self.exit_signal else None,
                        "identity": self.ident.name,
                        "target": self.target.name,
                    },
                )
                if tail and not self._stopped:
                    with contextlib.suppress(Exception):
                        self.chan.write(tail)
                manifest = rec.manifest or None  # empty: the recording had failed
            except RecordingError as exc:
                self._recording_failed(str(exc))
        if manifest is not None and rec is not None and not self.binary:
            self.ctx.track(asyncio.ensure_future(self.ctx.index_cast(rec.writer.path)))
        await self._finish_command("exited" if self.status == "closed" else self.status)
        await self.ctx.end_session(
            self.id,
            # After a failure: how far the unsealed cast got, and no manifest.
            rec,
            status=self.status,
            exit_status=self.exit_status,
        )
        await self.ctx.event(
            "session.end",
            self.ident.name,
            "success" if self.status == "closed" else "failure",
            self.server.peer,
            f"ssh:{self.target.name}",
            {
                "status": self.status,
                "exit_status": self.exit_status,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
            },
            session_id=self.id,
        )

    async def close(self, reason: str) -> None:
        """End the session from the relay's side (shutdown) and wait until sealed."""
        self.status = reason
        if self.up_chan is not None:
            self.up_chan.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            self.chan.close()
