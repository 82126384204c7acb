"""asciicast v2 encoding: header and event lines, as bytes, without I/O.

Event data must be valid UTF-8 JSON strings even when the session's bytes are not:
each stream keeps an incremental decoder so a character cut by a chunk boundary is
completed by the next chunk, and invalid bytes become U+FFFD.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

EVENT_CODES = ("o", "i", "r", "m")
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    was the recorder's largest single cost on bulk output. A lone surrogate (text decoded
    with ``surrogateescape``), which JSON text cannot hold, becomes U+FFFD."""
    try:
        return orjson.dumps([round(t, 6), code, data])
    except TypeError:
        return orjson.dumps([round(t, 6), code, _SURROGATE.sub("\ufffd", data)])


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
        event = self.prepare(t, code, data)
        return None if event is None else event_line(*event)

    def prepare(self, t: float, code: str, data: bytes | str) -> tuple[float, str, str] | None:
        """What ``encode`` does short of the JSON: the event's time and text, or None
        (a partial character). The cast writer's pool threads make the line."""
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
        return self._time(t), code, text

    def finish(self, t: float) -> list[bytes]:
        """Lines for any bytes still pending in the decoders (a cut final character)."""
        lines = []
        for code, dec in self._decoders.items():
            text = dec.decode(b"", final=True)
            if text:
                lines.append(event_line(self._time(t), code, text))
        return lines
