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
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import avt
import orjson

_TAIL_BYTES = 256 * 1024
_QUEUE = 2048
# WebSocket watchers: events are written at most this often, and a watcher whose socket
# buffer holds more than the limit is too slow and dropped.
FRAME_INTERVAL = 0.010
FRAME_BACKLOG = 8 << 20
# Output WebSocket watchers get byte for byte, up to this rate (a burst of FRAME_BURST):
# more than anyone reads, and enough for full-screen programs. Past it, as asciinema's
# live streaming does for a lagging viewer, they get a fresh screen every
# SNAPSHOT_INTERVAL instead of the bytes in between (markers, resizes and the end are
# always sent): twenty watchers of a session printing 100 MB/s would otherwise cost the
# relay 2 GB/s of socket writes. The recording always keeps every byte.
FRAME_RATE = 4 << 20
FRAME_BURST = 1 << 20
SNAPSHOT_INTERVAL = 0.100
_SNAPSHOT_TAIL = 64 * 1024


SendText = Callable[[bytes], Awaitable[None]]
"""Sends one WebSocket text message whose payload is the given UTF-8 bytes (aiohttp's
``WebSocketResponse.send_frame`` with the TEXT opcode)."""


@dataclass
class Event:
    """One live event: ``o`` output, ``r`` resize, ``m`` marker, ``end``."""

    kind: str
    data: str
    t: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        """Wire form for WebSocket watchers."""
        return {"type": self.kind, "data": self.data, "t": self.t}

    def payload(self) -> bytes:
        """The event's JSON form, encoded: the payload of one WebSocket text message."""
        return orjson.dumps(self.as_json())


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


class FrameWatcher:
    """A WebSocket watcher: ``run`` sends it the stream's messages through ``send``.

    The stream encodes each batch (what gathered in ``FRAME_INTERVAL``) once for all
    such watchers and hands every one the same payloads, so twenty watchers cost a
    busy session one encoding and twenty task wake-ups per interval rather than twenty
    queue hand-offs and wake-ups per event. What ``send`` has not taken yet is this
    watcher's backlog: past ``FRAME_BACKLOG`` bytes (its socket does not drain: aiohttp
    makes ``send`` wait while the transport is paused) it is dropped, never the session.
    """

    def __init__(self, stream: LiveStream, send: SendText) -> None:
        self.stream = stream
        self.dropped = False
        self._send = send
        self._pending: deque[bytes] = deque()
        self._size = 0
        self._ready = asyncio.Event()
        self._ended = False

    def offer(self, payloads: list[bytes]) -> bool:
        """Queue ``payloads``; False (and nothing queued) if this watcher's backlog is
        already too large: one large batch alone does not make a watcher slow."""
        if self._ended:
            return True
        if self._size > FRAME_BACKLOG:
            return False
        self._pending.extend(payloads)
        self._size += sum(map(len, payloads))
        self._ready.set()
        return True

    def finish(self, end: bytes, *, discard: bool = False) -> None:
        """Send ``end`` (an encoded ``end`` event) after what was offered (unless
        ``discard``), then nothing: ``run`` returns once it is sent."""
        if self._ended:
            return
        if discard:
            self._pending.clear()
            self._size = 0
        self._pending.append(end)
        self._ended = True
        self._ready.set()

    async def run(self) -> None:
        """Send the stream from now on (call it once the screen is sent) until its end."""
        while True:
            while self._pending:
                payload = self._pending.popleft()
                self._size -= len(payload)
                await self._send(payload)
            if self._ended:
                return
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        """Unsubscribe."""
        self.stream.unsubscribe(self)


