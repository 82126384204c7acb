"""Git's pkt-line framing: four hex digits of length (itself included), then the data.

`0000` is a flush, `0001` a delimiter and `0002` a response end (both protocol v2 only:
receive-pack speaks v0/v1, so they are errors there, and the decoder reports them as
such for the caller to decide). No I/O: the decoder is fed bytes and yields packets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

FLUSH = b"0000"
DELIM = b"0001"
RESPONSE_END = b"0002"
# git's LARGE_PACKET_MAX: the longest pkt-line, header included.
MAX_PKT = 65520
MAX_DATA = MAX_PKT - 4


class PktError(Exception):
    """The bytes are not pkt-lines."""


@dataclass(frozen=True, slots=True)
class Pkt:
    """One packet: `data` is None for the special packets, named by `special`."""

    data: bytes | None
    special: bytes = b""

    @property
    def is_flush(self) -> bool:
        return self.special == FLUSH


def encode(data: bytes) -> bytes:
    """One pkt-line carrying `data` (which must fit one packet)."""
    if len(data) > MAX_DATA:
        raise ValueError(f"pkt-line data of {len(data)} bytes exceeds {MAX_DATA}")
    return b"%04x" % (len(data) + 4) + data


def parse_length(head: bytes) -> int:
    """The length field of a header of four hex digits (lower or upper case)."""
    if len(head) != 4 or not all(c in b"0123456789abcdefABCDEF" for c in head):
        raise PktError(f"not a pkt-line length: {head!r}")
    return int(head, 16)


class PktDecoder:
    """Incremental pkt-line decoder. `feed` bytes, then iterate `packets()`; `stop()`
    hands back the bytes not yet decoded (what follows the last packet wanted, such as
    the pack after the command list)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> Pkt | None:
        """The next complete packet, or None until more bytes arrive."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 4:
            return None
        head = bytes(buf[pos : pos + 4])
        n = parse_length(head)
        if n in (0, 1, 2):
            self._pos = pos + 4
            return Pkt(None, head)
        if n < 4 or n > MAX_PKT:
            raise PktError(f"pkt-line length {n} out of range")
        if len(buf) - pos < n:
            return None
        data = bytes(buf[pos + 4 : pos + n])
        self._pos = pos + n
        if self._pos > 65536:
            # Drop what was decoded, so a long stream does not keep its whole past.
            del buf[: self._pos]
            self._pos = 0
        return Pkt(data)

    def packets(self) -> Iterator[Pkt]:
        while (pkt := self.next()) is not None:
            yield pkt

    def rest(self) -> bytes:
        """The bytes fed but not decoded, and forget them."""
        out = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = 0
        return out


def line(data: bytes) -> bytes:
    """The text of a pkt-line without its optional trailing LF."""
    return data[:-1] if data.endswith(b"\n") else data
