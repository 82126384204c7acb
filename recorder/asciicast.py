"""asciicast v2 encoding: header and event lines, as bytes, without I/O.

Event data must be valid UTF-8 JSON strings even when the session's bytes are not:
each stream keeps an incremental decoder so a character cut by a chunk boundary is
completed by the next chunk, and invalid bytes become U+FFFD.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from typing import Any

import orjson

EVENT_CODES = ("o", "i", "r", "m")


def header_line(
    width: int,
    height: int,
    timestamp: int,
    *,
    title: str | None = None,
    env: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """The asciicast v2 header line (without newline)."""
    header: dict[str, Any] = {
        "version": 2,
        "width": int(width),
        "height": int(height),
        "timestamp": int(timestamp),
    }
    if title is not None:
        header["title"] = title
    header["env"] = env or {}
    if extra:
        header.update(extra)
    return json.dumps(header, ensure_ascii=False, separators=(", ", ": ")).encode("utf-8")


def event_line(t: float, code: str, data: str) -> bytes:
    """One event line ``[t, code, data]`` (without newline). orjson: the stdlib encoder
    was the recorder's largest single cost on bulk output."""
    return orjson.dumps([round(t, 6), code, data])


@dataclass
class EventEncoder:
    """Turns byte chunks of the ``o`` and ``i`` streams into event lines, keeping
    timestamps monotonic and UTF-8 sequences whole across chunks."""

    _decoders: dict[str, codecs.IncrementalDecoder] = field(default_factory=dict)
    _last_t: float = 0.0

    def _time(self, t: float) -> float:
        # A clock step backwards must not produce an out-of-order cast.
        if t < self._last_t:
            t = self._last_t
        self._last_t = t
        return t

    def encode(self, t: float, code: str, data: bytes | str) -> bytes | None:
        """Encode one event; returns None when a byte chunk held only part of a
        character (it is emitted with the next chunk)."""
        if code not in EVENT_CODES:
            raise ValueError(f"unknown event code {code!r}")
        if isinstance(data, bytes):
            dec = self._decoders.get(code)
            if dec is None:
                dec = self._decoders[code] = codecs.getincrementaldecoder("utf-8")("replace")
            text = dec.decode(data)
            if not text:
                return None
        else:
            text = data
        return event_line(self._time(t), code, text)

    def finish(self, t: float) -> list[bytes]:
        """Lines for any bytes still pending in the decoders (a cut final character)."""
        lines = []
        for code, dec in self._decoders.items():
            text = dec.decode(b"", final=True)
            if text:
                lines.append(event_line(self._time(t), code, text))
        return lines
