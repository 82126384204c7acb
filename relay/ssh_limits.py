"""Size limits on what an SSH client asks of a session channel: the exec command, the
environment it sent before (``env`` requests: OpenSSH's ``SendEnv``/``SetEnv``) and
the subsystem name. All of it ends up in the recording, the audit store and the
target's process table, and asyncssh bounds none of it below its packet size (256 KiB
a packet; ``env`` requests are not counted at all).

asyncssh has no server-side hook for ``env`` requests (its ``accept_env`` counterpart
exists only on the client): each one lands in the channel's environment as it comes.
The public ``SSHServerChannel.get_environment_bytes()`` reads them at the next
``shell``/``exec``/``subsystem`` request, which the client sends after its ``env``
requests (RFC 4254 6.4), and that request is refused past a limit: the client is told
on stderr, the channel ends with exit status 255, the connection and its other
channels go on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from recorder.config import LimitsConfig

if TYPE_CHECKING:
    from relay.context import RelayContext


class _Channel(Protocol):
    def get_environment_bytes(self) -> Any: ...
    def write_stderr(self, data: Any) -> None: ...
    def exit(self, status: int) -> None: ...


class _Server(Protocol):
    @property
    def peer(self) -> str: ...


class _Ident(Protocol):
    @property
    def name(self) -> str: ...


class _Target(Protocol):
    @property
    def name(self) -> str: ...


class _Session(Protocol):
    """What of a relay session (relay/ssh_relay.py ``RelaySession``) the checks use."""

    @property
    def ctx(self) -> RelayContext: ...
    @property
    def chan(self) -> _Channel: ...
    @property
    def server(self) -> _Server: ...
    @property
    def ident(self) -> _Ident: ...
    @property
    def target(self) -> _Target: ...


def over_limit(
    limits: LimitsConfig,
    env: dict[bytes, bytes],
    command: str | None = None,
    subsystem: str | None = None,
) -> tuple[str, int, int] | None:
    """(limit key, size, limit) of the first limit a channel request breaks, or None."""
    if len(env) > limits.ssh_max_env_vars:
        return "ssh_max_env_vars", len(env), limits.ssh_max_env_vars
    env_bytes = sum(len(k) + len(v) for k, v in env.items())
    if env_bytes > limits.ssh_max_env_bytes:
        return "ssh_max_env_bytes", env_bytes, limits.ssh_max_env_bytes
    if command is not None:
        size = len(command.encode("utf-8", "surrogateescape"))
        if size > limits.ssh_max_command:
            return "ssh_max_command", size, limits.ssh_max_command
    if subsystem is not None:
        size = len(subsystem.encode("utf-8", "surrogateescape"))
        if size > limits.ssh_max_subsystem:
            return "ssh_max_subsystem", size, limits.ssh_max_subsystem
    return None


_WHAT = {
    "ssh_max_env_vars": "{size} environment variables exceed the limit of {limit}",
    "ssh_max_env_bytes": "environment of {size} bytes exceeds the limit of {limit} bytes",
    "ssh_max_command": "command of {size} bytes exceeds the limit of {limit} bytes",
    "ssh_max_subsystem": "subsystem name of {size} bytes exceeds the limit of {limit} bytes",
}


def describe(key: str, size: int, limit: int) -> str:
    """The one line a client is told."""
    return f"castgate: {_WHAT[key].format(size=size, limit=limit)} (limits.{key})"


def request_ok(
    session: _Session, *, command: str | None = None, subsystem: str | None = None
) -> bool:
    """Whether a ``shell`` (neither given), ``exec`` or ``subsystem`` request is within
    the limits; if not, the client is told on stderr and the refusal audited (counted
    under ``limit.exceeded`` in the metrics). Nothing of the oversized text is kept:
    only its size (it may hold anything, card numbers included)."""
    env = dict(session.chan.get_environment_bytes())
    broken = over_limit(session.ctx.cfg.limits, env, command, subsystem)
    if broken is None:
        return True
    key, size, limit = broken
    # The refusal alone would not be read: OpenSSH's client exits on a refused exec of
    # its main session (fatal "exec request failed") before it writes the stderr that
    # came with it. Closing the channel with exit status 255 first, as OpenSSH does
    # when it cannot run a command, gets the line to the user, mux clients included.
    session.chan.write_stderr(describe(key, size, limit).encode() + b"\r\n")
    session.chan.exit(255)
    request = "exec" if command is not None else "subsystem" if subsystem is not None else "shell"
    session.ctx.audit.emit(
        "limit.exceeded",
        session.ident.name,
        "failure",
        session.server.peer,
        f"ssh:{session.target.name}",
        {"limit": key, "size": size, "max": limit, "request": request},
    )
    return False
