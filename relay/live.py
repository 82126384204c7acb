"""Live fan-out: every live session publishes its masked event stream; any number of
watchers subscribe. Publishing never waits: each watcher has a bounded queue, and a
watcher that falls behind is dropped, never the session.

A watcher that joins late first gets the current screen: the hub keeps the recent
output of each session (a bounded tail) and, on join, renders it with the avt terminal
emulator into one screen dump. Sessions nobody watches pay only for the tail buffer.
"""

from __future__ import annotations

import asyncio
import codecs
import re
import time
from dataclasses import dataclass, field
from typing import Any

import avt

_TAIL_BYTES = 256 * 1024
_QUEUE = 2048


@dataclass
class Event:
    """One live event: ``o`` output, ``r`` resize, ``m`` marker, ``end``."""

    kind: str
    data: str
    t: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        """Wire form for WebSocket watchers."""
        return {"type": self.kind, "data": self.data, "t": self.t}


class Watcher:
    """A subscription; iterate ``next()`` until it returns None."""

    def __init__(self, stream: LiveStream) -> None:
        self.stream = stream
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(_QUEUE)
        self.dropped = False

    async def next(self) -> Event | None:
        """The next event, or None when the session ended or this watcher was dropped."""
        return await self.queue.get()

    def close(self) -> None:
        """Unsubscribe."""
        self.stream.unsubscribe(self)


class LiveStream:
    """The live view of one session."""

    def __init__(self, session_id: str, meta: dict[str, Any], width: int, height: int) -> None:
        self.id = session_id
        self.meta = meta
        self.width, self.height = width, height
        self._tail = bytearray()
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self.watchers: set[Watcher] = set()
        self.ended = False
        self.bytes = 0

    def output(self, data: bytes) -> None:
        """Masked output of the session."""
        self.bytes += len(data)
        self._tail += data
        if len(self._tail) > _TAIL_BYTES * 2:
            del self._tail[: len(self._tail) - _TAIL_BYTES]
        if self.watchers:
            self._publish(Event("o", self._dec.decode(data)))

    def resize(self, width: int, height: int) -> None:
        """The session's terminal size changed."""
        self.width, self.height = width, height
        self._publish(Event("r", f"{width}x{height}"))

    def marker(self, text: str) -> None:
        """A policy event (already masked)."""
        self._publish(Event("m", text))

    def end(self, status: str) -> None:
        """The session is over: watchers get ``end`` then None."""
        self.ended = True
        self._publish(Event("end", status))
        for w in list(self.watchers):
            self._put(w, None)
        self.watchers.clear()

    def _publish(self, event: Event) -> None:
        for w in list(self.watchers):
            self._put(w, event)

    def _put(self, w: Watcher, event: Event | None) -> None:
        try:
            w.queue.put_nowait(event)
        except asyncio.QueueFull:
            # Too slow: drop the watcher, never slow the session.
            w.dropped = True
            self.watchers.discard(w)
            while not w.queue.empty():
                w.queue.get_nowait()
            w.queue.put_nowait(Event("end", "watcher too slow, dropped"))
            w.queue.put_nowait(None)

    def screen(self) -> str:
        """The current screen as terminal output that redraws it (avt's dump)."""
        vt = avt.Vt(self.width, self.height)  # type: ignore[attr-defined]
        vt.feed_str(bytes(self._tail[-_TAIL_BYTES:]).decode("utf-8", "replace"))
        return str(vt.dump())

    def subscribe(self) -> tuple[Watcher, str]:
        """A new watcher and the screen to draw first."""
        w = Watcher(self)
        screen = self.screen()
        if self.ended:
            w.queue.put_nowait(Event("end", "session already ended"))
            w.queue.put_nowait(None)
        else:
            self.watchers.add(w)
        return w, screen

    def unsubscribe(self, w: Watcher) -> None:
        """Remove a watcher."""
        self.watchers.discard(w)


class LiveHub:
    """All live streams of a relay process."""

    def __init__(self) -> None:
        self.streams: dict[str, LiveStream] = {}

    def open(self, session_id: str, meta: dict[str, Any], width: int, height: int) -> LiveStream:
        """Register a live session."""
        stream = LiveStream(session_id, meta, width, height)
        self.streams[session_id] = stream
        return stream

    def close(self, session_id: str, status: str) -> None:
        """A session ended."""
        stream = self.streams.pop(session_id, None)
        if stream is not None:
            stream.end(status)

    def get(self, session_id: str) -> LiveStream | None:
        """The live stream of a session, if it is live here."""
        return self.streams.get(session_id)


# Escape sequences a watched session could use against the operator's terminal: OSC
# (window title, clipboard writes with OSC 52, hyperlinks, colour palette), DCS, APC, PM
# and SOS strings (including the 8-bit C1 forms). Stripped from what watchers render;
# the recording itself keeps the session's bytes as they were.
_HOSTILE = re.compile(
    r"(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|(?:\x1b[P_^X]|[\x90\x9e\x9f\x98])[^\x1b\x9c]*(?:\x1b\\|\x9c)?"
)


def neutralise(text: str) -> str:
    """Remove escape strings that could act on the operator's terminal or clipboard."""
    return (
        _HOSTILE.sub("", text)
        if ("\x1b" in text or any(c in text for c in "\x90\x9d\x9e\x9f\x98"))
        else text
    )


def render_event(event: dict[str, Any]) -> str:
    """Terminal text for one live event as watchers print it (markers in reverse video
    on their own line), with escape strings that could attack the operator's terminal
    removed."""
    kind = event.get("type")
    if kind in ("o", "screen"):
        return neutralise(str(event.get("data", "")))
    if kind == "m":
        return f"\r\n\x1b[7m castgate: {neutralise(str(event.get('data')))} \x1b[0m\r\n"
    if kind == "end":
        return f"\r\n\x1b[7m castgate: session ended ({neutralise(str(event.get('data')))}) \x1b[0m\r\n"
    return ""
