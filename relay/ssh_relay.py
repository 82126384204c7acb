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
from recorder.session import SessionRecorder
from relay.audit import BoundAudit
from relay.coalesce import coalesce
from relay.connlimit import Ticket
from relay.context import RelayContext, new_session_id
from relay.identity import AuthError, Identity
from relay.operator import OPERATOR_ROLES, OPERATOR_USER, OperatorSession
from relay.policy import Decision
from relay.session_core import SessionCore
from relay.session_recording import CastSpec
from relay.shell_line import ScriptUnit, StdinScript
from relay.shell_parse import analyze
from relay.ssh_limits import request_ok
from relay.ssh_pty import PtyShell
from relay.tokens import expiry_text, identity_detail, token_deadline
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
ENV_ALLOW = re.compile(r"^(LANG|LC_[A-Z]+|GIT_PROTOCOL|TZ)$")
# Keystrokes queued behind a shell line that waits for its policy decision (an approval
# can take minutes): past the high mark the agent's channel stops being read, so its SSH
# window, not the relay's memory, holds the rest.
_INPUT_HIGH = 1 << 20
_INPUT_LOW = 256 << 10
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


# How long a connection over a cap may take to reach authentication, where it is told
# why it is refused; then it is closed without being told.
REFUSAL_GRACE_S = 5.0


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
        self._refused: str | None = None  # over a connection cap: the reason
        self._refusal: asyncio.TimerHandle | None = None
        self.sessions: set[RelaySession] = set()
        self.audit: BoundAudit = ctx.audit.bind()

    # -- connection and authentication -------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        coalesce(conn)
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.audit = self.ctx.audit.bind(origin=self.peer)
        admitted = self.ctx.connections.admit("ssh", str(peer[0]) if peer else "?")
        if isinstance(admitted, str):
            # The refusal is sent when the client asks to authenticate: the key exchange
            # is done and the client waits for an answer, so it reads the reason. Sent
            # at once, it raced the client's own KEXINIT: the relay's close turned that
            # into a reset that discarded the reason unread (seen on a loaded machine).
            # A client that never gets that far is closed after REFUSAL_GRACE_S anyway.
            self._refused = f"castgate: {admitted}"
            self._refusal = asyncio.get_running_loop().call_later(REFUSAL_GRACE_S, self._refuse_now)
        else:
            self._ticket = admitted

    def _refuse_now(self) -> None:
        if self._refusal is not None:
            self._refusal.cancel()
            self._refusal = None
        if self.conn is not None and self._refused is not None:
            self.conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, self._refused)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refusal is not None:
            self._refusal.cancel()
            self._refusal = None
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
        self.audit = self.audit.bind(resource=f"ssh:{username}")
        if self._refused is not None:
            self._refuse_now()
        return True  # never "no authentication needed", refused or not

    def _throttled(self, method: str) -> bool:
        if self._refused is not None:
            return True  # over a connection cap: no credential is even looked at
        if self.ctx.limiter.blocked(self.peer):
            reason = "too many failed attempts from this address"
            self.audit.failure("auth", method=method, reason=reason)
            return True
        return False

    def _failed(self, method: str, reason: str) -> None:
        self.ctx.limiter.failure(self.peer)
        self.audit.failure("auth", method=method, reason=reason)

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
        self.audit = self.audit.bind(actor=ident.name)
        detail = identity_detail(ident)
        self.audit.success("auth", method=ident.method, groups=list(ident.groups), **detail)
        deadline = token_deadline(ident)
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
        when = expiry_text(ident)
        self.audit.success("session.token_expired", expired_at=when, provider=ident.provider)
        message = f"castgate: your token expired at {when}; the session is closed"
        conn.disconnect(asyncssh.DISC_BY_APPLICATION, message)

    # -- admission ---------------------------------------------------------------

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        ident = self.identity
        assert ident is not None
        if self.target_name == OPERATOR_USER:
            if not self.ctx.roles.of(ident.groups) & OPERATOR_ROLES:
                self.audit.bind(resource="operator").failure("access", reason="no operator role")
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
            self.audit.failure("access", reason=reason)
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
        self._refuse_forward(f"direct-tcpip to {dest_host}:{dest_port}")
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            "castgate: port forwarding is not allowed through this relay",
        )

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self._refuse_forward(f"tcpip-forward on {listen_host}:{listen_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._refuse_forward(f"unix socket {dest_path}")
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            "castgate: socket forwarding is not allowed through this relay",
        )

    def _refuse_forward(self, what: str) -> None:
        self.audit.failure("forwarding", request=what, reason="forwarding disabled")

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


