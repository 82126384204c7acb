"""Reading asciicast files: v2 (castgate's own format), v3 and the old v1, from any
recorder, not only castgate.

- v2: a header object, then ``[time, code, data]`` lines with times since the start.
- v3: a header with a ``term`` object (``cols``, ``rows``, ``type``), events with the
  interval since the previous event, ``#`` comment lines, and an ``x`` (exit) event.
- v1: one JSON document with ``stdout`` frames ``[delay, data]``.

Every event comes out with an absolute, never decreasing time. A torn last line (a
recorder killed mid-write) is recognised and ends the stream; it is not an error.

Positions: for v2 and v3 an event's position is the byte offset just after its line,
so a reader can resume from any position with the time of the event before it. For v1
(held in memory) it is the number of events read.
"""

from __future__ import annotations

import math
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from recorder.errors import CastgateError

_READ_BUFFER = 1 << 20
# Largest terminal side a cast may declare: a terminal model allocates every cell, and a
# 65535x65535 header would take hundreds of gigabytes. No real terminal comes close.
MAX_SIZE = 1000


class CastFormatError(CastgateError):
    """A file that is not an asciicast this reader understands."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event: absolute time in seconds, code (``o``, ``i``, ``r``, ``m``, ``x``)
    and data."""

    time: float
    code: str
    data: str


