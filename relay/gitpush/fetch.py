"""The target's objects for reading a push: an upload-pack fetch, I/O-free.

A push's thin pack and its old tips refer to objects only the target has; the relay
fetches them over a second exec channel (`git-upload-pack '<path>'`) of its own target
connection. `fetch_request` is the client's request (protocol v0: every server speaks
it), `FetchResponse` reads the answer (one ACK/NAK, then the pack, side-band or not).

Cost: with no `haves` this fetches every object reachable from the target's refs, a
full clone's transfer and a copy on disk; a relay that keeps the store per target
between pushes sends what it fetched before as `haves` and pays only for what changed.
The request asks for no thin pack, so the store is always complete in itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from relay.gitpush.advert import Advertisement
from relay.gitpush.held import HeldBytes
from relay.gitpush.packscan import PackError, PackScanner
from relay.gitpush.pktline import FLUSH, PktDecoder, PktError, encode, line

AGENT = "agent=castgate"


class FetchError(Exception):
    """The target's upload-pack answer is not a fetch response, or it reported an error."""


def wants_for(advert: Advertisement, have: Iterable[str] = ()) -> list[str]:
    """Every advertised tip, less what the store already has; peeled entries (`^{}`)
    point at objects their tag brings along."""
    known = set(have)
    out: list[str] = []
    for ref, oid in advert.refs.items():
        if ref.endswith("^{}") or oid in known or oid in out:
            continue
        out.append(oid)
    return out


def fetch_request(advert: Advertisement, wants: list[str], haves: Iterable[str] = ()) -> bytes:
    """The upload-pack request for `wants`; only a flush (ends the exchange) if none."""
    if not wants:
        return FLUSH
    offered = advert.caps
    caps: list[str] = [c for c in ("ofs-delta", "side-band-64k", "no-progress") if c in offered]
    if "object-format" in offered:
        caps.append(f"object-format={offered['object-format']}")
    if "agent" in offered:
        caps.append(AGENT)
    out = bytearray(encode(f"want {wants[0]} {' '.join(caps)}\n".encode()))
    for oid in wants[1:]:
        out += encode(f"want {oid}\n".encode())
    out += FLUSH
    for oid in haves:
        out += encode(f"have {oid}\n".encode())
    out += encode(b"done\n")
    return bytes(out)


class FetchResponse:
    """Fed upload-pack's answer to `fetch_request`; the pack goes into `pack` (spooled
    past the memory limit). `done` once the pack and the final flush have arrived."""

    def __init__(self, advert: Advertisement, *, spool_dir: str | None = None) -> None:
        self.sideband = "side-band-64k" in advert.caps
        self.pack = HeldBytes(spool_dir=spool_dir)
        self._scanner = PackScanner(hash_len=advert.hash_len)
        self._dec = PktDecoder()
        self._acked = False
        self.done = False

    def feed(self, data: bytes) -> None:
        try:
            self._feed(data)
        except (PktError, PackError) as exc:
            raise FetchError(str(exc)) from None

    def _feed(self, data: bytes) -> None:
        if self.done:
            if data:
                raise FetchError("data after the end of the fetch")
            return
        if not self._acked or self.sideband:
            self._dec.feed(data)
            self._packets()
        else:
            self._pack_bytes(data)

    def _packets(self) -> None:
        for pkt in self._dec.packets():
            if not self._acked:
                if pkt.data is None:
                    raise FetchError("flush before ACK/NAK")
                text = line(pkt.data)
                if text.startswith(b"ERR "):
                    raise FetchError(f"target: {text[4:].decode('utf-8', 'replace')[:200]}")
                if not (text == b"NAK" or text.startswith(b"ACK ")):
                    raise FetchError(f"expected ACK/NAK, got {text[:80]!r}")
                self._acked = True
                if not self.sideband:
                    self._pack_bytes(self._dec.rest())
                    return
                continue
            if pkt.data is None:
                if not pkt.is_flush or not self._scanner.done:
                    raise FetchError("fetch ended before the end of its pack")
                self.done = True
                if self._dec.rest():
                    raise FetchError("data after the end of the fetch")
                return
            band, payload = pkt.data[:1], pkt.data[1:]
            if band == b"\x01":
                self._pack_bytes(payload)
            elif band == b"\x03":
                raise FetchError(f"target: {payload.decode('utf-8', 'replace')[:200].strip()}")
            elif band != b"\x02":
                raise FetchError(f"unknown side-band {band!r}")

    def _pack_bytes(self, data: bytes) -> None:
        if not data:
            return
        if self._scanner.done:
            raise FetchError("data after the end of the pack")
        self.pack.append(data)
        trailing = self._scanner.feed(data)
        if trailing:
            raise FetchError("data after the end of the pack")
        if self._scanner.done and not self.sideband:
            self.done = True
