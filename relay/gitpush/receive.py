"""The receive-pack request machine: the target's advertisement goes by, the client's
request (shallow lines, commands with capabilities, push options, pack) is held until
it is complete, then forwarded byte for byte or refused.

No I/O and no asyncio: the SSH relay feeds `target_bytes` with what the target sends
before the request (and forwards it unchanged) and `client_bytes` with what the client
sends, then asks `complete` / `opaque`. Whatever does not parse as a push git would
send makes the machine opaque, with a one-line reason: the relay then treats the push
as it treats any command it cannot read (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from relay.gitpush.advert import (
    AdvertError,
    Advertisement,
    AdvertParser,
    capability_map,
    check_oid,
    name,
)
from relay.gitpush.held import DEFAULT_MEMORY_LIMIT, HeldBytes
from relay.gitpush.packscan import PackError, PackScanner, PackStats
from relay.gitpush.pktline import PktDecoder, PktError, line

DEFAULT_MAX_REQUEST = 4 * 1024 * 1024 * 1024
DEFAULT_MAX_COMMANDS = 10_000
# Capabilities a client may send that the server never advertises as such.
_CLIENT_ONLY = frozenset({"agent", "session-id"})
_BAD_REF = re.compile(r"[\x00-\x20\x7f]")


class State(Enum):
    ADVERTISEMENT = "advertisement"
    COMMANDS = "commands"
    OPTIONS = "push-options"
    PACK = "pack"
    COMPLETE = "complete"
    OPAQUE = "opaque"


@dataclass(frozen=True)
class Command:
    """One ref update as the client asks for it."""

    old: str
    new: str
    ref: str

    @property
    def kind(self) -> str:
        if set(self.old) == {"0"}:
            return "create"
        if set(self.new) == {"0"}:
            return "delete"
        return "update"


@dataclass
class PushRequest:
    """A complete push as held: what it asks and the exact bytes to forward."""

    advertisement: Advertisement
    held: HeldBytes
    commands: list[Command] = field(default_factory=list)
    capabilities: tuple[str, ...] = ()
    push_options: list[str] = field(default_factory=list)
    shallow: list[str] = field(default_factory=list)
    pack_offset: int | None = None
    pack: PackStats | None = None

    @property
    def caps(self) -> dict[str, str | None]:
        return capability_map(self.capabilities)

    @property
    def sha256(self) -> str:
        """SHA-256 of exactly the bytes that would be forwarded: what an approval binds to."""
        return self.held.sha256()

    @property
    def size(self) -> int:
        return self.held.size

    def forward(self) -> Iterator[bytes]:
        """The held bytes, unchanged, in chunks: what goes to the target when approved."""
        return self.held.chunks()


class _Opaque(Exception):
    pass


class ReceivePack:
    """One receive-pack exchange, up to the end of the client's request."""

    def __init__(
        self,
        *,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        spool_dir: str | None = None,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_commands: int = DEFAULT_MAX_COMMANDS,
    ) -> None:
        self.state = State.ADVERTISEMENT
        self.opaque_reason = ""
        self._max_request = max_request
        self._max_commands = max_commands
        self._advert = AdvertParser()
        self._dec = PktDecoder()
        self._scanner: PackScanner | None = None
        self._first_command = True
        self.request = PushRequest(
            Advertisement(), HeldBytes(memory_limit=memory_limit, spool_dir=spool_dir)
        )

    @property
    def complete(self) -> bool:
        return self.state is State.COMPLETE

    @property
    def opaque(self) -> bool:
        return self.state is State.OPAQUE

    def close(self) -> None:
        """Drop the held bytes (and their spool file)."""
        self.request.held.close()

    def target_bytes(self, data: bytes) -> None:
        """Bytes from the target before the request: its ref advertisement."""
        if self.state is State.OPAQUE:
            return
        if self.state is not State.ADVERTISEMENT:
            self._fail("the target sent data before the push was forwarded")
            return
        try:
            self._advert.feed(data)
        except (AdvertError, PktError) as exc:
            self._fail(str(exc))
            return
        if self._advert.done:
            if self._advert.rest():
                self._fail("the target sent data after its advertisement")
                return
            self.request.advertisement = self._advert.advert
            self.state = State.COMMANDS

    def client_bytes(self, data: bytes) -> None:
        """Bytes from the client; held, and parsed until the request is complete."""
        if self.state is State.OPAQUE or not data:
            return
        if self.state is State.ADVERTISEMENT:
            self._fail("the client sent data before the target's advertisement ended")
            return
        if self.state is State.COMPLETE:
            self._fail("the client sent data after the end of its push")
            return
        held = self.request.held
        held.append(data)
        if held.size > self._max_request:
            self._fail(f"the push is larger than {self._max_request} bytes")
            return
        try:
            if self.state is State.PACK:
                self._pack(data)
            else:
                self._dec.feed(data)
                self._packets()
        except (_Opaque, PktError, PackError) as exc:
            self._fail(str(exc))

    def client_eof(self) -> None:
        """The client closed its side: a request cut short is opaque."""
        if self.state is not State.COMPLETE and self.state is not State.OPAQUE:
            self._fail(f"the client's request ended early (in its {self.state.value})")

    def _fail(self, reason: str) -> None:
        self.state = State.OPAQUE
        self.opaque_reason = reason

    def _packets(self) -> None:
        for pkt in self._dec.packets():
            if pkt.data is None:
                if not pkt.is_flush:
                    raise _Opaque("protocol v2 packet in a receive-pack request")
                self._flush()
                if self.state is not State.COMMANDS and self.state is not State.OPTIONS:
                    return
            elif self.state is State.COMMANDS:
                self._command(line(pkt.data))
            else:
                self.request.push_options.append(line(pkt.data).decode("utf-8", "replace"))

    def _flush(self) -> None:
        req = self.request
        if self.state is State.COMMANDS and "push-options" in req.caps and req.commands:
            self.state = State.OPTIONS
            return
        rest = self._dec.rest()
        if not any(c.kind != "delete" for c in req.commands):
            # Delete-only (or empty) push: receive-pack reads no pack.
            if rest:
                raise _Opaque("data after a push that carries no pack")
            self.state = State.COMPLETE
            return
        self.state = State.PACK
        req.pack_offset = req.held.size - len(rest)
        self._scanner = PackScanner(hash_len=req.advertisement.hash_len)
        if rest:
            self._pack(rest)

    def _pack(self, data: bytes) -> None:
        scanner = self._scanner
        assert scanner is not None
        trailing = scanner.feed(data)
        if scanner.done:
            if trailing:
                raise _Opaque("data after the end of the pack")
            self.request.pack = scanner.stats
            self.state = State.COMPLETE

    def _command(self, text: bytes) -> None:
        req = self.request
        hash_len = req.advertisement.hash_len
        if text.startswith(b"push-cert"):
            raise _Opaque("signed push (push-cert): not read")
        if text.startswith(b"shallow "):
            if req.commands:
                raise _Opaque("shallow line after the commands")
            req.shallow.append(self._oid(text[8:], hash_len))
            return
        body, nul, caps = text.partition(b"\0")
        if self._first_command:
            self._first_command = False
            if nul:
                req.capabilities = tuple(caps.decode("ascii", "replace").split())
                self._check_caps()
        elif nul:
            raise _Opaque("capabilities after the first command")
        parts = body.split(b" ")
        if len(parts) != 3:
            raise _Opaque(f"not a ref update: {body[:100]!r}")
        ref = name(parts[2])
        if not ref or _BAD_REF.search(ref):
            raise _Opaque(f"bad ref name {parts[2][:100]!r}")
        old, new = self._oid(parts[0], hash_len), self._oid(parts[1], hash_len)
        if old == new:
            raise _Opaque(f"ref update with old == new for {ref}")
        req.commands.append(Command(old, new, ref))
        if len(req.commands) > self._max_commands:
            raise _Opaque(f"more than {self._max_commands} ref updates")

    def _check_caps(self) -> None:
        offered = self.request.advertisement.caps
        for key in self.request.caps:
            if key not in offered and key not in _CLIENT_ONLY:
                raise _Opaque(f"client capability {key!r} the target did not offer")

    @staticmethod
    def _oid(raw: bytes, hash_len: int) -> str:
        try:
            return check_oid(raw.decode("ascii"), hash_len)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Opaque(str(exc)) from None