# More than ~20 attributes (an exception to the guide): what is left here is the
# channel's request (kind, command, terminal) and its bridge state (asyncssh's callbacks
# on both hops, flow control, held output timers, input queued behind a decision), read
# by the callbacks on every chunk. The lifecycle (identity, audit, recording,
# enforcement, the end) is the session core's, the PTY line model ssh_pty.PtyShell's.
class RelaySession(asyncssh.SSHServerSession[bytes]):
    """One channel of an agent: shell, exec or subsystem, bridged to the target."""

    def __init__(
        self, ctx: RelayContext, server: RelayServer, ident: Identity, target: TargetConfig
    ) -> None:
        self.ctx = ctx
        self.server = server
        self.ident = ident
        self.target = target
        self.core = SessionCore(
            ctx,
            session_id=new_session_id(),
            ident=ident,
            target=target,
            origin=server.peer,
            frontend=self,
            commands=self,
            on_lost=self._recording_lost,
        )
        self.id = self.core.id
        self.audit = self.core.audit
        self.recording = self.core.recording
        # Refusals of a channel request, before the session (and its row) exists.
        self._request_audit = self.audit.bind(session_id=None)
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
        self.masked_command = ""
        self._early: list[bytes | None] = []
        self._loop = asyncio.get_event_loop()
        self._done = self._loop.create_future()
        self._task: asyncio.Task[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._fed: dict[str, float] = {}  # loop time of each stream's last held output
        self.input_queue: asyncio.Queue[bytes | None] | None = None
        self.pty = PtyShell(self)
        # How the channel's input is taken: "pty" (keystrokes, the echo line model),
        # "stdin" (a shell reading commands from stdin: line-checked), "record" (an
        # interpreter the relay cannot check: input recorded), None (data to a command).
        self.mode: str | None = None
        self._scp = False
        self._unit_allowed = False
        self._queued_in = 0
        self._input_paused = False
        self._ended = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = "closed"
        self.command_id: int | None = None
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
            self.pty = PtyShell(self, self.term_size[0])
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
            self._request_audit.failure("exec", reason="NUL byte in the command")
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
        reason = "not enabled for this target"
        self._request_audit.failure("subsystem", subsystem=subsystem, reason=reason)
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
        elif self.input_queue is not None:
            self.input_queue.put_nowait(data)
            self._queued_in += len(data)
            if self._queued_in > _INPUT_HIGH and not self._input_paused:
                self._input_paused = True
                self.chan.pause_reading()
        else:
            if self.mode == "record":
                self.safe(lambda rec: rec.input(data))
            else:
                self.record_input(data)
            self.up_chan.write(data)

    def eof_received(self) -> bool:
        if self.up_chan is None:
            self._early.append(None)
        elif self.input_queue is not None:
            self.input_queue.put_nowait(None)
        else:
            self.up_chan.write_eof()
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if not (width and height):
            return
        width, height = _clamp_size(width, height)
        self.term_size = (width, height)
        self.pty.resize(width)
        if self.up_chan is not None:
            self.up_chan.change_terminal_size(width, height, pixwidth, pixheight)
        if self.rec is not None and not self.binary:
            self.safe(lambda rec: rec.resize(width, height))

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

    def record_input(self, data: bytes) -> None:
        if self.rec is not None and not self.binary and self.ctx.cfg.recording.input == "all":
            self.safe(lambda rec: rec.input(data))

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
            self.pty.output_seen(data)
        masked = self.safe(lambda rec: rec.output(data, stream))
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
        masked = self.safe(lambda rec: rec.flush_output(stream))
        if masked:
            self.chan.write(masked, datatype)

    def _flush_all(self) -> None:
        if self._stopped:
            return  # the channel is closed
        for stream, datatype in (("err", asyncssh.EXTENDED_DATA_STDERR), ("out", None)):
            timer = self._timers.pop(stream, None)
            if timer is not None:
                timer.cancel()
            masked = self.safe(lambda rec, s=stream: rec.flush_output(s))  # type: ignore[misc]
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

    @property
    def rec(self) -> SessionRecorder | None:
        """The session's recorder (None until the recording is opened)."""
        return self.core.rec

    def safe(self, fn: Callable[[SessionRecorder], Any]) -> Any:
        """Run a recorder call; a recording failure applies ``recording.on_failure``."""
        return self.recording.safe(fn)

    def _recording_lost(self, why: str, *, terminate: bool, at_start: bool) -> None:
        """The agent learns that its session cannot be recorded: ``continue`` tells it
        and goes on unrecorded, ``terminate`` ends the session (nothing more flows)."""
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

    def _open_recording(self) -> str | None:
        """Open the cast; returns why it could not be, or None."""
        title = self.command if self.command is not None else (self.subsystem or "shell")
        self.masked_command = masked = self.ctx.masker.mask(title)
        who = {"identity": self.ident.name, "target": self.target.name, "protocol": "ssh"}
        return self.recording.open(
            CastSpec(
                title=f"{self.ident.name}@{self.target.name}: {masked}",
                width=self.term_size[0],
                height=self.term_size[1],
                env={"TERM": self.term_type or "dumb", "SHELL": "/bin/sh"},
                header={**who, "kind": self.kind, **identity_detail(self.ident)},
                live={**who, "kind": self.kind},
                input_mode=self.ctx.cfg.recording.input,
                hold_deadline=self.ctx.hold_deadline,
            )
        )

    def tell(self, text: str) -> None:
        """A relay message for the agent (the session core's, e.g. an approval)."""
        self._to_agent(f"{text}\r\n")
        self._flush_all()

    def _to_agent(self, text: str) -> None:
        """A message from the relay, shown in the agent's terminal (or stderr) and kept
        in the recording as part of what the agent saw."""
        data = text.encode()
        if self.mode == "pty":
            data = b"\r\n" + data  # the cursor sits after the echoed command line
            masked = self.safe(lambda rec: rec.output(data)) if self.rec else data
            if masked:
                self.chan.write(masked)
            self._arm("out", None)
        else:
            masked = self.safe(lambda rec: rec.output(data, "err")) if self.rec else data
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
            self.ctx.background.track(fin)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(fin)

    async def _run_inner(self) -> None:
        failure = self._open_recording()
        started = await self.core.start(
            protocol="ssh",
            title=self.masked_command,
            failure=failure,
            kind=self.kind,
            command=self.masked_command,
        )
        if not started or self._stopped:
            return
        refusal = self._choose_mode()
        if refusal is not None:
            await self._refuse(*refusal)
            return
        if self.kind == "exec" and self.command is not None:
            if not await self._exec_allowed(self.command):
                return
        elif self.kind == "subsystem":
            self.safe(lambda rec: rec.marker(f"subsystem {self.subsystem}: binary, not recorded"))
        if await self._open_upstream():
            await self._bridge()

    async def _open_upstream(self) -> bool:
        """The target's side of the session; False (the agent told why) when the
        target cannot be reached or refuses it, or the session ended meanwhile."""
        try:
            conn = await self.server.upstream(self.target)
        except TargetError as exc:
            self.status = "target unreachable"
            self.audit.failure("target.connect", reason=str(exc))
            self._to_agent(f"castgate: {exc}\r\n")
            self._flush_all()
            self.chan.exit(255)
            return False
        self.core.credential_used()
        if self._stopped:
            return False  # terminated while waiting (approval, target): never start it
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
            return False
        return True

    async def _bridge(self) -> None:
        """Move bytes both ways until the target's side ends, then pass on its exit."""
        input_task: asyncio.Future[None] | None = None
        if self.mode == "pty":
            self.input_queue = asyncio.Queue()
            input_task = asyncio.ensure_future(self.pty.run())
        elif self.mode == "stdin":
            self.input_queue = asyncio.Queue()
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
            self.audit.failure("target.lost", reason=str(lost))
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
        self.safe(lambda rec: rec.marker(marker))
        self._to_agent(f"castgate: {message}\r\n")
        kind = "exec" if self.kind == "exec" else "shell"
        await self.opened(self.masked_command, kind, Decision("block"), rule=rule)
        self.audit.failure("command.blocked", rule=rule, command=self.masked_command)
        await self.audit.settled()
        await self.finish_command("blocked")
        self._flush_all()
        self.chan.exit(126)

    def decide(self, command: str) -> Decision:
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
                return self.core.opaque(
                    f"starts {program}, an interpreter whose input is not checked"
                )
            if self.mode == "pty":
                for cmd in analysis.commands:
                    if cmd.program in _REBIND or (
                        cmd.program == "stty" and not set(cmd.argv[1:]) <= _STTY_READ
                    ):
                        return self.core.opaque(f"{cmd.program} changes what keys do")
        return decision

    async def _exec_allowed(self, command: str) -> bool:
        masked = self.masked_command
        kind = "git" if _GIT.match(command) else "exec"
        if self.rec is not None and self.ctx.cfg.recording.input != "none" and not self.binary:
            self.safe(lambda rec: rec.command_line(command))
        elif self.binary:
            self.safe(lambda rec: rec.marker(f"{kind}: {masked} (binary stream, not recorded)"))
        decision = self.decide(command)
        allowed = await self.apply(decision, masked, kind)
        if not allowed:
            self._flush_all()
            self.chan.exit(126)
        return allowed

    async def apply(self, decision: Decision, masked: str, kind: str) -> bool:
        """Enforce a policy decision (the session core); True when the command may run."""
        verdict = await self.core.enforce(decision, masked, kind)
        if not verdict.allowed:
            what = f": {masked}" if verdict.status == "blocked" else ""
            self._to_agent(f"{verdict.message}{what}\r\n")
        return verdict.allowed

    # -- the command log (the session core's CommandLog) ------------------------------

    async def opened(
        self, command: str, kind: str, decision: Decision, *, rule: str | None = None
    ) -> None:
        """A decided command's row in the store (finished by ``_finish_command``)."""
        self.command_id = await asyncio.to_thread(
            self.ctx.spool.add_command,
            self.id,
            command,
            kind=kind,
            action=decision.action,
            rule=rule or decision.rule_name,
        )

    async def refused(self, command: str, decision: Decision, status: str) -> None:
        """The command was refused: its row ends with why."""
        await self.finish_command(status)

    async def finish_command(self, status: str) -> None:
        if self.command_id is not None:
            cid, self.command_id = self.command_id, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    self.ctx.spool.finish_command,
                    cid,
                    status=status,
                    exit_status=self.exit_status,
                    bytes_in=self.bytes_in,
                    bytes_out=self.bytes_out,
                )

    def dequeued(self, data: bytes) -> None:
        self._queued_in -= len(data)
        if self._input_paused and self._queued_in < _INPUT_LOW:
            self._input_paused = False
            self.chan.resume_reading()

    async def _stdin_input(self) -> None:
        """Stdin of a shell without a PTY is its command stream: each unit the shell
        would run is decided before any byte of it reaches the target; one waiting for
        approval holds what follows, in order."""
        assert self.input_queue is not None and self.up_chan is not None
        script = StdinScript()
        while True:
            data = await self.input_queue.get()
            if data is not None:
                self.dequeued(data)
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
            self.safe(lambda rec: rec.command_line(text))
        if unit.kind == "opaque":
            decision = self.core.opaque(unit.reason or "cannot be parsed")
        else:
            decision = self.decide(text)
        self._unit_allowed = await self.apply(decision, self.ctx.masker.mask(text), "shell")
        if self._unit_allowed:
            self.up_chan.write(unit.data)
            if self.command_id is not None:
                await self.finish_command("submitted")

    async def _finish(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        if self.binary:
            self.safe(
                lambda rec: rec.marker(
                    f"end: exit {self.exit_status}, {self.bytes_out} bytes from target, "
                    f"{self.bytes_in} bytes from agent"
                )
            )
        info = {
            "exit_status": self.exit_status,
            "exit_signal": self.exit_signal[0] if self.exit_signal else None,
            "identity": self.ident.name,
            "target": self.target.name,
        }
        tail = self.core.seal(self.status, info, index=not self.binary)
        if tail and not self._stopped:
            with contextlib.suppress(Exception):
                self.chan.write(tail)
        await self.finish_command("exited" if self.status == "closed" else self.status)
        detail = {
            "exit_status": self.exit_status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
        await self.core.end(self.status, detail, exit_status=self.exit_status)

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