class LiveStream:
    """The live view of one session."""

    def __init__(self, session_id: str, meta: dict[str, Any], width: int, height: int) -> None:
        self.id = session_id
        self.meta = meta
        self.width, self.height = width, height
        # Recent output as the chunks it came in (no copy per chunk); trimmed to at
        # least _TAIL_BYTES once it holds twice that.
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self.watchers: set[Watcher] = set()
        self.framed: set[FrameWatcher] = set()
        self.ended = False
        self.bytes = 0
        self._batch: list[Event] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._tokens = float(FRAME_BURST)
        self._refilled = time.monotonic()
        self._snapshot_handle: asyncio.TimerHandle | None = None
        self.snapshots = 0

    def output(self, data: bytes) -> None:
        """Masked output of the session."""
        self.bytes += len(data)
        self._tail.append(data)
        self._tail_size += len(data)
        if self._tail_size > _TAIL_BYTES * 2:
            tail = self._tail
            while self._tail_size - len(tail[0]) >= _TAIL_BYTES:
                self._tail_size -= len(tail.popleft())
        if self.watchers or self.framed:
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
        # What is batched goes out first, by the rate rules; its output may be what
        # starts the skipping, so the skipping is looked at after it.
        self._flush()
        if self._snapshot_handle is not None:
            # Output was being skipped: the last screen goes before the end.
            self._snapshot_handle.cancel()
            self._snapshot_handle = None
            if self.framed:
                self._offer([self._screen_payload()])
        self.ended = True
        end = Event("end", status)
        for w in list(self.watchers):
            self._put(w, end)
        for w in list(self.watchers):  # one dropped just now has its None already
            self._put(w, None)
        if self.framed:
            payload = end.payload()
            for fw in self.framed:
                fw.finish(payload)
        self.watchers.clear()
        self.framed.clear()

    def _publish(self, event: Event) -> None:
        for w in list(self.watchers):
            self._put(w, event)
        if self.framed:
            self._batch.append(event)
            if self._flush_handle is None:
                loop = asyncio.get_running_loop()
                self._flush_handle = loop.call_later(FRAME_INTERVAL, self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        if self._snapshot_handle is None:
            now = time.monotonic()
            self._tokens = min(FRAME_BURST, self._tokens + (now - self._refilled) * FRAME_RATE)
            self._refilled = now
            size = sum(len(ev.data) for ev in batch if ev.kind == "o")
            if size <= self._tokens:
                self._tokens -= size
            else:
                self._snapshot_handle = asyncio.get_running_loop().call_later(
                    SNAPSHOT_INTERVAL, self._snapshot
                )
        if self._snapshot_handle is not None:
            batch = [ev for ev in batch if ev.kind != "o"]
        self._offer(_payloads(batch))

    def _snapshot(self) -> None:
        """Send framed watchers the current screen in place of the output skipped."""
        self._snapshot_handle = None
        self._flush()  # markers gathered since; output of this batch is in the screen
        if self.ended or not self.framed:
            return
        self._tokens = 0.0
        self._refilled = time.monotonic()
        self._offer([self._screen_payload()])

    def _screen_payload(self) -> bytes:
        self.snapshots += 1
        screen = {
            "type": "screen",
            "data": self.screen(_SNAPSHOT_TAIL),
            "width": self.width,
            "height": self.height,
            "t": time.time(),
        }
        return orjson.dumps(screen)

    def _offer(self, payloads: list[bytes]) -> None:
        if not payloads:
            return
        for w in list(self.framed):
            if not w.offer(payloads):
                self.framed.discard(w)
                w.dropped = True
                w.finish(Event("end", "watcher too slow, dropped").payload(), discard=True)

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

    def screen(self, tail: int = _TAIL_BYTES) -> str:
        """The current screen as terminal output that redraws it (avt's dump), from the
        last ``tail`` bytes of output."""
        vt = avt.Vt(self.width, self.height)  # type: ignore[attr-defined]
        vt.feed_str(self.recent(tail).decode("utf-8", "replace"))
        return str(vt.dump())

    def recent(self, size: int = _TAIL_BYTES) -> bytes:
        """The last ``size`` bytes of output (fewer if there were fewer)."""
        parts: list[bytes] = []
        got = 0
        for chunk in reversed(self._tail):
            parts.append(chunk)
            got += len(chunk)
            if got >= size:
                break
        data = b"".join(reversed(parts))
        return data[-size:] if size else b""

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

    def subscribe_frames(self, send: SendText) -> tuple[FrameWatcher, str]:
        """A WebSocket watcher sent messages through ``send`` (see FrameWatcher), and the
        screen to send before awaiting its ``run``."""
        w = FrameWatcher(self, send)
        screen = self.screen()
        if self.ended:
            w.finish(Event("end", "session already ended").payload())
        else:
            self.framed.add(w)
        return w, screen

    def watcher_count(self) -> int:
        """Watchers subscribed now, of either kind."""
        return len(self.watchers) + len(self.framed)

    def unsubscribe(self, w: Watcher | FrameWatcher) -> None:
        """Remove a watcher."""
        if isinstance(w, FrameWatcher):
            self.framed.discard(w)
        else:
            self.watchers.discard(w)


def _payloads(batch: list[Event]) -> list[bytes]:
    """The batch encoded, consecutive output joined into one message (watchers render
    the same text; one message and one socket write instead of one per chunk)."""
    out: list[bytes] = []
    run: list[Event] = []
    for ev in batch:
        if ev.kind == "o":
            run.append(ev)
            continue
        if run:
            out.append(_joined(run))
            run = []
        out.append(ev.payload())
    if run:
        out.append(_joined(run))
    return out


def _joined(run: list[Event]) -> bytes:
    if len(run) == 1:
        return run[0].payload()
    return Event("o", "".join(ev.data for ev in run), run[0].t).payload()


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


# What a watched session could use against the operator's terminal: OSC strings (window
# title, OSC 52 clipboard writes, OSC 8 hyperlinks, palette changes), DCS (terminal
# queries and their answers typed back), APC, PM and SOS strings, their 8-bit C1 forms
# and every other C1 control (8-bit CSI is passed as ESC [), window operations (CSI ... t:
# resize, iconify, report the title into the operator's input) and ENQ (answerback). Removed from what watchers
# render; the recording keeps the session's bytes as they were.
_SPECIAL = re.compile(r"[\x05\x1b\x80-\x9f]")
_STRING_INTRODUCERS = "]PX^_"
_C1_STRINGS = "\x90\x98\x9d\x9e\x9f"
_STRING_END = re.compile(r"[\x07\x18\x1a\x1b\x9c]")
_CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_CSI_PREFIX = re.compile(r"\x1b\[[0-?]*[ -/]*\Z")
_MAX_HELD = 256


class Neutraliser:
    """Removes the hostile sequences above from a stream of text chunks. It keeps state
    between chunks, so a sequence the session cuts in two (``ESC`` now, ``]52;...`` a
    second later) is removed whole, never passed on in halves that the operator's
    terminal would join. Colours, cursor movement and the rest pass unchanged."""

    def __init__(self) -> None:
        self._held = ""  # an escape sequence cut by the end of the last chunk
        self._in_string = False
        self._esc_in_string = False  # the last chunk ended with ESC inside a string

    def feed(self, text: str) -> str:
        """The safe part of ``text``; a sequence cut at its end waits for the next."""
        if self._esc_in_string:
            self._esc_in_string = False
            # ESC \ ends the string; ESC and anything else starts a new sequence.
            text = text[1:] if text.startswith("\\") else "\x1b" + text
        text, self._held = self._held + text, ""
        if "\x9b" in text:
            # 8-bit CSI (avt's own screen dumps position the cursor with it): the 7-bit
            # form, so it is kept or dropped by the same rule as any CSI.
            text = text.replace("\x9b", "\x1b[")
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            if self._in_string:
                m = _STRING_END.search(text, i)
                if m is None:
                    return "".join(out)  # all of it is string content: dropped
                self._in_string = False
                i = m.end()
                if m.group() == "\x1b":
                    if i == n:
                        self._esc_in_string = True
                    elif text[i] == "\\":
                        i += 1
                    else:
                        i -= 1  # ESC aborts the string and starts a new sequence
                continue
            m = _SPECIAL.search(text, i)
            if m is None:
                out.append(text[i:])
                break
            j = m.start()
            out.append(text[i:j])
            ch = m.group()
            if ch != "\x1b":
                # ENQ and C1 controls are dropped; the string ones open a string.
                self._in_string = ch in _C1_STRINGS
                i = j + 1
                continue
            if j + 1 == n:
                self._held = "\x1b"
                break
            nxt = text[j + 1]
            if nxt in _STRING_INTRODUCERS:
                self._in_string = True
                i = j + 2
                continue
            if nxt == "[":
                csi = _CSI.match(text, j)
                if csi is None:
                    if _CSI_PREFIX.match(text, j) and n - j <= _MAX_HELD:
                        self._held = text[j:]  # cut by the chunk: decide with the rest
                        break
                    i = j + 1  # malformed or absurdly long: the ESC alone is dropped
                    continue
                if not csi.group().endswith("t"):  # window operations are dropped
                    out.append(csi.group())
                i = csi.end()
                continue
            if nxt < " " or "\x7f" <= nxt <= "\x9f":
                # ESC before a control (or another ESC) is dropped: kept, it would join
                # whatever follows the control once the control is dropped ("ESC ENQ X"
                # would become "ESC X", a string opener), and a terminal executes the
                # control and goes on with the sequence anyway.
                i = j + 1
                continue
            out.append(text[j : j + 2])  # ESC and its next character, never apart
            i = j + 2
        return "".join(out)


def neutralise(text: str) -> str:
    """Remove what could act on the operator's terminal or clipboard from one complete
    text (a sequence cut at its end is dropped)."""
    return Neutraliser().feed(text) if _SPECIAL.search(text) else text


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Plain text for one line (a marker, a title, a command): every control character,
    ESC included, becomes a space."""
    return _CONTROLS.sub(" ", text)


def render_event(event: dict[str, Any], stream: Neutraliser | None = None) -> str:
    """Terminal text for one live event as watchers print it (markers in reverse video
    on their own line), with what could attack the operator's terminal removed. Pass the
    watch's ``stream`` so sequences cut between events are removed too."""
    kind = event.get("type")
    if kind == "o":
        data = str(event.get("data", ""))
        return stream.feed(data) if stream is not None else neutralise(data)
    if kind == "screen":
        return neutralise(str(event.get("data", "")))
    if kind == "m":
        return f"\r\n\x1b[7m castgate: {printable(str(event.get('data')))} \x1b[0m\r\n"
    if kind == "end":
        why = printable(str(event.get("data")))
        return f"\r\n\x1b[7m castgate: session ended ({why}) \x1b[0m\r\n"
    return ""
