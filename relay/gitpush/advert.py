"""A ref advertisement (receive-pack's or upload-pack's, protocol v0/v1): the target's
refs, capabilities, `.have` and `shallow` lines, up to the flush.

Protocol v2 has no push: a client that asks for v2 (GIT_PROTOCOL=version=2) gets a v0
advertisement from receive-pack, and a v2 capability advertisement here is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from relay.gitpush.pktline import PktDecoder, line

_HEX = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


class AdvertError(Exception):
    """The target's advertisement is not one this module reads (or is an ERR line)."""


def name(raw: bytes) -> str:
    """A ref name as text that encodes back to the same bytes."""
    return raw.decode("utf-8", "surrogateescape")


def raw_name(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def capability_map(caps: tuple[str, ...]) -> dict[str, str | None]:
    """`agent=git/2.39` -> {"agent": "git/2.39"}; a bare word maps to None."""
    out: dict[str, str | None] = {}
    for cap in caps:
        key, sep, value = cap.partition("=")
        out[key] = value if sep else None
    return out


@dataclass
class Advertisement:
    refs: dict[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    haves: list[str] = field(default_factory=list)
    shallow: list[str] = field(default_factory=list)
    version: int = 0

    @property
    def caps(self) -> dict[str, str | None]:
        return capability_map(self.capabilities)

    @property
    def hash_len(self) -> int:
        """Bytes of one object id: 32 when the target says object-format=sha256."""
        return 32 if self.caps.get("object-format") == "sha256" else 20


def check_oid(text: str, hash_len: int) -> str:
    if len(text) != hash_len * 2 or not _HEX.fullmatch(text):
        raise ValueError(f"not an object id: {text[:80]!r}")
    return text


class AdvertParser:
    """Fed the target's first bytes; `done` once the advertisement's flush arrived.
    `rest()` gives back what followed it in the same chunks (nothing, for receive-pack)."""

    def __init__(self) -> None:
        self._dec = PktDecoder()
        self.advert = Advertisement()
        self.done = False
        self._first = True

    def feed(self, data: bytes) -> None:
        self._dec.feed(data)
        for pkt in self._dec.packets():
            if pkt.data is None:
                if not pkt.is_flush:
                    raise AdvertError("protocol v2 packet in a v0/v1 advertisement")
                self.done = True
                return
            self._line(line(pkt.data))

    def rest(self) -> bytes:
        return self._dec.rest()

    def _line(self, text: bytes) -> None:
        adv = self.advert
        if text.startswith(b"ERR "):
            raise AdvertError(f"target: {text[4:].decode('utf-8', 'replace')[:200]}")
        if self._first and text == b"version 1":
            adv.version = 1
            return
        if text == b"version 2":
            raise AdvertError(
                "protocol v2 advertisement (read here: v0/v1; receive-pack has no v2)"
            )
        refpart, nul, caps = text.partition(b"\0")
        if self._first:
            self._first = False
            if nul:
                adv.capabilities = tuple(caps.decode("ascii", "replace").split())
        elif nul:
            raise AdvertError("capabilities after the first advertised ref")
        head, sp, ref = refpart.partition(b" ")
        if not sp:
            raise AdvertError(f"bad advertisement line {text[:80]!r}")
        try:
            if head == b"shallow":
                adv.shallow.append(check_oid(ref.decode("ascii"), adv.hash_len))
                return
            oid = check_oid(head.decode("ascii"), adv.hash_len)
        except (UnicodeDecodeError, ValueError):
            raise AdvertError(f"bad advertisement line {text[:80]!r}") from None
        if ref == b"capabilities^{}":
            return
        if ref == b".have":
            adv.haves.append(oid)
        else:
            adv.refs[name(ref)] = oid