@dataclass(frozen=True)
class Header:
    """What the header says, in one shape whatever the version."""

    version: int
    width: int
    height: int
    timestamp: int | None = None
    duration: float | None = None
    idle_time_limit: float | None = None
    title: str | None = None
    command: str | None = None
    term_type: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    theme: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _opt_float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        f = float(value)
        return f if math.isfinite(f) else None
    return None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse_header(raw: dict[str, Any], where: str) -> Header:
    """Normalise a v1/v2/v3 header object; raises CastFormatError naming ``where``."""
    version = raw.get("version")
    try:
        if version == 3:
            term = raw.get("term")
            if not isinstance(term, dict):
                raise CastFormatError(f"{where}: asciicast v3 header has no 'term' object")
            width, height = int(term["cols"]), int(term["rows"])
            term_type = _opt_str(term.get("type"))
            theme = term.get("theme")
        elif version in (1, 2):
            width, height = int(raw["width"]), int(raw["height"])
            env = raw.get("env")
            term_type = _opt_str(env.get("TERM")) if isinstance(env, dict) else None
            theme = raw.get("theme")
        else:
            raise CastFormatError(f"{where}: unsupported asciicast version {version!r}")
    except (KeyError, TypeError, ValueError, OverflowError):
        raise CastFormatError(f"{where}: header lacks a valid terminal size") from None
    if width < 1 or height < 1:
        raise CastFormatError(f"{where}: terminal size {width}x{height} is not positive")
    if width > MAX_SIZE or height > MAX_SIZE:
        raise CastFormatError(
            f"{where}: terminal size {width}x{height} is too large (at most {MAX_SIZE} a side)"
        )
    env = raw.get("env")
    timestamp = _opt_float(raw.get("timestamp"))
    return Header(
        version=int(version),
        width=width,
        height=height,
        timestamp=int(timestamp) if timestamp is not None else None,
        duration=_opt_float(raw.get("duration")),
        idle_time_limit=_opt_float(raw.get("idle_time_limit")),
        title=_opt_str(raw.get("title")),
        command=_opt_str(raw.get("command")),
        term_type=term_type,
        env={str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {},
        theme=theme if isinstance(theme, dict) else None,
        raw=raw,
    )


def parse_size(data: str) -> tuple[int, int] | None:
    """``"COLSxROWS"`` of an ``r`` event, or None when malformed or larger than
    ``MAX_SIZE`` a side (readers ignore such an event)."""
    cols, sep, rows = data.partition("x")
    if not sep or len(data) > 16:
        return None
    try:
        c, r = int(cols), int(rows)
    except ValueError:
        return None
    return (c, r) if 0 < c <= MAX_SIZE and 0 < r <= MAX_SIZE else None


class CastFile:
    """An asciicast file opened for reading. Cheap to open: only the header is read
    (a v1 file, being one JSON document, is read whole)."""

    def __init__(self, path: Path) -> None:
        """Open ``path`` and read its header; raises CastFormatError or OSError."""
        self.path = path
        self.torn = False
        self._v1_events: list[Event] | None = None
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise CastFormatError(f"{path}: no such file") from None
        if stat.S_ISDIR(mode):
            raise CastFormatError(f"{path}: is a directory, not a cast")
        if not stat.S_ISREG(mode):
            # A FIFO would block the reader forever, a device never end.
            raise CastFormatError(f"{path}: not a regular file")
        try:
            with path.open("rb") as fh:
                first = fh.readline()
                self.data_start = fh.tell()
        except IsADirectoryError:
            raise CastFormatError(f"{path}: is a directory, not a cast") from None
        self.size = path.stat().st_size
        try:
            raw = orjson.loads(first)
        except orjson.JSONDecodeError:
            raw = None
        if isinstance(raw, dict) and raw.get("version") != 1:
            self.header = parse_header(raw, str(path))
            return
        self.header = self._read_v1()

    def _read_v1(self) -> Header:
        try:
            doc = orjson.loads(self.path.read_bytes())
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise CastFormatError(f"{self.path}: not an asciicast file (bad header line)")
        header = parse_header(doc, str(self.path))
        events: list[Event] = []
        t = 0.0
        frames = doc.get("stdout")
        for frame in frames if isinstance(frames, list) else []:
            if isinstance(frame, list) and len(frame) >= 2 and isinstance(frame[1], str):
                delay = _opt_float(frame[0])
                if delay is None:
                    raise CastFormatError(f"{self.path}: a v1 frame's delay is not a number")
                t += max(0.0, delay)
                if not math.isfinite(t):
                    raise CastFormatError(f"{self.path}: v1 frame times overflow")
                events.append(Event(t, "o", frame[1]))
        self._v1_events = events
        self.data_start = 0
        return header

    @property
    def version(self) -> int:
        """1, 2 or 3."""
        return self.header.version

    def events(self, position: int | None = None, time: float = 0.0) -> Iterator[tuple[int, Event]]:
        """Events from ``position`` (default: the first) as ``(position after the event,
        event)``; ``time`` is the time of the event before ``position`` (v3 intervals
        and the never-decreasing rule continue from it)."""
        if self._v1_events is not None:
            start = position or 0
            for i in range(start, len(self._v1_events)):
                yield i + 1, self._v1_events[i]
            return
        with self.path.open("rb", buffering=_READ_BUFFER) as fh:
            offset = self.data_start if position is None else position
            fh.seek(offset)
            yield from self._lines(fh, offset, time)

    def _lines(self, fh: BinaryIO, offset: int, t: float) -> Iterator[tuple[int, Event]]:
        relative = self.header.version == 3
        loads = orjson.loads
        for line in fh:
            start = offset
            offset += len(line)
            if line[:1] in (b"#", b"\n", b"\r") or not line.strip():
                continue
            try:
                ev = loads(line)
                if not isinstance(ev, list):
                    raise TypeError
                when = float(ev[0])
                code = ev[1]
                data = ev[2]
            except (orjson.JSONDecodeError, TypeError, ValueError, IndexError, OverflowError):
                if not line.endswith(b"\n"):
                    self.torn = True  # cut mid-write: the end of the recording
                    return
                raise CastFormatError(
                    f"{self.path}: byte {start}: not an asciicast event line"
                ) from None
            if not isinstance(code, str):
                raise CastFormatError(f"{self.path}: byte {start}: event code is not a string")
            if relative:
                t += when if when > 0 else 0.0
            elif when > t:
                t = when
            if not math.isfinite(t):
                raise CastFormatError(f"{self.path}: byte {start}: event time is not finite")
            yield offset, Event(t, code, data if isinstance(data, str) else str(data))


def read_events(path: Path) -> tuple[Header, list[Event]]:
    """The header and every event of a (small) cast, for tests and exports."""
    cast = CastFile(path)
    return cast.header, [ev for _, ev in cast.events()]
